"""A sync pass: a Cloudflare Workers KV namespace replicated into the local store, and this
node's usage pushed back so every node counts every node's spend.

A pass lists the whole namespace (cursor pages), fetches only what changed (records aigw wrote
carry a version stamp in their KV metadata; records written by other tools are re-fetched on a
slower full cycle), and applies everything in one LMDB transaction, or nothing. A key is deleted
locally only after a listing that reached its end no longer contains it.

Usage: each node writes its own monthly totals under `aigw:usage:{node}:{month}:{level}:{id}`,
with the figures in the key's metadata, so a listing alone reads every node's totals.

Fleet-wide resets: `aigw --target cloudflare quota reset` writes a marker
`aigw:reset:{level}:{id}` (its month and `at_ms` in the metadata). A pass that lists a marker newer
than the one this node applied zeroes the level's counter of that month in its ledger and pushes
the level again with the marker in the figures' metadata (`z`); every node counts another node's
figures of that month as zero until they carry the marker, i.e. were pushed after that node
applied it.
"""

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import orjson

from store.alert_settings import AlertSettings
from store.alerts import Alerter, run_alerts
from store.audit import AUDIT_PREFIX
from store.cloudflare.client import BULK_GET, BULK_PUT, KVClient, SyncError
from store.cloudflare.settings import SyncSettings
from store.db import LMDB_MAX_KEY, Store, StoreError
from store.ledger import Level
from store.money import month_of, utc_now
from store.records import (
    ADMIN_KEY_PREFIX,
    MAX_COUNT,
    RESET_PREFIX,
    RecordError,
    Reset,
    UsageKey,
    counts_after_reset,
    parse_reset_listing,
    parse_usage_key,
    record_label,
    validate_record,
)

log = logging.getLogger("aigw.sync")

USAGE_PREFIX = "aigw:usage:"
STAMP = "aigw"  # the metadata field holding aigw's version stamp
# The audit log and the admin API's keys live in KV for `aigw --target cloudflare` and
# `aigw serve`; no gateway reads them, so no node copies them.
NOT_REPLICATED = (AUDIT_PREFIX, ADMIN_KEY_PREFIX)
REJECTED_KEPT = 100  # rejected records named in the stored pass summary (the count is whole)
KV_MAX_KEY = 512  # bytes: no KV key is longer, so what a pass derives from one fits LMDB's keys


def stamp_of(value: bytes) -> str:
    """The version stamp aigw puts in a record's KV metadata: a digest of the value."""
    return blake3.blake3(value).hexdigest()[:16]


@dataclass
class PassSummary:
    listed: int = 0
    fetched: int = 0
    changed: int = 0
    deleted: int = 0
    # Records (and other nodes' usage figures) not applied: [{"key": ..., "reason": ...}]. A
    # rejected record keeps its previous version in the store, if it had one.
    rejected: list[dict] = field(default_factory=list)
    usage_keys: int = 0
    # Other nodes' usage keys counted zero: pushed before their level's fleet-wide reset.
    usage_before_reset: int = 0
    reset_markers: int = 0
    resets_applied: int = 0  # markers new to this node: its counter of the level zeroed
    pushed: int = 0
    requests: int = 0
    duration_s: float = 0.0
    full: bool = False
    finished_at: float = 0.0

    def line(self) -> str:
        return (f"sync: listed {self.listed}, fetched {self.fetched}, changed {self.changed}, "
                f"deleted {self.deleted}, rejected {len(self.rejected)}, usage keys "
                f"{self.usage_keys}, pushed {self.pushed}, resets applied "
                f"{self.resets_applied}, requests {self.requests}, "
                f"{self.duration_s:.2f} s{' (full)' if self.full else ''}")


