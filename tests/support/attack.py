"""Tools for the adversarial tests: raw HTTP over raw sockets (CONNECT, TLS with any SNI, any
Host header, bytes no client library would send), a gzip bomb, and waiting for mitmdump to exit.

    resp = tunnel_request(proxy, connect="198.51.100.7:443", sni="api.openai.com",
                          request=http_request("POST", "/v1/chat/completions",
                                               host="api.openai.com", body=CHAT))
    assert resp.status == 401
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.proxy import Proxy

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
IO_TIMEOUT = 15.0


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names, last value wins
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def error_kinds(self) -> set[str]:
        """Every machine-readable error name of a native error body: OpenAI `type` and `code`,
        Anthropic `error.type`, Gemini `status` and `details[].reason` (lower-cased)."""
        try:
            body = self.json()
        except ValueError:
            return set()
        return error_kinds(body)

    def message(self) -> str:
        try:
            error = self.json().get("error")
        except (ValueError, AttributeError):
            return ""
        return str(error.get("message", "")) if isinstance(error, dict) else ""


def error_kinds(body: Any) -> set[str]:
    """See RawResponse.error_kinds."""
    kinds: set[str] = set()
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return kinds
    for name in ("type", "code", "status"):
        if isinstance(error.get(name), str):
            kinds.add(error[name].lower())
    for detail in error.get("details") or []:
        if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
            kinds.add(detail["reason"].lower())
    return kinds


def http_request(method: str, target: str, *, host: str | bytes,
                 headers: list[tuple[str | bytes, str | bytes]] | None = None,
                 body: Any = None, content_type: str = "application/json") -> bytes:
    """One HTTP/1.1 request as bytes (`Connection: close`). `body`: bytes as is, else JSON.
    Header values given as bytes go out unchanged (e.g. a latin-1 byte no client sends)."""
    if body is None:
        raw = b""
    elif isinstance(body, bytes):
        raw = body
    else:
        raw = json.dumps(body).encode()
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + _b(host)]
    for name, value in headers or []:
        lines.append(_b(name) + b": " + _b(value))
    if raw or method in ("POST", "PUT", "PATCH"):
        if not any(_b(n).lower() == b"content-type" for n, _ in headers or []):
            lines.append(b"Content-Type: " + content_type.encode())
        lines.append(b"Content-Length: " + str(len(raw)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + raw


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def tunnel_request(proxy: Proxy, *, connect: str, sni: str | None, request: bytes,
                   check_hostname: bool = True, tls: bool = True) -> RawResponse:
    """CONNECT `connect` through the proxy, TLS with `sni` (the proxy's CA trusted), send
    `request`, read the answer until the connection closes. `tls=False`: plain HTTP inside
    the tunnel."""
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT)
    try:
        sock.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
        head = _read_head(sock)
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise AssertionError(f"CONNECT {connect} answered {head!r}")
        if not tls:
            _send(sock, request)
            return parse_response(_read_all(sock))
        ctx = proxy.ssl_context()
        ctx.check_hostname = check_hostname and sni is not None
        tls = ctx.wrap_socket(sock, server_hostname=sni)
        _send(tls, request)
        return parse_response(_read_all(tls))
    finally:
        sock.close()


def h2_tunnel_request(proxy: Proxy, *, connect: str, sni: str, authority: str, path: str,
                      headers: list[tuple[str, str]], body: bytes) -> RawResponse:
    """One HTTP/2 POST (ALPN h2) through a CONNECT tunnel: `:authority` as given."""
    import h2.connection
    import h2.events

    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT)
    try:
        sock.sendall(f"CONNECT {connect} HTTP/1.1\r\nHost: {connect}\r\n\r\n".encode())
        head = _read_head(sock)
        if int(head.split(b" ", 2)[1]) != 200:
            raise AssertionError(f"CONNECT {connect} answered {head!r}")
        ctx = proxy.ssl_context()
        ctx.set_alpn_protocols(["h2"])
        tls = ctx.wrap_socket(sock, server_hostname=sni)
        if tls.selected_alpn_protocol() != "h2":
            raise AssertionError(f"the proxy did not speak h2: {tls.selected_alpn_protocol()}")
        conn = h2.connection.H2Connection()
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":authority", authority),
                              (":scheme", "https"), (":path", path), *headers,
                              ("content-length", str(len(body)))])
        conn.send_data(1, body, end_stream=True)
        tls.sendall(conn.data_to_send())
        status, answer, data = 0, {}, b""
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            chunk = tls.recv(65536)
            if not chunk:
                break
            ended = False
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    answer = {k.decode().lower(): v.decode() for k, v in event.headers}
                    status = int(answer.get(":status", 0))
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset,
                                        h2.events.ConnectionTerminated)):
                    ended = True
            tls.sendall(conn.data_to_send())
            if ended:
                break
        return RawResponse(status, "", answer, data)
    finally:
        sock.close()


def plain_request(proxy: Proxy, request: bytes) -> RawResponse:
    """Send `request` (absolute-form, plain HTTP) to the proxy itself; read the answer."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT) as sock:
        _send(sock, request)
        return parse_response(_read_all(sock))


def _send(sock: socket.socket, data: bytes) -> None:
    """Send all of `data`, unless the proxy answers and closes first (an early refusal of a
    large body): then the answer is read as usual."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
        pass


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + IO_TIMEOUT
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk or time.monotonic() > deadline:
            raise AssertionError(f"proxy closed before answering CONNECT: {data!r}")
        data += chunk
    return data


def _read_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(data: bytes) -> RawResponse:
    """An HTTP/1.1 response read to the end of the connection (chunked or not)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete HTTP response: {data[:500]!r}")
    lines = head.decode("latin-1").split("\r\n")
    _, status, reason = (lines[0].split(" ", 2) + [""])[:3]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(int(status), reason, headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out


def gzip_bomb(path: Path, decoded_size: int = 1 << 30, chunk: int = 1 << 20) -> bytes:
    """A gzip body that decodes to `decoded_size` zero bytes (about 1 MiB on the wire for
    1 GiB), built by streaming zeros through zlib; cached in `path`."""
    if path.exists():
        return path.read_bytes()
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(chunk)
    parts = [z.compress(zeros) for _ in range(decoded_size // chunk)]
    parts.append(z.compress(bytes(decoded_size % chunk)))
    parts.append(z.flush())
    data = b"".join(parts)
    path.write_bytes(data)
    return data


def deflate_from_gzip(gz: bytes, decoded_size: int) -> bytes:
    """The zlib-wrapped (Content-Encoding: deflate) form of a one-member gzip of zeros made by
    `gzip_bomb`: the same deflate data, a zlib header and the Adler-32 of `decoded_size` zeros
    (no second compression pass)."""
    if gz[:4] != b"\x1f\x8b\x08\x00":
        raise ValueError("expected a gzip member without optional header fields")
    adler = ((decoded_size % 65521) << 16) | 1  # a stays 1 over zeros; b counts them
    return b"\x78\xda" + gz[10:-8] + adler.to_bytes(4, "big")


def brotli_bomb(decoded_size: int = 1 << 30, chunk: int = 1 << 20) -> bytes:
    """Brotli of `decoded_size` zeros (about 190 KiB for 1 GiB)."""
    import brotli

    c = brotli.Compressor(quality=1)
    zeros = bytes(chunk)
    return b"".join(c.process(zeros) for _ in range(decoded_size // chunk)) + c.finish()


def zstd_bomb(decoded_size: int = 1 << 30, chunk: int = 1 << 20) -> bytes:
    """One zstd frame of `decoded_size` zeros (about 32 KiB for 1 GiB)."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]

    c = zstd.ZstdCompressor()
    zeros = bytes(chunk)
    return b"".join(c.compress(zeros) for _ in range(decoded_size // chunk)) + c.flush()


def zstd_compress(data: bytes) -> bytes:
    """One zstd frame of `data`."""
    try:
        from compression import zstd  # type: ignore[import-not-found]
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]
    return zstd.compress(data)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM (the peak resident set size) of a process, from /proc."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match.group(1)) * 1024


def wait_for_exit(process: subprocess.Popen[bytes], log_path: Path, *,
                  timeout: float = 15.0, after_listening: float = 4.0) -> int | None:
    """The exit code of a mitmdump expected to end at startup, or None if it keeps running:
    `after_listening` seconds after it logs that it listens (mitmproxy's errorcheck ends a
    process whose startup logged an error right after that), or `timeout` in all."""
    deadline = time.monotonic() + timeout
    listening_since: float | None = None
    while True:
        code = process.poll()
        if code is not None:
            return code
        now = time.monotonic()
        if listening_since is None and "proxy listening at" in _text(log_path):
            listening_since = now
        if now > deadline or (listening_since is not None
                              and now - listening_since > after_listening):
            return None
        time.sleep(0.05)


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
