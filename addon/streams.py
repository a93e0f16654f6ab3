"""Incremental readers for response streams: content decoding, server-sent events and streamed
JSON arrays. Fed arbitrary chunks (an event, a UTF-8 character or a compressed block can be split
anywhere); memory is bounded by the largest single event, never by the stream's length."""

import zlib
from collections.abc import Iterator

import brotli
import orjson

try:
    from compression import zstd  # Python >= 3.14
except ImportError:  # pragma: no cover - depends on the interpreter
    from backports import zstd

MAX_EVENT_BYTES = 16 * 1024 * 1024  # an event larger than this is skipped, not buffered


class Decoder:
    """Incremental Content-Encoding decoder: identity, gzip, deflate, br, zstd (and chains)."""

    def __init__(self, content_encoding: str | None) -> None:
        names = [e.strip().lower() for e in (content_encoding or "").split(",") if e.strip()]
        # Encodings are listed in the order they were applied: undo them in reverse.
        self._stages = [self._stage(name) for name in reversed(names) if name != "identity"]
        self.active = bool(self._stages)

    @staticmethod
    def _stage(name: str):
        if name in ("gzip", "x-gzip"):
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
        if name == "deflate":
            return _Deflate().decompress
        if name == "br":
            return brotli.Decompressor().process
        if name == "zstd":
            return zstd.ZstdDecompressor().decompress
        raise ValueError(f"unsupported content-encoding {name!r}")

    def decode(self, data: bytes) -> bytes:
        for stage in self._stages:
            if not data:
                break
            data = stage(data)
        return data


class _Deflate:
    """`deflate` is zlib-wrapped by the standard, raw in practice: accept both."""

    def __init__(self) -> None:
        self._obj: zlib._Decompress | None = None
        self._head = b""

    def decompress(self, data: bytes) -> bytes:
        if self._obj is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            wrapped = (self._head[0] & 0x0F) == 8 and int.from_bytes(self._head[:2]) % 31 == 0
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self._head = self._head, b""
        return self._obj.decompress(data)


class SSEParser:
    """Server-sent events (WHATWG framing): yields (event name or None, data) per event."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._size = 0
        self._oversized = False

    def feed(self, chunk: bytes) -> Iterator[tuple[str | None, str]]:
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        while True:
            cut = _line_end(buffer, start)
            if cut is None:
                self._buffer = buffer[start:]
                if len(self._buffer) > MAX_EVENT_BYTES:
                    self._buffer = b""
                    self._oversized = True
                return
            end, after = cut
            line = buffer[start:end]
            start = after
            if not line:
                if self._data and not self._oversized:
                    yield self._event, "\n".join(self._data)
                self._event, self._data, self._size, self._oversized = None, [], 0, False
                continue
            if self._oversized or line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                self._size += len(value)
                if self._size > MAX_EVENT_BYTES:
                    self._oversized, self._data = True, []
                else:
                    self._data.append(value.decode("utf-8", "replace"))
            elif field == b"event":
                self._event = value.decode("utf-8", "replace")

    def close(self) -> Iterator[tuple[str | None, str]]:
        """End of stream: an event not terminated by a blank line is still dispatched."""
        if self._buffer:
            yield from self.feed(b"\n")
        if self._data and not self._oversized:
            yield self._event, "\n".join(self._data)
        self._event, self._data = None, []


_BOUNDARIES = (b"\n\n", b"\r\n\r\n", b"\r\r")


class SSEBlocks:
    """Cuts an SSE byte stream at its last event boundary: `feed` returns the whole events in
    hand (possibly many, possibly none) and keeps the unfinished one. A blank line (LF LF,
    CRLF CRLF, CR CR) always ends an event; rarer mixtures just wait for the next such one."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._rest + chunk if self._rest else chunk
        if data.endswith(b"\n\n"):  # the usual case: a chunk ends where an event does
            self._rest = b""
            return data
        end = 0
        for boundary in _BOUNDARIES:
            found = data.rfind(boundary)
            if found >= 0 and found + len(boundary) > end:
                end = found + len(boundary)
        if end == 0:
            self._rest = data
            if len(data) > MAX_EVENT_BYTES:  # no boundary for this long: give it up as it is
                self._rest = b""
                return data
            return b""
        self._rest = data[end:]
        return data[:end]

    def close(self) -> bytes:
        rest, self._rest = self._rest, b""
        return rest


class SSEEventSplitter:
    """Cuts a plain SSE byte stream into whole events, each with its own bytes (terminating
    blank line included), so a filter can drop one event and pass the others unchanged."""

    def __init__(self) -> None:
        self._buffer = b""
        self._scanned = 0  # bytes of the buffer known to hold no complete event

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        buffer = self._buffer + chunk if self._buffer else chunk
        event_start, start = 0, self._scanned
        while True:
            cut = _line_end(buffer, start)
            if cut is None:
                self._buffer = buffer[event_start:]
                self._scanned = start - event_start
                return
            end, after = cut
            if end == start:  # a blank line: the event ends here
                yield buffer[event_start:after]
                event_start = after
            start = after

    def close(self) -> bytes:
        """What is left (an unterminated event): passed on as it is."""
        rest, self._buffer, self._scanned = self._buffer, b"", 0
        return rest


