"""Property tests of metering and settlement: any response body, encoding or stream a provider (or
whatever answers in its place) sends, at addon level (taddons/tflow, the real hooks and ledger).

The properties, for every adapter: no hook raises; the request is settled exactly once (its
reservation released, one usage record, the ledger written, nothing left to retry); the
recorded token counts and cost are non-negative ints in the ledger's 64-bit range; an internal
fault (an exception other than corrupt compression) is never what decided the charge; the same
stream split differently meters the same."""

import gzip
import json
import logging
import zlib
from collections.abc import Iterator

import brotli
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from addon import gateway as gateway_module
from addon import settlement
from addon.gateway import Gateway
from addon.metering import StreamTap, usage_from_body
from addon.pricing import MAX_COST_NUSD
from addon.providers import ADAPTERS
from addon.providers.base import MAX_TOKENS
from addon.streams import zstd
from store.money import month_of, utc_now
from tests.support.fuzz import fuzz_gateway, run
from tests.support.fuzz import json_values as json_values_of
from tests.support.seed import seed

INT64_MAX = 2**63 - 1


# (provider, host, path, credential header, request body) per API kind, streamed or not.
ENDPOINTS = {
    "openai": ("api.openai.com", "/v1/chat/completions", "authorization"),
    "openai_responses": ("api.openai.com", "/v1/responses", "authorization"),
    "azure": ("fuzz.openai.azure.com",
              "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "api-key"),
    "anthropic": ("api.anthropic.com", "/v1/messages", "x-api-key"),
    "gemini": ("generativelanguage.googleapis.com",
               "/v1beta/models/gemini-2.5-flash:generateContent", "x-goog-api-key"),
    "gemini_stream": ("generativelanguage.googleapis.com",
                      "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "x-goog-api-key"),
}
KIND_OF = {"openai": "openai", "openai_responses": "openai", "azure": "azure_openai",
           "anthropic": "anthropic", "gemini": "gemini", "gemini_stream": "gemini"}

ENCODERS = {
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
}
# What a decoder may legitimately fail with: the body is not what its encoding says.
DECODE_ERRORS = (zlib.error, brotli.error, zstd.ZstdError, ValueError)


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    with fuzz_gateway(tmp_path_factory.mktemp("fuzz_metering")) as gateway:
        gateway.seeded = seed(gateway.store, org_budget=None, user_limit=None)
        yield gateway


# --- strategies -----------------------------------------------------------------------------

# A token count as a provider, or anything answering in its place, might write it.
counts = st.one_of(
    st.integers(min_value=0, max_value=10**7),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=10**11, max_value=2**70),  # past what the ledger holds, once priced
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -1, -(2**63)]),
    st.floats(allow_nan=False),  # JSON has no NaN or Infinity; 1e300 it has
    st.sampled_from([1e17, 1e18, 1e300, 0.5, -0.0]),
    st.sampled_from(["NaN", "Infinity", "-1", "12", "", "1e9"]),
    st.none(), st.booleans(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.none(),
                                                         max_size=2),
)
USAGE_NAMES = {
    "openai": ["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens",
               "output_tokens"],
    "anthropic": ["input_tokens", "output_tokens", "cache_creation_input_tokens",
                  "cache_read_input_tokens"],
    "gemini": ["promptTokenCount", "candidatesTokenCount", "cachedContentTokenCount",
               "thoughtsTokenCount", "toolUsePromptTokenCount", "totalTokenCount"],
}
DETAILS = {
    "openai": [("prompt_tokens_details", "cached_tokens"),
               ("completion_tokens_details", "reasoning_tokens"),
               ("input_tokens_details", "cached_tokens"),
               ("output_tokens_details", "reasoning_tokens")],
    "anthropic": [("cache_creation", "ephemeral_1h_input_tokens")],
    "gemini": [],
}
json_values = json_values_of(max_leaves=12)
models = st.one_of(st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-flash",
                                    "expensive", "unknown-model"]), json_values)


def family(kind: str) -> str:
    return "openai" if kind == "azure_openai" else kind


@st.composite
def usage_objects(draw, kind: str) -> dict:
    """A usage object with the adapter's own field names and values of any type or size."""
    fam = family(kind)
    names = draw(st.lists(st.sampled_from(USAGE_NAMES[fam]), unique=True, max_size=6))
    usage: dict = {name: draw(counts) for name in names}
    for outer, inner in DETAILS[fam]:
        if draw(st.booleans()):
            usage[outer] = draw(st.one_of(st.none(), st.just({inner: draw(counts)}),
                                          json_values))
    return usage