class Replicator:
    """One KV namespace into one store; `sync_once` is a pass."""

    def __init__(self, store: Store, client: KVClient, settings: SyncSettings,
                 progress: Callable[[str, int, int | None], None] | None = None,
                 alerts: AlertSettings | None = None) -> None:
        self.store = store
        self.client = client
        self.settings = settings
        self.node_id = settings.node_id or store.node_id()
        self._progress = progress or (lambda stage, done, total: None)
        # Budget alerts sent after each complete pass (`alerts:` of mitm.yaml; None: none).
        self.alerter = None if alerts is None else Alerter(alerts, self.node_id)

    def sync_once(self, full: bool | None = None) -> PassSummary:
        """List, fetch what changed, apply in one transaction; push this node's usage.
        Raises SyncError (nothing applied) if the pass cannot complete."""
        try:
            summary = self._pass(full)
        except StoreError as exc:  # its one write transaction did not commit
            raise SyncError(f"the local store refused the pass: {exc}") from None
        if self.alerter is not None:
            run_alerts(self.alerter, self.store)  # never fails the pass: logged, next pass
        return summary

    def _pass(self, full: bool | None) -> PassSummary:
        started = time.monotonic()
        requests_before = self.client.budget.used
        summary = PassSummary()
        last = self.store.records.meta("last_sync") or {}
        if full is None:
            full = time.time() - float(last.get("last_full_at", 0)) >= self.settings.full_interval_s
        summary.full = full

        listing = self.client.list_all(progress=lambda n: self._progress("list", n, None))
        summary.listed = len(listing)
        local_stamps = self.store.records.stamps()
        listed: set[str] = set()
        wanted: list[str] = []
        stamps: dict[str, str] = {}
        usage: list[tuple[str, UsageKey]] = []
        resets: dict[Level, Reset] = {}
        for item in listing:
            name = item.get("name")
            if not isinstance(name, str):
                continue
            metadata = item.get("metadata")
            stamp = metadata.get(STAMP) if isinstance(metadata, dict) else None
            if name.startswith(NOT_REPLICATED):  # the admin server's own, not the nodes'
                continue
            if len(name.encode()) > KV_MAX_KEY:  # a listing KV could not have given
                self._reject(summary, name, RecordError(
                    f"{record_label(name)}: a KV key has at most {KV_MAX_KEY} bytes"))
                continue
            if name.startswith(USAGE_PREFIX):
                summary.usage_keys += 1
                try:
                    figures = parse_usage_key(name, metadata, USAGE_PREFIX)
                except RecordError as exc:
                    self._reject(summary, name, exc)
                    continue
                if figures.node != self.node_id:
                    usage.append((name, figures))
                continue
            if name.startswith(RESET_PREFIX):
                summary.reset_markers += 1
                try:
                    reset = parse_reset_listing(name, metadata)
                except RecordError as exc:
                    self._reject(summary, name, exc)
                    continue
                resets[(reset.level, reset.id)] = reset
                continue
            if not name or len(name.encode()) > LMDB_MAX_KEY:
                self._reject(summary, name, RecordError(
                    f"{record_label(name)}: an LMDB key has 1 to {LMDB_MAX_KEY} bytes"))
                continue
            listed.add(name)
            known = local_stamps.get(name)
            if isinstance(stamp, str) and stamp:
                if known != stamp:
                    wanted.append(name)
                    stamps[name] = stamp
            elif full or known is None:
                wanted.append(name)
                stamps[name] = ""
        remote = self._remote_totals(usage, resets, summary)
        this_month = month_of(utc_now())
        summary.resets_applied = len(self.store.ledger.apply_resets(
            {level: (reset.month, reset.at_ms) for level, reset in resets.items()},
            (previous_month(this_month), this_month)))
        # After the resets: a level just reset is pushed in this pass, with its marker (one
        # push a pass, so never two writes to one key within a second).
        if self.settings.push_usage:
            try:
                summary.pushed = self.push_usage()
            except SyncError as exc:  # other nodes see our spend a pass later; still pull
                log.warning("sync: pushing this node's usage failed: %s", exc)

        values = self._fetch(wanted)
        summary.fetched = len(values)
        puts: dict[str, bytes] = {}
        for name, value in values.items():
            try:
                validate_record(name, value)
            except RecordError as exc:
                # Not applied, nor its stamp: the previous version (if any) stays, and the
                # record is fetched again while its stamp differs (or on the full cycle).
                stamps.pop(name, None)
                self._reject(summary, name, exc)
                continue
            if stamps.get(name):
                # The stamp of the value applied, not the listing's: KV's listings and reads
                # are eventually consistent apart, so a pass may list one version and read
                # another. Kept with the listed stamp, an older value would never be fetched
                # again; with its own, the next pass sees they differ and fetches it again.
                stamps[name] = stamp_of(value)
            if self.store.records.get(name) != value:
                summary.changed += 1
            puts[name] = value
        for name in wanted:
            if name not in values:
                stamps.pop(name, None)  # gone between listing and fetch: the next pass decides
        deletes = [name for name in local_stamps if name not in listed]
        summary.deleted = len(deletes)

        summary.requests = self.client.budget.used - requests_before
        summary.duration_s = time.monotonic() - started
        summary.finished_at = time.time()
        record = {**summary.__dict__, "node_id": self.node_id,
                  "last_full_at": summary.finished_at if full else last.get("last_full_at", 0),
                  "rejected": summary.rejected[:REJECTED_KEPT],
                  "rejected_count": len(summary.rejected)}
        self.store.records.replicate(puts, deletes, stamps, remote, record)
        return summary

    def _fetch(self, names: list[str]) -> dict[str, bytes]:
        """Values by bulk get (100 a call); single get for what bulk cannot return."""
        values: dict[str, bytes] = {}
        singles: list[str] = []
        for start in range(0, len(names), BULK_GET):
            batch = names[start:start + BULK_GET]
            try:
                answer = self.client.bulk_get(batch)
            except SyncError as exc:
                if exc.status != 400:
                    raise
                # Bulk get refuses a batch holding a value it cannot return (not text, e.g.
                # binary): one by one, so one such value does not stop every pass.
                answer = dict.fromkeys(batch)
            for name in batch:
                entry = answer.get(name)
                value = entry.get("value") if isinstance(entry, dict) else entry
                if isinstance(value, str):
                    values[name] = value.encode()
                elif value is not None:
                    values[name] = orjson.dumps(value)
                else:
                    singles.append(name)
            self._progress("fetch", min(start + BULK_GET, len(names)), len(names))
        for name in singles:
            value = self.client.get(name)
            if value is not None:
                values[name] = value
        return values

    def _reject(self, summary: PassSummary, name: str, exc: RecordError) -> None:
        """Report a record (or usage figures) the pass does not apply: stderr and the summary."""
        label = record_label(name)
        reason = str(exc).removeprefix(f"{label}: ")
        kept = not name.startswith((USAGE_PREFIX, RESET_PREFIX)) \
            and 0 < len(name.encode()) <= LMDB_MAX_KEY \
            and self.store.records.get(name) is not None
        summary.rejected.append({"key": name, "reason": reason, "kept_previous": kept})
        log.warning("sync: %s not replicated: %s%s", label, reason,
                    " (its previous version stays)" if kept else "")

    def _remote_totals(self, usage: list[tuple[str, UsageKey]], resets: dict[Level, Reset],
                       summary: PassSummary) -> dict[tuple[str, str, str], tuple[int, int]]:
        """Other nodes' figures summed by (month, level, id); figures pushed before their
        level's reset marker count zero, and figures that would overflow the sum are rejected."""
        remote: dict[tuple[str, str, str], tuple[int, int]] = {}
        for name, figures in usage:
            if not counts_after_reset(figures, resets.get((figures.level, figures.id))):
                summary.usage_before_reset += 1
                continue
            level = (figures.month, figures.level, figures.id)
            total = remote.get(level, (0, 0))
            summed = (total[0] + figures.used_nusd, total[1] + figures.requests)
            if max(summed) > MAX_COUNT:
                self._reject(summary, name, RecordError(
                    f"{record_label(name)}: metadata: the nodes' totals overflow 64 bits"))
                continue
            remote[level] = summed
        return remote

    def push_usage(self) -> int:
        """Write this node's changed monthly totals (this month and last) to KV in bulk. Each key
        is written at most once a pass, and passes are at least a second apart."""
        this_month = month_of(utc_now())
        months = (previous_month(this_month), this_month)  # last month's final figures too
        pushed_before: dict[str, list[int]] = self.store.ledger.meta("pushed") or {}
        applied = self.store.ledger.applied_resets()
        items, current = [], {}
        for month in months:
            for (level, level_id), counter in self.store.ledger.month_counters(month).items():
                name = f"{USAGE_PREFIX}{self.node_id}:{month}:{level}:{level_id}"
                mark = applied.get((level, level_id))
                reset_ms = mark[1] if mark is not None and mark[0] == month else 0
                # The marker is part of what was pushed: a level just reset is pushed again
                # even when its figures did not change.
                figures = [counter.used_nusd, counter.requests, *([reset_ms] if reset_ms else [])]
                current[name] = figures
                if pushed_before.get(name) == figures or len(name.encode()) > KV_MAX_KEY:
                    continue
                body = {"node": self.node_id, "month": month, "level": level, "id": level_id,
                        "used_nusd": figures[0], "requests": figures[1], "at": int(time.time())}
                metadata = {"n": figures[0], "r": figures[1]}
                if reset_ms:
                    body["reset_ms"] = metadata["z"] = reset_ms
                value = orjson.dumps(body)
                items.append({"key": name, "value": value.decode(),
                              "metadata": {STAMP: stamp_of(value), **metadata}})
        failed: set[str] = set()
        for start in range(0, len(items), BULK_PUT):
            failed.update(self.client.bulk_put(items[start:start + BULK_PUT]))
        for name in failed:  # not written: pushed again next pass
            current.pop(name, None)
        merged = {**pushed_before, **current}
        self.store.ledger.set_meta("pushed", {k: v for k, v in merged.items() if k in current})
        return len(items) - len(failed)


def previous_month(month: str) -> str:
    year, number = int(month[:4]), int(month[5:7])
    return f"{year - 1:04d}-12" if number == 1 else f"{year:04d}-{number - 1:02d}"


def run_loop(replicator: Replicator, interval_s: float, *, stop: Callable[[], bool],
             sleep: Callable[[float], None] = time.sleep,
             report: Callable[[str], None] = log.info,
             on_pass: Callable[[PassSummary], None] | None = None,
             full_first: bool = False) -> None:
    """Pass after pass; a failed pass is retried with growing backoff (capped at the
    interval's tenfold), never crashing the loop."""
    failures = 0
    full: bool | None = True if full_first else None
    while not stop():
        try:
            summary = replicator.sync_once(full=full)
            report(summary.line())
            if on_pass is not None:
                on_pass(summary)
            failures, full = 0, None
            wait = interval_s
        except SyncError as exc:
            failures += 1
            wait = min(interval_s * 10, interval_s * math.pow(2, failures - 1))
            report(f"sync: pass failed, nothing applied ({exc}); next try in {wait:.0f}s")
        sleep(max(1.0, wait))
