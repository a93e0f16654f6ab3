"""One LMDB environment with named databases: the map grown when full, resized when another
process grew it, and every transaction of this process under one lock (LMDB's rule for
mdb_env_set_mapsize: no transaction of the process may be open while the map is resized)."""

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from store.errors import StoreError, StoreUnavailable

T = TypeVar("T")
log = logging.getLogger("aigw.store")

GIB = 1 << 30
MAX_MAP_SIZE = 1 << 40
LMDB_MAX_KEY = 511


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

    def write_fast(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """A request-path write: the common case without the retry loop of `write`, which
        takes over when the map is full or was resized."""
        with self.lock:
            self._depth += 1
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except (lmdb.MapResizedError, lmdb.MapFullError):
                pass
            except lmdb.Error as exc:
                raise StoreUnavailable(f"store write failed ({self.path}): {exc}") from exc
            finally:
                self._depth -= 1
            return self.write(fn)

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
