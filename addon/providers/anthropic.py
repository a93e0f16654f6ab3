"""Anthropic Messages: `x-api-key`; input counts exclude cache reads and writes."""

import re
from typing import Any

from mitmproxy import http

from addon.providers.base import Adapter, Denial, Usage, UsageMeter, as_int, bearer, header

ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    413: "request_too_large",
    421: "invalid_request_error",
    429: "rate_limit_error",
    503: "api_error",
}


class AnthropicMeter(UsageMeter):
    """Input and cache counts from `message_start` (or a whole message); output from the latest
    `message_delta`, whose counts are cumulative: the latest wins, nothing is summed. Cache
    writes are split by TTL (`cache_creation`), since 1-hour writes cost more."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}

    def feed(self, event: str | None, data: Any) -> None:
        if not isinstance(data, dict):
            return
        kind = data.get("type")
        message = data.get("message") if kind == "message_start" else data
        if not isinstance(message, dict):
            return
        if isinstance(message.get("model"), str):
            self.model = message["model"]
        usage = message.get("usage")
        if not isinstance(usage, dict):
            return
        for name in (
            "input_tokens",
            "output_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ):
            if usage.get(name) is not None:
                self._counts[name] = as_int(usage[name])
        by_ttl = usage.get("cache_creation")
        if isinstance(by_ttl, dict) and by_ttl.get("ephemeral_1h_input_tokens") is not None:
            self._counts["cache_write_1h"] = as_int(by_ttl["ephemeral_1h_input_tokens"])

    def usage(self) -> Usage | None:
        if not self._counts:
            return None
        c = self._counts
        writes = c.get("cache_creation_input_tokens", 0)
        writes_1h = min(writes, c.get("cache_write_1h", 0))
        return Usage(
            input_tokens=c.get("input_tokens", 0),
            cached_input_tokens=c.get("cache_read_input_tokens", 0),
            cache_write_tokens=writes - writes_1h,
            cache_write_1h_tokens=writes_1h,
            output_tokens=c.get("output_tokens", 0),
            model=self.model,
        )


class AnthropicAdapter(Adapter):
    kind = "anthropic"
    unmetered_paths = re.compile(r"/messages/batches/?$")
    credential_header = b"x-api-key"

    def credential(self, request: http.Request) -> str | None:
        return header(request, b"x-api-key") or bearer(request)

    def max_output_tokens(self, request: http.Request, body: Any) -> int | None:
        value = body.get("max_tokens") if isinstance(body, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return None

    def meter(self) -> UsageMeter:
        return AnthropicMeter()

    def error_body(self, denial: Denial) -> dict[str, Any]:
        error: dict[str, Any] = {
            "type": ANTHROPIC_ERROR_TYPES.get(denial.status, "api_error"),
            "message": denial.message,
        }
        if denial.details:
            error["details"] = denial.details
        return {"type": "error", "error": error}
