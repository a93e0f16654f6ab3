"""Budget alerts: when an org's or a user's monthly usage crosses a threshold of its limit, one
JSON POST to `alerts.webhook_url` per crossing per month.

Usage counts as the request path counts it: this node's ledger, the other nodes' totals the last
sync pass replicated, and the Workers gateway's own quota record of the month. The gateway's
maintenance runs `run_in_background` (a thread, never the request hook); `aigw sync` runs
`Alerter.run_once` after a pass.

Each crossing is claimed in a ledger write transaction before it is sent (`alert|...` entries in
the ledger's meta), so a restarted process or a second one on the same store does not send it
again; a send that fails after its retries releases the claim, and a later run tries again. A
process that dies between the POST and its record leaves a claim that goes stale and is sent
again: receivers can drop the repeat by its `alert_id` (also the `Idempotency-Key` header).
"""

import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import blake3
import httpx
import lmdb
import orjson
import tenacity

from store.alert_settings import AlertSettings, load_alert_settings
from store.db import Store
from store.errors import StoreError
from store.lmdb_env import LMDB_MAX_KEY, _enc, _Env, _now_ms
from store.money import from_usd, month_span, to_usd
from store.records import Org, QuotaRecord, RecordError, User, org_quota_key, user_quota_key
from store.settings import ConfigError, load_yaml

log = logging.getLogger("aigw.alerts")

_PREFIX = "alert|"
# A claim older than this was left by a process that died sending it: longer than the slowest
# send the settings allow (attempts x httpx's per-phase timeouts, plus the waits between).
CLAIM_STALE_S = 3600.0
PRUNE_BATCH = 1000  # old months' entries deleted per run
USER_AGENT = "aigw-alerts/1"


class Crossing(NamedTuple):
    """One threshold of one level's monthly limit that its usage has reached."""

    level: str  # "org" | "user"
    id: str
    month: str  # YYYY-MM
    threshold: float
    used_nusd: int
    limit_nusd: int

    @property
    def alert_id(self) -> str:
        """A stable name of the crossing: the same on every node and every attempt."""
        text = f"{self.month}|{self.level}|{self.id}|{self.threshold!r}"
        return blake3.blake3(text.encode()).hexdigest()[:32]

    def payload(self, node_id: str, now: float) -> dict[str, Any]:
        """The webhook's JSON body."""
        return {
            "alert_id": self.alert_id,
            "level": self.level,
            "id": self.id,
            "month": self.month,
            "threshold": self.threshold,
            "used_usd": to_usd(self.used_nusd),
            "limit_usd": to_usd(self.limit_nusd),
            "node_id": node_id,
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
            .replace("+00:00", "Z"),
        }


# --- what has crossed ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limited:
    """An org or user with a monthly limit, and what others counted for it this month."""

    level: str
    id: str
    limit_nusd: int
    external_nusd: int  # other nodes' totals plus the Workers gateway's quota record


def crossings(store: Store, month: str, thresholds: Iterable[float]) -> list[Crossing]:
    """Every threshold each org's and user's usage of `month` has reached (lowest first within
    a level); levels without a limit have none, and neither does a level with no usage."""
    limited = _limited(store, month)
    counters = []
    for start in range(0, len(limited), SCAN_PAGE):  # short transactions: requests write too
        counters += store.ledger.counters(
            [(x.level, x.id) for x in limited[start:start + SCAN_PAGE]], month)
    ordered = sorted(thresholds)
    found = []
    for entry, counter in zip(limited, counters, strict=True):
        used = counter.used_nusd + entry.external_nusd
        if used <= 0:
            continue
        for threshold in ordered:
            if used >= round(threshold * entry.limit_nusd):
                found.append(Crossing(entry.level, entry.id, month, threshold, used,
                                      entry.limit_nusd))
    return found


_LIMITS_CACHE: dict[tuple[str, str], tuple[int, list[_Limited]]] = {}


