"""A local fake of the AI providers' HTTP APIs, for end-to-end tests.

`FakeProvider` is an aiohttp server on 127.0.0.1 (ephemeral port) running in a background thread
with its own event loop, so synchronous tests and the official SDKs can talk to it. It answers
with the providers' real wire formats (field names checked against the installed openai,
anthropic and google-genai typed models) and records every request it receives.

Routes (everything else is recorded and answered 404):
  POST /v1/chat/completions                               api "openai"
  POST /v1/responses                                      api "responses"
  POST /openai/deployments/{dep}/chat/completions         api "azure"   (+ /openai/v1/chat/...)
  GET  /v1/models                                         OpenAI list (Anthropic's if x-api-key
                                                          or anthropic-version is sent, Gemini's
                                                          if x-goog-api-key or ?key= is sent)
  POST /v1/messages                                       api "anthropic"
  POST /v1/messages/count_tokens                          api "anthropic"
  POST /{v1beta,v1,v1alpha}/models/{m}:generateContent    api "gemini"
  POST /{v1beta,v1,v1alpha}/models/{m}:streamGenerateContent[?alt=sse]
  POST /{v1beta,v1,v1alpha}/models/{m}:countTokens
  GET  /{v1beta,v1}/models                                Gemini model list

Control, from the least to the most specific (later wins field by field):
  1. `fake.usage[api]`   the usage object, in the API's own wire shape, for all requests of that
                         api (defaults in DEFAULT_USAGE); `fake.scenario` (a `Scenario`) for the
                         rest: text, status, error body, encoding, breaks, delays, extra headers.
  `hold_response` / `hold_after` keep answers waiting until `fake.release()` (`fake.held`
  counts the answers waiting, `fake.wait_for_held(n)` waits for them), so a test synchronizes
  on the state it needs instead of guessing a delay; `reset()` releases whatever still waits.
  2. `fake.enqueue(**scenario_fields)`: one-shot overrides, consumed by the next requests (FIFO).
  3. request headers: `x-fake-usage: <json usage>`, `x-fake-status: 429`,
     `x-fake-encoding: gzip`, `x-fake-break-after: 3`, `x-fake-delay: 0.1`,
     `x-fake-response-delay: 0.5`, `x-fake-stream-error-after: 2`, or
     `x-fake-scenario: <json object of Scenario fields>`.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import gzip
import itertools
import json
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.support.server import ThreadedServer

try:  # brotli is a mitmproxy dependency, so it is normally present
    import brotli
except ImportError:  # pragma: no cover
    brotli = None

try:  # Python 3.14+
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd  # type: ignore[no-redef]  # a mitmproxy 12 dependency
    except ImportError:
        zstd = None

APIS = ("openai", "responses", "azure", "anthropic", "gemini")

# Distinct numbers per API so a test can tell which one was metered.
DEFAULT_USAGE: dict[str, dict[str, Any]] = {
    "openai": {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 2,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "azure": {
        "prompt_tokens": 17,
        "completion_tokens": 5,
        "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "responses": {
        "input_tokens": 13,
        "input_tokens_details": {"cached_tokens": 4},
        "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 22,
    },
    "anthropic": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 5,
        "cache_read_input_tokens": 8,
        "cache_creation": {"ephemeral_5m_input_tokens": 5, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 9,
        "service_tier": "standard",
    },
    "gemini": {
        "promptTokenCount": 15,
        "candidatesTokenCount": 6,
        "totalTokenCount": 21,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 15}],
    },
}

DEFAULT_TEXT_CHUNKS = ("Hello", " from", " the", " fake", " provider.")

CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")

ENCODINGS = ("identity", "gzip", "deflate", "br", "zstd")


def available_encodings() -> tuple[str, ...]:
    """Content-encodings this fake can produce in this environment."""
    return tuple(
        e
        for e in ENCODINGS
        if (e != "br" or brotli is not None) and (e != "zstd" or zstd is not None)
    )


@dataclass
class Scenario:
    """How the fake answers. Every field can also be given per request (see module doc)."""

    text_chunks: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_CHUNKS))
    # The usage object (API-native shape) for this request; None: `fake.usage[api]`.
    usage: dict[str, Any] | None = None
    # != 200: answer with the provider's native error body (or `error_body`) and this status,
    # as JSON, also for streamed requests (real providers fail before the stream starts).
    status: int = 200
    error_body: Any = None  # dict/list -> JSON, str/bytes -> raw
    error_message: str = "fake provider error"
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    encoding: str | None = None  # Content-Encoding of the response body, see ENCODINGS
    # Streams: close the connection after this many events (no [DONE], no terminating chunk).
    # Non-streamed answers: send the headers (with the full Content-Length) and half the body.
    break_after: int | None = None
    # Streams: after this many events send the provider's in-stream error event and end.
    stream_error_after: int | None = None
    delay: float = 0.0  # seconds between stream events
    response_delay: float = 0.0  # seconds before the response headers are sent
    # Wait for `fake.release()` before the response headers (a request the test keeps in flight
    # for as long as it needs, where a delay would only guess how long that is).
    hold_response: bool = False
    # Streams: send this many events, then wait for `fake.release()` before the rest (the test
    # sees what arrived while the provider still holds the end of the stream).
    hold_after: int | None = None
    # Anthropic: put input/cache counts into message_delta.usage too (some compatible backends)
    anthropic_delta_full_usage: bool = False
    # Anthropic: extra message_delta events (with lower cumulative output_tokens) before the last
    anthropic_extra_message_deltas: int = 0
    # Gemini streams: non-final chunks carry usageMetadata with prompt counts only (as the real
    # API does); False: only the last chunk has usageMetadata.
    gemini_partial_usage: bool = True

    @property
    def text(self) -> str:
        return "".join(self.text_chunks)


HOLD_TIMEOUT_S = 60.0  # a held answer goes on by itself after this (a test that failed first)

SCENARIO_FIELDS = {f.name for f in dataclasses.fields(Scenario)}

_HEADER_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "x-fake-usage": ("usage", json.loads),
    "x-fake-status": ("status", int),
    "x-fake-encoding": ("encoding", str),
    "x-fake-break-after": ("break_after", int),
    "x-fake-stream-error-after": ("stream_error_after", int),
    "x-fake-delay": ("delay", float),
    "x-fake-response-delay": ("response_delay", float),
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str  # without the query string
    query_string: str
    query: dict[str, str]  # first value of each query parameter
    headers: CIMultiDict[str]  # case-insensitive
    header_pairs: list[tuple[str, str]]  # as received, in order
    body: bytes
    json: Any  # parsed body, or None if it was not JSON
    api: str | None  # "openai", "responses", "azure", "anthropic", "gemini" or None
    model: str | None  # the model / deployment the request named
    stream: bool  # whether a streamed answer was asked for
    received_at: float  # time.monotonic()
    # Why the body could not be read (e.g. it decoded to more than `max_body`): the request is
    # still recorded, so "nothing was forwarded" cannot pass because the fake refused to read.
    body_error: str | None = None

    @property
    def credentials(self) -> dict[str, str]:
        """The credential-bearing headers and `key` query parameter that were present."""
        found = {h: self.headers[h] for h in CREDENTIAL_HEADERS if h in self.headers}
        if "key" in self.query:
            found["key"] = self.query["key"]
        return found

    @property
    def credential(self) -> str | None:
        """The single credential value seen (Bearer prefix stripped), or None."""
        for name, value in self.credentials.items():
            if name == "authorization" and value.lower().startswith("bearer "):
                return value[7:]
            return value
        return None


class _Encoder:
    """Incremental Content-Encoding: each chunk() output is decodable up to that point."""

    def __init__(self, name: str | None):
        self.name = (name or "identity").lower()
        if self.name == "gzip":
            self._z = zlib.compressobj(wbits=31)
        elif self.name == "deflate":
            self._z = zlib.compressobj(wbits=15)
        elif self.name == "br":
            if brotli is None:
                raise ValueError("brotli is not installed")
            self._z = brotli.Compressor()
        elif self.name == "zstd":
            if zstd is None:
                raise ValueError("no zstd module available")
            self._z = zstd.ZstdCompressor()
        elif self.name != "identity":
            raise ValueError(f"unknown encoding {name!r}")

    @property
    def header(self) -> str | None:
        return None if self.name == "identity" else self.name

    def chunk(self, data: bytes) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        if self.name == "br":
            return self._z.process(data) + self._z.flush()
        if self.name == "zstd":
            return self._z.compress(data, mode=zstd.ZstdCompressor.FLUSH_BLOCK)
        return data

    def finish(self) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._z.flush(zlib.Z_FINISH)
        if self.name == "br":
            return self._z.finish()
        if self.name == "zstd":
            return self._z.flush(mode=zstd.ZstdCompressor.FLUSH_FRAME)
        return b""

    def all(self, data: bytes) -> bytes:
        return self.chunk(data) + self.finish()


def encode_body(data: bytes, encoding: str | None) -> bytes:
    """Encode a whole body (helper for tests that need to compare bytes)."""
    return _Encoder(encoding).all(data)


def decode_body(data: bytes, encoding: str | None) -> bytes:
    """Decode a body produced with `encoding` (gzip, deflate, br, zstd or identity)."""
    enc = (encoding or "identity").lower()
    if enc == "gzip":
        return gzip.decompress(data)
    if enc == "deflate":
        return zlib.decompress(data)
    if enc == "br":
        return brotli.decompress(data)
    if enc == "zstd":
        return zstd.decompress(data)
    return data


# --------------------------------------------------------------------------- wire formats


def sse(data: Any, event: str | None = None, *, crlf: bool = False) -> bytes:
    """One SSE event; `data` is JSON-encoded unless it is already a str."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    nl = "\r\n" if crlf else "\n"
    head = f"event: {event}{nl}" if event else ""
    return f"{head}data: {payload}{nl}{nl}".encode()


