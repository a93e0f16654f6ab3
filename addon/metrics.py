"""Prometheus metrics of the data plane (prometheus-client), in one registry per process.

The request path only adds to plain in-memory numbers (a dict of counters, a list per
histogram: no lock, no call into the client library); prometheus-client builds the families
from them when Prometheus scrapes, in the listener's thread. What needs the store (the budget
gauges, the replica's age) and the unsettled ledger writes are read then too, never on the
request path. The registry is module state: it outlives a script reload, so counters do not
restart with each new instance."""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from store.money import to_usd
from store.records import (
    ApiKey,
    Org,
    QuotaRecord,
    RecordError,
    User,
    org_config_key,
    org_quota_key,
    user_config_key,
    user_quota_key,
)

DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 1.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0)
TOKEN_KINDS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")
BUDGET_TTL_S = 10.0  # scrapes closer together than this share one computation
READ_CHUNK = 500  # records read per transaction for the budget gauges

# name (without _total), help, label names
COUNTERS = {
    "aigw_requests": ("Decided requests, by provider, decision (allowed, denied, grace, "
                      "passthrough) and status class.", ("provider", "decision", "status_class")),
    "aigw_denials": ("Requests the gateway refused, by provider and error type.",
                     ("provider", "reason")),
    "aigw_spend_usd": ("Metered cost in USD, by provider and model.", ("provider", "model")),
    "aigw_tokens": ("Metered tokens, by provider, model and kind.",
                    ("provider", "model", "kind")),
    "aigw_grace_requests": ("Requests forwarded by a fail-open failure mode.", ()),
    "aigw_store_errors": ("Store faults met by requests: a read or a ledger write that "
                          "failed.", ()),
}
HISTOGRAMS = {
    "aigw_decision_seconds": ("Time from the request hook to the decision (body read, "
                              "look-ups, reservation).", DECISION_BUCKETS),
    "aigw_request_duration_seconds": ("Time from the request's arrival to its log line "
                                      "(settled, or denied).", DURATION_BUCKETS),
}


def status_class(status: int | None) -> str:
    """`2xx` .. `5xx`, or `none` when the request got no response (an error)."""
    return f"{status // 100}xx" if status else "none"