def _limited(store: Store, month: str) -> list[_Limited]:
    """The orgs and users with a limit, read again only when the records changed (their
    generation moves with every record and every replicated total: `Records.generation`)."""
    cache_key = (str(store.path), month)
    generation = store.records.generation()
    cached = _LIMITS_CACHE.get(cache_key)
    if cached is not None and cached[0] == generation:
        return cached[1]
    limited = []
    for level, prefix, kind, quota_key in (("org", "org:", Org, org_quota_key),
                                           ("user", "user:", User, user_quota_key)):
        records = dict(_scan(store, prefix))
        for key, raw in records.items():
            parts = key.split(":")
            if len(parts) != 3 or parts[2] != "config":
                continue
            try:
                record = kind.parse(parts[1], raw)
                quota_raw = records.get(quota_key(parts[1]))
                quota = (0, 0) if quota_raw is None else QuotaRecord.parse(
                    quota_raw, quota_key(parts[1])).usage_in(month)
            except RecordError:
                continue  # the request path refuses it too; nothing to measure against
            limit = record.monthly_budget_usd if level == "org" else record.monthly_limit_usd
            if limit is None:
                continue
            remote, _ = store.records.remote_usage(month, level, parts[1])
            limited.append(_Limited(level, parts[1], from_usd(limit),
                                    remote + quota[0]))
    _LIMITS_CACHE.clear()  # one store and month at a time is all a process needs
    _LIMITS_CACHE[cache_key] = (generation, limited)
    return limited


SCAN_PAGE = 1000  # records a read transaction: the request path waits for no long scan


def _scan(store: Store, prefix: str) -> Iterator[tuple[str, bytes]]:
    """`Records.scan(prefix)` in pages of short read transactions (each holds the lock that
    every request's look-up takes; one scan of a large store held it for tens of ms)."""
    env, db = store.records._env, store.records._db
    start = prefix.encode()
    after: bytes | None = None
    while True:
        def page(txn: lmdb.Transaction, after: bytes | None = after) -> list[tuple[bytes, bytes]]:
            cursor = txn.cursor(db=db)
            if not cursor.set_range(after or start):
                return []
            out: list[tuple[bytes, bytes]] = []
            for k, v in cursor:
                if k == after:
                    continue
                if not k.startswith(start) or len(out) >= SCAN_PAGE:
                    break
                out.append((k, v))
            return out

        batch = env.read(page)
        for k, v in batch:
            yield k.decode(), v
        if len(batch) < SCAN_PAGE:
            return
        after = batch[-1][0]


# --- which crossings were sent (ledger meta) -------------------------------------------------


class SentAlerts:
    """The crossings sent or being sent, in one ledger's `meta` table: `alert|{month}|...`
    entries, each claimed in a write transaction so that one process sends it."""

    def __init__(self, store: Store, owner: str) -> None:
        # The ledger's own environment and meta table (as `store.registry` uses them): a claim
        # must read and write in one transaction, which `Ledger.meta`/`set_meta` do not offer.
        self._env: _Env = store.ledger._env
        self._meta = store.ledger._meta
        self.owner = owner

    @staticmethod
    def key(crossing: Crossing) -> bytes:
        """The entry's key; an id too long for an LMDB key is named by its digest."""
        text = f"{_PREFIX}{crossing.month}|{crossing.level}|{crossing.threshold!r}|{crossing.id}"
        if len(text.encode()) > LMDB_MAX_KEY:
            text = f"{_PREFIX}{crossing.month}|{crossing.level}|{crossing.threshold!r}|" \
                   f"#{crossing.alert_id}"
        return _enc(text)

    def unsent(self, found: list[Crossing]) -> list[Crossing]:
        """The crossings with no entry (or a stale claim), in one read transaction."""
        def collect(txn: lmdb.Transaction) -> list[Crossing]:
            return [c for c in found if self._claimable(txn.get(self.key(c), db=self._meta))]

        return self._env.read(collect)

    def claim(self, crossing: Crossing) -> bool:
        """Take the crossing for this process; False if it was sent or another holds it."""
        key = self.key(crossing)
        entry = orjson.dumps({"state": "claimed", "owner": self.owner, "at": _now_ms()})

        def apply(txn: lmdb.Transaction) -> bool:
            if not self._claimable(txn.get(key, db=self._meta)):
                return False
            txn.put(key, entry, db=self._meta)
            return True

        return self._env.write(apply)

    def sent(self, crossing: Crossing) -> None:
        """Record the crossing as sent: no process sends it again."""
        key = self.key(crossing)
        entry = orjson.dumps({"state": "sent", "owner": self.owner, "at": _now_ms()})
        self._env.write(lambda txn: txn.put(key, entry, db=self._meta))

    def release(self, crossing: Crossing) -> None:
        """Give up this process's claim (the send failed): a later run tries again."""
        key = self.key(crossing)

        def apply(txn: lmdb.Transaction) -> None:
            current = _entry(txn.get(key, db=self._meta))
            if current.get("state") == "claimed" and current.get("owner") == self.owner:
                txn.delete(key, db=self._meta)

        self._env.write(apply)

    def state(self, crossing: Crossing) -> str | None:
        """"sent", "claimed" or None."""
        raw = self._env.read(lambda txn: txn.get(self.key(crossing), db=self._meta))
        return _entry(raw).get("state") if raw is not None else None

    def prune(self, keep_from: str) -> int:
        """Delete the entries of months before `keep_from` (YYYY-MM), a bounded batch a call."""
        start, stop = _enc(_PREFIX), _enc(f"{_PREFIX}{keep_from}")

        def apply(txn: lmdb.Transaction) -> int:
            cursor = txn.cursor(db=self._meta)
            old = []
            if cursor.set_range(start):
                for k in cursor.iternext(keys=True, values=False):
                    if not k.startswith(start) or k >= stop or len(old) >= PRUNE_BATCH:
                        break
                    old.append(k)
            for k in old:
                txn.delete(k, db=self._meta)
            return len(old)

        return self._env.write(apply)

    @staticmethod
    def _claimable(raw: bytes | None) -> bool:
        if raw is None:
            return True
        current = _entry(raw)
        if current.get("state") == "sent":
            return False
        return time.time() * 1000 - float(current.get("at", 0)) > CLAIM_STALE_S * 1000


def _entry(raw: bytes | None) -> dict:
    try:
        value = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# --- sending ---------------------------------------------------------------------------------


class WebhookError(Exception):
    """A POST the webhook did not accept; `retryable` when trying again may help."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def _post(client: httpx.Client, url: str, body: dict) -> None:
    try:
        response = client.post(url, content=orjson.dumps(body), headers={
            "content-type": "application/json", "idempotency-key": body["alert_id"]})
    except httpx.HTTPError as exc:  # connect, read or write timeout, refused, reset
        raise WebhookError(type(exc).__name__, retryable=True) from None
    if response.is_success:
        return
    # A 4xx other than a timeout or a rate limit will not change by trying again.
    retryable = response.status_code >= 500 or response.status_code in (408, 425, 429)
    raise WebhookError(f"HTTP {response.status_code}", retryable=retryable)


@dataclass
class RunSummary:
    """What one run did."""

    sent: list[Crossing] = field(default_factory=list)
    failed: list[Crossing] = field(default_factory=list)
    pending: int = 0  # crossings left for a later run (the webhook failed, or time ran out)
    pruned: int = 0


class Alerter:
    """Finds the crossings not sent yet and sends them, each claimed first."""

    def __init__(self, settings: AlertSettings, node_id: str, *,
                 owner: str | None = None,
                 transport: httpx.BaseTransport | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.node_id = node_id
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}"
        self._transport = transport
        self._sleep = sleep
        self._clock = clock

    def run_once(self, store: Store) -> RunSummary:
        """One run: this month's crossings not yet sent, sent lowest threshold first; stops at
        the first alert the webhook still refuses after its retries, or when the run's time
        is up (the rest wait for the next run). StoreError if the store cannot be read."""
        settings = self.settings
        summary = RunSummary()
        month = month_span(self._clock())[0]
        sent = SentAlerts(store, self.owner)
        summary.pruned = sent.prune(_previous_month(month))
        todo = sent.unsent(crossings(store, month, settings.thresholds))
        if not todo:
            return summary
        deadline = time.monotonic() + settings.run_budget_s
        with httpx.Client(timeout=settings.timeout_s, transport=self._transport,
                          follow_redirects=False, headers={"user-agent": USER_AGENT}) as client:
            for index, crossing in enumerate(todo):
                if time.monotonic() >= deadline:
                    summary.pending = len(todo) - index
                    break
                if not sent.claim(crossing):
                    continue  # another process has it, or sent it since
                try:
                    self._send(client, crossing)
                except WebhookError as exc:
                    sent.release(crossing)
                    summary.failed.append(crossing)
                    summary.pending = len(todo) - index
                    log.warning("alerts: %s %s at %d%% of its %s limit not delivered to %s "
                                "(%s); retried on the next run", crossing.level, crossing.id,
                                round(crossing.threshold * 100), crossing.month,
                                settings.destination, exc)
                    break  # the webhook is down: the others would wait for it too
                except BaseException:
                    sent.release(crossing)
                    raise
                sent.sent(crossing)
                summary.sent.append(crossing)
                log.info("alerts: %s %s reached %d%% of its %s limit; sent to %s",
                         crossing.level, crossing.id, round(crossing.threshold * 100),
                         crossing.month, settings.destination)
        return summary

    def _send(self, client: httpx.Client, crossing: Crossing) -> None:
        """One POST, retried with exponential backoff on what may pass (timeouts, 5xx, 429)."""
        settings = self.settings
        body = crossing.payload(self.node_id, self._clock())
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(settings.max_attempts),
            wait=tenacity.wait_exponential(multiplier=settings.backoff_s,
                                           max=settings.max_backoff_s),
            retry=tenacity.retry_if_exception(
                lambda exc: isinstance(exc, WebhookError) and exc.retryable),
            sleep=self._sleep,
            reraise=True,
        )
        retrying(_post, client, settings.webhook_url, body)


def _previous_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year - 1:04d}-12" if number == 1 else f"{year:04d}-{number - 1:02d}"


# --- the gateway's background runs -----------------------------------------------------------


@dataclass
class _Background:
    """The gateway process's alert runs: the settings read from its mitm.yaml (again when the
    file changes), and at most one run at a time, in a thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None
    seen: tuple[str, float] | None = None  # the file and mtime `settings` came from
    settings: AlertSettings | None = None
    node_id: str | None = None  # sync.node_id, if the file sets one
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}/{os.getpid()}/"
                                                f"{os.urandom(4).hex()}")


