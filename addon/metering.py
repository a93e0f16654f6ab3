"""Reading usage from responses: whole JSON bodies, and streams tapped as they pass through."""

import json
import logging
from typing import Any

from mitmproxy import http

from addon.providers.base import Adapter, Usage, UsageMeter
from addon.streams import Decoder, JSONArrayParser, SSEParser

log = logging.getLogger("aigw.metering")

BYTES_PER_TOKEN = 4  # rough size of a token, for estimates only


def parse_json(raw: bytes | None) -> Any:
    """The JSON value of a body, or None when it is empty or not JSON."""
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def usage_from_body(adapter: Adapter, response: http.Response) -> Usage | None:
    """Usage of a buffered (non-streamed) response; None when it carries none."""
    try:
        raw = response.get_content(strict=False)
    except ValueError:
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
    """mitmproxy's `response.stream` callable: returns every chunk unchanged and at once, while
    decoding and parsing a copy to meter usage. A fault in metering never touches the stream."""

    def __init__(self, meter: UsageMeter, content_encoding: str | None, framing: str) -> None:
        self.meter = meter
        self.decoded_bytes = 0
        self.finished = False
        self.failed = False
        self._decoder = Decoder(content_encoding)
        self._sse = SSEParser() if framing == "sse" else None
        self._array = JSONArrayParser() if framing != "sse" else None

    def __call__(self, chunk: bytes) -> bytes:
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
            return
        data = self._decoder.decode(chunk)
        self.decoded_bytes += len(data)
        if self._sse is not None:
            self._events(self._sse.feed(data))
        else:
            assert self._array is not None
            for item in self._array.feed(data):
                self.meter.feed(None, item)

    def _events(self, events) -> None:
        for event, data in events:
            # Only usage-bearing events are parsed: every API names the field *usage*/*Usage*.
            if "sage" in data:
                self.meter.feed(event, parse_json(data.encode()))

    def usage(self) -> Usage | None:
        return None if self.failed else self.meter.usage()


def estimate_tokens(num_bytes: int) -> int:
    return (num_bytes + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN
