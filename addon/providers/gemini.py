"""Google Gemini (generativelanguage): key in `x-goog-api-key` or `?key=`, model in the path."""

import re
from typing import Any
from urllib.parse import unquote

from mitmproxy import http

from addon.providers.base import Adapter, Denial, Usage, UsageMeter, as_int, dig, header

_MODEL = re.compile(r"/models/([^/:]+):")

GEMINI_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    413: "INVALID_ARGUMENT",
    421: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    503: "UNAVAILABLE",
}


class GeminiMeter(UsageMeter):
    """`usageMetadata` of the last chunk that has one; thoughts are billed as output."""

    def __init__(self) -> None:
        super().__init__()
        self._usage: dict | None = None

    def feed(self, event: str | None, data: Any) -> None:
        if isinstance(data, list):  # a whole streamed array read at once: its elements
            for item in data:
                self._feed_chunk(item)
        else:
            self._feed_chunk(data)

    def _feed_chunk(self, data: Any) -> None:
        # One level only: an array of arrays is no Gemini answer, and recursing into one
        # nested as deep as JSON allows would raise RecursionError.
        if not isinstance(data, dict):
            return
        if isinstance(data.get("modelVersion"), str):
            self.model = data["modelVersion"]
        usage = data.get("usageMetadata")
        if isinstance(usage, dict):
            self._usage = usage

    def usage(self) -> Usage | None:
        u = self._usage
        if u is None:
            return None
        prompt = as_int(u.get("promptTokenCount")) + as_int(u.get("toolUsePromptTokenCount"))
        cached = min(prompt, as_int(u.get("cachedContentTokenCount")))
        thoughts = as_int(u.get("thoughtsTokenCount"))
        return Usage(
            input_tokens=prompt - cached,
            cached_input_tokens=cached,
            output_tokens=as_int(u.get("candidatesTokenCount")) + thoughts,
            reasoning_tokens=thoughts,
            model=self.model,
        )


class GeminiAdapter(Adapter):
    kind = "gemini"
    unmetered_paths = re.compile(r":(batchGenerateContent|asyncBatchEmbedContent)$|/batches/?$")
    credential_header = b"x-goog-api-key"

    def credential(self, request: http.Request) -> str | None:
        found = header(request, b"x-goog-api-key")
        if found:
            return found
        return request.query.get("key") if "key=" in request.path else None

    def model(self, request: http.Request, body: Any) -> str | None:
        # The path only, as the provider reads it: decoded (`%3A`), never the query.
        match = _MODEL.search(unquote(request.path.partition("?")[0]))
        return match.group(1) if match else None

    def max_output_tokens(self, request: http.Request, body: Any) -> int | None:
        config = dig(body, "generationConfig") or dig(body, "generation_config")
        value = None
        if isinstance(config, dict):
            value = config.get("maxOutputTokens", config.get("max_output_tokens"))
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return None

    def is_stream(self, request: http.Request, response: http.Response) -> bool:
        return super().is_stream(request, response) or ":streamGenerateContent" in request.path

    def stream_framing(self, request: http.Request, response: http.Response) -> str:
        content_type = response.headers.get("content-type", "")
        return "sse" if content_type.startswith("text/event-stream") else "json_array"

    def meter(self) -> UsageMeter:
        return GeminiMeter()

    def error_body(self, denial: Denial) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": denial.status,
            "message": denial.message,
            "status": GEMINI_STATUS.get(denial.status, "UNKNOWN"),
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID" if denial.status == 401
                    else denial.error_type.upper(),
                    "domain": "aigw",
                    "metadata": {k: str(v) for k, v in (denial.details or {}).items()},
                }
            ],
        }
        return {"error": error}