def openai_error_body(status: int, message: str) -> dict[str, Any]:
    kind, code = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        403: ("invalid_request_error", "model_not_found"),
        404: ("invalid_request_error", "model_not_found"),
        429: ("insufficient_quota", "insufficient_quota"),
    }.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def azure_error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": str(status), "message": message}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_fake",
    }


def gemini_error_body(status: int, message: str) -> dict[str, Any]:
    grpc = {
        400: "INVALID_ARGUMENT",
        401: "UNAUTHENTICATED",
        403: "PERMISSION_DENIED",
        404: "NOT_FOUND",
        429: "RESOURCE_EXHAUSTED",
        503: "UNAVAILABLE",
        504: "DEADLINE_EXCEEDED",
    }.get(status, "INTERNAL")
    return {"error": {"code": status, "message": message, "status": grpc}}


ERROR_BODIES: dict[str, Callable[[int, str], dict[str, Any]]] = {
    "openai": openai_error_body,
    "responses": openai_error_body,
    "azure": azure_error_body,
    "anthropic": anthropic_error_body,
    "gemini": gemini_error_body,
}

_AZURE_FILTER = {
    "hate": {"filtered": False, "severity": "safe"},
    "self_harm": {"filtered": False, "severity": "safe"},
    "sexual": {"filtered": False, "severity": "safe"},
    "violence": {"filtered": False, "severity": "safe"},
}


