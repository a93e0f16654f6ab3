"""Replication from a Cloudflare Workers KV namespace into the local store, and this node's usage
pushed back so every node counts every node's spend.

A pass lists the whole namespace (cursor pages), fetches only what changed (records aigw wrote
carry a version stamp in their KV metadata; records written by other tools are re-fetched on a
slower full cycle), and applies everything in one LMDB transaction, or nothing. A key is deleted
locally only after a listing that reached its end no longer contains it.

Usage: each node writes its own monthly totals under `aigw:usage:{node}:{month}:{level}:{id}`,
with the figures in the key's metadata, so a listing alone reads every node's totals.
"""

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import blake3
import httpx
import orjson

from store.db import LMDB_MAX_KEY, Store, StoreError
from store.money import month_of, utc_now
from store.records import MAX_COUNT, RecordError, parse_usage_key, record_label, validate_record
from store.settings import ConfigError, Section

log = logging.getLogger("aigw.sync")

DEFAULT_API_BASE = "https://api.cloudflare.com/client/v4"
USAGE_PREFIX = "aigw:usage:"
STAMP = "aigw"  # the metadata field holding aigw's version stamp
LIST_PAGE = 1000
BULK_GET = 100
BULK_PUT = 10_000
MAX_RETRY_AFTER_S = 600.0  # a retry-after is honoured up to this (Cloudflare blocks for 300 s)
REJECTED_KEPT = 100  # rejected records named in the stored pass summary (the count is whole)


class SyncError(Exception):
    """A pass could not complete; nothing of it was applied."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a refused request, if that was the cause


class KVError(Exception):
    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retryable, self.retry_after, self.status = retryable, retry_after, status


@dataclass(frozen=True)
class CloudflareSettings:
    account_id: str
    namespace_id: str
    api_token: str = field(repr=False)
    api_base: str = DEFAULT_API_BASE


@dataclass(frozen=True)
class SyncSettings:
    interval_s: float = 30.0
    full_interval_s: float = 3600.0  # re-fetch records without a stamp this often
    request_budget: int = 600  # requests per budget window: half of Cloudflare's limit
    budget_window_s: float = 300.0
    node_id: str | None = None
    push_usage: bool = True
    max_attempts: int = 6
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0


def load_sync_settings(config: dict, source: str, api_base: str | None = None,
                       environ: dict | None = None) -> tuple[CloudflareSettings, SyncSettings]:
    """Credentials as wrangler users have them (CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID,
    CLOUDFLARE_KV_NAMESPACE_ID), else `sync.cloudflare` in mitm.yaml; the rest from `sync:`."""
    env = os.environ if environ is None else environ
    section = Section(source, "sync", config.get("sync"))
    section.check_keys({"cloudflare", "node_id", "interval_s", "full_interval_s",
                        "request_budget", "push_usage", "max_attempts", "timeout_s"})
    cf = section.section("cloudflare")
    cf.check_keys({"account_id", "namespace_id", "api_token_file", "api_base"})
    token = env.get("CLOUDFLARE_API_TOKEN")
    if not token and cf.data.get("api_token_file"):
        path = Path(os.path.expanduser(cf.text("api_token_file")))
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise cf.error("api_token_file", f"cannot read {path}: {exc.strerror}") from None
    account = env.get("CLOUDFLARE_ACCOUNT_ID") or cf.optional_text("account_id")
    namespace = env.get("CLOUDFLARE_KV_NAMESPACE_ID") or cf.optional_text("namespace_id")
    missing = [name for name, value in (("CLOUDFLARE_API_TOKEN (or sync.cloudflare."
                                         "api_token_file)", token),
                                        ("CLOUDFLARE_ACCOUNT_ID (or sync.cloudflare.account_id)",
                                         account),
                                        ("CLOUDFLARE_KV_NAMESPACE_ID (or sync.cloudflare."
                                         "namespace_id)", namespace)) if not value]
    if missing:
        raise ConfigError(source, "sync.cloudflare", "missing " + ", ".join(missing))
    base = api_base or cf.data.get("api_base") or DEFAULT_API_BASE
    defaults = SyncSettings()
    push = section.data.get("push_usage", True)
    if not isinstance(push, bool):
        raise section.error("push_usage", f"must be true or false, not {push!r}")
    return (
        CloudflareSettings(str(account), str(namespace), str(token), str(base).rstrip("/")),
        SyncSettings(
            interval_s=section.number("interval_s", defaults.interval_s, minimum=1),
            full_interval_s=section.number("full_interval_s", defaults.full_interval_s,
                                           minimum=1),
            request_budget=section.integer("request_budget", defaults.request_budget, minimum=10),
            node_id=_node_id(section),
            push_usage=push,
            max_attempts=section.integer("max_attempts", defaults.max_attempts, minimum=1),
            timeout_s=section.number("timeout_s", defaults.timeout_s, minimum=1),
        ),
    )


def _node_id(section: Section) -> str | None:
    node = section.optional_text("node_id")
    if node is not None and ":" in node:  # usage keys are aigw:usage:{node}:{month}:...
        raise section.error("node_id", f"must not contain ':', not {node!r}")
    return node


class RequestBudget:
    """At most `limit` requests in any `window` seconds: a large sync is spread out instead of
    tripping Cloudflare's limit (which blocks every tool using the token for 5 minutes)."""

    def __init__(self, limit: int, window: float, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window = limit, window
        self._sleep, self._clock = sleep, clock
        self._sent: deque[float] = deque()
        self.used = 0

    def acquire(self) -> None:
        while True:
            now = self._clock()
            while self._sent and now - self._sent[0] >= self.window:
                self._sent.popleft()
            if len(self._sent) < self.limit:
                self._sent.append(now)
                self.used += 1
                return
            self._sleep(self.window - (now - self._sent[0]) + 0.01)


class KVClient:
    """The Workers KV REST API (v4) over httpx, with bounded retries honouring retry-after.
    The token is sent, never logged."""

    def __init__(self, cf: CloudflareSettings, settings: SyncSettings,
                 budget: RequestBudget | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._base = (f"{cf.api_base}/accounts/{cf.account_id}/storage/kv/namespaces/"
                      f"{cf.namespace_id}")
        self._http = httpx.Client(
            headers={"authorization": f"Bearer {cf.api_token}"},
            timeout=settings.timeout_s,
        )
        self._settings = settings
        self._sleep = sleep
        self.budget = budget or RequestBudget(settings.request_budget, settings.budget_window_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- operations ------------------------------------------------------------------------

    def list_page(self, cursor: str | None, prefix: str = "") -> tuple[list[dict], str | None]:
        params: dict[str, Any] = {"limit": LIST_PAGE}
        if cursor:
            params["cursor"] = cursor
        if prefix:
            params["prefix"] = prefix
        body = self._json("GET", "/keys", check=_check_page, params=params)
        return body["result"], (body["result_info"].get("cursor") or None)

    def list_all(self, prefix: str = "", progress: Callable[[int], None] | None = None
                 ) -> list[dict]:
        """Every key, following the cursor through empty pages until it ends."""
        keys: list[dict] = []
        cursor: str | None = None
        while True:
            page, cursor = self.list_page(cursor, prefix)
            keys.extend(page)
            if progress:
                progress(len(keys))
            if not cursor:
                return keys

    def bulk_get(self, names: list[str]) -> dict[str, Any]:
        """{name: {"value": text, "metadata": ...} | None} for up to 100 names."""
        body = self._json("POST", "/bulk/get", check=_check_values,
                          json={"keys": names, "type": "text", "withMetadata": True})
        return body["result"]["values"]

    def get(self, name: str) -> bytes | None:
        response = self._send("GET", f"/values/{quote(name, safe='')}", allow_404=True)
        return None if response is None else response.content

    def bulk_put(self, items: list[dict]) -> list[str]:
        """Write up to 10,000 pairs; returns the keys Cloudflare did not write."""
        body = self._json("PUT", "/bulk", json=items)
        result = body.get("result") or {}
        return list(result.get("unsuccessful_keys") or [])

    def bulk_delete(self, names: list[str]) -> list[str]:
        body = self._json("POST", "/bulk/delete", json=names)
        return list((body.get("result") or {}).get("unsuccessful_keys") or [])

    # --- transport -------------------------------------------------------------------------

    def _json(self, method: str, path: str, check: Callable[[dict], str | None] | None = None,
              **kwargs: Any) -> dict:
        """The envelope of a successful answer; `check` names what is missing from a malformed
        one (retried like any other fault)."""
        for attempt in range(self._settings.max_attempts):
            try:
                response = self._send(method, path, **kwargs)
                assert response is not None
                try:
                    body = orjson.loads(response.content)
                except orjson.JSONDecodeError:
                    raise KVError(f"{method} {path}: malformed JSON", retryable=True) from None
                if not isinstance(body, dict) or body.get("success") is not True:
                    raise KVError(f"{method} {path}: {_errors(body)}", retryable=True)
                problem = check(body) if check is not None else None
                if problem:
                    raise KVError(f"{method} {path}: malformed answer: {problem}",
                                  retryable=True)
                return body
            except KVError as exc:
                self._backoff(exc, attempt, method, path)
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, allow_404: bool = False, **kwargs: Any
              ) -> httpx.Response | None:
        for attempt in range(self._settings.max_attempts):
            self.budget.acquire()
            try:
                response = self._http.request(method, self._base + path, **kwargs)
                response.read()
            except httpx.TimeoutException:
                exc = KVError(f"{method} {path}: timed out", retryable=True)
            except httpx.HTTPError as error:
                exc = KVError(f"{method} {path}: {type(error).__name__}", retryable=True)
            else:
                if response.status_code == 404 and allow_404:
                    return None
                if response.status_code < 400:
                    return response
                retryable = response.status_code == 429 or response.status_code >= 500
                exc = KVError(
                    f"{method} {path}: HTTP {response.status_code}: {_errors(_body(response))}",
                    retryable=retryable,
                    retry_after=_retry_after(response),
                    status=response.status_code,
                )
            self._backoff(exc, attempt, method, path)
        raise AssertionError("unreachable")

    def _backoff(self, exc: KVError, attempt: int, method: str, path: str) -> None:
        if not exc.retryable or attempt + 1 >= self._settings.max_attempts:
            if exc.retryable:
                raise SyncError(f"{exc} (gave up after {attempt + 1} attempts)",
                                exc.status) from None
            raise SyncError(str(exc), exc.status) from None
        delay = min(self._settings.max_backoff_s, 0.5 * 2**attempt)
        if exc.retry_after is not None:  # retrying sooner only meets the limit again
            delay = max(delay, min(exc.retry_after, MAX_RETRY_AFTER_S))
        log.warning("%s; retrying in %.1fs (attempt %d of %d)", exc, delay, attempt + 2,
                    self._settings.max_attempts)
        self._sleep(delay)


def _check_page(body: dict) -> str | None:
    """A listing page must say whether more follow: taking a page without `result_info` for
    the last one would delete every key after it. Likewise an entry without a name: the key
    it stands for would look deleted."""
    result, info = body.get("result"), body.get("result_info")
    if not isinstance(result, list):
        return "no result list"
    if not isinstance(info, dict):
        return "no result_info"
    if not all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in result):
        return "a key without a name"
    return None


def _check_values(body: dict) -> str | None:
    result = body.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("values"), dict):
        return "no result.values"
    return None


def _body(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


def _errors(body: Any) -> str:
    if isinstance(body, dict) and body.get("errors"):
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in body["errors"]
                         if isinstance(e, dict))
    return "unsuccessful response"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def stamp_of(value: bytes) -> str:
    """The version stamp aigw puts in a record's KV metadata: a digest of the value."""
    return blake3.blake3(value).hexdigest()[:16]


@dataclass
class PassSummary:
    listed: int = 0
    fetched: int = 0
    changed: int = 0
    deleted: int = 0
    # Records (and other nodes' usage figures) not applied: [{"key": ..., "reason": ...}]. A
    # rejected record keeps its previous version in the store, if it had one.
    rejected: list[dict] = field(default_factory=list)
    usage_keys: int = 0
    pushed: int = 0
    requests: int = 0
    duration_s: float = 0.0
    full: bool = False
    finished_at: float = 0.0

    def line(self) -> str:
        return (f"sync: listed {self.listed}, fetched {self.fetched}, changed {self.changed}, "
                f"deleted {self.deleted}, rejected {len(self.rejected)}, usage keys "
                f"{self.usage_keys}, pushed {self.pushed}, requests {self.requests}, "
                f"{self.duration_s:.2f} s{' (full)' if self.full else ''}")


class Replicator:
    """One KV namespace into one store; `sync_once` is a pass."""

    def __init__(self, store: Store, client: KVClient, settings: SyncSettings,
                 progress: Callable[[str, int, int | None], None] | None = None) -> None:
        self.store = store
        self.client = client
        self.settings = settings
        self.node_id = settings.node_id or store.node_id()
        self._progress = progress or (lambda stage, done, total: None)

    def sync_once(self, full: bool | None = None) -> PassSummary:
        """List, fetch what changed, apply in one transaction; push this node's usage.
        Raises SyncError (nothing applied) if the pass cannot complete."""
        try:
            return self._pass(full)
        except StoreError as exc:  # its one write transaction did not commit
            raise SyncError(f"the local store refused the pass: {exc}") from None

    def _pass(self, full: bool | None) -> PassSummary:
        started = time.monotonic()
        requests_before = self.client.budget.used
        summary = PassSummary()
        last = self.store.records.meta("last_sync") or {}
        if full is None:
            full = time.time() - float(last.get("last_full_at", 0)) >= self.settings.full_interval_s
        summary.full = full

        if self.settings.push_usage:
            try:
                summary.pushed = self.push_usage()
            except SyncError as exc:  # other nodes see our spend a pass later; still pull
                log.warning("sync: pushing this node's usage failed: %s", exc)
        listing = self.client.list_all(progress=lambda n: self._progress("list", n, None))
        summary.listed = len(listing)
        local_stamps = self.store.records.stamps()
        listed: set[str] = set()
        wanted: list[str] = []
        stamps: dict[str, str] = {}
        remote: dict[tuple[str, str, str], tuple[int, int]] = {}
        for item in listing:
            name = item.get("name")
            if not isinstance(name, str):
                continue
            metadata = item.get("metadata")
            stamp = metadata.get(STAMP) if isinstance(metadata, dict) else None
            if name.startswith(USAGE_PREFIX):
                summary.usage_keys += 1
                try:
                    self._count_remote(name, metadata, remote)
                except RecordError as exc:
                    self._reject(summary, name, exc)
                continue
            if not name or len(name.encode()) > LMDB_MAX_KEY:
                self._reject(summary, name, RecordError(
                    f"{record_label(name)}: an LMDB key has 1 to {LMDB_MAX_KEY} bytes"))
                continue
            listed.add(name)
            known = local_stamps.get(name)
            if isinstance(stamp, str) and stamp:
                if known != stamp:
                    wanted.append(name)
                    stamps[name] = stamp
            elif full or known is None:
                wanted.append(name)
                stamps[name] = ""

        values = self._fetch(wanted)
        summary.fetched = len(values)
        puts: dict[str, bytes] = {}
        for name, value in values.items():
            try:
                validate_record(name, value)
            except RecordError as exc:
                # Not applied, nor its stamp: the previous version (if any) stays, and the
                # record is fetched again while its stamp differs (or on the full cycle).
                stamps.pop(name, None)
                self._reject(summary, name, exc)
                continue
            if self.store.records.get(name) != value:
                summary.changed += 1
            puts[name] = value
        for name in wanted:
            if name not in values:
                stamps.pop(name, None)  # gone between listing and fetch: the next pass decides
        deletes = [name for name in local_stamps if name not in listed]
        summary.deleted = len(deletes)

        summary.requests = self.client.budget.used - requests_before
        summary.duration_s = time.monotonic() - started
        summary.finished_at = time.time()
        record = {**summary.__dict__, "node_id": self.node_id,
                  "last_full_at": summary.finished_at if full else last.get("last_full_at", 0),
                  "rejected": summary.rejected[:REJECTED_KEPT],
                  "rejected_count": len(summary.rejected)}
        self.store.records.replicate(puts, deletes, stamps, remote, record)
        return summary

    def _fetch(self, names: list[str]) -> dict[str, bytes]:
        """Values by bulk get (100 a call); single get for what bulk cannot return."""
        values: dict[str, bytes] = {}
        singles: list[str] = []
        for start in range(0, len(names), BULK_GET):
            batch = names[start:start + BULK_GET]
            try:
                answer = self.client.bulk_get(batch)
            except SyncError as exc:
                if exc.status != 400:
                    raise
                # Bulk get refuses a batch holding a value it cannot return (not text, e.g.
                # binary): one by one, so one such value does not stop every pass.
                answer = dict.fromkeys(batch)
            for name in batch:
                entry = answer.get(name)
                value = entry.get("value") if isinstance(entry, dict) else entry
                if isinstance(value, str):
                    values[name] = value.encode()
                elif value is not None:
                    values[name] = orjson.dumps(value)
                else:
                    singles.append(name)
            self._progress("fetch", min(start + BULK_GET, len(names)), len(names))
        for name in singles:
            value = self.client.get(name)
            if value is not None:
                values[name] = value
        return values

    def _reject(self, summary: PassSummary, name: str, exc: RecordError) -> None:
        """Report a record (or usage figures) the pass does not apply: stderr and the summary."""
        label = record_label(name)
        reason = str(exc).removeprefix(f"{label}: ")
        kept = not name.startswith(USAGE_PREFIX) and 0 < len(name.encode()) <= LMDB_MAX_KEY \
            and self.store.records.get(name) is not None
        summary.rejected.append({"key": name, "reason": reason, "kept_previous": kept})
        log.warning("sync: %s not replicated: %s%s", label, reason,
                    " (its previous version stays)" if kept else "")

    def _count_remote(self, name: str, metadata: Any,
                      remote: dict[tuple[str, str, str], tuple[int, int]]) -> None:
        """Add another node's figures to the totals; RecordError if they are malformed."""
        node, month, level, level_id, used, requests = parse_usage_key(name, metadata,
                                                                       USAGE_PREFIX)
        if node == self.node_id:
            return
        total = remote.get((month, level, level_id), (0, 0))
        summed = (total[0] + used, total[1] + requests)
        if max(summed) > MAX_COUNT:
            raise RecordError(f"{record_label(name)}: metadata: the nodes' totals overflow 64 bits")
        remote[(month, level, level_id)] = summed

    def push_usage(self) -> int:
        """Write this node's changed monthly totals (this month and last) to KV in bulk. Each key
        is written at most once a pass, and passes are at least a second apart."""
        this_month = month_of(utc_now())
        months = (previous_month(this_month), this_month)  # last month's final figures too
        pushed_before: dict[str, list[int]] = self.store.ledger.meta("pushed") or {}
        items, current = [], {}
        for month in months:
            for (level, level_id), counter in self.store.ledger.month_counters(month).items():
                name = f"{USAGE_PREFIX}{self.node_id}:{month}:{level}:{level_id}"
                figures = [counter.used_nusd, counter.requests]
                current[name] = figures
                if pushed_before.get(name) == figures or len(name.encode()) > 512:
                    continue
                value = orjson.dumps({"node": self.node_id, "month": month, "level": level,
                                      "id": level_id, "used_nusd": figures[0],
                                      "requests": figures[1], "at": int(time.time())})
                items.append({"key": name, "value": value.decode(),
                              "metadata": {STAMP: stamp_of(value), "n": figures[0],
                                           "r": figures[1]}})
        failed: set[str] = set()
        for start in range(0, len(items), BULK_PUT):
            failed.update(self.client.bulk_put(items[start:start + BULK_PUT]))
        for name in failed:  # not written: pushed again next pass
            current.pop(name, None)
        merged = {**pushed_before, **current}
        self.store.ledger.set_meta("pushed", {k: v for k, v in merged.items() if k in current})
        return len(items) - len(failed)