_BACKGROUND = _Background()


def run_in_background(store: Store | None, config_source: str) -> threading.Thread | None:
    """Start one alert run in a daemon thread unless one is still running, or there is no
    store, or `alerts:` in the file at `config_source` names no webhook. Returns the thread.
    Never raises: a fault is logged and the next call tries again."""
    state = _BACKGROUND
    with state.lock:
        if store is None or (state.thread is not None and state.thread.is_alive()):
            return None
        try:
            _read_settings(state, config_source)
        except ConfigError as exc:
            log.error("aigw: alerts off until the file is fixed: %s", exc)
            return None
        except Exception as exc:  # the maintenance tick goes on whatever happens here
            log.error("aigw: alerts: cannot read %s (%s)", config_source, type(exc).__name__)
            return None
        if state.settings is None:
            return None
        settings, node_id, owner = state.settings, state.node_id, state.owner
        thread = threading.Thread(target=_run, args=(store, settings, node_id, owner),
                                  name="aigw-alerts", daemon=True)
        state.thread = thread
    thread.start()
    return thread


def _read_settings(state: _Background, source: str) -> None:
    try:
        mtime = Path(source).stat().st_mtime
    except OSError:
        mtime = -1.0
    if state.seen == (source, mtime):
        return
    state.seen, state.settings, state.node_id = (source, mtime), None, None
    config = load_yaml(source) if mtime >= 0 else {}
    state.settings = load_alert_settings(config, source)
    sync = config.get("sync")
    node = sync.get("node_id") if isinstance(sync, dict) else None
    state.node_id = node if isinstance(node, str) and node and ":" not in node else None


def _run(store: Store, settings: AlertSettings, node_id: str | None, owner: str) -> None:
    try:
        alerter = Alerter(settings, node_id or store.node_id(), owner=owner)
    except StoreError as exc:
        log.warning("aigw: alerts: the store is unavailable (%s); retrying", exc)
        return
    run_alerts(alerter, store)


def run_alerts(alerter: Alerter, store: Store) -> RunSummary | None:
    """`alerter.run_once(store)`, a fault logged instead of raised (the next run retries):
    for callers whose own work must not fail with it (a sync pass, the maintenance thread)."""
    try:
        return alerter.run_once(store)
    except StoreError as exc:  # closed by a reload, full, unreadable
        log.warning("aigw: alerts: the store is unavailable (%s); retrying", exc)
    except Exception as exc:
        # Its type and place only: a message could quote the webhook URL, and so its secret.
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        log.error("aigw: alerts: the run failed (%s%s); retrying", type(exc).__name__, where)
    return None