class FakeProvider(ThreadedServer):
    """The fake server. Use as a context manager or call start()/stop()."""

    thread_name = "fake-provider"
    max_body = 64 * 1024 * 1024

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self.azure_model = "gpt-4o-2024-08-06"  # the `model` Azure answers with
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._queue: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._released = threading.Event()
        self.held = 0  # answers waiting for release()
        # Same ids and timestamps in every answer, so two answers can be compared byte for byte.
        self.fixed_ids = False
        self.usage: dict[str, dict[str, Any]] = {}
        self.scenario = Scenario()
        self.reset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ lifecycle


    @property
    def address(self) -> str:
        """"host:port", the value for AIGW_TEST_UPSTREAM."""
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ control

    def reset(self) -> None:
        """Forget recorded requests and queued overrides; restore default usage and scenario."""
        with self._lock:
            self._released.set()  # nothing a previous test held waits any longer
            self._released = threading.Event()
            self._requests.clear()
            self._queue.clear()
            self.usage = copy.deepcopy(DEFAULT_USAGE)
            self.scenario = Scenario()
            self.azure_model = "gpt-4o-2024-08-06"
            self.fixed_ids = False

    def set(self, **fields: Any) -> None:
        """Change fields of the persistent scenario, e.g. fake.set(delay=0.1, encoding="gzip")."""
        _check_fields(fields)
        with self._lock:
            for k, v in fields.items():
                setattr(self.scenario, k, v)

    def enqueue(self, **fields: Any) -> None:
        """Overrides for the next request only (each call queues one request's overrides)."""
        _check_fields(fields)
        with self._lock:
            self._queue.append(fields)

    def release(self) -> None:
        """Let the answers held now (hold_response, hold_after) go on; answers held later wait
        for the next release() (wait_for_held first: an answer not yet held is not released)."""
        with self._lock:
            self._released.set()
            self._released = threading.Event()

    def wait_for_held(self, n: int, timeout: float = 30.0) -> None:
        """Block until at least n answers are held; AssertionError on timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.held >= n, timeout):
                raise AssertionError(f"fake provider: expected {n} held answers, got {self.held}")

    async def _hold(self) -> None:
        """Wait for release() (bounded: a test that never releases still ends)."""
        with self._changed:
            released = self._released
            self.held += 1
            self._changed.notify_all()
        try:
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while not released.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            with self._changed:
                self.held -= 1
                self._changed.notify_all()

    def expected_usage(self, api: str) -> dict[str, Any]:
        """The usage object the fake will send for `api` (what a test should expect)."""
        with self._lock:
            if self.scenario.usage is not None:
                return copy.deepcopy(self.scenario.usage)
            return copy.deepcopy(self.usage[api])

    # ------------------------------------------------------------------ recorded requests

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of all recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, api: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.api == api]

    @property
    def last(self) -> RecordedRequest:
        with self._lock:
            if not self._requests:
                raise AssertionError("the fake provider has received no request")
            return self._requests[-1]

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until at least n requests were recorded; AssertionError on timeout."""
        with self._changed:
            ok = self._changed.wait_for(lambda: len(self._requests) >= n, timeout)
            if not ok:
                raise AssertionError(
                    f"fake provider: expected {n} requests, got {len(self._requests)}"
                )
            return list(self._requests)

    def credentials_seen(self) -> list[tuple[str, str]]:
        """(where, value) of every credential header / ?key= seen, in order."""
        return [item for r in self.requests for item in r.credentials.items()]

    def saw_secret(self, secret: str) -> bool:
        """Whether `secret` appears anywhere in any request (headers, query, body)."""
        needle = secret.encode()
        for r in self.requests:
            if any(secret in v for _, v in r.header_pairs):
                return True
            if secret in urllib.parse.unquote(r.query_string) or needle in r.body:
                return True
        return False

    # ------------------------------------------------------------------ request handling

    def _resolve(self, request: web.Request) -> Scenario:
        with self._lock:
            scenario = copy.deepcopy(self.scenario)
            queued = self._queue.pop(0) if self._queue else {}
        for k, v in queued.items():
            setattr(scenario, k, copy.deepcopy(v))
        for header, (name, conv) in _HEADER_FIELDS.items():
            if header in request.headers:
                setattr(scenario, name, conv(request.headers[header]))
        if "x-fake-scenario" in request.headers:
            fields = json.loads(request.headers["x-fake-scenario"])
            _check_fields(fields)
            for k, v in fields.items():
                setattr(scenario, k, v)
        return scenario

    def _usage(self, api: str, scenario: Scenario) -> dict[str, Any]:
        if scenario.usage is not None:
            return copy.deepcopy(scenario.usage)
        with self._lock:
            return copy.deepcopy(self.usage[api])

    def _next_id(self) -> str:
        if self.fixed_ids:
            return "fake000000"
        return f"fake{next(self._ids):06d}"

    def _created(self) -> int:
        return 1_700_000_000 if self.fixed_ids else int(time.time())

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body_error = None
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            body, body_error = b"", f"body too large: {exc.text}"
        except Exception as exc:  # e.g. a Content-Encoding aiohttp cannot decode
            body, body_error = b"", f"body unreadable: {exc!r}"
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        route = _route(request, parsed)
        api, model, stream = route.api, route.model, route.stream
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            query={k: request.query.getone(k) for k in request.query.keys()},
            headers=CIMultiDict(request.headers),
            header_pairs=[(k.decode("latin-1"), v.decode("latin-1"))
                          for k, v in request.raw_headers],
            body=body,
            json=parsed,
            api=api,
            model=model,
            stream=stream,
            received_at=time.monotonic(),
            body_error=body_error,
        )
        with self._changed:
            self._requests.append(rec)
            self._changed.notify_all()
        if body_error is not None:
            status = 413 if body_error.startswith("body too large") else 400
            return web.Response(status=status, text=body_error)

        scenario = self._resolve(request)
        if scenario.response_delay:
            await asyncio.sleep(scenario.response_delay)
        if scenario.hold_response:
            await self._hold()
        if route.handler is None:
            status = 404
            err = (ERROR_BODIES.get(api or "openai", openai_error_body))(
                404, f"fake provider: no route for {request.method} {request.path}"
            )
            return await self._send_json(request, status, err, scenario)
        if scenario.status != 200 and route.api is not None:
            return await self._send_error(request, route.api, scenario)
        return await route.handler(self, request, rec, scenario)

    async def _send_error(
        self, request: web.Request, api: str, scenario: Scenario
    ) -> web.StreamResponse:
        body = scenario.error_body
        if body is None:
            body = ERROR_BODIES[api](scenario.status, scenario.error_message)
        return await self._send_json(request, scenario.status, body, scenario)

    async def _send_json(
        self,
        request: web.Request,
        status: int,
        obj: Any,
        scenario: Scenario,
        content_type: str = "application/json",
    ) -> web.StreamResponse:
        if isinstance(obj, bytes):
            raw = obj
        elif isinstance(obj, str):
            raw = obj.encode()
        else:
            raw = json.dumps(obj, indent=2).encode()
        enc = _Encoder(scenario.encoding)
        data = enc.all(raw)
        resp = web.StreamResponse(status=status)
        resp.headers["Content-Type"] = content_type
        resp.headers["x-request-id"] = f"req_{self._next_id()}"
        if enc.header:
            resp.headers["Content-Encoding"] = enc.header
        resp.headers.update(scenario.headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        if scenario.break_after is not None:
            await resp.write(data[: len(data) // 2])
            _break_connection(request)
            return resp
        await resp.write(data)
        await resp.write_eof()
        return resp

    async def _send_stream(
        self,
        request: web.Request,
        events: list[bytes],
        scenario: Scenario,
        content_type: str,
        error_event: bytes | None = None,
        trailer: bytes = b"",
    ) -> web.StreamResponse:
        """Send events one write per event (flushed to the socket each time)."""
        enc = _Encoder(scenario.encoding)
        resp = web.StreamResponse(status=200)
        resp.headers["Content-Type"] = content_type
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["x-request-id"] = f"req_{self._next_id()}"
        if enc.header:
            resp.headers["Content-Encoding"] = enc.header
        resp.headers.update(scenario.headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i, event in enumerate(events):
            if scenario.break_after is not None and i >= scenario.break_after:
                _break_connection(request)
                return resp
            if scenario.stream_error_after is not None and i >= scenario.stream_error_after:
                if error_event is not None:
                    await resp.write(enc.chunk(error_event))
                break
            if i and scenario.delay:
                await asyncio.sleep(scenario.delay)
            if scenario.hold_after is not None and i == scenario.hold_after:
                await self._hold()
            await resp.write(enc.chunk(event))
        tail = enc.chunk(trailer) if trailer else b""
        await resp.write_eof(tail + enc.finish())
        return resp

    # ------------------------------------------------------------------ OpenAI chat / Azure

    async def _openai_chat(
        self, request: web.Request, rec: RecordedRequest, sc: Scenario
    ) -> web.StreamResponse:
        api = rec.api or "openai"
        azure = api == "azure"
        body = rec.json if isinstance(rec.json, dict) else {}
        model = self.azure_model if azure else str(body.get("model", "gpt-4o-mini"))
        usage = self._usage(api, sc)
        cid = f"chatcmpl-{self._next_id()}"
        created = self._created()
        if not rec.stream:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": sc.text,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": usage,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
            }
            if azure:
                choice["content_filter_results"] = _AZURE_FILTER
                obj["prompt_filter_results"] = [
                    {"prompt_index": 0, "content_filter_results": _AZURE_FILTER}
                ]
            return await self._send_json(request, 200, obj, sc)

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                c["usage"] = None
            c.update(extra)
            return c

        def choice_delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            d: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
            }
            if azure:
                d["content_filter_results"] = {} if finish else _AZURE_FILTER
            return d

        events: list[bytes] = []
        if azure:  # Azure's first chunk: prompt filter results, no choices, empty model
            events.append(sse({
                "choices": [],
                "created": 0,
                "id": "",
                "model": "",
                "object": "",
                "prompt_filter_results": [
                    {"prompt_index": 0, "content_filter_results": _AZURE_FILTER}
                ],
            }))
        events.append(sse(chunk([choice_delta(
            {"role": "assistant", "content": "", "refusal": None})], obfuscation="Qx")))
        for piece in sc.text_chunks:
            events.append(sse(chunk([choice_delta({"content": piece})], obfuscation="k9")))
        events.append(sse(chunk([choice_delta({}, "stop")], obfuscation="Zz")))
        if include_usage:
            events.append(sse(chunk([], usage=usage, obfuscation="aB")))
        events.append(b"data: [DONE]\n\n")
        err = sse({"error": {"message": sc.error_message, "type": "server_error",
                             "param": None, "code": None}})
        return await self._send_stream(
            request, events, sc, "text/event-stream; charset=utf-8", error_event=err
        )

    # ------------------------------------------------------------------ OpenAI Responses

    async def _openai_responses(
        self, request: web.Request, rec: RecordedRequest, sc: Scenario
    ) -> web.StreamResponse:
        body = rec.json if isinstance(rec.json, dict) else {}
        model = str(body.get("model", "gpt-4o-mini"))
        usage = self._usage("responses", sc)
        rid = f"resp_{self._next_id()}"
        mid = f"msg_{self._next_id()}"
        created = self._created()

        def response(status: str, output: list[Any], usage_obj: Any) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "background": False,
                "error": None,
                "incomplete_details": None,
                "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"),
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None},
                "service_tier": "default",
                "store": True,
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage_obj,
                "user": None,
                "metadata": {},
            }

        text_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": sc.text}
        message = {
            "id": mid,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [text_part],
        }
        if not rec.stream:
            return await self._send_json(request, 200, response("completed", [message], usage), sc)

        seq = itertools.count()

        def ev(kind: str, **payload: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(seq), **payload}, kind)

        loc = {"item_id": mid, "output_index": 0, "content_index": 0}
        events = [
            ev("response.created", response=response("in_progress", [], None)),
            ev("response.in_progress", response=response("in_progress", [], None)),
            ev("response.output_item.added", output_index=0,
               item={**message, "status": "in_progress", "content": []}),
            ev("response.content_part.added", **loc, part={**text_part, "text": ""}),
        ]
        for piece in sc.text_chunks:
            events.append(ev("response.output_text.delta", **loc, delta=piece, logprobs=[]))
        events += [
            ev("response.output_text.done", **loc, text=sc.text, logprobs=[]),
            ev("response.content_part.done", **loc, part=text_part),
            ev("response.output_item.done", output_index=0, item=message),
            ev("response.completed", response=response("completed", [message], usage)),
        ]
        err = sse({"type": "error", "code": "server_error", "message": sc.error_message,
                   "param": None, "sequence_number": 999}, "error")
        return await self._send_stream(
            request, events, sc, "text/event-stream; charset=utf-8", error_event=err
        )

    # ------------------------------------------------------------------ Anthropic

    async def _anthropic_messages(
        self, request: web.Request, rec: RecordedRequest, sc: Scenario
    ) -> web.StreamResponse:
        body = rec.json if isinstance(rec.json, dict) else {}
        model = str(body.get("model", "claude-sonnet-4-6"))
        usage = self._usage("anthropic", sc)
        mid = f"msg_{self._next_id()}"
        message: dict[str, Any] = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": sc.text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not rec.stream:
            return await self._send_json(request, 200, message, sc)

        start_usage = {k: v for k, v in usage.items() if k != "output_tokens"}
        start_usage["output_tokens"] = 1
        out = int(usage.get("output_tokens", 0))
        events = [
            sse({"type": "message_start", "message": {
                **message, "content": [], "stop_reason": None, "usage": start_usage,
            }}, "message_start"),
            sse({"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}, "content_block_start"),
            sse({"type": "ping"}, "ping"),
        ]
        for piece in sc.text_chunks:
            events.append(sse({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": piece}},
                              "content_block_delta"))
        events.append(sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        n_extra = sc.anthropic_extra_message_deltas
        for i in range(n_extra):
            partial = max(1, out * (i + 1) // (n_extra + 1))
            events.append(sse({"type": "message_delta",
                               "delta": {"stop_reason": None, "stop_sequence": None},
                               "usage": {"output_tokens": partial}}, "message_delta"))
        delta_usage: dict[str, Any] = {"output_tokens": out}
        if sc.anthropic_delta_full_usage:
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
                if k in usage:
                    delta_usage[k] = usage[k]
        events.append(sse({"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": delta_usage}, "message_delta"))
        events.append(sse({"type": "message_stop"}, "message_stop"))
        err = sse({"type": "error", "error": {"type": "overloaded_error",
                                              "message": sc.error_message}}, "error")
        return await self._send_stream(
            request, events, sc, "text/event-stream; charset=utf-8", error_event=err
        )

    async def _anthropic_count_tokens(
        self, request: web.Request, rec: RecordedRequest, sc: Scenario
    ) -> web.StreamResponse:
        usage = self._usage("anthropic", sc)
        return await self._send_json(
            request, 200, {"input_tokens": int(usage.get("input_tokens", 0))}, sc
        )

    # ------------------------------------------------------------------ Gemini

    async def _gemini_generate(
        self, request: web.Request, rec: RecordedRequest, sc: Scenario
    ) -> web.StreamResponse:
        model = rec.model or "gemini"
        usage = self._usage("gemini", sc)
        rid = f"resp-{self._next_id()}"

        def candidate(text: str, final: bool) -> dict[str, Any]:
            c: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
            if final:
                c["finishReason"] = "STOP"
            c["index"] = 0
            return c

        if not rec.stream:
            obj = {
                "candidates": [candidate(sc.text, True)],
                "usageMetadata": usage,
                "modelVersion": model,
                "responseId": rid,
            }
            return await self._send_json(request, 200, obj, sc)

        partial = {
            k: usage[k] for k in ("promptTokenCount", "cachedContentTokenCount",
                                  "promptTokensDetails") if k in usage
        }
        partial["totalTokenCount"] = usage.get("promptTokenCount", 0)
        pieces = list(sc.text_chunks) or [""]
        chunks: list[dict[str, Any]] = []
        for i, piece in enumerate(pieces):
            final = i == len(pieces) - 1
            c: dict[str, Any] = {"candidates": [candidate(piece, final)]}
            if final:
                c["usageMetadata"] = usage
            elif sc.gemini_partial_usage:
                c["usageMetadata"] = copy.deepcopy(partial)
            c["modelVersion"] = model
            c["responseId"] = rid
            chunks.append(c)
        err_obj = gemini_error_body(500, sc.error_message)

        if rec.query.get("alt") == "sse":
            events = [sse(c, crlf=True) for c in chunks]
            return await self._send_stream(
                request, events, sc, "text/event-stream", error_event=sse(err_obj, crlf=True)
            )
        # Without alt=sse: one JSON array, sent element by element: "[{..}\r\n,{..}\r\n]"
        events = [
            ("[" if i == 0 else "\r\n,").encode() + json.dumps(c, indent=2).encode()
            for i, c in enumerate(chunks)
        ]
        err = b"\r\n," + json.dumps(err_obj, indent=2).encode()
        return await self._send_stream(
            request, events, sc, "application/json; charset=UTF-8",
            error_event=err, trailer=b"\r\n]",
        )

    async def _gemini_count_tokens(
        self, request: web.Request, rec: RecordedRequest, sc: Scenario
    ) -> web.StreamResponse:
        usage = self._usage("gemini", sc)
        return await self._send_json(
            request, 200, {"totalTokens": int(usage.get("promptTokenCount", 0))}, sc
        )

    # ------------------------------------------------------------------ model lists

    async def _models(
        self, request: web.Request, rec: RecordedRequest, sc: Scenario
    ) -> web.StreamResponse:
        h = rec.headers
        if rec.path.startswith("/v1beta/") or "x-goog-api-key" in h or "key" in rec.query:
            obj: Any = {"models": [
                {"name": "models/gemini-2.5-flash", "displayName": "Gemini 2.5 Flash",
                 "supportedGenerationMethods": ["generateContent", "countTokens"]},
                {"name": "models/gemini-2.5-pro", "displayName": "Gemini 2.5 Pro",
                 "supportedGenerationMethods": ["generateContent", "countTokens"]},
            ]}
        elif "x-api-key" in h or "anthropic-version" in h:
            data = [
                {"type": "model", "id": m, "display_name": m,
                 "created_at": "2025-01-01T00:00:00Z"}
                for m in ("claude-sonnet-4-6", "claude-haiku-4-5")
            ]
            obj = {"data": data, "has_more": False,
                   "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        else:
            obj = {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"}
                for m in ("gpt-4o", "gpt-4o-mini")
            ]}
        return await self._send_json(request, 200, obj, sc)


Handler = Callable[..., Any]


@dataclass
class _Route:
    handler: Handler | None
    api: str | None
    model: str | None = None
    stream: bool = False


def _route(request: web.Request, body: Any) -> _Route:
    path, method = request.path, request.method
    b = body if isinstance(body, dict) else {}
    model = b.get("model") if isinstance(b.get("model"), str) else None
    stream = b.get("stream") is True
    if method == "GET" and path in ("/v1/models", "/v1beta/models"):
        return _Route(FakeProvider._models, None)
    if method != "POST":
        return _Route(None, None)
    if path == "/v1/chat/completions":
        return _Route(FakeProvider._openai_chat, "openai", model, stream)
    if path == "/v1/responses":
        return _Route(FakeProvider._openai_responses, "responses", model, stream)
    if path == "/v1/messages":
        return _Route(FakeProvider._anthropic_messages, "anthropic", model, stream)
    if path == "/v1/messages/count_tokens":
        return _Route(FakeProvider._anthropic_count_tokens, "anthropic", model)
    parts = path.split("/")
    # /openai/deployments/{deployment}/chat/completions
    if len(parts) == 6 and parts[1:3] == ["openai", "deployments"] and parts[4:] == [
        "chat", "completions",
    ]:
        return _Route(FakeProvider._openai_chat, "azure", parts[3], stream)
    if path == "/openai/v1/chat/completions":
        return _Route(FakeProvider._openai_chat, "azure", model, stream)
    # /{version}/models/{model}:{action}
    if len(parts) == 4 and parts[1] in ("v1", "v1beta", "v1alpha") and parts[2] == "models":
        gmodel, _, action = parts[3].partition(":")
        if action == "generateContent":
            return _Route(FakeProvider._gemini_generate, "gemini", gmodel, False)
        if action == "streamGenerateContent":
            return _Route(FakeProvider._gemini_generate, "gemini", gmodel, True)
        if action == "countTokens":
            return _Route(FakeProvider._gemini_count_tokens, "gemini", gmodel)
        return _Route(None, "gemini", gmodel)
    return _Route(None, None, model, stream)


def _break_connection(request: web.Request) -> None:
    """Close the TCP connection now (what was written is flushed, nothing more is sent)."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = set(fields) - SCENARIO_FIELDS
    if unknown:
        raise ValueError(f"unknown Scenario fields: {sorted(unknown)}")
    enc = fields.get("encoding")
    if enc is not None and enc not in available_encodings():
        raise ValueError(f"encoding {enc!r} not available here: {available_encodings()}")
