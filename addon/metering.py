"""Reading usage from responses: whole JSON bodies, and streams tapped as they pass through."""

import logging
import re
from collections.abc import Callable
from typing import Any

import orjson
from mitmproxy import http

from addon.providers.base import Adapter, Usage, UsageMeter, header
from addon.streams import (
    MAX_EVENT_BYTES,
    Decoder,
    JSONArrayParser,
    SSEBlocks,
    SSEEventSplitter,
    SSEParser,
)

log = logging.getLogger("aigw.metering")

BYTES_PER_TOKEN = 4  # rough size of a token, for estimates only


def parse_json(raw: bytes | None) -> Any:
    """The JSON value of a body, or None when it is empty or not JSON."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        return None


def body_of(message: http.Message) -> bytes | None:
    """A message's body, decoded if it is content-encoded (None if it cannot be decoded)."""
    if header(message, b"content-encoding") is None:
        return message.raw_content
    try:
        return message.get_content(strict=False)
    except ValueError:
        return None


def usage_from_body(adapter: Adapter, response: http.Response) -> Usage | None:
    """Usage of a buffered (non-streamed) response; None when it carries none."""
    raw = body_of(response)
    if raw is None:
        log.warning("response body could not be decoded (%s)", response.headers.get(
            "content-encoding"))
        return None
    meter = adapter.meter()
    body = parse_json(raw)
    if body is None and raw and raw.lstrip()[:1] in (b"[", b"d", b"e", b":"):
        _feed_all(meter, raw)  # a stream the client asked for without streaming headers
    else:
        meter.feed(None, body)
    return meter.usage()


def _feed_all(meter: UsageMeter, raw: bytes) -> None:
    parser: SSEParser | JSONArrayParser
    if raw.lstrip()[:1] == b"[":
        parser = JSONArrayParser()
        for item in parser.feed(raw):
            meter.feed(None, item)
        return
    parser = SSEParser()
    for event, data in [*parser.feed(raw), *parser.close()]:
        if "sage" in data:
            meter.feed(event, parse_json(data.encode()))


class StreamTap:
    """mitmproxy's `response.stream` callable: meters usage from a copy of each chunk and returns
    the chunk unchanged and at once. A fault in metering never touches the stream.

    SSE is read a region at a time (everything up to the last event boundary in hand): a
    region with no usage-bearing event is only scanned, in C, so a long stream costs little
    more than passing it on; only usage events are parsed.

    With `drop_usage_only`, the gateway itself asked for a usage event the client did not ask
    for: what the client receives is the stream (decoded, if encoded) cut at event boundaries,
    minus that event, so it is exactly what the provider would have sent it."""

    def __init__(
        self,
        meter: UsageMeter,
        content_encoding: str | None,
        framing: str,
        drop_usage_only: Callable[[Any], bool] | None = None,
    ) -> None:
        self.meter = meter
        self._text = _TextSample()  # text delivered, for an estimate if usage never comes
        self.failed = False
        self._decoder = Decoder(content_encoding)
        self._sse = SSEBlocks() if framing == "sse" else None
        self._array = JSONArrayParser() if framing == "json_array" else None
        self._body = bytearray() if framing == "json_body" else None
        self._drop = drop_usage_only if framing == "sse" else None

    @property
    def text_chars(self) -> int:
        """About how many bytes of generated text the client received."""
        return self._text.estimate()

    @property
    def decodes_output(self) -> bool:
        """True when what the client receives is the decoded stream."""
        return self._drop is not None

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self._drop is not None:
            return self._filter(chunk)
        if not self.failed:
            try:
                self._observe(chunk)
            except Exception:
                self.failed = True
                log.exception("stream metering failed; the request will be charged an estimate")
        return chunk

    def _observe(self, chunk: bytes) -> None:
        if not chunk:
            if self._sse is not None:
                self._region(self._sse.close())
            elif self._body is not None:
                self.meter.feed(None, parse_json(bytes(self._body)))
            return
        data = self._decoder.decode(chunk) if self._decoder.active else chunk
        if self._sse is not None:
            self._region(self._sse.feed(data))
        elif self._array is not None:
            for item in self._array.feed(data):
                self._text.add(orjson.dumps(item))
                self.meter.feed(None, item)
        elif self._body is not None and len(self._body) + len(data) <= MAX_EVENT_BYTES:
            self._body += data

    def _region(self, region: bytes) -> None:
        """Meter a run of whole events."""
        if not region:
            return
        self._text.add(region)
        if _USAGE.search(region) is None:
            return
        parser = SSEParser()
        for event, data in [*parser.feed(region), *parser.close()]:
            if _USAGE.search(data.encode()):
                self.meter.feed(event, parse_json(data.encode()))

    def _filter(self, chunk: bytes) -> list[bytes]:
        # A list, never b"" for a data event: mitmproxy would send an empty HTTP/1.1 chunk,
        # which ends a chunked body early.
        assert self._sse is not None and self._drop is not None
        try:
            data = self._decoder.decode(chunk) if chunk else b""
        except Exception:
            self.failed = True
            log.exception("could not decode the stream; passing it on as received")
            self._drop = None
            return [chunk] if chunk else []
        if chunk:
            region = self._sse.feed(data)
        else:
            region = self._sse.close()
        if not region:
            return []
        self._text.add(region)
        if _USAGE.search(region) is None:
            return [region]
        out = []
        splitter = SSEEventSplitter()
        for block in [*splitter.feed(region), splitter.close()]:
            if not block:
                continue
            try:
                parser = SSEParser()
                events = [*parser.feed(block), *parser.close()]
                drop = False
                for event, text in events:
                    if _USAGE.search(text.encode()):
                        parsed = parse_json(text.encode())
                        self.meter.feed(event, parsed)
                        drop = drop or bool(self._drop(parsed))
                if drop:
                    continue
            except Exception:
                self.failed = True
                log.exception("stream metering failed; the request will be charged an estimate")
            out.append(block)
        return out

    def usage(self) -> Usage | None:
        return None if self.failed else self.meter.usage()


# A usage-bearing event in any API: "usage": {...} or "usageMetadata": {...} (not "usage": null).
_USAGE = re.compile(rb'sage(?:Metadata)?"\s*:\s*\{')
_TEXT = re.compile(
    rb'"(?:content|text|delta|partial_json|arguments|thinking)":\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)


class _TextSample:
    """Generated text in a stream, measured on a sample of it: the first regions, then one in
    sixteen, extrapolated over every byte (scanning all of it would cost more than the proxy)."""

    def __init__(self) -> None:
        self.bytes = self.sampled_bytes = self.sampled_text = 0
        self._regions = 0

    def add(self, region: bytes) -> None:
        self.bytes += len(region)
        self._regions += 1
        if self._regions <= 8 or self._regions % 16 == 0:
            self.sampled_bytes += len(region)
            self.sampled_text += _text_chars(region)

    def estimate(self) -> int:
        if not self.sampled_bytes:
            return 0
        return self.bytes * self.sampled_text // self.sampled_bytes


def _text_chars(data: bytes) -> int:
    """Bytes of generated text in a run of events, for estimates (no JSON parsing)."""
    return sum(map(len, _TEXT.findall(data)))


def estimate_tokens(num_bytes: int) -> int:
    return (num_bytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN
