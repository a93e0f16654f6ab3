"""The usage ledger: monthly counters per key, user and org; reservations of requests in flight;
the per-request usage log; and the fail-open grace ledger.

Written twice per request, on the event loop: no sync on commit (an fsync per commit cost 20x the
write and a third of the gateway's throughput: docs/performance.md), and no writable map (with
it a full filesystem kills the process with SIGBUS). `Store.flush` bounds what an OS crash can
lose. The gateways sharing the ledger are registered in it (`store.registry`), so that the
reservations of one that crashed can be released.
"""

import functools
import heapq
import os
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import lmdb
import orjson

from store.lmdb_env import _enc, _Env, _now_ms, _Part
from store.rates import Window
from store.registry import IsLive, Registry

T = TypeVar("T")

_COUNTER = struct.Struct("<qqqq")  # used_nusd, reserved_nusd, requests, updated_ms
# A counter saturates here rather than overflow its int64: a write that cannot be packed would
# fail, and a settle that always fails would be retried forever, its reservation held.
_I64_MAX = 2**63 - 1
_GRACE = struct.Struct("<qq")  # used_nusd, requests

LEDGER_DBS = ("usage", "reservations", "requests", "grace", "meta")
LEDGER_SYNC = {"sync": False, "metasync": False}

# The usage log's keys: `{settled_ns:020d}|{id}` (metered) and `grace|{settled_ns:020d}|{id}`
# (fail-open grace), so each kind reads and prunes in time order from its prefix.
_GRACE_PREFIX = b"grace|"
LOG_PAGE = 1000  # records read per read transaction when the log is streamed
# Pruning deletes at most PRUNE_BATCH records per write transaction, and at most
# PRUNE_BATCHES such transactions per call: a large backlog never holds the ledger's write lock
# (which every request's settlement waits for) for more than one short batch, and a call
# returns within a bounded time; the backlog is worked off over successive maintenance ticks.
PRUNE_BATCH = 500
PRUNE_BATCHES = 8


class Counter(NamedTuple):
    """A level's monthly totals in the ledger."""

    used_nusd: int = 0
    reserved_nusd: int = 0
    requests: int = 0
    updated_ms: int = 0

    @classmethod
    def unpack(cls, raw: bytes | None) -> "Counter":
        return cls._make(_COUNTER.unpack(raw)) if raw else _ZERO


_ZERO = Counter()


class UsageRecord(NamedTuple):
    """One metered request in the ledger's log: what was charged, to whom, and on what basis.
    Stored as a JSON array in this field order (compact: the log grows by one per request)."""

    at: float
    provider: str
    model: str | None
    key_id: str | None
    user_id: str | None
    org_id: str | None
    mode: str  # metered | grace
    status: int | None
    error: str | None
    cost_nusd: int
    estimated: bool  # no usage from the provider: charged an estimate
    input: int = 0
    cached_input: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0
    output: int = 0
    reasoning: int = 0
    grace_who: str | None = None

    def encode(self) -> bytes:
        return orjson.dumps(tuple(self))

    @classmethod
    def decode(cls, raw: bytes) -> "UsageRecord":
        return cls(*orjson.loads(raw))


Level = tuple[str, str]  # ("key" | "user" | "org", id)


@functools.lru_cache(maxsize=100_000)
def _counter_key(month: str, level: Level) -> bytes:
    return _enc(f"{month}|{level[0]}|{level[1]}")


@functools.lru_cache(maxsize=100_000)
def _counter_keys_cached(month: str, levels: tuple[Level, ...]) -> tuple[bytes, ...]:
    return tuple(_counter_key(month, level) for level in levels)


def _counter_keys(month: str, levels: Iterable[Level]) -> tuple[bytes, ...]:
    """The ledger keys of the levels' counters for `month` (cached: one look-up a request)."""
    return _counter_keys_cached(month, levels if isinstance(levels, tuple) else tuple(levels))


@functools.lru_cache(maxsize=100_000)
def rate_key(level: Level) -> bytes:
    """The ledger key of a level's rate window (not per month: a window spans a month's end)."""
    return _enc(f"rate|{level[0]}|{level[1]}")


