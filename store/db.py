"""The LMDB store: two environments in one data directory.

`config/`  replicated, read-mostly records in the Workers gateway's KV layout (and sync metadata):
           `store.records_db.Records`
`ledger/`  usage written per request: monthly counters, reservations, the per-request log, the
           fail-open grace ledger and the registry of gateway processes: `store.ledger.Ledger`

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

This module is the facade: `Store` opens both environments; the names of the parts are
re-exported here for the callers that import them from `store.db`.
"""

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import lmdb

from store.errors import StoreError, StoreMissing, StoreUnavailable, missing_store_message
from store.hashing import hash_key
from store.ledger import LEDGER_DBS, LEDGER_SYNC, Counter, Ledger, Level, UsageRecord
from store.lmdb_env import GIB, LMDB_MAX_KEY, MAX_MAP_SIZE, _Env, _reason
from store.records_db import CONFIG_DBS, RESOLVE_CACHE_SIZE, Identity, Records
from store.registry import GATEWAY_TIMEOUT_S, IsLive

log = logging.getLogger("aigw.store")

__all__ = [
    "CONFIG_DBS",
    "GATEWAY_TIMEOUT_S",
    "GIB",
    "LEDGER_DBS",
    "LEDGER_SYNC",
    "LMDB_MAX_KEY",
    "MAX_MAP_SIZE",
    "RESOLVE_CACHE_SIZE",
    "Counter",
    "Flusher",
    "Identity",
    "IsLive",
    "Ledger",
    "Level",
    "Records",
    "Store",
    "StoreError",
    "StoreMissing",
    "StoreUnavailable",
    "UsageRecord",
    "_Env",
    "missing_store_message",
]


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
        key_layout: str | None = None,
    ) -> None:
        """Open the store at `path`, creating it unless `create` is False (then a path with no
        store is `StoreMissing`). A store that cannot be opened is `StoreUnavailable`.
        `key_layout`: where admin operations create keys (`store.key_layout`; None: as the
        records show)."""
        self.path = Path(path)
        self.hash_algorithm = hash_algorithm
        self.key_layout = key_layout
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

    def last_metered(self, key_ids: Sequence[str], month: str) -> list[int | None]:
        """For each key, when this node last metered it in `month` (epoch milliseconds), or
        None if it never did (`store.target.AdminTarget`)."""
        counters = self.ledger.counters([("key", key_id) for key_id in key_ids], month)
        return [c.updated_ms if c.requests and c.updated_ms else None for c in counters]

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
