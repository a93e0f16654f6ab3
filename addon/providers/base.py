"""What every provider adapter answers: where the credential is, what the model is, how usage is
read (whole body or stream events), and what a native error looks like."""

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from mitmproxy import http


class Usage(NamedTuple):
    """Billable token counts, normalised across providers. (A named tuple: one is built per
    request, and a frozen dataclass costs four times as much to build.)"""

    input_tokens: int = 0  # uncached input, billed at the input price
    cached_input_tokens: int = 0  # cached prompt tokens / cache reads
    cache_write_tokens: int = 0  # Anthropic cache writes (5-minute TTL)
    cache_write_1h_tokens: int = 0  # Anthropic cache writes with a 1-hour TTL
    output_tokens: int = 0  # reasoning/thinking tokens included
    reasoning_tokens: int = 0  # informational: already inside output_tokens
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Denial:
    """A gateway answer in place of the provider's: status, a machine type, a human message."""

    status: int
    error_type: str  # seed types: invalid_api_key, key_quota_exceeded, ...
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    details: dict[str, Any] | None = None


class UsageMeter:
    """Accumulates usage from a response: `feed` each parsed JSON body or stream event."""

    def __init__(self) -> None:
        self.model: str | None = None

    def feed(self, event: str | None, data: Any) -> None:
        raise NotImplementedError

    def usage(self) -> Usage | None:
        """The usage seen so far, or None if the response carried none."""
        raise NotImplementedError


# No response bills a trillion tokens of one kind. A count is capped there, so the sum of a
# response's counts, and the rate windows' sums of them, stay far inside the ledger's 64-bit
# integers whatever a provider (or whatever answers in its place) writes.
MAX_TOKENS = 10**12


def as_int(value: Any) -> int:
    """A token count from JSON: a non-negative int, at most MAX_TOKENS (a larger count is
    capped: charged at the most, never at nothing); anything else (bool, null, text, NaN) is 0."""
    if type(value) is int:  # the common case first; bool is not int here
        return (value if value < MAX_TOKENS else MAX_TOKENS) if value > 0 else 0
    if isinstance(value, float) and value > 0:  # not NaN; infinity is capped
        return int(min(value, MAX_TOKENS))
    if isinstance(value, int) and not isinstance(value, bool):  # an int subclass
        return min(max(0, int(value)), MAX_TOKENS)
    return 0


def dig(data: Any, *path: str) -> Any:
    for name in path:
        if not isinstance(data, dict):
            return None
        data = data.get(name)
    return data


# Every place any API kind reads a credential from. All of them are removed from a request before
# it is forwarded, whatever its kind: a gateway key left in one the provider ignores today is still
# a gateway key sent to a third party.
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key")
CREDENTIAL_QUERY = ("key", "api-key", "api_key")
REDACTED = "<redacted>"
_REDACTED_BYTES = REDACTED.encode()


def _query_holds_credential(request: http.Request) -> bool:
    return "?" in request.path  # cheap pre-check before mitmproxy parses the query


def redact_credentials(request: http.Request) -> None:
    """Replace every credential the request holds with `<redacted>`, in place: for a flow that
    was refused, or one already sent upstream (so no log, saved flow or UI shows one)."""
    # The response hooks redact twice (a flow may skip `responseheaders`): the second finds
    # only `<redacted>` and leaves the fields alone (mitmproxy rebuilds them on every set).
    fields = request.headers.fields
    if any(v != _REDACTED_BYTES and k.lower() in CREDENTIAL_HEADERS for k, v in fields):
        request.headers.fields = tuple(
            (k, _REDACTED_BYTES) if k.lower() in CREDENTIAL_HEADERS else (k, v)
            for k, v in fields
        )
    if _query_holds_credential(request):
        query = request.query
        if any(v != REDACTED and _is_credential_name(k) for k, v in query.items(True)):
            query.fields = tuple(  # names as decoded: `%6Bey` is `key` too
                (k, REDACTED) if _is_credential_name(k) else (k, v) for k, v in query.items(True))


