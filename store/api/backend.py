"""What the admin server runs its operations on: the target (the local store or the Cloudflare
KV namespace), the local store for this node's usage log and reports, and the admin keys.

Operations are synchronous (LMDB, the KV REST client): they run one at a time on one worker
thread, so the event loop never blocks and an operation's read-check-write (an email unique in
its org) is never interleaved with another's in this server."""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from store import audit
from store.admin_keys import AdminKeys
from store.db import Store
from store.records import AdminKeyRecord
from store.target import AdminTarget

ADMIN_KEYS_TTL_S = 5.0  # a new or revoked admin key takes effect within this


class Backend:
    """The target, an optional local store, and the one thread their operations run on."""

    def __init__(self, target: AdminTarget, local: Store | None, *, target_name: str,
                 known_providers: frozenset[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.target = target
        self.local = local  # this node's ledger: the usage log, reports, the dashboard
        self.target_name = target_name
        self.known_providers = known_providers
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aigw-admin")
        self._clock = clock
        self._keys: AdminKeys | None = None
        self._keys_at = float("-inf")

    async def run(self, operation: Callable[[], Any], *, actor: str | None = None,
                  action: str = "") -> Any:
        """Run `operation` on the worker thread; its writes are audited as `actor` doing
        `action` (reads pass no actor)."""

        def call() -> Any:
            if actor is None:
                return operation()
            with audit.audited(actor, action):
                return operation()

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def authenticate(self, raw: str) -> AdminKeyRecord | None:
        """The active admin key `raw` is, or None (the keys are re-read every few seconds)."""
        if self._keys is None or self._clock() - self._keys_at >= ADMIN_KEYS_TTL_S:
            self._keys = await self.run(lambda: AdminKeys(self.target))
            self._keys_at = self._clock()
        return self._keys.authenticate(raw)

    def forget_keys(self) -> None:
        """Re-read the admin keys at the next request (after this server wrote one)."""
        self._keys = None

    def close(self) -> None:
        """Finish the operation under way, then stop the worker thread."""
        self._executor.shutdown(wait=True)
