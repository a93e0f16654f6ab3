"""A month's spend, requests and tokens grouped by org, user, key, model, provider or day, in
one pass over the usage log; and each org's and user's budget use against its limit."""

import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from store.admin_base import AdminError
from store.admin_usage import level_usage
from store.db import Store
from store.ledger import UsageRecord
from store.money import to_usd
from store.records import RecordError, org_config_key, user_config_key
from store.report.query import LogFilter, month_bounds, read_log, total_tokens

GROUPS = ("org", "user", "key", "model", "provider", "day")
# The record field each grouping reads (day: from the request's start time).
_GROUP_FIELD = {"org": "org_id", "user": "user_id", "key": "key_id", "model": "model",
                "provider": "provider"}


@dataclass
class Totals:
    """What a group of usage records adds up to."""

    requests: int = 0
    cost_nusd: int = 0
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    estimated_requests: int = 0  # charged an estimate: no usage from the provider
    grace_requests: int = 0  # forwarded in fail-open mode (charged to the grace ledger)

    def add(self, record: UsageRecord) -> None:
        """Count one record in."""
        self.requests += 1
        self.cost_nusd += record.cost_nusd
        self.input_tokens += record.input
        self.cached_input_tokens += record.cached_input
        self.cache_write_tokens += record.cache_write + record.cache_write_1h
        self.output_tokens += record.output
        self.reasoning_tokens += record.reasoning
        self.total_tokens += total_tokens(record)
        self.estimated_requests += bool(record.estimated)
        self.grace_requests += record.mode == "grace"

    def as_dict(self) -> dict[str, Any]:
        """The totals as JSON fields, the cost in USD (`cost_usd`) in place of nano-dollars."""
        out: dict[str, Any] = {"requests": self.requests, "cost_usd": to_usd(self.cost_nusd)}
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name not in ("requests", "cost_nusd")})
        return out


TOTAL_FIELDS = tuple(Totals().as_dict())


def day_of(at: float) -> str:
    """The UTC day of an epoch time, `YYYY-MM-DD`."""
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def group_key(record: UsageRecord, by: str) -> str | None:
    """The group of `record` under `by` (None: the record has no such id)."""
    return day_of(record.at) if by == "day" else getattr(record, _GROUP_FIELD[by])


@dataclass
class Summary:
    """A month of usage records: the total and every grouping."""

    month: str
    total: Totals
    groups: dict[str, dict[str | None, Totals]]

    def rows(self, by: str) -> list[dict[str, Any]]:
        """The groups under `by` as rows: days in order, anything else by spend, largest
        first."""
        items = list(self.groups[by].items())
        if by == "day":
            items.sort(key=lambda item: item[0] or "")
        else:
            items.sort(key=lambda item: (-item[1].cost_nusd, -item[1].requests, item[0] or ""))
        return [{by: name, **totals.as_dict()} for name, totals in items]


def summarize(month: str, records: Iterable[UsageRecord]) -> Summary:
    """Total and group `records` (those of `month`) in one pass."""
    total = Totals()
    groups: dict[str, dict[str | None, Totals]] = {by: {} for by in GROUPS}
    for record in records:
        total.add(record)
        for by, table in groups.items():
            name = group_key(record, by)
            totals = table.get(name)
            if totals is None:
                totals = table[name] = Totals()
            totals.add(record)
    return Summary(month, total, groups)


def month_summary(store: Store, month: str) -> Summary:
    """The usage records of the UTC month `month` (by the request's start) summarized."""
    start, end = month_bounds(month)
    return summarize(month, read_log(store, LogFilter(since=start, until=end)))


def report_of(store: Store, summary: Summary, by: str) -> dict[str, Any]:
    """The JSON answer of `aigw report`: the month's total, its groups under `by`, and each
    org's and user's budget use."""
    return {"month": summary.month, "by": by, "generated_at": _now_iso(),
            "total": summary.total.as_dict(), "groups": summary.rows(by),
            "budgets": budgets(store, summary.month, summary)}


def month_report(store: Store, month: str, by: str) -> dict[str, Any]:
    """`report_of` the UTC month `month`."""
    return report_of(store, month_summary(store, month), by)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def budgets(store: Store, month: str, summary: Summary) -> list[dict[str, Any]]:
    """Each org's and user's budget use in `month` against its monthly limit: every org and
    user in the records, and any with spend in the log. `used_usd` is what the gateway counts
    for the budget (this node, the other nodes, the Workers quota record); `limit_usd` is the
    record's limit as it stands (None: no limit, or no record)."""
    out = []
    for level, prefix, suffix in (("org", "org:", ":config"), ("user", "user:", ":config")):
        ids = {key[len(prefix):-len(suffix)] for key, _ in store.records.scan(prefix)
               if key.endswith(suffix) and key.count(":") == 2}
        ids.update(name for name in summary.groups[level] if name)
        for level_id in sorted(ids):
            out.append(_budget(store, level, level_id, month))
    return out


def _budget(store: Store, level: str, level_id: str, month: str) -> dict[str, Any]:
    name = _name_of(store, level, level_id)
    try:
        usage = level_usage(store, level, level_id, month)
    except (AdminError, RecordError):  # a deleted or unreadable record: spend without a limit
        (counter,) = store.ledger.counters([(level, level_id)], month)
        used, limit, requests = to_usd(counter.used_nusd), None, counter.requests
    else:
        used = usage["current_usage_usd"]
        limit = usage["monthly_budget_usd" if level == "org" else "monthly_limit_usd"]
        requests = usage["request_count"]
    ratio = None if not limit else round(used / limit, 6)
    return {"level": level, "id": level_id, "name": name, "used_usd": used,
            "limit_usd": limit, "used_ratio": ratio, "requests": requests}


def _name_of(store: Store, level: str, level_id: str) -> str | None:
    key = org_config_key(level_id) if level == "org" else user_config_key(level_id)
    try:
        record = store.records.get_json(key)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    name = record.get("name" if level == "org" else "email")
    return name if isinstance(name, str) and name else None
