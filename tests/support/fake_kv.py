"""A local fake of the Cloudflare Workers KV REST API (v4), for sync tests.

`FakeKV` is an aiohttp server on 127.0.0.1 (ephemeral port) running in a background thread with
its own event loop (the same pattern as `FakeProvider`). Point code under test at `fake.api_base`
(`http://127.0.0.1:PORT/client/v4`) with `Authorization: Bearer <fake.token>`.

Routes, under /client/v4/accounts/{account_id}/storage/kv/namespaces/{namespace_id}
(operation names, used by faults and `op_counts`, in brackets):
  GET    /keys?prefix=&limit=&cursor=    [list]        limit 10..1000 (default 1000)
  GET    /values/{key}                   [get]         raw bytes; 404 code 10009 if missing
  PUT    /values/{key}?expiration_ttl=   [put]         raw body, or multipart value + metadata
  DELETE /values/{key}                   [delete]
  GET    /metadata/{key}                 [metadata]    result: the metadata (or null)
  POST   /bulk/get                       [bulk_get]    {"keys": [<=100], "type", "withMetadata"}
  PUT    /bulk                           [bulk_put]    [{key, value, base64?, expiration?,
                                                         expiration_ttl?, metadata?}] <= 10,000
  POST   /bulk/delete  (and DELETE /bulk) [bulk_delete] ["key", ...] <= 10,000
  GET    (the namespace itself)          [namespace]   {id, title, supports_url_encoding}
Everything else: 404 code 7003 "Could not route to ...". Keys are percent-encoded single path
segments (a raw "/" inside a key is a routing error, as it is for the real API).

Every JSON answer is the v4 envelope {"success", "errors": [{"code", "message"}], "messages",
"result", "result_info"?}. Checks, in order: auth (401 code 10000 unless `Authorization: Bearer
<token>`; 403 for a write with a `read_only_tokens` token), the rate limit (429 code 971 with
`retry-after`), account/namespace (404 code 10013), route, injected faults, then the operation.

Control (plain attributes, safe to change while the server runs):
  rate_limit          None or (requests, per_seconds): a token bucket over every authenticated
                      request; `rate_limit_block_s` additionally blocks everything for that long
                      once exceeded (the real API blocks for 5 minutes past 1,200 per 5 minutes)
  empty_pages         int N (N empty pages after the first page) or {page_index: n}: before the
                      data page `page_index` (0 = first; == number of data pages: at the end)
                      the listing returns n empty pages that still carry a cursor
  lag_s               a write becomes visible to reads and listings lag_s seconds after it is
                      made; until then every reader (the writer too) sees the previous value
  enforce_write_rate  False: writes are only logged in `writes`; True: a second write to the
                      same key within `write_interval_s` (1 s) is refused (PUT: 429; bulk: the
                      key is reported in unsuccessful_keys)
  min_ttl             smallest expiration_ttl accepted (the real API: 60); 0 for quick tests
  clock               callable returning epoch seconds (default time.time): expiry, lag, write
                      times and the rate limit all use it, so a test can move time by hand
  fail(...)           inject a `Fault` (see its doc); `clear_faults()`
  fail_keys(*keys)    bulk writes/deletes report these keys as unsuccessful (not applied)

Direct state access (no HTTP, not counted, not logged as writes): put, get, delete, metadata,
entry, keys, load_bulk (wrangler-style list), dump, clear; reset() restores everything.

Observation: `requests` (RecordedRequest, Authorization redacted: the token is never stored,
printed or logged), `request_count`, `op_counts`, `path_counts`, `writes` [(key, time)],
`write_violations()`, `wait_for_requests(n)`, `reset_counters()`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import collections
import json
import math
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.support.server import ThreadedServer

OPS = (
    "list", "get", "put", "delete", "metadata", "bulk_get", "bulk_put", "bulk_delete",
    "namespace",
)
WRITE_OPS = frozenset({"put", "delete", "bulk_put", "bulk_delete"})
FAULT_KINDS = ("status", "timeout", "truncate", "malformed", "unsuccessful")

MAX_KEY_BYTES = 512
MAX_METADATA_BYTES = 1024
MAX_VALUE_BYTES = 25 * 1024 * 1024
MAX_BULK_GET = 100
MAX_BULK_WRITE = 10_000
LIST_LIMIT_MIN, LIST_LIMIT_MAX = 10, 1000

# Codes seen from the real API: 10000, 10009, 10013, 971, 7003. The others are this fake's own
# choice (the real API's code for those cases is not documented); clients should key on the
# HTTP status and treat the code as informative.
CODE_AUTH = 10000
CODE_KEY_NOT_FOUND = 10009
CODE_NAMESPACE_NOT_FOUND = 10013
CODE_RATE_LIMITED = 971
CODE_NO_ROUTE = 7003
CODE_METHOD_NOT_ALLOWED = 10405
CODE_BAD_REQUEST = 10026
CODE_KEY_TOO_LONG = 10033
CODE_METADATA_TOO_LARGE = 10034
CODE_VALUE_TOO_LARGE = 10035
CODE_WRITE_RATE = 10100
CODE_INTERNAL = 10001

MSG_RATE_LIMITED = "Please wait and consider throttling your request speed"


def _now_wall() -> float:
    return time.time()


# --------------------------------------------------------------------------- data model


@dataclass(slots=True)
class _Version:
    visible_at: float
    value: bytes | None  # None: a deletion
    metadata: Any = None
    expiration: int | None = None


@dataclass(frozen=True)
class Entry:
    """A stored key as readers see it now."""

    key: str
    value: bytes
    metadata: Any
    expiration: int | None

    @property
    def text(self) -> str:
        return self.value.decode()


@dataclass
class Fault:
    """One injected failure, matched by operation name (see OPS, or "*" for any).

    kind:
      "status"        answer `status` (429: code 971 and a `retry-after` header; 5xx: an error
                      envelope) without running the operation
      "timeout"       run the operation, then sleep `delay` seconds before answering
      "truncate"      run the operation, send its headers with the full Content-Length and half
                      of the body, then close the connection
      "malformed"     run the operation, answer 200 with a body that is not valid JSON
      "unsuccessful"  answer 200 with {"success": false, "errors": [...]} without running it
    `after`: let this many matching calls through first (counted from when the fault was added);
    `times`: how many calls fail (None: every later matching call). `apply` overrides whether
    the operation runs (its write lands) before the fault's answer.
    """

    op: str
    kind: str = "status"
    status: int = 503
    times: int | None = 1
    after: int = 0
    retry_after: float | None = None
    delay: float = 5.0
    code: int | None = None
    message: str | None = None
    body: bytes | None = None  # replaces the answer's body (status/unsuccessful/malformed)
    apply: bool | None = None
    seen: int = 0  # matching calls so far
    fired: int = 0  # calls this fault failed

    def __post_init__(self) -> None:
        if self.op != "*" and self.op not in OPS:
            raise ValueError(f"unknown operation {self.op!r}; one of {OPS} or '*'")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times

    @property
    def runs_operation(self) -> bool:
        if self.apply is not None:
            return self.apply
        return self.kind in ("timeout", "truncate", "malformed")


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it (the Authorization header value is redacted)."""

    method: str
    path: str  # raw (still percent-encoded), without the query string
    query_string: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes
    json: Any
    op: str | None
    key: str | None  # the decoded key of /values/ and /metadata/ requests
    authorized: bool  # the bearer token matched
    received_at: float  # time.monotonic()


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class _ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def envelope(
    result: Any = None,
    *,
    success: bool = True,
    errors: list[dict[str, Any]] | None = None,
    result_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "success": success,
        "errors": errors or [],
        "messages": [],
        "result": result,
    }
    if result_info is not None:
        obj["result_info"] = result_info
    return obj


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _error_reply(status: int, code: int, message: str, headers: dict[str, str] | None = None
                 ) -> _Reply:
    body = envelope(None, success=False, errors=[{"code": code, "message": message}])
    return _Reply(status, _json_bytes(body), headers=dict(headers or {}))


