"""The configuration records: KV keys to JSON values in the Workers gateway's layout, the sync
metadata (version stamps, other nodes' usage totals, the last pass), and the request path's
look-up of a presented key with its user and org (`Records.resolve`).

The config environment syncs every commit: its writes are admin commands and sync passes.
"""

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lmdb
import orjson

from store.errors import StoreUnavailable
from store.lmdb_env import _enc, _Env, _Part
from store.lru import LRU
from store.records import (
    ApiKey,
    Org,
    QuotaRecord,
    RecordError,
    User,
    VirtualKey,
    apikey_key,
    org_config_key,
    org_quota_key,
    user_config_key,
    user_quota_key,
    vkey_config_key,
    vkey_quota_key,
)

CONFIG_DBS = ("records", "meta", "stamps", "remote")
RESOLVE_CACHE_SIZE = 200_000  # entries of each of resolve's caches (least recently used go)
_SUMS = struct.Struct("<qq")  # other nodes' totals: nano-dollars, requests


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
    key_quota: QuotaRecord | None = None  # the later Workers gateway's `vkey:{hash}:quota`
    layout: str = "apikey"  # where the key was found: `apikey:{hash}` or `vkey:{hash}:config`


class Records(_Part):
    """Configuration records: KV keys to JSON values, as the Workers gateway lays them out."""

    def __init__(self, env: _Env) -> None:
        self._env = env
        self._db = env.dbs["records"]
        self._meta = env.dbs["meta"]
        self._stamps = env.dbs["stamps"]
        self._remote = env.dbs["remote"]
        self._cache: LRU[str, Identity] = LRU(RESOLVE_CACHE_SIZE)
        self._cache_txnid = -1
        self._cache_generation = -1
        self._cache_month = ""
        self._last_sync: dict | None = None
        self._parse_cache: LRU[tuple, Any] = LRU(RESOLVE_CACHE_SIZE)
        # A user's or org's parsed records for the generation of `_cache`.
        self._level_cache: LRU[tuple[str, str], tuple] = LRU(RESOLVE_CACHE_SIZE)

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

        Answers are cached while the records stay the same: every write that changes a record
        or other nodes' totals (an admin command, a sync pass that brought something new) moves
        the records' generation in the same transaction, which empties the cache, so a
        revocation is seen by the next request; a pass that changed nothing keeps it. Until then
        a key's answer is the same object: the gateway keeps what it derived from it (and the
        checks it passed) while it is."""
        try:  # the common case: a key seen since the last commit
            with self._env.lock, self._env.env.begin() as txn:
                if txn.id() == self._cache_txnid and month == self._cache_month:
                    hit = self._cache.get(key_hash)
                    if hit is not None:
                        return hit
        except lmdb.Error:
            pass  # the full path below retries and reports it

        def lookup(txn: lmdb.Transaction) -> Identity:
            if txn.id() != self._cache_txnid or month != self._cache_month:
                self._refresh(txn, month)
            hit = self._cache.get(key_hash)
            if hit is not None:
                return hit

            get, db = txn.get, self._db
            layout, key_quota = "apikey", None
            raw_key = get(apikey_key(key_hash).encode(), db=db)
            if raw_key is not None and get(vkey_config_key(key_hash).encode(), db=db) is not None:
                # Both layouts hold this key: revoking one would leave the other working, so
                # neither is believed (`aigw health` names it among the invalid records).
                raw_key = None
            elif raw_key is not None:
                key = ApiKey.parse(key_hash, raw_key)
            elif (raw_key := get(vkey_config_key(key_hash).encode(), db=db)) is not None:
                # The later layout, looked up only when the first misses (its hot path stays).
                layout, key = "vkey", VirtualKey.parse(key_hash, raw_key).as_api_key()
                key_quota = self._parsed(QuotaRecord, None,
                                         get(vkey_quota_key(key_hash).encode(), db=db))
            if raw_key is None:
                identity = Identity(key_hash, None, None, None, None, None)
            else:
                user, user_quota, user_remote = self._level(txn, "user", key.user_id, month)
                org_id = key.org_id or (user.org_id if user else None)
                org, org_quota, org_remote = (
                    self._level(txn, "org", org_id, month) if org_id else (None, None, (0, 0)))
                key_remote = _remote_sum(txn, self._remote, month, "key", key.key_id)
                identity = Identity(key_hash, key, user, org, user_quota, org_quota,
                                    (key_remote, user_remote, org_remote), key_quota, layout)
            self._cache.put(key_hash, identity)
            return identity

        try:
            return self._env.read(lookup)
        except RecordError as exc:
            raise StoreUnavailable(f"unreadable record: {exc}") from exc

    def _refresh(self, txn: lmdb.Transaction, month: str) -> None:
        """Another commit since the cache was filled: the last pass's summary is read again,
        and the cached answers go only if the records changed (or the month did)."""
        generation = _generation(txn, self._meta)
        if generation != self._cache_generation or month != self._cache_month:
            self._cache.clear()
            self._level_cache.clear()
            self._cache_generation, self._cache_month = generation, month
        self._cache_txnid = txn.id()
        raw_sync = txn.get(b"last_sync", db=self._meta)
        self._last_sync = orjson.loads(raw_sync) if raw_sync else None

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
            sums = [(_enc(f"{m}|{lv}|{i}"), _SUMS.pack(*v)) for (m, lv, i), v in remote.items()]
        meta = orjson.dumps(summary)

        def apply(txn: lmdb.Transaction) -> None:
            changed = self._apply(txn, encoded, removed)
            for k in removed:
                txn.delete(k, db=self._stamps)
            for k, v in stamped:
                txn.put(k, v, db=self._stamps)
            if sums is not None and dict(sums) != dict(txn.cursor(db=self._remote)):
                txn.drop(self._remote, delete=False)
                for k, v in sums:
                    txn.put(k, v, db=self._remote)
                changed = True
            if changed:
                _bump_generation(txn, self._meta)
            txn.put(b"last_sync", meta, db=self._meta)

        self._env.write(apply)

    def stamps(self) -> dict[str, str]:
        """Version stamps of the replicated keys ("" for a key written by another tool)."""
        return self._env.read(
            lambda txn: {k.decode(): v.decode() for k, v in txn.cursor(db=self._stamps)}
        )

    def _level(self, txn: lmdb.Transaction, level: str, level_id: str, month: str) -> tuple:
        """A user's or an org's record, quota record and other nodes' totals, read once per
        generation of the records (`resolve` empties this cache when they change): the keys of
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
            self._level_cache.put((level, level_id), cached)
        return cached

    def _parsed(self, kind: type, record_id: str | None, raw: bytes | None) -> Any:
        """A user, org or quota record parsed once per distinct value: many keys share them."""
        if raw is None:
            return None
        cache_key = (kind, record_id, raw)
        parsed = self._parse_cache.get(cache_key)
        if parsed is None:
            parsed = kind.parse(raw) if record_id is None else kind.parse(record_id, raw)
            self._parse_cache.put(cache_key, parsed)
        return parsed

    def write(self, puts: dict[str, bytes], deletes: Iterable[str] = ()) -> None:
        """Apply puts and deletes in one transaction: all or nothing."""
        encoded = [(_enc(k), v) for k, v in puts.items()]
        encoded_deletes = [_enc(k) for k in deletes]

        def apply(txn: lmdb.Transaction) -> None:
            if self._apply(txn, encoded, encoded_deletes):
                _bump_generation(txn, self._meta)

        self._env.write(apply)

    def _apply(self, txn: lmdb.Transaction, puts: list[tuple[bytes, bytes]],
               deletes: list[bytes]) -> bool:
        """Write what differs from the stored records; whether anything did."""
        changed = False
        get, put, db = txn.get, txn.put, self._db
        for k, v in puts:
            if get(k, db=db) != v:
                put(k, v, db=db)
                changed = True
        for k in deletes:
            changed = txn.delete(k, db=db) or changed
        return changed

    def generation(self) -> int:
        """The records' generation: moved by every write that changed a record or other
        nodes' totals, and by no other."""
        return self._env.read(lambda txn: _generation(txn, self._meta))

    def names(self, prefix: str = "") -> list[str]:
        """The keys that start with `prefix`, in key order (no value is read)."""
        start = prefix.encode()

        def collect(txn: lmdb.Transaction) -> list[str]:
            cursor = txn.cursor(db=self._db)
            if not cursor.set_range(start):
                return []
            out = []
            for k in cursor.iternext(keys=True, values=False):
                if not k.startswith(start):
                    break
                out.append(k.decode())
            return out

        return self._env.read(collect)

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
        """Record counts by kind: org, user, key (apikey, and vkey config of the later layout),
        key listing, quota, other (the later layout's `vkey:id:` index among them)."""

        def tally(txn: lmdb.Transaction) -> dict[str, int]:
            counts = {"orgs": 0, "users": 0, "apikeys": 0, "key_listings": 0, "quotas": 0,
                      "other": 0}
            for k in txn.cursor(db=self._db).iternext(keys=True, values=False):
                parts = k.decode().split(":")
                if parts[0] == "apikey":
                    counts["apikeys"] += 1
                elif parts[0] == "vkey" and len(parts) == 3 and parts[1] != "id" \
                        and parts[2] == "config":
                    counts["vkeys"] = counts.get("vkeys", 0) + 1
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
    return _SUMS.unpack(raw) if raw else (0, 0)


_GENERATION = b"records_generation"  # config meta: moved by every change resolve could see
_U64 = struct.Struct("<Q")


def _generation(txn: lmdb.Transaction, meta: Any) -> int:
    raw = txn.get(_GENERATION, db=meta)
    return _U64.unpack(raw)[0] if raw else 0


def _bump_generation(txn: lmdb.Transaction, meta: Any) -> None:
    txn.put(_GENERATION, _U64.pack(_generation(txn, meta) + 1), db=meta)
