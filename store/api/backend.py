"""What the admin server runs its operations on: the target (the local store or the Cloudflare
KV namespace), the local store for this node's usage log and reports, and the admin keys.

Operations are synchronous (LMDB, the KV REST client): they run one at a time on one worker
thread, so the event loop never blocks and an operation's read-check-write (an email unique in
its org) is never interleaved with another's in this server."""

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from store import audit
from store.admin_keys import AdminKeys, looks_like_admin_key
from store.cloudflare.settings import SyncSettings
from store.db import Store
from store.records import AdminKeyRecord
from store.target import AdminTarget

ADMIN_KEYS_TTL_S = 5.0  # a new or revoked admin key takes effect within this
log = logging.getLogger("aigw.serve")


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
        # Admin keys are re-read on a thread of their own: a slow operation never holds up
        # every other request's authentication.
        self._auth_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aigw-auth")
        self._reload = asyncio.Lock()
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
        """The active admin key `raw` is, or None. Only a string shaped like an admin key is
        looked up; the keys are re-read at most once every ADMIN_KEYS_TTL_S, by one request
        while the others wait for it (a burst of requests costs one read). If a re-read fails,
        the keys read before stay in use; with none read yet it raises."""
        if not looks_like_admin_key(raw):
            return None
        async with self._reload:
            if self._keys is None or self._clock() - self._keys_at >= ADMIN_KEYS_TTL_S:
                loop = asyncio.get_running_loop()
                try:
                    self._keys = await loop.run_in_executor(
                        self._auth_executor, lambda: AdminKeys(self.target))
                except Exception as exc:
                    if self._keys is None:
                        raise
                    log.warning("re-reading the admin keys failed (%s): the keys read %.0f s "
                                "ago stay in use", type(exc).__name__,
                                self._clock() - self._keys_at)
                self._keys_at = self._clock()
        return self._keys.authenticate(raw)

    def close(self) -> None:
        """Finish the operation under way, then stop the worker threads."""
        self._executor.shutdown(wait=True)
        self._auth_executor.shutdown(wait=True)


def admin_kv_policy(settings: SyncSettings) -> SyncSettings:
    """The Cloudflare client's policy for a server that answers people: two attempts, a
    retry-after honoured up to 5 s, 10 s a request, and the budget of `sync:` (per server
    process) that, once used up, answers at once (502) instead of waiting."""
    return replace(settings, max_attempts=2, max_backoff_s=1.0, timeout_s=10.0,
                   max_retry_after_s=5.0, wait_for_budget=False)
