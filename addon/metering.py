"""Reading usage from responses: whole JSON bodies, and streams tapped as they pass through."""

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from mitmproxy import http

from addon.providers.base import Adapter, Usage, UsageMeter, header
from addon.streams import MAX_EVENT_BYTES, Decoder, JSONArrayParser, SSEEventSplitter, SSEParser

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

    With `drop_usage_only`, the gateway itself asked for a usage event the client did not ask
    for: the stream is cut into whole events (decoded, if encoded) and that event is dropped,
    so the client receives exactly what the provider would have sent it."""

    def __init__(
        self,
        meter: UsageMeter,
        content_encoding: str | None,
        framing: str,
        drop_usage_only: Callable[[Any], bool] | None = None,
    ) -> None:
        self.meter = meter
        self.text_chars = 0  # text delivered to the client, for an estimate if usage never comes
        self.finished = False
        self.failed = False
        self._decoder = Decoder(content_encoding)
        self._sse = SSEParser() if framing == "sse" else None
        self._array = JSONArrayParser() if framing == "json_array" else None
        self._body = bytearray() if framing == "json_body" else None
        self._drop = drop_usage_only
        self._splitter = SSEEventSplitter() if drop_usage_only else None

    @property
    def decodes_output(self) -> bool:
        """True when what the client receives is the decoded stream."""
        return self._splitter is not None

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        if self._splitter is not None:
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
            self.finished = True
            if self._sse is not None:
                self._events(self._sse.close())
            elif self._body is not None:
                self.meter.feed(None, parse_json(bytes(self._body)))
            return
        data = self._decoder.decode(chunk)
        if self._sse is not None:
            self._events(self._sse.feed(data))
        elif self._array is not None:
            for item in self._array.feed(data):
                self.text_chars += _text_chars(json.dumps(item))
                self.meter.feed(None, item)
        elif self._body is not None and len(self._body) + len(data) <= MAX_EVENT_BYTES:
            self._body += data

    def _events(self, events: Iterable[tuple[str | None, str]]) -> bool:
        """Meter events; True if one of them is the usage-only event to drop."""
        drop = False
        for event, data in events:
            self.text_chars += _text_chars(data)
            # Only usage-bearing events are parsed: every API names the field *usage*/*Usage*.
            if "sage" in data:
                parsed = parse_json(data.encode())
                self.meter.feed(event, parsed)
                drop = drop or bool(self._drop and self._drop(parsed))
        return drop

    def _filter(self, chunk: bytes) -> list[bytes]:
        # A list, never b"" for a data event: mitmproxy would send an empty HTTP/1.1 chunk,
        # which ends a chunked body early.
        assert self._splitter is not None
        try:
            data = self._decoder.decode(chunk) if chunk else b""
        except Exception:
            self.failed = True
            log.exception("could not decode the stream; passing it on as received")
            self._splitter = None
            return [chunk] if chunk else []
        blocks = list(self._splitter.feed(data))
        if not chunk:
            self.finished = True
            blocks.append(self._splitter.close())
        out = []
        for block in blocks:
            try:
                parser = SSEParser()
                if self._events([*parser.feed(block), *parser.close()]):
                    continue
            except Exception:
                self.failed = True
                log.exception("stream metering failed; the request will be charged an estimate")
            if block:
                out.append(block)
        return out

    def usage(self) -> Usage | None:
        return None if self.failed else self.meter.usage()


_TEXT = re.compile(
    r'"(?:content|text|delta|partial_json|arguments|thinking)":\s*"((?:[^"\\]|\\.)*)"'
)


def _text_chars(data: str) -> int:
    """Characters of generated text in an event, for estimates (no JSON parsing)."""
    return sum(len(m) for m in _TEXT.findall(data))


def estimate_tokens(num_bytes: int) -> int:
    return (num_bytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN
