"""The LMDB store: two environments in one data directory.

`config/`  replicated, read-mostly records in the Workers gateway's KV layout (and sync metadata)
`ledger/`  usage written per request: monthly counters, reservations, the per-request log and the
           fail-open grace ledger

Keeping them apart means a large configuration write (an import, a sync pass) never holds the lock
that a request's ledger write needs.

Durability: the config environment syncs every commit. The ledger commits without sync and
without a writable map (MDB_NOSYNC alone): LMDB documents that its transactions then keep
atomicity, consistency and isolation and lose only durability, on a filesystem that preserves
write order, so an OS crash or power loss can lose the commits since the last `flush()`, which
callers run on a timer (`Flusher`). No writable map (MDB_WRITEMAP): with it, a full filesystem
kills the process with SIGBUS, and with no-sync LMDB says it can corrupt the database on an OS
crash. A killed process loses nothing in any case (the pages are the OS's). A full disk or map,
or a store that cannot be opened, is `StoreUnavailable`; nothing committed is lost.
"""

import functools
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import lmdb
import orjson

from store.hashing import hash_key
from store.records import (
    ApiKey,
    Org,
    QuotaRecord,
    RecordError,
    User,
    apikey_key,
    org_config_key,
    org_quota_key,
    user_config_key,
    user_quota_key,
)

T = TypeVar("T")
log = logging.getLogger("aigw.store")

GIB = 1 << 30
MAX_MAP_SIZE = 1 << 40
LMDB_MAX_KEY = 511
_COUNTER = struct.Struct("<qqqq")  # used_nusd, reserved_nusd, requests, updated_ms
_GRACE = struct.Struct("<qq")  # used_nusd, requests

CONFIG_DBS = ("records", "meta", "stamps", "remote")
LEDGER_DBS = ("usage", "reservations", "requests", "grace", "meta")
# The ledger is written twice per request, on the event loop: no sync on commit (an fsync per
# commit cost 20x the write and a third of the gateway's throughput: docs/performance.md), and no
# writable map (see the module docstring). `Store.flush` bounds what an OS crash can lose.
LEDGER_SYNC = {"sync": False, "metasync": False}

RESOLVE_CACHE_SIZE = 200_000
_GATEWAYS = b"gateways"  # ledger meta: the gateway processes using this ledger
GATEWAY_TIMEOUT_S = 30.0  # a registered gateway without a heartbeat for this long is gone
IsLive = Callable[[str, dict], bool]  # whether a registered gateway (name, entry) still runs


class StoreError(Exception):
    """The store refused an operation (bad input, missing record)."""


class StoreUnavailable(StoreError):
    """The store cannot be read or written: quota data is unavailable."""


class StoreMissing(StoreError):
    """No store at the path, and the caller asked not to create one."""


def missing_store_message(path: str | Path) -> str:
    """What to tell someone who pointed a tool at a path with no store."""
    return (f"no store at {path}: create one with `aigw org create ...` or `aigw import FILE`, "
            f"or run scripts/run for a demo store")


def _reason(exc: lmdb.Error) -> str:
    """An LMDB error without the C function's name ("mdb_env_open: Permission denied")."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("mdb_") and ": " in text else text


def _now_ms() -> int:
    return int(time.time() * 1000)


def _enc(key: str) -> bytes:
    raw = key.encode("utf-8")
    if len(raw) > LMDB_MAX_KEY:
        raise StoreError(f"key longer than LMDB's {LMDB_MAX_KEY} bytes: {key[:60]}...")
    return raw


class _Env:
    """One LMDB environment with named databases; retries MapFull (grows) and MapResized.

    Every transaction of this process runs under `lock`, and the map is resized only while no
    transaction of this process is open (LMDB's rule for mdb_env_set_mapsize): a thread that
    meets a full or resized map waits for other threads' transactions to end first."""

    def __init__(
        self,
        path: Path,
        dbs: Iterable[str],
        *,
        map_size: int,
        sync: bool = True,
        metasync: bool = True,
        writemap: bool = False,
        create: bool = True,
    ) -> None:
        self.path = path
        self.lock = threading.RLock()
        self._depth = 0  # transactions open on the thread holding `lock`
        if create:
            path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=16,
            max_readers=1024,
            sync=sync,
            metasync=metasync,
            readahead=False,
            lock=True,
            writemap=writemap,
            create=create,
        )
        try:
            self.env.reader_check()  # slots left by killed processes
            self.dbs = {}
            with self.env.begin(write=True) as txn:
                for name in dbs:
                    self.dbs[name] = self.env.open_db(name.encode(), txn=txn)
        except BaseException:
            self.env.close()
            raise

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        with self.lock:
            for _attempt in range(3):
                self._depth += 1
                try:
                    with self.env.begin(buffers=False) as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    pass  # resized below, once this transaction is closed
                except lmdb.Error as exc:
                    raise StoreUnavailable(f"store read failed ({self.path}): {exc}") from exc
                finally:
                    self._depth -= 1
                self.resize(0)
        raise StoreUnavailable(f"store map kept resizing ({self.path})")

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        with self.lock:
            for _attempt in range(6):
                self._depth += 1
                grow = False
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapResizedError:
                    pass
                except lmdb.MapFullError:
                    grow = True
                except lmdb.Error as exc:
                    # A failed commit is aborted whole: what was committed before stays.
                    raise StoreUnavailable(f"store write failed ({self.path}): {exc}") from exc
                finally:
                    self._depth -= 1
                if not grow:
                    self.resize(0)
                    continue
                size = self.env.info()["map_size"]
                if size >= MAX_MAP_SIZE:
                    raise StoreUnavailable(f"store is full ({self.path})")
                self.resize(min(size * 2, MAX_MAP_SIZE))
        raise StoreUnavailable(f"store write kept failing on map size ({self.path})")

    def resize(self, size: int) -> None:
        """Grow the map to `size` (0: adopt the size another process set). The caller holds
        `lock`, so no other thread of this process has a transaction open."""
        if self._depth:
            # Called from inside one of this thread's own transactions: resizing would unmap
            # pages that transaction still reads. Refuse; the outer call can be retried.
            raise StoreUnavailable(f"store map must be resized outside a transaction "
                                   f"({self.path})")
        try:
            self.env.set_mapsize(size)
        except lmdb.Error as exc:
            raise StoreUnavailable(f"store map resize failed ({self.path}): {exc}") from exc

    def sync(self) -> None:
        """fsync this environment (no lock: without a writable map it only fsyncs the file)."""
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise StoreUnavailable(f"store sync failed ({self.path}): {exc}") from exc

    def close(self) -> None:
        with self.lock:
            try:
                self.env.sync(True)
            except lmdb.Error as exc:
                log.error("store sync at close failed (%s): %s", self.path, exc)
            finally:
                self.env.close()


@dataclass(slots=True)  # built per request: a frozen one costs a call per field
class Identity:
    """Everything a request's decision needs from the configuration records."""

    key_hash: str
    key: ApiKey | None
    user: User | None
    org: Org | None
    user_quota: QuotaRecord | None  # the Workers gateway's own totals, if replicated
    org_quota: QuotaRecord | None
    # Other gateway nodes' totals this month (nano-dollars, requests) for key, user and org,
    # as the last sync pass found them in KV.
    remote: tuple[tuple[int, int], ...] = ((0, 0), (0, 0), (0, 0))


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


class _Part:
    """A part of the store in one environment, with its own small `meta` table."""

    _env: _Env
    _meta: Any

    def meta(self, name: str) -> Any:
        raw = self._env.read(lambda txn: txn.get(_enc(name), db=self._meta))
        return None if raw is None else json.loads(raw)

    def set_meta(self, name: str, value: Any) -> None:
        data = json.dumps(value).encode()
        self._env.write(lambda txn: txn.put(_enc(name), data, db=self._meta))


class Records(_Part):
    """Configuration records: KV keys to JSON values, as the Workers gateway lays them out."""

    def __init__(self, env: _Env) -> None:
        self._env = env
        self._db = env.dbs["records"]
        self._meta = env.dbs["meta"]
        self._stamps = env.dbs["stamps"]
        self._remote = env.dbs["remote"]
        self._cache: dict[str, Identity] = {}
        self._cache_txnid = -1
        self._cache_month = ""
        self._last_sync: dict | None = None
        self._parse_cache: dict[tuple, Any] = {}
        self._level_cache: dict[tuple[str, str], tuple] = {}  # for the snapshot of `_cache`

    def get(self, key: str) -> bytes | None:
        return self._env.read(lambda txn: txn.get(_enc(key), db=self._db))

    def get_json(self, key: str) -> dict | None:
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of those `keys` that exist, read in one transaction."""
        names = list(keys)

        def collect(txn: lmdb.Transaction) -> dict[str, bytes]:
            found = ((name, txn.get(_enc(name), db=self._db)) for name in names)
            return {name: raw for name, raw in found if raw is not None}

        return self._env.read(collect)

    def resolve(self, key_hash: str, month: str = "") -> Identity:
        """Look up a presented key's hash, its user and its org in one read transaction, with
        other nodes' totals for `month` (YYYY-MM).

        Answers are cached until the records change: any committed write (an admin command, a
        sync pass) moves the environment's transaction id and empties the cache, so a
        revocation is seen by the next request. Until then a key's answer is the same object:
        the gateway keeps what it derived from it (and the checks it passed) while it is."""
        try:  # the common case: a key seen since the last commit
            with self._env.lock, self._env.env.begin() as txn:
                if txn.id() == self._cache_txnid and month == self._cache_month:
                    hit = self._cache.get(key_hash)
                    if hit is not None:
                        return hit
        except lmdb.Error:
            pass  # the full path below retries and reports it

        def lookup(txn: lmdb.Transaction) -> Identity:
            txnid = txn.id()
            if txnid != self._cache_txnid or month != self._cache_month:
                self._cache.clear()
                self._level_cache.clear()
                self._cache_txnid, self._cache_month = txnid, month
                raw_sync = txn.get(b"last_sync", db=self._meta)
                self._last_sync = orjson.loads(raw_sync) if raw_sync else None
            else:
                hit = self._cache.get(key_hash)
                if hit is not None:
                    return hit

            raw_key = txn.get(apikey_key(key_hash).encode(), db=self._db)
            if raw_key is None:
                identity = Identity(key_hash, None, None, None, None, None)
            else:
                key = ApiKey.parse(key_hash, raw_key)
                user, user_quota, user_remote = self._level(txn, "user", key.user_id, month)
                org_id = key.org_id or (user.org_id if user else None)
                org, org_quota, org_remote = (
                    self._level(txn, "org", org_id, month) if org_id else (None, None, (0, 0)))
                key_remote = _remote_sum(txn, self._remote, month, "key", key.key_id)
                identity = Identity(key_hash, key, user, org, user_quota, org_quota,
                                    (key_remote, user_remote, org_remote))
            if len(self._cache) >= RESOLVE_CACHE_SIZE:
                self._cache.clear()
            self._cache[key_hash] = identity
            return identity

        try:
            return self._env.read(lookup)
        except RecordError as exc:
            raise StoreUnavailable(f"unreadable record: {exc}") from exc

    def remote_usage(self, month: str, level: str, level_id: str) -> tuple[int, int]:
        """Other nodes' totals (nano-dollars, requests) of one level for `month`, as the last
        sync pass replicated them: what `resolve` gives the request path."""
        return self._env.read(lambda txn: _remote_sum(txn, self._remote, month, level, level_id))

    def last_sync(self) -> dict | None:
        """The summary of the last complete sync pass (None if there never was one), as seen
        by the last `resolve`."""
        return self._last_sync

    def replicate(
        self,
        puts: dict[str, bytes],
        deletes: Iterable[str],
        stamps: dict[str, str],
        remote: dict[tuple[str, str, str], tuple[int, int]] | None,
        summary: dict,
    ) -> None:
        """Apply a complete sync pass in one transaction: records written and deleted, the
        version stamp of every replicated key (deleted keys lose theirs), other nodes' usage
        totals (replaced whole), and the pass summary (`last_sync`)."""
        encoded = [(_enc(k), v) for k, v in puts.items()]
        removed = [_enc(k) for k in deletes]
        stamped = [(_enc(k), v.encode()) for k, v in stamps.items()]
        sums = None
        if remote is not None:
            sums = [(_enc(f"{m}|{lv}|{i}"), _GRACE.pack(*v)) for (m, lv, i), v in remote.items()]
        meta = orjson.dumps(summary)

        def apply(txn: lmdb.Transaction) -> None:
            for k, v in encoded:
                txn.put(k, v, db=self._db)
            for k in removed:
                txn.delete(k, db=self._db)
                txn.delete(k, db=self._stamps)
            for k, v in stamped:
                txn.put(k, v, db=self._stamps)
            if sums is not None:
                txn.drop(self._remote, delete=False)
                for k, v in sums:
                    txn.put(k, v, db=self._remote)
            txn.put(b"last_sync", meta, db=self._meta)

        self._env.write(apply)

    def stamps(self) -> dict[str, str]:
        """Version stamps of the replicated keys ("" for a key written by another tool)."""
        return self._env.read(
            lambda txn: {k.decode(): v.decode() for k, v in txn.cursor(db=self._stamps)}
        )

    def _level(self, txn: lmdb.Transaction, level: str, level_id: str, month: str) -> tuple:
        """A user's or an org's record, quota record and other nodes' totals, read once per
        snapshot of the records (`resolve` empties this cache when they change): the keys of
        one user or org share them."""
        cached = self._level_cache.get((level, level_id))
        if cached is None:
            kind, config_key, quota_key = (
                (User, user_config_key, user_quota_key) if level == "user"
                else (Org, org_config_key, org_quota_key))
            get, db = txn.get, self._db
            cached = (
                self._parsed(kind, level_id, get(config_key(level_id).encode(), db=db)),
                self._parsed(QuotaRecord, None, get(quota_key(level_id).encode(), db=db)),
                _remote_sum(txn, self._remote, month, level, level_id),
            )
            if len(self._level_cache) >= RESOLVE_CACHE_SIZE:
                self._level_cache.clear()
            self._level_cache[(level, level_id)] = cached
        return cached

    def _parsed(self, kind: type, record_id: str | None, raw: bytes | None) -> Any:
        """A user, org or quota record parsed once per distinct value: many keys share them."""
        if raw is None:
            return None
        cache_key = (kind, record_id, raw)
        parsed = self._parse_cache.get(cache_key)
        if parsed is None:
            parsed = kind.parse(raw) if record_id is None else kind.parse(record_id, raw)
            if len(self._parse_cache) >= RESOLVE_CACHE_SIZE:
                self._parse_cache.clear()
            self._parse_cache[cache_key] = parsed
        return parsed

    def write(self, puts: dict[str, bytes], deletes: Iterable[str] = ()) -> None:
        """Apply puts and deletes in one transaction: all or nothing."""
        encoded = [(_enc(k), v) for k, v in puts.items()]
        encoded_deletes = [_enc(k) for k in deletes]

        def apply(txn: lmdb.Transaction) -> None:
            for k, v in encoded:
                txn.put(k, v, db=self._db)
            for k in encoded_deletes:
                txn.delete(k, db=self._db)

        self._env.write(apply)

    def scan(self, prefix: str = "") -> list[tuple[str, bytes]]:
        start = prefix.encode()

        def collect(txn: lmdb.Transaction) -> list[tuple[str, bytes]]:
            out = []
            cursor = txn.cursor(db=self._db)
            if not cursor.set_range(start):
                return out
            for k, v in cursor:
                if not k.startswith(start):
                    break
                out.append((k.decode(), v))
            return out

        return self._env.read(collect)

    def count(self) -> dict[str, int]:
        """Record counts by kind: org, user, apikey, key listing, quota, other."""

        def tally(txn: lmdb.Transaction) -> dict[str, int]:
            counts = {"orgs": 0, "users": 0, "apikeys": 0, "key_listings": 0, "quotas": 0,
                      "other": 0}
            for k in txn.cursor(db=self._db).iternext(keys=True, values=False):
                parts = k.decode().split(":")
                if parts[0] == "apikey":
                    counts["apikeys"] += 1
                elif parts[-1] == "quota":
                    counts["quotas"] += 1
                elif parts[0] == "org" and parts[-1] == "config":
                    counts["orgs"] += 1
                elif parts[0] == "user" and parts[-1] == "config":
                    counts["users"] += 1
                elif parts[0] == "user" and len(parts) == 4:
                    counts["key_listings"] += 1
                else:
                    counts["other"] += 1
            return counts

        return self._env.read(tally)



def _remote_sum(txn: lmdb.Transaction, db: Any, month: str, level: str, level_id: str
                ) -> tuple[int, int]:
    raw = txn.get(f"{month}|{level}|{level_id}".encode(), db=db)
    return _GRACE.unpack(raw) if raw else (0, 0)


def _reservation(amount: int, created_ms: int, pid: int, host: str, keys: list[bytes]) -> bytes:
    """A reservation, compact: amount, time and owner, then the counters it holds."""
    head = f"{amount}|{created_ms}|{pid}|{host}".encode()
    return b"\x1f".join([head, *keys])


def _parse_reservation(raw: bytes) -> tuple[int, int, int, str, list[bytes]]:
    head, *keys = raw.split(b"\x1f")
    amount, created, pid, host = head.decode().split("|", 3)
    return int(amount), int(created), int(pid), host, keys


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
        self._gateway = ""  # this process's registration (see `join`)
        self._gateway_info: dict[str, Any] = {}
        self._is_live: IsLive | None = None

    # --- the gateways sharing this ledger (to release a crashed one's reservations) ----------

    def join(self, gateway: str, info: dict[str, Any], is_live: IsLive) -> list[str]:
        """Register a gateway process (`gateway`: a unique name; `info`: what `is_live` needs
        to judge it, e.g. its pid) as a user of this ledger, and drop the registrations
        `is_live(name, entry)` rejects. Each entry carries `seen`, the time of its last
        heartbeat. Returns the other live gateways."""
        self._gateway = gateway
        self._gateway_info = dict(info)
        self._is_live = is_live
        return self.heartbeat()

    def heartbeat(self) -> list[str]:
        """Refresh this gateway's registration (restoring it if another process dropped it)
        and drop dead ones; returns the other live gateways."""
        gateway = self._gateway
        if not gateway:
            return []

        def apply(txn: lmdb.Transaction) -> list[str]:
            current = self._registry(txn)
            live = {g: e for g, e in current.items() if g != gateway and self._live(g, e)}
            others = sorted(live)
            live[gateway] = {**self._gateway_info, "seen": time.time()}
            self._put_registry(txn, live)
            return others

        return self._env.write(apply)

    def leave(self) -> None:
        """Remove this gateway's registration."""
        gateway = self._gateway
        if not gateway:
            return

        def apply(txn: lmdb.Transaction) -> None:
            live = self._registry(txn)
            if live.pop(gateway, None) is not None:
                self._put_registry(txn, live)

        self._gateway = ""
        self._env.write(apply)

    def gateways(self) -> list[str]:
        """The live gateway processes registered on this ledger."""
        return sorted(g for g, e in self._env.read(self._registry).items() if self._live(g, e))

    def _live(self, gateway: str, entry: Any) -> bool:
        if gateway == self._gateway:
            return True
        if not isinstance(entry, dict) or time.time() - float(entry.get("seen", 0)) > (
            GATEWAY_TIMEOUT_S
        ):
            return False  # no heartbeat for too long: crashed, or a registry of another format
        return self._is_live is None or self._is_live(gateway, entry)

    def _registry(self, txn: lmdb.Transaction) -> dict[str, Any]:
        raw = txn.get(_GATEWAYS, db=self._meta)
        return orjson.loads(raw) if raw else {}

    def _put_registry(self, txn: lmdb.Transaction, registry: dict[str, Any]) -> None:
        txn.put(_GATEWAYS, orjson.dumps(registry, option=orjson.OPT_SORT_KEYS), db=self._meta)

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
    ) -> T | None:
        """Read the levels' counters and call `refuse(counters)` inside one write transaction;
        unless it returns a reason to refuse, add `amount_nusd` to each level's reserved total and
        record the reservation. Returns the reason, or None when reserved. Atomic across
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
            if reason is None:
                now = _now_ms()
                put = txn.put
                for k, c in zip(keys, counters, strict=True):
                    put(k, pack(c[0], c[1] + amount_nusd, c[2], now), db=usage)
                put(rid, _reservation(amount_nusd, now, pid, host, keys), db=self._reservations)
            return reason

        return self._write_fast(apply)

    def _write_fast(self, apply: Callable[[lmdb.Transaction], T]) -> T:
        """A request-path write: the common case without the generic retry wrapper; map
        resizes and full maps go through it."""
        env = self._env
        with env.lock:
            env._depth += 1
            try:
                with env.env.begin(write=True) as txn:
                    return apply(txn)
            except (lmdb.MapResizedError, lmdb.MapFullError):
                pass
            except lmdb.Error as exc:
                raise StoreUnavailable(f"store write failed ({env.path}): {exc}") from exc
            finally:
                env._depth -= 1
            return env.write(apply)

    def settle(
        self,
        reservation_id: str | None,
        levels: Sequence[Level],
        month: str,
        cost_nusd: int,
        record: UsageRecord | None = None,
    ) -> list[Counter]:
        """Release a reservation (if still held), add the real cost and one request to each
        level, and log the request, in one transaction. Returns the counters after the write."""
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
            now = _now_ms()
            after = []
            pack, unpack = _COUNTER.pack, _COUNTER.unpack
            for k in keys:
                raw_counter = get(k, db=usage)
                used, reserved, requests, _ = unpack(raw_counter) if raw_counter else _ZERO
                value = Counter(used + cost_nusd, reserved - released if reserved > released
                                else 0, requests + 1, now)
                put(k, pack(*value), db=usage)
                after.append(value)
            if entry is not None:
                suffix = reservation_id or os.urandom(6).hex()
                put(_enc(f"{time.time_ns():020d}|{suffix}"), entry, db=self._log)
            return after

        return self._write_fast(apply)

    def release(self, reservation_id: str) -> bool:
        """Drop a reservation without charging anything (the request was never forwarded)."""
        rid = _enc(reservation_id)

        def apply(txn: lmdb.Transaction) -> bool:
            raw = txn.get(rid, db=self._reservations)
            if raw is None:
                return False
            self._unreserve(txn, raw)
            txn.delete(rid, db=self._reservations)
            return True

        return self._env.write(apply)

    def _unreserve(self, txn: lmdb.Transaction, raw: bytes) -> None:
        amount, _, _, _, keys = _parse_reservation(raw)
        for k in keys:
            c = Counter.unpack(txn.get(k, db=self._usage))
            txn.put(k, _COUNTER.pack(c[0], max(0, c[1] - amount), c[2], c[3]), db=self._usage)

    def release_stale(self, is_stale: Callable[[dict], bool]) -> int:
        """Release every reservation for which `is_stale(record)` holds (left by a crash)."""

        def apply(txn: lmdb.Transaction) -> int:
            stale = [
                (k, v) for k, v in txn.cursor(db=self._reservations)
                if is_stale(_reservation_record(v))
            ]
            for k, v in stale:
                self._unreserve(txn, v)
                txn.delete(k, db=self._reservations)
            return len(stale)

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



class Store:
    """The data directory: configuration records plus the usage ledger."""

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether a store was ever created at `path` (its config environment's data file
        exists). True when that cannot be told (no permission): opening it then reports the
        real reason."""
        try:
            return (Path(path) / "config" / "data.mdb").is_file()
        except OSError:
            return True

    def __init__(
        self,
        path: str | Path,
        *,
        hash_algorithm: str = "blake3",
        map_size: int = 4 * GIB,
        create: bool = True,
    ) -> None:
        """Open the store at `path`, creating it unless `create` is False (then a path with no
        store is `StoreMissing`). A store that cannot be opened is `StoreUnavailable`."""
        self.path = Path(path)
        self.hash_algorithm = hash_algorithm
        hash_key("", hash_algorithm)  # rejects an unknown algorithm early
        if not create and not Store.exists(self.path):
            raise StoreMissing(missing_store_message(self.path))
        config_env = self._open("config", CONFIG_DBS, map_size=map_size, create=create)
        try:
            # The ledger is node-local: a store that has a config environment gets one.
            ledger_env = self._open("ledger", LEDGER_DBS, map_size=map_size, **LEDGER_SYNC)
        except BaseException:
            config_env.close()
            raise
        self._envs = (config_env, ledger_env)
        self.records = Records(config_env)
        self.ledger = Ledger(ledger_env)
        self._closed = False
        self._sync_lock = threading.Lock()  # close waits for a flush in progress (Flusher)

    def _open(self, name: str, dbs: Sequence[str], *, map_size: int, sync: bool = True,
              metasync: bool = True, create: bool = True) -> _Env:
        where = self.path / name
        try:
            return _Env(where, dbs, map_size=map_size, sync=sync, metasync=metasync,
                        create=create)
        except FileNotFoundError as exc:
            raise StoreMissing(missing_store_message(self.path)) from exc
        except lmdb.Error as exc:
            if not create and not Store.exists(self.path):  # removed since the check
                raise StoreMissing(missing_store_message(self.path)) from exc
            raise StoreUnavailable(f"cannot open store at {self.path}: {_reason(exc)}") from exc
        except OSError as exc:  # creating its directories
            raise StoreUnavailable(
                f"cannot open store at {self.path}: {exc.strerror or exc}") from exc

    def hash(self, raw_key: str) -> str:
        return hash_key(raw_key, self.hash_algorithm)

    def node_id(self) -> str:
        """This store's node id, created once."""
        node = self.ledger.meta("node_id")
        if node is None:
            node = "node_" + os.urandom(6).hex()
            self.ledger.set_meta("node_id", node)
        return node

    def flush(self) -> None:
        """fsync the store: the ledger's last commit survives an OS crash or power loss once
        this returns. Safe from another thread (it takes no transaction)."""
        with self._sync_lock:
            if self._closed:
                return
            for env in self._envs:
                env.sync()

    def close(self) -> None:
        with self._sync_lock:
            if self._closed:
                return
            self._closed = True
            for env in self._envs:
                env.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Flusher:
    """A daemon thread that syncs the store every `interval` seconds, off the event loop."""

    def __init__(self, store: Store, interval: float) -> None:
        self._store = store
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aigw-flush", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval):
            try:
                self._store.flush()
            except StoreUnavailable as exc:  # a full or failing disk: once, not every second
                if not failing:
                    log.error("ledger sync failed (%s); retrying every %.1fs", exc,
                              self._interval)
                failing = True
                continue
            except Exception:
                log.exception("ledger sync failed; retrying in %.1fs", self._interval)
                failing = True
                continue
            if failing:
                log.warning("ledger sync works again")
            failing = False

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