def _ok(result: Any, **kw: Any) -> _Reply:
    return _Reply(200, _json_bytes(envelope(result, **kw)))


def _encode_cursor(state: list[Any]) -> str:
    raw = _json_bytes(["fkv1", *state])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        state = json.loads(raw)
    except (ValueError, binascii.Error) as e:
        raise _ApiError(400, CODE_BAD_REQUEST, "Invalid cursor") from e
    if (not isinstance(state, list) or len(state) != 4 or state[0] != "fkv1"
            or not (state[1] is None or isinstance(state[1], str))
            or not isinstance(state[2], int) or not isinstance(state[3], int)):
        raise _ApiError(400, CODE_BAD_REQUEST, "Invalid cursor")
    return state[1:]


def _check_key(key: str) -> None:
    if key in ("", ".", ".."):
        raise _ApiError(400, CODE_BAD_REQUEST, f"Invalid key name: {key!r}")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise _ApiError(
            400,
            CODE_KEY_TOO_LONG,
            f"Key name is too long: {len(key.encode())} bytes, the limit is {MAX_KEY_BYTES}",
        )


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    size = len(_json_bytes(metadata))
    if size > MAX_METADATA_BYTES:
        raise _ApiError(
            400, CODE_METADATA_TOO_LARGE,
            f"Metadata is too large: {size} bytes serialized, the limit is {MAX_METADATA_BYTES}",
        )


def _parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    params = {}
    for piece in content_type.split(";")[1:]:
        k, _, v = piece.strip().partition("=")
        params[k.lower()] = v.strip('"')
    boundary = params.get("boundary")
    if not boundary:
        raise _ApiError(400, CODE_BAD_REQUEST, "multipart body without a boundary")
    parts: dict[str, bytes] = {}
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        if chunk.startswith(b"\r\n"):
            chunk = chunk[2:]
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name = None
        for line in head.decode("latin-1").split("\r\n"):
            hname, _, hval = line.partition(":")
            if hname.strip().lower() == "content-disposition":
                for item in hval.split(";"):
                    k, _, v = item.strip().partition("=")
                    if k.lower() == "name":
                        name = v.strip('"')
        if name is not None:
            parts[name] = content
    return parts


# --------------------------------------------------------------------------- the server