def _line_end(buffer: bytes, start: int = 0) -> tuple[int, int] | None:
    """(end of the line starting at `start`, start of the next) for CRLF, LF or CR line ends;
    None if incomplete. A trailing CR may be the first half of a CRLF: wait for the next byte."""
    lf = buffer.find(b"\n", start)
    cr = buffer.find(b"\r", start, lf if lf != -1 else len(buffer))
    if cr == -1:
        return None if lf == -1 else (lf, lf + 1)
    if cr + 1 == len(buffer):
        return None
    return (cr, cr + 2) if buffer[cr + 1] == 0x0A else (cr, cr + 1)


class JSONArrayParser:
    """A JSON array streamed element by element (Gemini without `alt=sse`): yields each
    top-level element once complete, parsed."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._element = bytearray()
        self._oversized = False

    def feed(self, chunk: bytes) -> Iterator[object]:
        for byte in chunk:
            if self._depth == 0:
                if byte == 0x5B:  # [
                    self._depth = 1
                continue
            if self._depth == 1 and not self._in_string and byte in b" \t\r\n,]":
                if byte == 0x5D:  # ]
                    self._depth = 0
                continue
            self._add(byte)
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # "
                    self._in_string = False
                continue
            if byte == 0x22:
                self._in_string = True
            elif byte in b"{[":
                self._depth += 1
            elif byte in b"}]":
                self._depth -= 1
                if self._depth == 1:
                    yield from self._complete()

    def _add(self, byte: int) -> None:
        if self._oversized:
            return
        self._element.append(byte)
        if len(self._element) > MAX_EVENT_BYTES:
            self._oversized = True
            self._element.clear()

    def _complete(self) -> Iterator[object]:
        element, oversized = bytes(self._element), self._oversized
        self._element.clear()
        self._oversized = False
        if oversized:
            return
        try:
            yield orjson.loads(element)
        except orjson.JSONDecodeError:
            return


class BodyTooLarge(ValueError):
    """A request body decodes to more than the configured limit."""


_INPUT_STEP = 64 * 1024  # compressed bytes fed per step: bounds the work between limit checks


def decode_bounded(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """A body decoded from its Content-Encoding chain, never holding more than `limit` decoded
    bytes: BodyTooLarge as soon as the output passes it (a gzip bomb costs at most `limit`).
    ValueError for an unknown encoding or corrupt data."""
    names = [e.strip().lower() for e in (content_encoding or "").split(",") if e.strip()]
    data = raw
    for name in reversed(names):  # undo the encodings in the reverse of their order
        if name != "identity":
            data = _decode_one(data, name, limit)
    if len(data) > limit:
        raise BodyTooLarge(f"body of {len(data)} bytes over the limit of {limit}")
    return data


def _decode_one(data: bytes, name: str, limit: int) -> bytes:
    out = bytearray()
    budget = limit + 1  # one byte past the limit proves the body is too large
    try:
        if name in ("gzip", "x-gzip", "deflate"):
            pending = data
            while pending and len(out) < budget:  # gzip allows several members in a row
                wbits = 16 + zlib.MAX_WBITS if name != "deflate" else (
                    zlib.MAX_WBITS if (pending[0] & 0x0F) == 8
                    and int.from_bytes(pending[:2]) % 31 == 0 else -zlib.MAX_WBITS)
                obj = zlib.decompressobj(wbits)
                while pending and not obj.eof and len(out) < budget:
                    out += obj.decompress(pending[:_INPUT_STEP], budget - len(out))
                    pending = obj.unconsumed_tail + pending[_INPUT_STEP:]
                if not obj.eof or name == "deflate":
                    break
                pending = obj.unused_data + pending
        elif name == "br":
            obj = brotli.Decompressor()
            for start in range(0, len(data) or 1, _INPUT_STEP):
                out += obj.process(data[start:start + _INPUT_STEP],
                                   output_buffer_limit=budget - len(out))
                while len(out) < budget and not obj.can_accept_more_data():
                    out += obj.process(b"", output_buffer_limit=budget - len(out))
                if len(out) >= budget:
                    break
        elif name == "zstd":
            pending = data
            while pending and len(out) < budget:  # zstd allows several frames in a row
                obj = zstd.ZstdDecompressor()
                while len(out) < budget and not obj.eof:
                    chunk, pending = pending[:_INPUT_STEP], pending[_INPUT_STEP:]
                    out += obj.decompress(chunk, budget - len(out))
                    while len(out) < budget and not obj.needs_input and not obj.eof:
                        out += obj.decompress(b"", budget - len(out))
                    if not pending:
                        break
                if not obj.eof:
                    break
                pending = obj.unused_data + pending
        else:
            raise ValueError(f"unsupported content-encoding {name!r}")
    except (zlib.error, brotli.error, zstd.ZstdError) as exc:
        raise ValueError(f"invalid {name} data: {exc}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"body decodes to over {limit} bytes")
    return bytes(out)
