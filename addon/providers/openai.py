"""OpenAI (Chat Completions, Responses, embeddings) and every OpenAI-compatible host."""

import json
import re
from typing import Any

from mitmproxy import http

from addon.providers.base import Adapter, Denial, Usage, UsageMeter, as_int, bearer, dig

OPENAI_ERROR_CODES = {401: "invalid_api_key", 429: "insufficient_quota"}


class OpenAIMeter(UsageMeter):
    """Chat Completions (`usage.prompt_tokens`) and Responses (`usage.input_tokens`, in the
    `response` of response.completed / incomplete / failed events)."""

    def __init__(self) -> None:
        super().__init__()
        self._usage: dict | None = None

    def feed(self, event: str | None, data: Any) -> None:
        if not isinstance(data, dict):
            return
        response, kind = data.get("response"), data.get("type")
        if isinstance(response, dict) and isinstance(kind, str) and kind.startswith("response."):
            data = response
        if isinstance(data.get("model"), str):
            self.model = data["model"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            self._usage = usage

    def usage(self) -> Usage | None:
        u = self._usage
        if u is None:
            return None
        if "prompt_tokens" in u or "completion_tokens" in u:
            prompt = as_int(u.get("prompt_tokens"))
            cached = min(prompt, as_int(dig(u, "prompt_tokens_details", "cached_tokens")))
            return Usage(
                input_tokens=prompt - cached,
                cached_input_tokens=cached,
                output_tokens=as_int(u.get("completion_tokens")),
                reasoning_tokens=as_int(dig(u, "completion_tokens_details", "reasoning_tokens")),
                model=self.model,
            )
        prompt = as_int(u.get("input_tokens"))
        cached = min(prompt, as_int(dig(u, "input_tokens_details", "cached_tokens")))
        return Usage(
            input_tokens=prompt - cached,
            cached_input_tokens=cached,
            output_tokens=as_int(u.get("output_tokens")),
            reasoning_tokens=as_int(dig(u, "output_tokens_details", "reasoning_tokens")),
            model=self.model,
        )


class OpenAIAdapter(Adapter):
    kind = "openai"
    unmetered_paths = re.compile(r"/(batches|fine_tuning/jobs)/?$")
    credential_header = b"authorization"
    credential_prefix = "Bearer "

    def credential(self, request: http.Request) -> str | None:
        return bearer(request)

    def max_output_tokens(self, request: http.Request, body: Any) -> int | None:
        if not isinstance(body, dict):
            return None
        for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def meter(self) -> UsageMeter:
        return OpenAIMeter()

    def request_stream_usage(self, request: http.Request, body: Any) -> bool:
        # Chat Completions only: the Responses API rejects stream_options (and always reports
        # usage in response.completed).
        if not (isinstance(body, dict) and body.get("stream") is True
                and request.path.split("?")[0].endswith("/chat/completions")):
            return False
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return False
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
        request.content = json.dumps(body).encode()
        return True

    def is_usage_only_event(self, data: Any) -> bool:
        return (isinstance(data, dict) and data.get("choices") == []
                and isinstance(data.get("usage"), dict))

    def error_body(self, denial: Denial) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": denial.message,
            "type": "invalid_request_error" if denial.status == 401 else denial.error_type,
            "param": None,
            "code": denial.error_type if denial.error_type == "rate_limit_exceeded"
            else OPENAI_ERROR_CODES.get(denial.status, denial.error_type),
        }
        if denial.details:
            error["details"] = denial.details
        return {"error": error}