class RateAsk(NamedTuple):
    """What `Ledger.reserve` decides on the rate windows of the levels that set rate limits:
    `decide(windows)` sees them as of `now` without this request, and None admits it (they then
    count it: one request, `tokens` estimated, one more in flight)."""

    keys: tuple[bytes, ...]
    window_s: int
    now: float
    tokens: int
    decide: Callable[[list[Window]], Any]


# In a reservation record, what its rate windows hold of it: b"@{second}|{tokens}" and then the
# rate keys, each prefixed b"~" (counter keys start with the month's digits).
_RATE_MARK = b"\x1f@"


def _reservation(amount: int, created_ms: int, pid: int, host: str, keys: Sequence[bytes],
                 rate: tuple[int, int, Sequence[bytes]] | None = None) -> bytes:
    """A reservation, compact: amount, time and owner, then the counters it holds (and what
    the rate windows hold of it)."""
    head = f"{amount}|{created_ms}|{pid}|{host}".encode()
    parts = [head, *keys]
    if rate is not None:
        second, tokens, rate_keys = rate
        parts.append(f"@{second}|{tokens}".encode())
        parts.extend(b"~" + k for k in rate_keys)
    return b"\x1f".join(parts)


def _parse_reservation(raw: bytes) -> tuple[int, int, int, str, list[bytes]]:
    head, *keys = raw.split(b"\x1f")
    amount, created, pid, host = head.decode().split("|", 3)
    if _RATE_MARK in raw:
        keys = [k for k in keys if k[:1] not in (b"@", b"~")]
    return int(amount), int(created), int(pid), host, keys


def _rate_part(raw: bytes) -> tuple[int, int, list[bytes]] | None:
    """(second, tokens, rate keys) of a reservation that its rate windows count, else None."""
    at = raw.find(_RATE_MARK)
    if at < 0:
        return None
    mark, *keys = raw[at + 1:].split(b"\x1f")
    second, tokens = mark[1:].split(b"|")
    return int(second), int(tokens), [k[1:] for k in keys]


def _reservation_record(raw: bytes) -> dict:
    amount, created, pid, host, keys = _parse_reservation(raw)
    levels = [k.decode().split("|", 2) for k in keys]
    return {
        "amount_nusd": amount,
        "created_ms": created,
        "pid": pid,
        "host": host,
        "month": levels[0][0] if levels else None,
        "levels": [[lv[1], lv[2]] for lv in levels],
    }


class Ledger(_Part):
    """Monthly usage counters per key, user and org; reservations for requests in flight; the
    per-request usage log; and the fail-open grace ledger."""

    def __init__(self, env: _Env) -> None:
        self._env = env
        self._usage = env.dbs["usage"]
        self._reservations = env.dbs["reservations"]
        self._log = env.dbs["requests"]
        self._grace = env.dbs["grace"]
        self._meta = env.dbs["meta"]
        # Rate windows live beside the counters (`rate|{level}|{id}`, no month: never under a
        # month's prefix): one B-tree fewer to write per request than a database of their own.
        self._rates = env.dbs["usage"]
        self.registry = Registry(env, self._meta)

    # --- the gateways sharing this ledger (to release a crashed one's reservations) ----------

    def join(self, gateway: str, info: dict[str, Any], is_live: IsLive) -> list[str]:
        """Register this gateway process on the ledger (see `Registry.join`)."""
        return self.registry.join(gateway, info, is_live)

    def heartbeat(self) -> list[str]:
        """Refresh this gateway's registration (see `Registry.heartbeat`)."""
        return self.registry.heartbeat()

    def leave(self) -> None:
        """Remove this gateway's registration."""
        self.registry.leave()

    def gateways(self) -> list[str]:
        """The live gateway processes registered on this ledger."""
        return self.registry.gateways()

    # --- the ledger ---------------------------------------------------------------------------

    def counters(self, levels: Iterable[Level], month: str) -> list[Counter]:
        keys = _counter_keys(month, levels)
        return self._env.read(
            lambda txn: [Counter.unpack(txn.get(k, db=self._usage)) for k in keys]
        )

    def reserve(
        self,
        reservation_id: str,
        levels: Sequence[Level],
        month: str,
        amount_nusd: int,
        refuse: Callable[[list[Counter]], T | None],
        *,
        owner: dict | None = None,
        rates: RateAsk | None = None,
    ) -> T | None:
        """Read the levels' counters and call `refuse(counters)` inside one write transaction;
        unless it returns a reason to refuse (nor `rates.decide` on the rate windows), add
        `amount_nusd` to each level's reserved total, count the request in the rate windows
        and record the reservation. Returns the reason, or None when reserved. Atomic across
        processes sharing the store."""
        keys = _counter_keys(month, levels)
        rid = _enc(reservation_id)
        pid = (owner or {}).get("pid", 0)
        host = (owner or {}).get("host", "")
        usage, unpack, pack = self._usage, _COUNTER.unpack, _COUNTER.pack

        def apply(txn: lmdb.Transaction) -> T | None:
            get = txn.get
            counters = []
            for k in keys:
                raw = get(k, db=usage)
                counters.append(Counter._make(unpack(raw)) if raw else _ZERO)
            reason = refuse(counters)
            rate = None
            if reason is None and rates is not None:
                windows = [Window.unpack(get(k, db=self._rates), rates.window_s).advance(
                    rates.now, rates.window_s) for k in rates.keys]
                reason = rates.decide(windows)
                if reason is None:
                    second = int(rates.now // 1)
                    for k, w in zip(rates.keys, windows, strict=True):
                        w.add(second, 1, rates.tokens)
                        w.in_flight += 1
                        txn.put(k, w.pack(), db=self._rates)
                    rate = (second, rates.tokens, rates.keys)
            if reason is None:
                now = _now_ms()
                put = txn.put
                for k, c in zip(keys, counters, strict=True):
                    put(k, pack(c[0], min(c[1] + amount_nusd, _I64_MAX), c[2], now), db=usage)
                put(rid, _reservation(amount_nusd, now, pid, host, keys, rate),
                    db=self._reservations)
            return reason

        return self._env.write_fast(apply)

    def settle(
        self,
        reservation_id: str | None,
        levels: Sequence[Level],
        month: str,
        cost_nusd: int,
        record: UsageRecord | None = None,
    ) -> list[Counter]:
        """Release a reservation (if still held), add the real cost and one request to each
        level, and log the request, in one transaction; in the rate windows that count the
        reservation, its estimated tokens become the record's metered ones and it is no longer
        in flight. Returns the counters after the write."""
        keys = _counter_keys(month, levels)
        entry = None if record is None else record.encode()
        rid = None if reservation_id is None else _enc(reservation_id)

        def apply(txn: lmdb.Transaction) -> list[Counter]:
            get, put = txn.get, txn.put
            usage = self._usage
            released = 0
            if rid is not None:
                raw = get(rid, db=self._reservations)
                if raw is not None:
                    released = int(raw[: raw.index(b"|")])  # the amount leads the record
                    txn.delete(rid, db=self._reservations)
                    if _RATE_MARK in raw:
                        self._settle_rates(txn, raw, None if record is None
                                           else record_tokens(record))
            now = _now_ms()
            after = []
            pack, unpack = _COUNTER.pack, _COUNTER.unpack
            for k in keys:
                raw_counter = get(k, db=usage)
                used, reserved, requests, _ = unpack(raw_counter) if raw_counter else _ZERO
                value = Counter(min(used + cost_nusd, _I64_MAX),
                                reserved - released if reserved > released else 0,
                                min(requests + 1, _I64_MAX), now)
                put(k, pack(*value), db=usage)
                after.append(value)
            if entry is not None:
                suffix = reservation_id or os.urandom(6).hex()
                put(_enc(f"{time.time_ns():020d}|{suffix}"), entry, db=self._log)
            return after

        return self._env.write_fast(apply)

    def _settle_rates(self, txn: lmdb.Transaction, raw: bytes, tokens: int | None,
                      *, uncount: bool = False) -> None:
        """A reservation leaves its rate windows' in-flight count; its estimate becomes
        `tokens` (None: stays); `uncount`: the request was never forwarded, it counts nothing."""
        part = _rate_part(raw)
        if part is None:
            return
        second, estimate, keys = part
        now = time.time()
        for k in keys:
            stored = txn.get(k, db=self._rates)
            if stored is None:
                continue
            w = Window.unpack(stored, 60)
            w.advance(now)
            w.in_flight = max(0, w.in_flight - 1)
            if uncount:
                w.adjust(second, -1, -estimate)
            elif tokens is not None:
                w.adjust(second, 0, tokens - estimate)
            txn.put(k, w.pack(), db=self._rates)

    def rate_windows(self, levels: Iterable[Level], now: float | None = None
                     ) -> list[Window | None]:
        """The levels' rate windows as of `now` (None: a level without one)."""
        at = time.time() if now is None else now
        keys = [rate_key(level) for level in levels]

        def collect(txn: lmdb.Transaction) -> list[Window | None]:
            out: list[Window | None] = []
            for k in keys:
                raw = txn.get(k, db=self._rates)
                out.append(None if raw is None else Window.unpack(raw, 60).advance(at))
            return out

        return self._env.read(collect)

    def release(self, reservation_id: str) -> bool:
        """Drop a reservation without charging anything (the request was never forwarded)."""
        rid = _enc(reservation_id)

        def apply(txn: lmdb.Transaction) -> bool:
            raw = txn.get(rid, db=self._reservations)
            if raw is None:
                return False
            self._unreserve(txn, raw)
            self._settle_rates(txn, raw, None, uncount=True)
            txn.delete(rid, db=self._reservations)
            return True

        return self._env.write(apply)

    def _unreserve(self, txn: lmdb.Transaction, raw: bytes) -> None:
        amount, _, _, _, keys = _parse_reservation(raw)
        for k in keys:
            c = Counter.unpack(txn.get(k, db=self._usage))
            txn.put(k, _COUNTER.pack(c[0], max(0, c[1] - amount), c[2], c[3]), db=self._usage)

    def release_stale(self, stale: Callable[[dict], bool] | float) -> int:
        """Release the reservations left by crashed gateways; returns how many.

        `stale` is either the reservation timeout in milliseconds, then one transaction reads
        which gateways are live and releases every reservation older than the timeout or held
        by a gateway no longer registered; or (the older form) a predicate over a reservation's
        record (`reservations()`), the caller having judged liveness itself."""
        if callable(stale):
            is_stale = stale
            timeout_ms = None
        else:
            is_stale = None
            timeout_ms = float(stale)

        def apply(txn: lmdb.Transaction) -> int:
            if is_stale is not None:
                judge = is_stale
            else:
                live = self.registry.live(txn)  # in the releasing transaction: no race
                now_ms = _now_ms()

                def judge(record: dict) -> bool:
                    if now_ms - int(record.get("created_ms", 0)) > timeout_ms:
                        return True
                    return str(record.get("host", "")) not in live

            stale_entries = [
                (k, v) for k, v in txn.cursor(db=self._reservations)
                if judge(_reservation_record(v))
            ]
            for k, v in stale_entries:
                self._unreserve(txn, v)
                self._settle_rates(txn, v, None)  # it may have reached the provider: counted
                txn.delete(k, db=self._reservations)
            return len(stale_entries)

        return self._env.write(apply)

    def reservations(self) -> list[dict]:
        """The reservations held by requests in flight."""
        return self._env.read(
            lambda txn: [_reservation_record(v) for _, v in txn.cursor(db=self._reservations)]
        )

    def month_counters(self, month: str) -> dict[Level, Counter]:
        """Every level's counter for `month` on this node."""
        prefix = f"{month}|".encode()

        def collect(txn: lmdb.Transaction) -> dict[Level, Counter]:
            out: dict[Level, Counter] = {}
            cursor = txn.cursor(db=self._usage)
            if not cursor.set_range(prefix):
                return out
            for k, v in cursor:
                if not k.startswith(prefix):
                    break
                _, level, level_id = k.decode().split("|", 2)
                out[(level, level_id)] = Counter.unpack(v)
            return out

        return self._env.read(collect)

    def reset(self, level: Level, month: str) -> Counter:
        """Zero a level's usage and request count for the month (reservations in flight stay)."""
        k = _counter_key(month, level)

        def apply(txn: lmdb.Transaction) -> Counter:
            before = Counter.unpack(txn.get(k, db=self._usage))
            txn.put(k, _COUNTER.pack(0, before.reserved_nusd, 0, _now_ms()), db=self._usage)
            return before

        return self._env.write(apply)

    def applied_resets(self) -> dict[Level, tuple[str, int]]:
        """The fleet-wide reset markers this node has applied: (month, at_ms) by level."""
        return self._env.read(lambda txn: _applied_resets(txn, self._meta))

    def apply_resets(self, markers: dict[Level, tuple[str, int]], months: Collection[str]
                     ) -> list[Level]:
        """Apply the fleet-wide reset markers (level -> (month, at_ms)) of `months` that are
        newer than the one applied before for their level: zero the level's counter of the
        marker's month, if it has one (reservations in flight stay), and remember the marker, in
        one transaction (a marker is never remembered without its reset, nor reset twice).
        Remembered markers of other months are forgotten. Returns the levels reset."""

        def apply(txn: lmdb.Transaction) -> list[Level]:
            remembered = _applied_resets(txn, self._meta)
            applied = {level: mark for level, mark in remembered.items() if mark[0] in months}
            reset: list[Level] = []
            now = _now_ms()
            for level, (month, at_ms) in markers.items():
                if month not in months or at_ms <= applied.get(level, ("", 0))[1]:
                    continue
                k = _counter_key(month, level)
                raw = txn.get(k, db=self._usage)
                if raw is not None:
                    before = Counter.unpack(raw)
                    txn.put(k, _COUNTER.pack(0, before.reserved_nusd, 0, now), db=self._usage)
                applied[level] = (month, at_ms)
                reset.append(level)
            if applied != remembered:
                stored = {f"{lv}|{i}": [m, t] for (lv, i), (m, t) in applied.items()}
                txn.put(_RESETS_APPLIED, orjson.dumps(stored), db=self._meta)
            return reset

        return self._env.write(apply)

    def log_entries(self, since_ns: int = 0) -> list[UsageRecord]:
        """The metered requests logged since `since_ns` (epoch nanoseconds), oldest first."""
        start = f"{since_ns:020d}".encode()

        def collect(txn: lmdb.Transaction) -> list[UsageRecord]:
            cursor = txn.cursor(db=self._log)
            if not cursor.set_range(start):
                return []
            out = []
            for k, v in cursor:
                if not k[:1].isdigit():
                    break
                out.append(UsageRecord.decode(v))
            return out

        return self._env.read(collect)

    def iter_log(self, since_ns: int = 0, until_ns: int | None = None, *,
                 page: int = LOG_PAGE) -> Iterator[tuple[int, UsageRecord]]:
        """Every usage record (metered and grace) settled from `since_ns` up to `until_ns`
        (epoch nanoseconds, inclusive), as (settled_ns, record) oldest first. Streamed: one
        short read transaction per `page` records, never the whole log in memory."""
        return heapq.merge(
            self._iter_prefix(b"", since_ns, until_ns, page),
            self._iter_prefix(_GRACE_PREFIX, since_ns, until_ns, page),
            key=lambda item: item[0],
        )

    def _iter_prefix(self, prefix: bytes, since_ns: int, until_ns: int | None,
                     page: int) -> Iterator[tuple[int, UsageRecord]]:
        start = prefix + f"{max(0, since_ns):020d}".encode()
        stop = None if until_ns is None else prefix + f"{until_ns:020d}|".encode()
        after: bytes | None = None  # the last key read: the next page starts past it

        def read_page(txn: lmdb.Transaction) -> list[tuple[bytes, bytes]]:
            cursor = txn.cursor(db=self._log)
            if after is None:
                found = cursor.set_range(start)
            else:
                found = cursor.set_range(after) and (cursor.key() != after or cursor.next())
            out: list[tuple[bytes, bytes]] = []
            while found and len(out) < page:
                k = cursor.key()
                if not _log_key_of(prefix, k) or (stop is not None and k > stop):
                    break
                out.append((k, cursor.value()))
                found = cursor.next()
            return out

        while True:
            rows = self._env.read(read_page)
            for k, v in rows:
                yield _log_time(prefix, k), UsageRecord.decode(v)
            if len(rows) < page:
                return
            after = rows[-1][0]

    def prune_usage(self, retention_days: float, *, now_s: float | None = None,
                    batch: int = PRUNE_BATCH, batches: int = PRUNE_BATCHES) -> int:
        """Delete (boundedly, see `prune_log`) the usage records older than `retention_days`:
        the gateway's maintenance calls this every tick. Returns how many were deleted."""
        now_s = time.time() if now_s is None else now_s
        before_ns = int((now_s - retention_days * 86400) * 1e9)
        return self.prune_log(before_ns, batch=batch, batches=batches)

    def prune_log(self, before_ns: int, *, batch: int = PRUNE_BATCH,
                  batches: int = PRUNE_BATCHES) -> int:
        """Delete the usage records (metered and grace) settled before `before_ns`: at most
        `batch` a write transaction and `batches` transactions a call (call again for the rest).
        Returns how many were deleted."""
        deleted = 0
        transactions = batches
        for prefix in (b"", _GRACE_PREFIX):
            cutoff = prefix + f"{max(0, before_ns):020d}".encode()
            while transactions > 0:
                # A read first: with nothing to prune, no write lock is taken.
                if not self._env.read(lambda txn, p=prefix, c=cutoff: self._has_older(txn, p, c)):
                    break
                transactions -= 1
                count = self._env.write(
                    lambda txn, p=prefix, c=cutoff: self._delete_older(txn, p, c, batch))
                deleted += count
                if count < batch:
                    break
        return deleted

    def _has_older(self, txn: lmdb.Transaction, prefix: bytes, cutoff: bytes) -> bool:
        cursor = txn.cursor(db=self._log)
        return bool(cursor.set_range(prefix)) and _log_key_of(prefix, cursor.key()) and (
            cursor.key() < cutoff)

    def _delete_older(self, txn: lmdb.Transaction, prefix: bytes, cutoff: bytes,
                      batch: int) -> int:
        cursor = txn.cursor(db=self._log)
        count = 0
        found = cursor.set_range(prefix)
        while found and count < batch:
            k = cursor.key()
            if not _log_key_of(prefix, k) or k >= cutoff:
                break
            found = cursor.delete()  # moves to the next record
            count += 1
        return count

    def grace_used(self, day: str, who: str) -> tuple[int, int]:
        raw = self._env.read(lambda txn: txn.get(_enc(f"{day}|{who}"), db=self._grace))
        return _GRACE.unpack(raw) if raw else (0, 0)

    def grace_charge(
        self, day: str, who: str, cost_nusd: int, record: UsageRecord
    ) -> tuple[int, int]:
        """Add a fail-open request to the day's grace total and keep it for reconciliation."""
        k = _enc(f"{day}|{who}")

        def apply(txn: lmdb.Transaction) -> tuple[int, int]:
            raw = txn.get(k, db=self._grace)
            used, count = _GRACE.unpack(raw) if raw else (0, 0)
            after = (used + cost_nusd, count + 1)
            txn.put(k, _GRACE.pack(*after), db=self._grace)
            entry = _enc(f"grace|{time.time_ns():020d}|{os.urandom(4).hex()}")
            txn.put(entry, record.encode(), db=self._log)
            return after

        return self._env.write(apply)

    def grace_log(self) -> list[UsageRecord]:
        """Requests forwarded in fail-open mode, kept for reconciliation."""

        def collect(txn: lmdb.Transaction) -> list[UsageRecord]:
            cursor = txn.cursor(db=self._log)
            if not cursor.set_range(b"grace|"):
                return []
            out = []
            for k, v in cursor:
                if not k.startswith(b"grace|"):
                    break
                out.append(UsageRecord.decode(v))
            return out

        return self._env.read(collect)


_RESETS_APPLIED = b"resets_applied"  # ledger meta: {"level|id": [month, at_ms]}


def _applied_resets(txn: lmdb.Transaction, meta: Any) -> dict[Level, tuple[str, int]]:
    raw = txn.get(_RESETS_APPLIED, db=meta)
    stored: dict[str, list] = orjson.loads(raw) if raw else {}
    return {(k.split("|", 1)[0], k.split("|", 1)[1]): (v[0], v[1]) for k, v in stored.items()}


def record_tokens(record: UsageRecord) -> int:
    """The tokens a usage record counts against a TPM limit: every kind of input, and output."""
    return (record.input + record.cached_input + record.cache_write + record.cache_write_1h
            + record.output)


def _log_key_of(prefix: bytes, key: bytes) -> bool:
    """Whether a usage log key is of the kind `prefix` names (b"": metered, digits first)."""
    return key.startswith(prefix) and key[len(prefix):len(prefix) + 1].isdigit()


def _log_time(prefix: bytes, key: bytes) -> int:
    """The settlement time (epoch nanoseconds) in a usage log key."""
    return int(key[len(prefix):len(prefix) + 20])
