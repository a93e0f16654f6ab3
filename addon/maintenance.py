"""The gateway's background work, every few seconds off the request path: the ledger
registration's heartbeat, re-opening a store that could not be opened, re-reading an invalid
mitm.yaml once it changes, saying why the gateway is not ready, retrying failed settlements and
releasing the reservations of gateways that are gone."""

import asyncio
import logging
from collections.abc import Callable

from addon.runtime import Runtime, log_fault
from addon.settlement import Settler
from store import alerts

log = logging.getLogger("aigw")

TICK_S = 5.0
MAINTENANCE_EVERY = 6  # ticks between retries of settlements and releases (30 s)
NOT_READY_LOG_EVERY = 6  # ticks between repeats of the not-ready error (30 s)


class Maintenance:
    def __init__(self, runtime: Runtime, settler: Settler, reload: Callable[[], None]) -> None:
        self.runtime = runtime
        self.settler = settler
        self.reload = reload  # re-reads mitm.yaml and re-opens the store
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(TICK_S)
            ticks += 1
            try:
                self.tick(ticks)
            except Exception as exc:
                log_fault("background maintenance failed; retrying", exc)

    def tick(self, ticks: int) -> None:
        runtime = self.runtime
        if runtime.config_changed():
            self.reload()
        elif runtime.config is not None and runtime.store is None:
            runtime.not_ready = runtime.open_store()  # missing, or unavailable until now
        if runtime.not_ready:
            if ticks % NOT_READY_LOG_EVERY == 1:
                log.error("aigw: not ready, answering 503 to every request: %s",
                          runtime.not_ready)
            return
        if runtime.store is not None:
            runtime.store.ledger.heartbeat()
        if ticks % MAINTENANCE_EVERY == 0:
            self.settler.retry_unsettled()
            runtime.release_stale()
            if runtime.config is not None:  # in a thread: a slow webhook never holds a tick up
                alerts.run_in_background(runtime.store, runtime.config.source)
        if runtime.store is not None and runtime.config is not None:  # bounded: a few ms at most
            runtime.store.ledger.prune_usage(runtime.config.policy.usage_log_retention_days)
