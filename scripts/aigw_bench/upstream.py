"""The fake provider (internal mode `_upstream`): a plain-HTTP or HTTPS OpenAI answering chat
completions on loopback, as one JSON answer or as an SSE stream of any length."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import ssl
import tempfile
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from aigw_bench.fixtures import CHAT_RESPONSE

STREAM_PROMPT_TOKENS = 14
STREAM_WORDS = (" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog",
                ".", " Stream", "ing", " token", " by", " token", ",")
STREAM_CHUNK = {"id": "chatcmpl-bench-stream", "object": "chat.completion.chunk",
                "created": 1700000000, "model": "gpt-4o-mini-2024-07-18",
                "service_tier": "default", "system_fingerprint": "fp_bench"}
# gpt-4o-mini in THROUGHPUT_CONFIG: $0.15 and $0.60 per 1M tokens, in nano-dollars a token
STREAM_INPUT_NUSD, STREAM_OUTPUT_NUSD = 150, 600


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _sse_chunk(delta: dict, finish: str | None = None) -> bytes:
    return _sse({**STREAM_CHUNK, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}], "usage": None})


def sse_events(n: int) -> Iterator[bytes]:
    """An OpenAI chat-completions stream as the API sends it when the client asked for
    `stream_options.include_usage`: a role event, `n` content events (each with `"usage": null`),
    the finish event, the usage event (`choices: []`), then `[DONE]`."""
    yield _sse_chunk({"role": "assistant", "content": "", "refusal": None})
    words = [_sse_chunk({"content": word}) for word in STREAM_WORDS]
    for i in range(n):
        yield words[i % len(words)]
    yield _sse_chunk({}, "stop")
    yield _sse({**STREAM_CHUNK, "choices": [], "usage": {
        "prompt_tokens": STREAM_PROMPT_TOKENS, "completion_tokens": n,
        "total_tokens": STREAM_PROMPT_TOKENS + n,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0}}})
    yield b"data: [DONE]\n\n"


def sse_digest(n: int) -> tuple[int, int]:
    """(length, crc32) of the stream's body."""
    length = crc = 0
    for event in sse_events(n):
        length += len(event)
        crc = zlib.crc32(event, crc)
    return length, crc


def events_for_bytes(target: int) -> int:
    """Content events for a stream of about `target` bytes."""
    sizes = [len(_sse_chunk({"content": word})) for word in STREAM_WORDS]
    return max(1, math.ceil(target * len(sizes) / sum(sizes)))


def http_chunks(n: int, cut: int) -> Iterator[bytes]:
    """The stream in HTTP/1.1 chunked framing: one chunk an event (cut <= 0, as providers flush
    token by token), or chunks of `cut` bytes that split events anywhere."""
    if cut <= 0:
        for event in sse_events(n):
            yield b"%x\r\n" % len(event) + event + b"\r\n"
    else:
        pending = bytearray()
        for event in sse_events(n):
            pending += event
            while len(pending) >= cut:
                yield b"%x\r\n" % cut + bytes(pending[:cut]) + b"\r\n"
                del pending[:cut]
        if pending:
            yield b"%x\r\n" % len(pending) + bytes(pending) + b"\r\n"
    yield b"0\r\n\r\n"



def self_signed_context(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1 (IP SAN)."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "upstream-cert.pem", directory / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def main(argv: list[str]) -> None:
    """Serve until SIGINT or SIGTERM; print the port first, on a line of its own."""
    tls = "--tls" in argv
    # --cert-dir DIR: where the self-signed certificate is kept, for the proxies to trust it
    cert_dir = argv[argv.index("--cert-dir") + 1] if "--cert-dir" in argv else None
    body = json.dumps(CHAT_RESPONSE, separators=(",", ":")).encode()
    ok = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
          b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    missing = (b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
               b"content-length: 2\r\n\r\n{}")
    sse_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")

    class Upstream(asyncio.Protocol):
        """HTTP/1.1 keep-alive; requests carry a content-length (mitmproxy sends one here).
        A request with `x-bench-stream: EVENTS CUT` is answered with an SSE stream
        (`http_chunks`), written as fast as the connection takes it (flow control honoured);
        one with `x-bench-delay-ms: N` N ms late."""

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.buffer = bytearray()
            self.writable = asyncio.Event()
            self.writable.set()
            self.closed = False
            self.streaming: asyncio.Task | None = None

        def pause_writing(self) -> None:
            self.writable.clear()

        def resume_writing(self) -> None:
            self.writable.set()

        def connection_lost(self, exc) -> None:
            self.closed = True
            self.writable.set()

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if self.streaming is None:
                self.serve()

        async def stream(self, events: int, cut: int) -> None:
            try:
                pieces = http_chunks(events, cut)
                self.transport.write(sse_head + next(pieces))  # the first event at once
                batch: list[bytes] = []
                size = 0
                for piece in pieces:
                    batch.append(piece)
                    size += len(piece)
                    if size >= 65_536:
                        self.transport.write(b"".join(batch))
                        batch.clear()
                        size = 0
                        await self.writable.wait()
                        await asyncio.sleep(0)
                        if self.closed:
                            return
                self.transport.write(b"".join(batch))
            finally:
                self.streaming = None
            if not self.closed:
                self.serve()

        def serve(self) -> None:
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                length = 0
                at = head.find(b"\r\ncontent-length:")
                if at >= 0:
                    stop = head.find(b"\r\n", at + 2)
                    length = int(head[at + 17: stop if stop >= 0 else None])
                if len(self.buffer) < end + 4 + length:
                    return
                del self.buffer[: end + 4 + length]
                at = head.find(b"\r\nx-bench-stream:")
                if at >= 0 and head.startswith(b"post /v1/chat/completions "):
                    stop = head.find(b"\r\n", at + 2)
                    events, cut = (int(v) for v in
                                   head[at + 17: stop if stop >= 0 else None].split())
                    self.streaming = asyncio.get_running_loop().create_task(
                        self.stream(events, cut))
                    return
                answer = ok if head.startswith(b"post /v1/chat/completions ") else missing
                at = head.find(b"\r\nx-bench-delay-ms:")
                if at >= 0:  # the burst: every request in flight at once
                    stop = head.find(b"\r\n", at + 2)
                    delay = int(head[at + 19: stop if stop >= 0 else None]) / 1000
                    asyncio.get_running_loop().call_later(delay, self.write, answer)
                    continue
                self.transport.write(answer)

        def write(self, data: bytes) -> None:
            if not self.closed:
                self.transport.write(data)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        ctx = None
        if tls:
            if cert_dir is not None:
                ctx = self_signed_context(Path(cert_dir))
            else:
                with tempfile.TemporaryDirectory(prefix="aigw-bench-upstream-") as tmpdir:
                    ctx = self_signed_context(Path(tmpdir))
        server = await loop.create_server(Upstream, "127.0.0.1", 0, backlog=256, ssl=ctx)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())

