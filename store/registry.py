"""The registry of gateway processes sharing a ledger: each registers when it opens the store,
refreshes its entry with a heartbeat and removes it when it stops. Its only use is to tell
which reservations belong to a gateway that is gone (crashed), so the others release them."""

import time
from collections.abc import Callable
from typing import Any

import lmdb
import orjson

from store.lmdb_env import _Env

_GATEWAYS = b"gateways"  # ledger meta: the gateway processes using this ledger
GATEWAY_TIMEOUT_S = 30.0  # a registered gateway without a heartbeat for this long is gone
IsLive = Callable[[str, dict], bool]  # whether a registered gateway (name, entry) still runs


class Registry:
    """The gateways registered in one ledger's `meta` table; this process's own entry is the
    one `join` made."""

    def __init__(self, env: _Env, meta: Any) -> None:
        self._env = env
        self._meta = meta
        self._gateway = ""  # this process's registration (see `join`)
        self._gateway_info: dict[str, Any] = {}
        self._is_live: IsLive | None = None

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
            current = self._read(txn)
            live = {g: e for g, e in current.items() if g != gateway and self._live(g, e)}
            others = sorted(live)
            live[gateway] = {**self._gateway_info, "seen": time.time()}
            self._write(txn, live)
            return others

        return self._env.write(apply)

    def leave(self) -> None:
        """Remove this gateway's registration."""
        gateway = self._gateway
        if not gateway:
            return

        def apply(txn: lmdb.Transaction) -> None:
            live = self._read(txn)
            if live.pop(gateway, None) is not None:
                self._write(txn, live)

        self._gateway = ""
        self._env.write(apply)

    def gateways(self) -> list[str]:
        """The live gateway processes registered on this ledger."""
        return sorted(self._env.read(self.live))

    def live(self, txn: lmdb.Transaction) -> set[str]:
        """The live gateways as `txn` sees the registry: a caller that releases reservations
        judges liveness inside the transaction that releases them."""
        return {g for g, e in self._read(txn).items() if self._live(g, e)}

    def _live(self, gateway: str, entry: Any) -> bool:
        if gateway == self._gateway:
            return True
        if not isinstance(entry, dict) or time.time() - float(entry.get("seen", 0)) > (
            GATEWAY_TIMEOUT_S
        ):
            return False  # no heartbeat for too long: crashed, or a registry of another format
        return self._is_live is None or self._is_live(gateway, entry)

    def _read(self, txn: lmdb.Transaction) -> dict[str, Any]:
        raw = txn.get(_GATEWAYS, db=self._meta)
        return orjson.loads(raw) if raw else {}

    def _write(self, txn: lmdb.Transaction, registry: dict[str, Any]) -> None:
        txn.put(_GATEWAYS, orjson.dumps(registry, option=orjson.OPT_SORT_KEYS), db=self._meta)
