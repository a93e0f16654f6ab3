"""Incremental stream readers: any chunking, any content-encoding, the same events."""

import gzip
import json
import zlib

import brotli
from hypothesis import given, settings
from hypothesis import strategies as st

from addon.metering import StreamTap
from addon.providers import ADAPTERS
from addon.streams import Decoder, JSONArrayParser, SSEParser, zstd

ENCODERS = {
    None: lambda b: b,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstd.compress,
}

OPENAI_STREAM = "".join(
    f"data: {json.dumps(chunk)}\n\n"
    for chunk in [
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "usage": None,
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "usage": None,
         "choices": [{"index": 0, "delta": {"content": "Grüße, 世界 🌍"}}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "usage": None,
         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o", "choices": [],
         "usage": {"prompt_tokens": 1200, "completion_tokens": 37, "total_tokens": 1237,
                   "prompt_tokens_details": {"cached_tokens": 1024}}},
    ]
).encode() + b"data: [DONE]\n\n"

ANTHROPIC_STREAM = (
    b"event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"model\":"
    b"\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":10,"
    b"\"cache_read_input_tokens\":500,\"output_tokens\":1}}}\r\n\r\n"
    b"event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n"
    b": a comment line\r\n"
    b"event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,"
    b"\"delta\":{\"type\":\"text_delta\",\"text\":\"h\\u00e9llo\"}}\r\n\r\n"
    b"event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":"
    b"\"end_turn\"},\"usage\":{\"output_tokens\":15}}\r\n\r\n"
    b"event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":"
    b"42}}\r\n\r\n"
    b"event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n"
)

GEMINI_ARRAY = (
    b'[{"candidates": [{"content": {"parts": [{"text": "a ] \\" }"}]}}],'
    b' "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}, "modelVersion": "gemini-2.5-flash"}\r\n'
    b',\r\n{"candidates": [{"content": {"parts": [{"text": "b"}]}}],'
    b' "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 30, "thoughtsTokenCount": 12,'
    b' "cachedContentTokenCount": 2, "totalTokenCount": 50}, "modelVersion": "gemini-2.5-flash"}\r\n]'
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=40)
encodings = st.sampled_from(list(ENCODERS))


def run_tap(kind: str, body: bytes, encoding: str | None, cut: list[int], framing="sse"):
    encoded = ENCODERS[encoding](body)
    tap = StreamTap(ADAPTERS[kind]().meter(), encoding, framing)
    out = b"".join(tap(piece) for piece in split(encoded, cut)) + tap(b"")
    assert out == encoded  # the client gets exactly what the provider sent
    assert not tap.failed
    return tap.usage()


@settings(max_examples=150, deadline=None)
@given(cut=cuts, encoding=encodings)
def test_openai_stream_usage_survives_any_chunking(cut, encoding):
    usage = run_tap("openai", OPENAI_STREAM, encoding, cut)
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (176, 1024, 37)
    assert usage.model == "gpt-4o"


@settings(max_examples=150, deadline=None)
@given(cut=cuts, encoding=encodings)
def test_anthropic_stream_takes_the_latest_cumulative_output(cut, encoding):
    usage = run_tap("anthropic", ANTHROPIC_STREAM, encoding, cut)
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens,
            usage.output_tokens) == (25, 500, 10, 42)


@settings(max_examples=150, deadline=None)
@given(cut=cuts, encoding=encodings)
def test_gemini_streamed_array_uses_the_last_usage(cut, encoding):
    usage = run_tap("gemini", GEMINI_ARRAY, encoding, cut, framing="json_array")
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
            usage.reasoning_tokens) == (6, 2, 42, 12)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from([None, "delta", "done"]), st.text(max_size=40)),
        max_size=12,
    ),
    cut=cuts,
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_sse_parser_yields_the_same_events_for_any_chunking(events, cut, newline):
    lines = []
    expected = []
    for name, data in events:
        data = data.replace("\r", "").replace("\n", "")
        if name:
            lines.append(f"event: {name}")
        lines.append(f"data: {data}")
        lines.append("")
        expected.append((name, data))
    wire = newline.join(lines).encode() + (newline.encode() if lines else b"")
    parser = SSEParser()
    got = [e for piece in split(wire, cut) for e in parser.feed(piece)] + list(parser.close())
    assert got == expected


@settings(max_examples=150, deadline=None)
@given(
    items=st.lists(
        # 64-bit integers: orjson reads larger ones as floats (no provider sends them)
        st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=12), INT64,
                                                       st.lists(INT64, max_size=3)),
                        max_size=4),
        max_size=6,
    ),
    cut=cuts,
)
def test_json_array_parser_yields_each_element(items, cut):
    wire = ("[" + ",\r\n".join(json.dumps(i, ensure_ascii=False) for i in items) + "]").encode()
    parser = JSONArrayParser()
    assert [e for piece in split(wire, cut) for e in parser.feed(piece)] == items


@given(garbage=st.binary(max_size=300), cut=cuts)
def test_garbage_never_breaks_the_stream(garbage, cut):
    tap = StreamTap(ADAPTERS["openai"]().meter(), None, "sse")
    out = b"".join(tap(piece) for piece in split(garbage, cut)) + tap(b"")
    assert out == garbage


def test_corrupt_compression_marks_the_tap_failed_but_passes_bytes():
    tap = StreamTap(ADAPTERS["openai"]().meter(), "gzip", "sse")
    assert tap(b"definitely not gzip") == b"definitely not gzip"
    assert tap.failed and tap.usage() is None


def test_decoder_chain_undoes_encodings_in_reverse():
    body = b"data: x\n\n"
    encoded = brotli.compress(gzip.compress(body))
    assert Decoder("gzip, br").decode(encoded) == body


@settings(max_examples=150, deadline=None)
@given(cut=cuts, encoding=encodings)
def test_injected_usage_event_is_dropped_under_any_chunking(cut, encoding):
    adapter = ADAPTERS["openai"]()
    tap = StreamTap(adapter.meter(), encoding, "sse", adapter.is_usage_only_event)
    out = []
    for piece in split(ENCODERS[encoding](OPENAI_STREAM), cut):
        if not piece:
            continue
        sent = tap(piece)
        assert isinstance(sent, list) and b"" not in sent  # an empty chunk would end the body
        out.extend(sent)
    out.extend(tap(b""))
    usage_event = OPENAI_STREAM.split(b"\n\n")[3] + b"\n\n"
    assert b"".join(out) == OPENAI_STREAM.replace(usage_event, b"")  # decoded, minus usage
    assert tap.usage().output_tokens == 37