def remove_credentials(request: http.Request) -> None:
    """Remove every credential the request holds, in any place any API kind reads one."""
    _remove_query_credentials(request)
    fields = request.headers.fields
    if any(k.lower() in CREDENTIAL_HEADERS for k, _ in fields):
        request.headers.fields = tuple((k, v) for k, v in fields
                                       if k.lower() not in CREDENTIAL_HEADERS)


def _remove_query_credentials(request: http.Request) -> None:
    if _query_holds_credential(request):
        query = request.query
        if any(_is_credential_name(name) for name in query):
            query.fields = tuple(
                (k, v) for k, v in query.items(True) if not _is_credential_name(k))


def _is_credential_name(name: str) -> bool:
    return name.strip().lower() in CREDENTIAL_QUERY


class Adapter:
    """One API kind. Subclasses set `kind` and implement the hooks below."""

    kind: ClassVar[str]
    # The header the provider reads its credential from, and the value's prefix.
    credential_header: ClassVar[bytes] = b"authorization"
    credential_prefix: ClassVar[str] = ""

    def credential(self, request: http.Request) -> str | None:
        """The credential the client presented, or None."""
        raise NotImplementedError

    def set_credential(self, request: http.Request, secret: str) -> None:
        """Remove every credential the client sent (any header or query parameter any API kind
        reads) and put `secret` where the provider wants it."""
        _remove_query_credentials(request)
        replace_headers(
            request, CREDENTIAL_HEADERS, (self.credential_header, self.credential_prefix + secret)
        )

    # Endpoints billed after the request (batch and fine-tuning jobs): their cost never shows
    # in the response, so the gateway cannot meter them and does not forward them.
    unmetered_paths: ClassVar[re.Pattern | None] = None

    def is_unmetered(self, request: http.Request) -> bool:
        """Whether the request starts work billed later, which the gateway cannot meter."""
        pattern = self.unmetered_paths
        return (pattern is not None and request.method == "POST"
                and pattern.search(request.path.partition("?")[0]) is not None)

    def model(self, request: http.Request, body: Any) -> str | None:
        value = body.get("model") if isinstance(body, dict) else None
        return value if isinstance(value, str) and value else None

    def max_output_tokens(self, request: http.Request, body: Any) -> int | None:
        raise NotImplementedError

    def is_stream(self, request: http.Request, response: http.Response) -> bool:
        """Whether the response is a stream to meter event by event (never buffered)."""
        content_type = header(response, b"content-type")
        return content_type is not None and content_type.startswith("text/event-stream")

    def stream_framing(self, request: http.Request, response: http.Response) -> str:
        """`sse` or `json_array`."""
        return "sse"

    def meter(self) -> UsageMeter:
        raise NotImplementedError

    def request_stream_usage(self, request: http.Request, body: Any) -> bool:
        """Ask the provider for usage in a stream the client did not ask it for; True if the
        request was changed (the gateway must then drop that usage event from the stream)."""
        return False

    def is_usage_only_event(self, data: Any) -> bool:
        """Whether a parsed stream event is the usage event `request_stream_usage` asked for."""
        return False

    def error_body(self, denial: Denial) -> dict[str, Any]:
        raise NotImplementedError

    def deny(self, denial: Denial) -> http.Response:
        """The denial as this provider would have answered it."""
        body = json.dumps(self.error_body(denial)).encode()
        headers = {"content-type": "application/json", **dict(denial.headers)}
        return http.Response.make(denial.status, body, headers)


def header(message: http.Message, name: bytes) -> str | None:
    """The first value of a header (`name` in lower case), read straight from the raw fields:
    far cheaper than mitmproxy's Headers mapping on the request path."""
    for key, value in message.headers.fields:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def replace_headers(
    message: http.Message, remove: tuple[bytes, ...], add: tuple[bytes, str]
) -> None:
    """Drop every header named in `remove` (lower case) and append one, in a single pass."""
    fields = [(k, v) for k, v in message.headers.fields if k.lower() not in remove]
    fields.append((add[0], add[1].encode("latin-1")))
    message.headers.fields = tuple(fields)


def bearer(request: http.Request) -> str | None:
    value = header(request, b"authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip(" \t")  # HTTP's whitespace only: a key with a trailing \xa0 stays wrong
    if scheme.lower() == "bearer" and token:
        return token
    return None