def previous_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year - 1:04d}-12" if number == 1 else f"{year:04d}-{number - 1:02d}"


def run_loop(replicator: Replicator, interval_s: float, *, stop: Callable[[], bool],
             sleep: Callable[[float], None] = time.sleep,
             report: Callable[[str], None] = log.info,
             on_pass: Callable[[PassSummary], None] | None = None,
             full_first: bool = False) -> None:
    """Pass after pass; a failed pass is retried with growing backoff (capped at the
    interval's tenfold), never crashing the loop."""
    failures = 0
    full: bool | None = True if full_first else None
    while not stop():
        try:
            summary = replicator.sync_once(full=full)
            report(summary.line())
            if on_pass is not None:
                on_pass(summary)
            failures, full = 0, None
            wait = interval_s
        except SyncError as exc:
            failures += 1
            wait = min(interval_s * 10, interval_s * math.pow(2, failures - 1))
            report(f"sync: pass failed, nothing applied ({exc}); next try in {wait:.0f}s")
        sleep(max(1.0, wait))


class progress_reporter:  # noqa: N801 - used as a function
    """Progress of a long pass: a bar on a terminal (rich), a plain line every 10,000 keys
    otherwise."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._bar: Any = None
        self._tasks: dict[str, Any] = {}
        self._last: dict[str, int] = {}
        if hasattr(stream, "isatty") and stream.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(file=stream), transient=True)
            self._bar.start()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self._bar is not None:
            task = self._tasks.get(stage)
            if task is None:
                task = self._tasks[stage] = self._bar.add_task(
                    "listing keys" if stage == "list" else "fetching values", total=total)
            self._bar.update(task, completed=done, total=total)
            return
        if done - self._last.get(stage, 0) >= 10_000 or (total is not None and done == total
                                                          and done):
            self._last[stage] = done
            of = f" of {total}" if total is not None else ""
            print(f"sync: {'listed' if stage == 'list' else 'fetched'} {done}{of}",
                  file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def write_records(client: KVClient, records: dict[str, bytes], deletes: Iterable[str] = ()
                  ) -> None:
    """Admin writes straight to KV, each value with its version stamp (so syncs fetch it)."""
    items = [{"key": k, "value": v.decode(), "metadata": {STAMP: stamp_of(v)}}
             for k, v in records.items()]
    for start in range(0, len(items), BULK_PUT):
        failed = client.bulk_put(items[start:start + BULK_PUT])
        if failed:
            raise SyncError(f"Cloudflare did not write {len(failed)} keys: {failed[:5]}")
    names = list(deletes)
    if names:
        failed = client.bulk_delete(names)
        if failed:
            raise SyncError(f"Cloudflare did not delete {len(failed)} keys: {failed[:5]}")


class KVRecords:
    """The records API of the store (`get`, `get_json`, `scan`, `write`) over a KV namespace, so
    the admin operations can manage every node from one place (`aigw --target cloudflare`)."""

    def __init__(self, client: KVClient) -> None:
        self._client = client

    def get(self, key: str) -> bytes | None:
        return self._client.get(key)

    def get_json(self, key: str) -> dict | None:
        raw = self.get(key)
        return None if raw is None else orjson.loads(raw)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of those `keys` that exist, fetched in bulk (BULK_GET a request)."""
        names = list(keys)
        out = {}
        for start in range(0, len(names), BULK_GET):
            values = self._client.bulk_get(names[start:start + BULK_GET])
            for name in names[start:start + BULK_GET]:
                entry = values.get(name)
                value = entry.get("value") if isinstance(entry, dict) else entry
                if value is None:
                    raw = self._client.get(name)
                    if raw is not None:
                        out[name] = raw
                else:
                    out[name] = (value.encode() if isinstance(value, str)
                                 else orjson.dumps(value))
        return out

    def scan(self, prefix: str = "") -> list[tuple[str, bytes]]:
        names = [item["name"] for item in self._client.list_all(prefix=prefix)
                 if isinstance(item.get("name"), str)]
        values = self.get_many(names)
        return [(name, values[name]) for name in names if name in values]

    def write(self, puts: dict[str, bytes], deletes: Iterable[str] = ()) -> None:
        write_records(self._client, puts, deletes)


class CloudflareTarget:
    """What the admin operations need of a store, with the records in Cloudflare KV."""

    def __init__(self, client: KVClient, hash_algorithm: str) -> None:
        from store.hashing import hash_key

        self.records = KVRecords(client)
        self.hash_algorithm = hash_algorithm
        self._hash_key = hash_key

    def hash(self, raw_key: str) -> str:
        return self._hash_key(raw_key, self.hash_algorithm)