class FakeKV(ThreadedServer):
    """The fake Workers KV API. Use as a context manager or call start()/stop()."""

    thread_name = "fake-kv"
    max_body = 128 * 1024 * 1024

    def __init__(
        self,
        token: str | None = None,
        account_id: str = "0123456789abcdef0123456789abcdef",
        namespace_id: str = "fedcba9876543210fedcba9876543210",
        *,
        title: str = "aigw-fake",
        read_only_tokens: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.token = token if token is not None else "fake-kv-" + secrets.token_hex(16)
        self.read_only_tokens = set(read_only_tokens)
        self.account_id = account_id
        self.namespace_id = namespace_id
        self.title = title
        self.host, self.port = host, port
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._data: dict[str, list[_Version]] = {}
        self._sorted: list[str] = []
        self.clock: Callable[[], float] = _now_wall
        self.lag_s = 0.0
        self.empty_pages: int | dict[int, int] = 0
        self.enforce_write_rate = False
        self.write_interval_s = 1.0
        self.min_ttl = 60
        self.rate_limit_block_s: float | None = None
        self._rate_limit: tuple[int, float] | None = None
        self._bucket = 0.0
        self._bucket_at = 0.0
        self._blocked_until = 0.0
        self.faults: list[Fault] = []
        self._failing_keys: dict[str, int | None] = {}
        self._last_write: dict[str, float] = {}
        self._requests: list[RecordedRequest] = []
        self.request_count = 0
        self.op_counts: collections.Counter[str] = collections.Counter()
        self.path_counts: collections.Counter[str] = collections.Counter()
        self.writes: list[tuple[str, float]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:  # never shows the token
        return (f"FakeKV(url={self.url!r}, account_id={self.account_id!r}, "
                f"namespace_id={self.namespace_id!r}, keys={len(self._data)})")

    # ------------------------------------------------------------------ lifecycle


    @property
    def api_base(self) -> str:
        """The value for --api-base: http://127.0.0.1:PORT/client/v4"""
        return f"{self.url}/client/v4"

    @property
    def namespace_path(self) -> str:
        return f"/client/v4/accounts/{self.account_id}/storage/kv/namespaces/{self.namespace_id}"

    @property
    def namespace_url(self) -> str:
        return self.url + self.namespace_path

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # ------------------------------------------------------------------ control

    @property
    def rate_limit(self) -> tuple[int, float] | None:
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: tuple[int, float] | None) -> None:
        with self._lock:
            if value is not None:
                n, per = value
                if n < 1 or per <= 0:
                    raise ValueError("rate_limit is (requests >= 1, per_seconds > 0)")
                value = (int(n), float(per))
            self._rate_limit = value
            self._bucket = float(value[0]) if value else 0.0
            self._bucket_at = self.clock()
            self._blocked_until = 0.0

    def fail(
        self,
        op: str,
        kind: str = "status",
        *,
        status: int = 503,
        times: int | None = 1,
        after: int = 0,
        retry_after: float | None = None,
        delay: float = 5.0,
        code: int | None = None,
        message: str | None = None,
        body: bytes | str | None = None,
        apply: bool | None = None,
    ) -> Fault:
        """Add a fault, e.g. fail("list", status=503, times=1, after=2); returns it."""
        if isinstance(body, str):
            body = body.encode()
        fault = Fault(op, kind, status, times, after, retry_after, delay, code, message, body,
                      apply)
        with self._lock:
            self.faults.append(fault)
        return fault

    def add_fault(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()
            self._failing_keys.clear()

    def fail_keys(self, *keys: str, times: int | None = 1) -> None:
        """Bulk writes/deletes skip these keys and report them in unsuccessful_keys
        (`times` bulk operations each; None: always)."""
        with self._lock:
            for k in keys:
                self._failing_keys[k] = times

    def reset(self) -> None:
        """Back to a fresh fake (same token, ids and port): no data, faults, limits or logs."""
        with self._lock:
            self.clear()
            self.faults.clear()
            self._failing_keys.clear()
            self.clock = _now_wall
            self.lag_s = 0.0
            self.empty_pages = 0
            self.enforce_write_rate = False
            self.write_interval_s = 1.0
            self.min_ttl = 60
            self.rate_limit_block_s = None
            self.rate_limit = None
            self.reset_counters()

    def reset_counters(self) -> None:
        """Forget recorded requests, counts and the write log (the data stays)."""
        with self._lock:
            self._requests.clear()
            self.request_count = 0
            self.op_counts.clear()
            self.path_counts.clear()
            self.writes.clear()
            self._last_write.clear()

    # ------------------------------------------------------------------ observation

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, op: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.op == op]

    @property
    def last(self) -> RecordedRequest:
        with self._lock:
            if not self._requests:
                raise AssertionError("the fake KV has received no request")
            return self._requests[-1]

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._requests) >= n, timeout):
                raise AssertionError(f"fake KV: expected {n} requests, got {len(self._requests)}")
            return list(self._requests)

    def write_violations(self, window: float | None = None) -> list[tuple[str, float]]:
        """(key, interval) for each pair of consecutive writes to one key closer than `window`
        seconds (default write_interval_s): empty when writes never beat one per key per second."""
        window = self.write_interval_s if window is None else window
        last: dict[str, float] = {}
        out = []
        with self._lock:
            for key, t in self.writes:
                if key in last and t - last[key] < window:
                    out.append((key, t - last[key]))
                last[key] = t
        return out

    def saw_secret(self, secret: str) -> bool:
        """Whether `secret` appears in any recorded query, body or non-Authorization header."""
        needle = secret.encode()
        for r in self.requests:
            if any(secret in v for k, v in r.headers.items() if k.lower() != "authorization"):
                return True
            if secret in urllib.parse.unquote(r.query_string) or needle in r.body:
                return True
        return False

    # ------------------------------------------------------------------ direct state access

    def put(
        self,
        key: str,
        value: str | bytes,
        metadata: Any = None,
        *,
        expiration: int | None = None,
        expiration_ttl: int | None = None,
        lag: float = 0.0,
        check: bool = True,
    ) -> None:
        """Store a value (visible now unless `lag`); not logged in `writes`."""
        if check:
            _check_key(key)
            _check_metadata(metadata)
        data = value.encode() if isinstance(value, str) else bytes(value)
        with self._lock:
            now = self.clock()
            exp = self._expiration(now, expiration, expiration_ttl, check=False)
            self._store(key, _Version(now + lag, data, metadata, exp))

    def get(self, key: str, *, latest: bool = False) -> bytes | None:
        """The value a reader sees now (latest=True: the last written, ignoring lag)."""
        e = self.entry(key, latest=latest)
        return None if e is None else e.value

    def metadata(self, key: str, *, latest: bool = False) -> Any:
        e = self.entry(key, latest=latest)
        return None if e is None else e.metadata

    def entry(self, key: str, *, latest: bool = False) -> Entry | None:
        with self._lock:
            now = self.clock()
            if latest:
                vs = self._data.get(key)
                v = vs[-1] if vs else None
                if v is None or v.value is None or self._expired(v, now):
                    return None
            else:
                v = self._visible(key, now)
                if v is None:
                    return None
            assert v.value is not None
            return Entry(key, v.value, v.metadata, v.expiration)

    def delete(self, key: str, *, lag: float = 0.0) -> None:
        with self._lock:
            if key in self._data:
                self._store(key, _Version(self.clock() + lag, None))

    def keys(self, prefix: str = "") -> list[str]:
        """Visible keys (sorted by UTF-8 bytes)."""
        with self._lock:
            now = self.clock()
            start = bisect.bisect_left(self._sorted, prefix)
            out = []
            for k in self._sorted[start:]:
                if not k.startswith(prefix):
                    break
                if self._visible(k, now, purge=False) is not None:
                    out.append(k)
            return out

    def load_bulk(self, items: Iterable[dict[str, Any]]) -> int:
        """Load a wrangler-style list [{"key", "value", "metadata"?, "base64"?, "expiration"?,
        "expiration_ttl"?}] (visible at once); returns the number of pairs."""
        with self._lock:
            now = self.clock()
            versions = []
            for item in items:
                key = item["key"]
                _check_key(key)
                _check_metadata(item.get("metadata"))
                value = item["value"]
                if item.get("base64"):
                    data = base64.b64decode(value)
                else:
                    data = value.encode() if isinstance(value, str) else bytes(value)
                exp = self._expiration(now, item.get("expiration"), item.get("expiration_ttl"),
                                       check=False)
                versions.append((key, _Version(now, data, item.get("metadata"), exp)))
            self._store_many(versions)
            return len(versions)

    def dump(self) -> list[dict[str, Any]]:
        """The visible pairs as a wrangler-style list (text values; base64 for binary ones)."""
        out = []
        with self._lock:
            now = self.clock()
            for k in self._sorted:
                v = self._visible(k, now, purge=False)
                if v is None:
                    continue
                assert v.value is not None
                try:
                    item: dict[str, Any] = {"key": k, "value": v.value.decode()}
                except UnicodeDecodeError:
                    item = {"key": k, "value": base64.b64encode(v.value).decode(), "base64": True}
                if v.metadata is not None:
                    item["metadata"] = v.metadata
                if v.expiration is not None:
                    item["expiration"] = v.expiration
                out.append(item)
        return out

    def clear(self) -> None:
        """Remove every key at once (no lag)."""
        with self._lock:
            self._data.clear()
            self._sorted.clear()

    # ------------------------------------------------------------------ storage internals

    def _expired(self, v: _Version, now: float) -> bool:
        return v.expiration is not None and v.expiration <= now

    def _visible(self, key: str, now: float, purge: bool = True) -> _Version | None:
        vs = self._data.get(key)
        if not vs:
            return None
        for i in range(len(vs) - 1, -1, -1):
            if vs[i].visible_at <= now:
                if i:
                    del vs[:i]
                v = vs[0]
                break
        else:
            return None
        if v.value is None or self._expired(v, now):
            if purge and len(vs) == 1:
                self._remove(key)
            return None
        return v

    def _dead(self, key: str, now: float) -> bool:
        """Deleted or expired, with no pending write: safe to forget."""
        vs = self._data.get(key)
        if not vs or len(vs) != 1:
            return False
        v = vs[0]
        return v.visible_at <= now and (v.value is None or self._expired(v, now))

    def _remove(self, key: str) -> None:
        self._data.pop(key, None)
        i = bisect.bisect_left(self._sorted, key)
        if i < len(self._sorted) and self._sorted[i] == key:
            del self._sorted[i]

    def _store(self, key: str, version: _Version) -> None:
        vs = self._data.get(key)
        if vs is None:
            self._data[key] = [version]
            bisect.insort(self._sorted, key)
        else:
            vs.append(version)

    def _store_many(self, versions: list[tuple[str, _Version]]) -> None:
        new = []
        for key, version in versions:
            vs = self._data.get(key)
            if vs is None:
                self._data[key] = [version]
                new.append(key)
            else:
                vs.append(version)
        if len(new) > 64:
            self._sorted = sorted(self._data)
        else:
            for key in new:
                bisect.insort(self._sorted, key)

    def _expiration(self, now: float, expiration: Any, ttl: Any, check: bool = True
                    ) -> int | None:
        if ttl not in (None, ""):
            try:
                ttl_i = int(ttl)
            except (TypeError, ValueError) as e:
                raise _ApiError(400, CODE_BAD_REQUEST, f"Invalid expiration_ttl of {ttl}") from e
            if check and ttl_i < self.min_ttl:
                raise _ApiError(400, CODE_BAD_REQUEST,
                                f"Invalid expiration_ttl of {ttl_i}. Expiration TTL must be at "
                                f"least {self.min_ttl}.")
            return int(now) + ttl_i
        if expiration not in (None, ""):
            try:
                exp_i = int(expiration)
            except (TypeError, ValueError) as e:
                raise _ApiError(400, CODE_BAD_REQUEST,
                                f"Invalid expiration of {expiration}") from e
            if check and exp_i < now + self.min_ttl:
                raise _ApiError(400, CODE_BAD_REQUEST,
                                f"Invalid expiration of {exp_i}. Expiration times must be at "
                                f"least {self.min_ttl} seconds in the future.")
            return exp_i
        return None

    def _empty_map(self) -> dict[int, int]:
        ep = self.empty_pages
        if isinstance(ep, int):
            return {1: ep} if ep > 0 else {}
        return {int(k): int(v) for k, v in ep.items() if v > 0}

    def _write_allowed(self, key: str, now: float) -> bool:
        last = self._last_write.get(key)
        return not (self.enforce_write_rate and last is not None
                    and now - last < self.write_interval_s)

    def _log_write(self, key: str, now: float) -> None:
        self.writes.append((key, now))
        self._last_write[key] = now

    def _key_fails(self, key: str) -> bool:
        if key not in self._failing_keys:
            return False
        left = self._failing_keys[key]
        if left is not None:
            if left <= 1:
                del self._failing_keys[key]
            else:
                self._failing_keys[key] = left - 1
        return True

    # ------------------------------------------------------------------ operations

    def _op_list(self, query: dict[str, str]) -> _Reply:
        prefix = query.get("prefix", "")
        raw_limit = query.get("limit", "")
        try:
            limit = int(raw_limit) if raw_limit else LIST_LIMIT_MAX
        except ValueError as e:
            raise _ApiError(400, CODE_BAD_REQUEST, f"Invalid list limit: {raw_limit}") from e
        if not LIST_LIMIT_MIN <= limit <= LIST_LIMIT_MAX:
            raise _ApiError(400, CODE_BAD_REQUEST,
                            f"Invalid key limit: {limit}. Must be between {LIST_LIMIT_MIN} and "
                            f"{LIST_LIMIT_MAX}")
        cursor = query.get("cursor", "")
        after, page, empties = _decode_cursor(cursor) if cursor else (None, 0, 0)
        empty_map = self._empty_map()
        now = self.clock()
        start = bisect.bisect_left(self._sorted, prefix)
        if after is not None:
            start = max(start, bisect.bisect_right(self._sorted, after))
        if empties < empty_map.get(page, 0):
            if empties + 1 < empty_map[page] or self._more(start, prefix, now):
                nxt = _encode_cursor([after, page, empties + 1])
            else:
                nxt = ""  # nothing left: this empty page is the last one
            return _ok([], result_info={"count": 0, "cursor": nxt})
        items: list[dict[str, Any]] = []
        n = len(self._sorted)
        i = start
        last_scanned = after
        gone = []
        while i < n and len(items) < limit:
            k = self._sorted[i]
            if not k.startswith(prefix):
                break
            v = self._visible(k, now, purge=False)
            last_scanned = k
            i += 1
            if v is None:
                if self._dead(k, now):
                    gone.append(k)
                continue
            item: dict[str, Any] = {"name": k}
            if v.expiration is not None:
                item["expiration"] = v.expiration
            if v.metadata is not None:
                item["metadata"] = v.metadata
            items.append(item)
        more = self._more(i, prefix, now)
        for k in gone:
            self._remove(k)
        if more or empty_map.get(page + 1, 0) > 0:
            nxt = _encode_cursor([last_scanned, page + 1, 0])
        else:
            nxt = ""
        return _ok(items, result_info={"count": len(items), "cursor": nxt})

    def _more(self, i: int, prefix: str, now: float) -> bool:
        """Whether a visible key with `prefix` sits at or after sorted index i."""
        n = len(self._sorted)
        while i < n:
            k = self._sorted[i]
            if not k.startswith(prefix):
                return False
            if self._visible(k, now, purge=False) is not None:
                return True
            i += 1
        return False

    def _op_get(self, key: str) -> _Reply:
        _check_key(key)
        v = self._visible(key, self.clock())
        if v is None:
            raise _ApiError(404, CODE_KEY_NOT_FOUND, "get: 'key not found'")
        assert v.value is not None
        headers = {}
        if v.expiration is not None:
            headers["expiration"] = str(v.expiration)
        return _Reply(200, v.value, "application/octet-stream", headers)

    def _op_metadata(self, key: str) -> _Reply:
        _check_key(key)
        v = self._visible(key, self.clock())
        if v is None:
            raise _ApiError(404, CODE_KEY_NOT_FOUND, "metadata: 'key not found'")
        return _ok(v.metadata)

    def _op_put(self, key: str, query: dict[str, str], headers: CIMultiDict[str], body: bytes
                ) -> _Reply:
        _check_key(key)
        ctype = headers.get("Content-Type", "")
        metadata = None
        if ctype.lower().startswith("multipart/form-data"):
            parts = _parse_multipart(body, ctype)
            if "value" not in parts:
                raise _ApiError(400, CODE_BAD_REQUEST, "multipart body without a 'value' part")
            value = parts["value"]
            if "metadata" in parts and parts["metadata"].strip():
                try:
                    metadata = json.loads(parts["metadata"])
                except ValueError as e:
                    raise _ApiError(400, CODE_BAD_REQUEST,
                                    "metadata must be valid JSON") from e
        else:
            value = body
        _check_metadata(metadata)
        if len(value) > MAX_VALUE_BYTES:
            raise _ApiError(413, CODE_VALUE_TOO_LARGE, "Value is too large (limit 25 MiB)")
        now = self.clock()
        exp = self._expiration(now, query.get("expiration"), query.get("expiration_ttl"))
        if not self._write_allowed(key, now):
            raise _ApiError(429, CODE_WRITE_RATE, "KV PUT failed: 429 Too Many Requests",
                            {"retry-after": "1"})
        self._store(key, _Version(now + self.lag_s, value, metadata, exp))
        self._log_write(key, now)
        return _ok({})

    def _op_delete(self, key: str) -> _Reply:
        _check_key(key)
        now = self.clock()
        if not self._write_allowed(key, now):
            raise _ApiError(429, CODE_WRITE_RATE, "KV DELETE failed: 429 Too Many Requests",
                            {"retry-after": "1"})
        if key in self._data:
            self._store(key, _Version(now + self.lag_s, None))
        self._log_write(key, now)
        return _ok({})

    def _op_bulk_get(self, body: Any) -> _Reply:
        if not isinstance(body, dict) or not isinstance(body.get("keys"), list):
            raise _ApiError(400, CODE_BAD_REQUEST, "Body must be a JSON object with 'keys'")
        keys = body["keys"]
        if len(keys) > MAX_BULK_GET:
            raise _ApiError(400, CODE_BAD_REQUEST,
                            f"Too many keys: {len(keys)}; at most {MAX_BULK_GET} per request")
        if not all(isinstance(k, str) for k in keys):
            raise _ApiError(400, CODE_BAD_REQUEST, "'keys' must be strings")
        kind = body.get("type", "text")
        if kind not in ("text", "json"):
            raise _ApiError(400, CODE_BAD_REQUEST, f"Invalid type {kind!r}: 'text' or 'json'")
        with_md = bool(body.get("withMetadata", False))
        now = self.clock()
        values: dict[str, Any] = {}
        for k in keys:
            _check_key(k)
            v = self._visible(k, now)
            if v is None:
                values[k] = None
                continue
            assert v.value is not None
            try:
                text = v.value.decode()
            except UnicodeDecodeError as e:
                raise _ApiError(400, CODE_BAD_REQUEST,
                                f"Key {k!r} does not hold a text value") from e
            val: Any = text
            if kind == "json":
                try:
                    val = json.loads(text)
                except ValueError as e:
                    raise _ApiError(400, CODE_BAD_REQUEST,
                                    f"Key {k!r} does not hold valid JSON") from e
            if with_md:
                item: dict[str, Any] = {"value": val, "metadata": v.metadata}
                if v.expiration is not None:
                    item["expiration"] = v.expiration
                values[k] = item
            else:
                values[k] = val
        return _ok({"values": values})

    def _op_bulk_put(self, body: Any) -> _Reply:
        if not isinstance(body, list):
            raise _ApiError(400, CODE_BAD_REQUEST, "Body must be a JSON array of pairs")
        if len(body) > MAX_BULK_WRITE:
            raise _ApiError(400, CODE_BAD_REQUEST,
                            f"Too many pairs: {len(body)}; at most {MAX_BULK_WRITE} per request")
        now = self.clock()
        prepared = []
        for item in body:
            if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not \
                    isinstance(item.get("value"), str):
                raise _ApiError(400, CODE_BAD_REQUEST,
                                "Each pair needs a string 'key' and a string 'value'")
            key = item["key"]
            _check_key(key)
            metadata = item.get("metadata")
            _check_metadata(metadata)
            if item.get("base64"):
                try:
                    data = base64.b64decode(item["value"], validate=True)
                except (ValueError, binascii.Error) as e:
                    raise _ApiError(400, CODE_BAD_REQUEST,
                                    f"Invalid base64 value for key {key!r}") from e
            else:
                data = item["value"].encode()
            if len(data) > MAX_VALUE_BYTES:
                raise _ApiError(413, CODE_VALUE_TOO_LARGE, "Value is too large (limit 25 MiB)")
            exp = self._expiration(now, item.get("expiration"), item.get("expiration_ttl"))
            prepared.append((key, data, metadata, exp))
        ok, failed, versions = 0, [], []
        for key, data, metadata, exp in prepared:
            if self._key_fails(key) or not self._write_allowed(key, now):
                failed.append(key)
                continue
            versions.append((key, _Version(now + self.lag_s, data, metadata, exp)))
            self._log_write(key, now)
            ok += 1
        self._store_many(versions)
        return _ok({"successful_key_count": ok, "unsuccessful_keys": failed})

    def _op_bulk_delete(self, body: Any) -> _Reply:
        if not isinstance(body, list) or not all(isinstance(k, str) for k in body):
            raise _ApiError(400, CODE_BAD_REQUEST, "Body must be a JSON array of key names")
        if len(body) > MAX_BULK_WRITE:
            raise _ApiError(400, CODE_BAD_REQUEST,
                            f"Too many keys: {len(body)}; at most {MAX_BULK_WRITE} per request")
        for k in body:
            _check_key(k)
        now = self.clock()
        ok, failed = 0, []
        for key in body:
            if self._key_fails(key) or not self._write_allowed(key, now):
                failed.append(key)
                continue
            if key in self._data:
                self._store(key, _Version(now + self.lag_s, None))
            self._log_write(key, now)
            ok += 1
        return _ok({"successful_key_count": ok, "unsuccessful_keys": failed})

    def _op_namespace(self) -> _Reply:
        return _ok({"id": self.namespace_id, "title": self.title, "supports_url_encoding": True})

    # ------------------------------------------------------------------ request handling

    def _route(self, method: str, raw_path: str) -> tuple[str | None, str | None]:
        """(op, key) of a known path; op None: a method that path does not take."""
        prefix = "/client/v4/accounts/"
        if not raw_path.startswith(prefix):
            raise _ApiError(404, CODE_NO_ROUTE, f"Could not route to {raw_path}, perhaps your "
                                                f"object identifier is invalid?")
        parts = raw_path[len(prefix):].split("/")
        # account / storage / kv / namespaces / ns / rest...
        if len(parts) < 5 or parts[1:4] != ["storage", "kv", "namespaces"]:
            raise _ApiError(404, CODE_NO_ROUTE, f"Could not route to {raw_path}, perhaps your "
                                                f"object identifier is invalid?")
        account, ns, rest = parts[0], parts[4], parts[5:]
        if account != self.account_id or ns != self.namespace_id:
            raise _ApiError(404, CODE_NAMESPACE_NOT_FOUND, "namespace not found")
        table: dict[tuple[str, ...], dict[str, str]] = {
            (): {"GET": "namespace"},
            ("keys",): {"GET": "list"},
            ("bulk",): {"PUT": "bulk_put", "DELETE": "bulk_delete"},
            ("bulk", "get"): {"POST": "bulk_get"},
            ("bulk", "delete"): {"POST": "bulk_delete"},
        }
        if len(rest) == 2 and rest[0] in ("values", "metadata"):
            try:
                key = urllib.parse.unquote_to_bytes(rest[1]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise _ApiError(400, CODE_BAD_REQUEST, "key is not valid UTF-8") from e
            methods = ({"GET": "get", "PUT": "put", "DELETE": "delete"} if rest[0] == "values"
                       else {"GET": "metadata"})
            return methods.get(method), key
        if tuple(rest) in table:
            return table[tuple(rest)].get(method), None
        raise _ApiError(404, CODE_NO_ROUTE, f"Could not route to {raw_path}, perhaps your "
                                            f"object identifier is invalid?")

    def _check_rate(self, now: float) -> None:
        rl = self._rate_limit
        if rl is None:
            return
        if now < self._blocked_until:
            wait = self._blocked_until - now
            raise _ApiError(429, CODE_RATE_LIMITED, MSG_RATE_LIMITED,
                            {"retry-after": str(max(1, math.ceil(wait)))})
        n, per = rl
        rate = n / per
        self._bucket = min(float(n), self._bucket + (now - self._bucket_at) * rate)
        self._bucket_at = now
        if self._bucket >= 1.0:
            self._bucket -= 1.0
            return
        if self.rate_limit_block_s:
            self._blocked_until = now + self.rate_limit_block_s
            wait = self.rate_limit_block_s
        else:
            wait = (1.0 - self._bucket) / rate
        raise _ApiError(429, CODE_RATE_LIMITED, MSG_RATE_LIMITED,
                        {"retry-after": str(max(1, math.ceil(wait)))})

    def _match_fault(self, op: str) -> Fault | None:
        chosen = None
        for f in self.faults:
            if f.exhausted or (f.op != "*" and f.op != op):
                continue
            f.seen += 1
            if chosen is None and f.seen > f.after:
                f.fired += 1
                chosen = f
        return chosen

    def _fault_reply(self, fault: Fault) -> _Reply:
        if fault.kind == "unsuccessful":
            code = fault.code if fault.code is not None else CODE_INTERNAL
            msg = fault.message or "fake KV: injected failure"
            body = fault.body or _json_bytes(
                envelope(None, success=False, errors=[{"code": code, "message": msg}]))
            return _Reply(200, body)
        status = fault.status
        headers = {}
        if status == 429:
            code = fault.code if fault.code is not None else CODE_RATE_LIMITED
            msg = fault.message or MSG_RATE_LIMITED
            ra = fault.retry_after if fault.retry_after is not None else 1
            headers["retry-after"] = str(max(0, math.ceil(ra)))
        else:
            code = fault.code if fault.code is not None else CODE_INTERNAL
            msg = fault.message or {
                500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                504: "Gateway Timeout",
            }.get(status, "fake KV: injected failure")
            if fault.retry_after is not None:
                headers["retry-after"] = str(max(0, math.ceil(fault.retry_after)))
        reply = _error_reply(status, code, msg, headers)
        if fault.body is not None:
            reply.body = fault.body
        return reply

    def _handle(self, op: str, key: str | None, rec: RecordedRequest,
                headers: CIMultiDict[str]) -> _Reply:
        if op == "list":
            return self._op_list(rec.query)
        if op == "get":
            assert key is not None
            return self._op_get(key)
        if op == "metadata":
            assert key is not None
            return self._op_metadata(key)
        if op == "put":
            assert key is not None
            return self._op_put(key, rec.query, headers, rec.body)
        if op == "delete":
            assert key is not None
            return self._op_delete(key)
        if op == "namespace":
            return self._op_namespace()
        if rec.json is None:
            raise _ApiError(400, CODE_BAD_REQUEST, "Body must be valid JSON")
        if op == "bulk_get":
            return self._op_bulk_get(rec.json)
        if op == "bulk_put":
            return self._op_bulk_put(rec.json)
        return self._op_bulk_delete(rec.json)

    def _process(self, request: web.Request, body: bytes
                 ) -> tuple[_Reply, Fault | None, RecordedRequest]:
        raw_path = request.raw_path.split("?", 1)[0]
        auth = request.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        authorized = token is not None and token == self.token
        read_only = (not authorized and token is not None and token in self.read_only_tokens)
        safe_headers = CIMultiDict(request.headers)
        if "Authorization" in safe_headers:
            safe_headers["Authorization"] = "Bearer <redacted>" if token else "<redacted>"
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        op = key = None
        route_error: _ApiError | None = None
        try:
            op, key = self._route(request.method, raw_path)
            if op is None:
                route_error = _ApiError(405, CODE_METHOD_NOT_ALLOWED,
                                        f"Method {request.method} not allowed for {raw_path}")
        except _ApiError as e:
            route_error = e
        rec = RecordedRequest(
            method=request.method,
            path=raw_path,
            query_string=request.query_string,
            query={k: request.query.getone(k) for k in request.query.keys()},
            headers=safe_headers,
            body=body,
            json=parsed,
            op=op,
            key=key,
            authorized=authorized,
            received_at=time.monotonic(),
        )
        with self._changed:
            self._requests.append(rec)
            self.request_count += 1
            self.path_counts[f"{request.method} {raw_path}"] += 1
            if op is not None:
                self.op_counts[op] += 1
            self._changed.notify_all()
            try:
                if not authorized and not read_only:
                    raise _ApiError(401, CODE_AUTH, "Authentication error")
                self._check_rate(self.clock())
                if route_error is not None:
                    raise route_error
                assert op is not None
                if read_only and op in WRITE_OPS:
                    raise _ApiError(403, CODE_AUTH, "Authentication error")
                fault = self._match_fault(op)
                if fault is not None and not fault.runs_operation:
                    return self._fault_reply(fault), fault, rec
                try:
                    reply = self._handle(op, key, rec, request.headers)
                except _ApiError as e:
                    reply = _error_reply(e.status, e.code, e.message, e.headers)
                if fault is not None and fault.kind == "malformed":
                    reply = _Reply(200, fault.body or b'{"success": true, "errors": [], '
                                                      b'"messages": [], "result": {"val')
                return reply, fault, rec
            except _ApiError as e:
                return _error_reply(e.status, e.code, e.message, e.headers), None, rec

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        reply, fault, _rec = self._process(request, body)
        if fault is not None and fault.kind == "timeout":
            await asyncio.sleep(fault.delay)
        resp = web.StreamResponse(status=reply.status)
        resp.headers["Content-Type"] = reply.content_type
        resp.headers["cf-ray"] = secrets.token_hex(8) + "-FAKE"
        resp.headers.update(reply.headers)
        resp.content_length = len(reply.body)
        try:
            await resp.prepare(request)
            if fault is not None and fault.kind == "truncate":
                await resp.write(reply.body[: len(reply.body) // 2])
                if request.transport is not None:
                    request.transport.close()
                return resp
            await resp.write(reply.body)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away (e.g. it timed out first)
        return resp