class Histogram:
    """Bucket counts (not cumulative; the last one past every bound) and the sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # a bound counts as `le`
        self.sum += value


class Metrics:
    """The numbers the hooks feed, and the collector that shows them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # (counter name, label values) -> value; written by the event loop only.
        self.counts: dict[tuple, float] = {}
        self.decision = Histogram(DECISION_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.state = StateCollector()
        self.registry.register(_Exposition(self))
        self.registry.register(self.state)

    def inc(self, name: str, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        key = (name, labels)
        counts = self.counts
        counts[key] = counts.get(key, 0) + amount

    def finished(self, provider: str, decision: str, status: int | None, seconds: float,
                 reason: str | None = None) -> None:
        """A request's line was written: count it, and its denial."""
        self.inc("aigw_requests", (provider, decision, status_class(status)))
        if decision == "denied":
            self.inc("aigw_denials", (provider, reason or "unknown"))
        if seconds >= 0:
            self.duration.observe(seconds)

    def metered(self, provider: str, model: str | None, cost_nusd: int,
                tokens: Iterable[int]) -> None:
        """A settled request's cost and tokens (TOKEN_KINDS order)."""
        model = model or "unknown"
        if cost_nusd:
            # Nano-dollars, summed exactly; shown in USD.
            self.inc("aigw_spend_usd", (provider, model), cost_nusd)
        for kind, count in zip(TOKEN_KINDS, tokens, strict=True):
            if count:
                self.inc("aigw_tokens", (provider, model, kind), count)


class _Exposition(Collector):
    """The counters and histograms as Prometheus families, built at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Any]:
        counts = dict(self.metrics.counts)  # one copy: the event loop goes on adding
        families = {name: CounterMetricFamily(name, doc, labels=labels)
                    for name, (doc, labels) in COUNTERS.items()}
        for (name, labels), value in counts.items():
            families[name].add_metric(list(labels), to_usd(value) if name == "aigw_spend_usd"
                                      else value)
        for name, (_doc, labels) in COUNTERS.items():
            if not labels and (name, ()) not in counts:
                families[name].add_metric([], 0)
        yield from families.values()
        for name, histogram in (("aigw_decision_seconds", self.metrics.decision),
                                ("aigw_request_duration_seconds", self.metrics.duration)):
            doc, bounds = HISTOGRAMS[name]
            counts_now, total = list(histogram.counts), histogram.sum
            cumulative, buckets = 0, []
            for bound, count in zip((*bounds, math.inf), counts_now, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class StateCollector(Collector):
    """The gauges read at scrape time from `source`, a callable that returns the figures (or
    None when no gateway is running): unsettled writes, replica age, budgets."""

    def __init__(self) -> None:
        self.source: Callable[[], dict | None] | None = None

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = self.source() if self.source is not None else None
        unsettled = GaugeMetricFamily("aigw_unsettled_writes", "Ledger settlements that "
                                      "failed and wait for a retry.")
        age = GaugeMetricFamily("aigw_replica_age_seconds", "Seconds since the store's last "
                                "complete sync pass (absent: never synced).")
        used = GaugeMetricFamily("aigw_budget_used_usd", "This month's usage of a level as "
                                 "its budget counts it (this node, other nodes, the Workers "
                                 "gateway's quota record).", labels=("level", "id"))
        limit = GaugeMetricFamily("aigw_budget_limit_usd", "A level's monthly limit (absent: "
                                  "no limit).", labels=("level", "id"))
        if state is not None:
            unsettled.add_metric([], state.get("unsettled", 0))
            if state.get("replica_age_s") is not None:
                age.add_metric([], state["replica_age_s"])
            for level, level_id, used_usd, limit_usd in state.get("budgets", ()):
                used.add_metric([level, level_id], used_usd)
                if limit_usd is not None:
                    limit.add_metric([level, level_id], limit_usd)
        return [unsettled, age, used, limit]


class BudgetGauges:
    """The budget figures of the levels this store charged this month, recomputed at most
    every BUDGET_TTL_S seconds (a scrape reads the store in short transactions)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cached: tuple[float, tuple, list] = (-math.inf, (), [])

    def get(self, store: Any, month: str, with_keys: bool) -> list[tuple]:
        with self._lock:
            at, key, figures = self._cached
            if key == (id(store), month, with_keys) and time.monotonic() - at < BUDGET_TTL_S:
                return figures
            figures = budget_levels(store, month, with_keys)
            self._cached = (time.monotonic(), (id(store), month, with_keys), figures)
            return figures


def budget_levels(store: Any, month: str, with_keys: bool) -> list[tuple]:
    """(level, id, used_usd, limit_usd) of every user and org (and key, `with_keys`) with a
    ledger counter this month: the counter plus what the request path adds to it (other
    nodes' totals, the Workers gateway's quota record), and the limit of its record."""
    counters = store.ledger.month_counters(month)
    wanted = ("user", "org", "key") if with_keys else ("user", "org")
    levels = sorted(lv for lv in counters if lv[0] in wanted)
    limits = _limits(store, levels, with_keys)
    quotas = _quota_usage(store, levels, month)
    out = []
    for level in levels:
        remote = store.records.remote_usage(month, *level)[0]
        used = counters[level].used_nusd + remote + quotas.get(level, 0)
        limit = limits.get(level)
        out.append((level[0], level[1], to_usd(used), limit))
    return out


def _chunks(items: list, size: int = READ_CHUNK) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _limits(store: Any, levels: list[tuple[str, str]], with_keys: bool
            ) -> dict[tuple[str, str], float | None]:
    names = {("user", i): user_config_key(i) for lv, i in levels if lv == "user"}
    names.update({("org", i): org_config_key(i) for lv, i in levels if lv == "org"})
    found: dict[str, bytes] = {}
    for chunk in _chunks(list(names.values())):
        found.update(store.records.get_many(chunk))
    limits: dict[tuple[str, str], float | None] = {}
    for level, name in names.items():
        raw = found.get(name)
        if raw is None:
            continue
        try:
            if level[0] == "user":
                limits[level] = User.parse(level[1], raw).monthly_limit_usd
            else:
                limits[level] = Org.parse(level[1], raw).monthly_budget_usd
        except RecordError:
            continue
    if with_keys:  # opt-in: one scan of the key records
        for name, raw in store.records.scan("apikey:"):
            try:
                key = ApiKey.parse(name.removeprefix("apikey:"), raw)
            except RecordError:
                continue
            limits[("key", key.key_id)] = key.monthly_limit_usd
    return limits


def _quota_usage(store: Any, levels: list[tuple[str, str]], month: str
                 ) -> dict[tuple[str, str], int]:
    names = {(lv, i): (user_quota_key(i) if lv == "user" else org_quota_key(i))
             for lv, i in levels if lv in ("user", "org")}
    found: dict[str, bytes] = {}
    for chunk in _chunks(list(names.values())):
        found.update(store.records.get_many(chunk))
    out = {}
    for level, name in names.items():
        raw = found.get(name)
        if raw is not None:
            try:
                out[level] = QuotaRecord.parse(raw, name).usage_in(month)[0]
            except RecordError:
                continue
    return out


_METRICS: list[Metrics] = []


def process_metrics() -> Metrics:
    """This process's metrics (created on first use, kept across script reloads)."""
    if not _METRICS:
        _METRICS.append(Metrics())
    return _METRICS[0]