@st.composite
def usage_documents(draw, kind: str) -> dict:
    """A response body (or stream event) shaped as the adapter reads usage from it."""
    fam = family(kind)
    usage = draw(st.one_of(usage_objects(kind), json_values))
    model = draw(models)
    if fam == "openai":
        shape = draw(st.sampled_from(["chat", "responses_event", "choices_empty"]))
        if shape == "responses_event":
            return {"type": draw(st.one_of(st.sampled_from(
                ["response.completed", "response.incomplete", "response.failed"]), json_values)),
                "response": {"model": model, "usage": usage}}
        return {"model": model, "choices": [] if shape == "choices_empty" else [{}],
                "usage": usage}
    if fam == "anthropic":
        if draw(st.booleans()):
            return {"type": "message_start", "message": {"model": model, "usage": usage}}
        return {"type": draw(st.sampled_from(["message_delta", "message", None])),
                "usage": usage}
    return {"modelVersion": model, "usageMetadata": usage, "candidates": []}


def bodies(kind: str) -> st.SearchStrategy[bytes]:
    """A whole response body: random bytes, any JSON, or a usage document of any values."""
    return st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        usage_documents(kind).map(lambda v: json.dumps(v).encode()),
        st.lists(usage_documents(kind), max_size=3).map(lambda v: json.dumps(v).encode()),
        # Nested as deep as orjson reads (1024), and past it.
        st.sampled_from([1, 2, 999, 1000, 1023, 1024, 1025]).map(lambda n: b"[" * n + b"]" * n),
    )


@st.composite
def sse_streams(draw, kind: str) -> bytes:
    """SSE with random and usage-bearing events, comments, odd fields and line ends."""
    newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    lines: list[bytes] = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        what = draw(st.sampled_from(["usage", "json", "text", "comment", "done", "field"]))
        if draw(st.booleans()):
            lines.append(b"event: " + draw(st.sampled_from(
                [b"message_start", b"message_delta", b"ping", b"x"])))
        if what == "usage":
            lines.append(b"data: " + json.dumps(draw(usage_documents(kind))).encode())
        elif what == "json":
            lines.append(b"data: " + json.dumps(draw(json_values)).encode())
        elif what == "text":
            lines.append(b"data: " + draw(st.text(max_size=20)).encode()
                         .replace(b"\r", b"").replace(b"\n", b""))
        elif what == "comment":
            lines.append(b": keep-alive")
        elif what == "done":
            lines.append(b"data: [DONE]")
        else:
            lines.append(draw(st.sampled_from([b"id: 7", b"retry: 10", b"data", b"datax: 1"])))
        lines.append(b"")
    wire = newline.join(lines)
    return wire + (newline if lines and draw(st.booleans()) else b"")


@st.composite
def json_array_streams(draw, kind: str) -> bytes:
    items = draw(st.lists(st.one_of(usage_documents(kind), json_values), max_size=4))
    wire = b"[" + b",\r\n".join(json.dumps(i).encode() for i in items)
    return wire + (b"]" if draw(st.booleans()) else b"")  # a stream may end early


cuts = st.lists(st.integers(min_value=0, max_value=5000), max_size=12)
statuses = st.sampled_from([200, 200, 200, 400, 429, 500])


def split(data: bytes, cut: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cut})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@st.composite
def encodings(draw, body: bytes, known: bool = False) -> tuple[str | None, bytes]:
    """(content-encoding, wire bytes): identity, a real encoding, a chain, a lie, an unknown
    one (not with `known`: a tap is never made for it)."""
    choice = draw(st.sampled_from(["none", "one", "chain", "lie", *([] if known else
                                                                    ["unknown"])]))
    if choice == "none":
        return None, body
    if choice == "one":
        name = draw(st.sampled_from(sorted(ENCODERS)))
        return name, ENCODERS[name](body)
    if choice == "chain":
        return "gzip, br", brotli.compress(gzip.compress(body))
    if choice == "lie":
        return draw(st.sampled_from(sorted(ENCODERS))), body  # says gzip, is not
    return draw(st.sampled_from(["compress", "x-bogus", "gzip;q=1", ","])), body


# --- driving one request --------------------------------------------------------------------


def request_flow(gw: Gateway, endpoint: str, stream: bool) -> http.HTTPFlow:
    host, path, credential = ENDPOINTS[endpoint]
    key = gw.seeded.api_key
    value = f"Bearer {key}" if credential == "authorization" else key
    body = {"model": "gpt-4o", "max_tokens": 50, "messages": [], "stream": stream}
    req = tutils.treq(host=host, port=443, scheme=b"https", method=b"POST", path=path.encode(),
                      headers=http.Headers([(b"content-type", b"application/json"),
                                            (credential.encode(), value.encode())]),
                      content=json.dumps(body).encode())
    flow = tflow.tflow(req=req)
    flow.client_conn.sni = host
    flow.server_conn.address = (host, 443)
    flow.server_conn.timestamp_tcp_setup = 1.0  # it reached the provider
    return flow


class Settlements:
    """What the settler told its observer, per flow."""

    def __init__(self, gw: Gateway) -> None:
        self.seen: list[tuple[str, object, bool]] = []
        self._next = gw.settler.observer

    def __call__(self, flow, flight, entry, written) -> None:
        self.seen.append((flow.id, entry, written))
        if self._next is not None:
            self._next(flow, flight, entry, written)


def settle_one(gw: Gateway, caplog, endpoint: str, status: int, encoding: str | None,
               wire: bytes, content_type: str, chunks: list[bytes] | None):
    """Admit one request, answer it with `wire` (streamed in `chunks`, or whole), run the
    response hooks; check the settlement properties; return the usage record."""
    s = gw.seeded
    levels = [("key", s.key_id), ("user", s.user_id), ("org", s.org_id)]
    month = month_of(utc_now())
    before = gw.store.ledger.counters(levels, month)
    held = len(gw.store.ledger.reservations())  # left by an earlier failing example, if any
    flow = request_flow(gw, endpoint, stream=chunks is not None)
    run(gw.request(flow))
    gw.injector.request(flow)
    assert flow.response is None, "the request was not admitted"
    assert len(gw.store.ledger.reservations()) == held + 1

    observed = Settlements(gw)
    gw.settler.observer = observed
    faults: list[BaseException] = []
    caplog.clear()
    with pytest.MonkeyPatch.context() as mp:
        for module in (settlement, gateway_module):
            mp.setattr(module, "log_fault", lambda what, exc: faults.append(exc))
        headers = [(b"content-type", content_type.encode())]
        if encoding is not None:
            headers.append((b"content-encoding", encoding.encode()))
        flow.response = tutils.tresp(status_code=status, headers=http.Headers(headers),
                                     content=None if chunks is not None else wire)
        gw.responseheaders(flow)
        stream = flow.response.stream
        if chunks is not None:
            if callable(stream):
                for chunk in chunks:
                    stream(chunk)
                stream(b"")
            else:  # not tapped (an encoding it cannot decode): mitmproxy reads it whole
                flow.response.raw_content = wire
        run(gw.response(flow))
    gw.settler.observer = observed._next

    faults += [r.exc_info[1] for r in caplog.records if r.exc_info and r.levelno >= logging.ERROR]
    for exc in faults:
        assert isinstance(exc, DECODE_ERRORS), f"an internal fault decided the charge: {exc!r}"
    assert [(fid, written) for fid, _, written in observed.seen] == [(flow.id, True)], \
        "settled exactly once, and written"
    assert gw.settler.unsettled == []
    assert len(gw.store.ledger.reservations()) == held
    entry = observed.seen[0][1]
    for name in ("input", "cached_input", "cache_write", "cache_write_1h", "output",
                 "reasoning", "cost_nusd"):
        value = getattr(entry, name)
        assert type(value) is int and 0 <= value <= INT64_MAX, (name, value)
    after = gw.store.ledger.counters(levels, month)
    for b, a in zip(before, after, strict=True):
        assert a.requests == b.requests + 1
        assert a.used_nusd == b.used_nusd + entry.cost_nusd
        assert a.reserved_nusd == 0
    return entry


COMMON = settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow])


# --- the properties -------------------------------------------------------------------------


@COMMON
@given(data=st.data(), endpoint=st.sampled_from(sorted(ENDPOINTS)), status=statuses)
def test_any_whole_body_is_settled_once_within_range(gw, caplog, data, endpoint, status):
    body = data.draw(bodies(KIND_OF[endpoint]))
    encoding, wire = data.draw(encodings(body))
    content_type = data.draw(st.sampled_from(["application/json", "text/plain", ""]))
    entry = settle_one(gw, caplog, endpoint, status, encoding, wire, content_type, None)
    if status >= 400 and entry.estimated:
        assert entry.cost_nusd == 0  # providers do not bill refused requests


@COMMON
@given(data=st.data(), endpoint=st.sampled_from(["openai", "openai_responses", "azure",
                                                 "anthropic", "gemini"]),
       status=statuses, cut=cuts)
def test_any_sse_stream_is_settled_once_within_range(gw, caplog, data, endpoint, status, cut):
    wire = data.draw(sse_streams(KIND_OF[endpoint]))
    encoding, encoded = data.draw(encodings(wire))
    settle_one(gw, caplog, endpoint, status, encoding, encoded, "text/event-stream",
               split(encoded, cut))


@COMMON
@given(data=st.data(), status=statuses, cut=cuts)
def test_any_gemini_streamed_array_is_settled_once_within_range(gw, caplog, data, status, cut):
    wire = data.draw(st.one_of(json_array_streams("gemini"), st.binary(max_size=100)))
    encoding, encoded = data.draw(encodings(wire))
    settle_one(gw, caplog, "gemini_stream", status, encoding, encoded, "application/json",
               split(encoded, cut))


def tap_usage(kind: str, framing: str, encoding: str | None, encoded: bytes,
              chunks: list[bytes], drop: bool = False):
    adapter = ADAPTERS[kind]()
    tap = StreamTap(adapter.meter(), encoding, framing,
                    adapter.is_usage_only_event if drop else None)
    for chunk in chunks:
        tap(chunk)
    tap(b"")
    return tap.usage(), tap.failed


@settings(max_examples=150, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(ADAPTERS)), cut_a=cuts, cut_b=cuts,
       drop=st.booleans())
def test_the_same_sse_bytes_split_differently_meter_the_same(data, kind, cut_a, cut_b, drop):
    wire = data.draw(sse_streams(kind))
    encoding, encoded = data.draw(encodings(wire, known=True))
    whole = tap_usage(kind, "sse", encoding, encoded, [encoded], drop)
    assert tap_usage(kind, "sse", encoding, encoded, split(encoded, cut_a), drop) == whole
    assert tap_usage(kind, "sse", encoding, encoded, split(encoded, cut_b), drop) == whole


@settings(max_examples=150, deadline=None)
@given(data=st.data(), cut_a=cuts, cut_b=cuts)
def test_the_same_gemini_array_split_differently_meters_the_same(data, cut_a, cut_b):
    wire = data.draw(json_array_streams("gemini"))
    encoding, encoded = data.draw(encodings(wire, known=True))
    whole = tap_usage("gemini", "json_array", encoding, encoded, [encoded])
    assert tap_usage("gemini", "json_array", encoding, encoded, split(encoded, cut_a)) == whole
    assert tap_usage("gemini", "json_array", encoding, encoded, split(encoded, cut_b)) == whole


@settings(max_examples=200, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(ADAPTERS)))
def test_usage_read_from_any_document_is_in_range(data, kind):
    """The adapters' own reading, without the ledger: every count a non-negative int that fits
    the ledger, whatever the document says."""
    body = json.dumps(data.draw(usage_documents(kind))).encode()
    response = tutils.tresp(headers=http.Headers(content_type="application/json"),
                            content=body)
    usage = usage_from_body(ADAPTERS[kind](), response)
    if usage is not None:
        for value in usage[:6]:
            assert type(value) is int and 0 <= value <= INT64_MAX


# --- what the properties found, kept as plain regression tests --------------------------------


@pytest.mark.parametrize("count", [2**63, 2**64 - 1, 1e17, 1e300])
@pytest.mark.parametrize("endpoint", ["openai", "anthropic", "gemini"])
def test_a_count_past_the_ledgers_range_is_settled_at_the_capped_cost(gw, caplog, endpoint,
                                                                     count):
    """`prompt_tokens: 2**63` priced as is overflowed the ledger's 64-bit counters: the write
    failed and was retried forever, the reservation never released."""
    usage = {"openai": {"prompt_tokens": count}, "anthropic": {"input_tokens": count},
             "gemini": {"promptTokenCount": count}}[endpoint]
    body = {"openai": {"model": "gpt-4o", "choices": [], "usage": usage},
            "anthropic": {"type": "message", "model": "gpt-4o", "usage": usage},
            "gemini": {"modelVersion": "gpt-4o", "usageMetadata": usage}}[endpoint]
    entry = settle_one(gw, caplog, endpoint, 200, None, json.dumps(body).encode(),
                       "application/json", None)
    assert entry.input == MAX_TOKENS and not entry.estimated
    assert entry.cost_nusd == MAX_COST_NUSD  # 10**12 tokens at $2.5 per 1M: over $1M


def test_a_responses_body_with_a_type_that_is_no_string_is_metered(gw, caplog):
    """`"type": null` beside a `response` object raised AttributeError in the OpenAI meter:
    the request was charged its reservation instead of its usage."""
    body = {"type": None, "response": {}, "model": "gpt-4o", "usage": {"prompt_tokens": 10}}
    entry = settle_one(gw, caplog, "openai", 200, None, json.dumps(body).encode(),
                       "application/json", None)
    assert entry.input == 10 and not entry.estimated


def test_arrays_nested_as_deep_as_json_allows_are_no_fault(gw, caplog):
    """The Gemini meter recursed into nested arrays: 1,000 deep raised RecursionError."""
    entry = settle_one(gw, caplog, "gemini", 200, None, b"[" * 1024 + b"]" * 1024,
                       "application/json", None)
    assert entry.estimated
