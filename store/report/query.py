"""Reading the per-request usage log: times and months given on the command line, filters, and
each record as a row whose fields say what they are (time in ISO UTC, cost in USD, tokens)."""

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from store.db import Store
from store.ledger import UsageRecord
from store.money import to_usd

# The log is keyed by settlement time and a record's `at` is when its request started, so a
# scan up to `until` reads this far past it for the requests that started before and settled
# after (a request is reserved for an hour by default: one running over a day is not expected).
SETTLE_SLACK_S = 86400

# A row's fields, in output order (the CSV header).
FIELDS = (
    "time", "provider", "model", "org_id", "user_id", "key_id", "mode", "status", "error",
    "cost_usd", "estimated", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "total_tokens", "grace_who",
)


def parse_time(text: str, name: str = "time") -> float:
    """An ISO 8601 date or time (`2026-12-01`, `2026-12-01T10:00:00Z`, `...+02:00`; no zone:
    UTC) as epoch seconds; ValueError naming `name` and the expected form otherwise."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 date or time such as 2026-12-01 or "
                         f"2026-12-01T10:00:00Z, not {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse_month(text: str) -> str:
    """A month as `YYYY-MM`; ValueError otherwise."""
    value = text.strip()
    try:
        parsed = datetime.strptime(value, "%Y-%m")
    except ValueError:
        parsed = None
    if parsed is None or len(value) != 7:
        raise ValueError(f"month must be YYYY-MM, such as 2026-12, not {text!r}")
    return value


def month_bounds(month: str) -> tuple[float, float]:
    """The UTC month `YYYY-MM` as [start, end) epoch seconds."""
    year, mon = (int(part) for part in month.split("-"))
    start = datetime(year, mon, 1, tzinfo=UTC).timestamp()
    return start, start + calendar.monthrange(year, mon)[1] * 86400


def iso_utc(at: float) -> str:
    """Epoch seconds as ISO 8601 UTC to the millisecond: `2026-12-01T10:00:00.123Z`."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class LogFilter:
    """Which records `aigw log` and `aigw report` read: [since, until) by the request's start
    time (epoch seconds), and the ids and model each must have (None: any)."""

    since: float | None = None
    until: float | None = None
    org_id: str | None = None
    user_id: str | None = None
    key_id: str | None = None
    model: str | None = None

    def matches(self, record: UsageRecord) -> bool:
        """Whether `record` passes every condition."""
        return ((self.since is None or record.at >= self.since)
                and (self.until is None or record.at < self.until)
                and (self.org_id is None or record.org_id == self.org_id)
                and (self.user_id is None or record.user_id == self.user_id)
                and (self.key_id is None or record.key_id == self.key_id)
                and (self.model is None or record.model == self.model))


def read_log(store: Store, where: LogFilter = LogFilter()) -> Iterator[UsageRecord]:
    """The usage records that pass `where`, metered and grace, in settlement order; streamed
    from the ledger a page at a time."""
    since_ns = 0 if where.since is None else int(where.since * 1e9)
    until_ns = None if where.until is None else int((where.until + SETTLE_SLACK_S) * 1e9)
    for _, record in store.ledger.iter_log(since_ns, until_ns):
        if where.matches(record):
            yield record


def total_tokens(record: UsageRecord) -> int:
    """Every token billed: input (uncached, cached, cache writes) and output (reasoning is
    part of output)."""
    return (record.input + record.cached_input + record.cache_write + record.cache_write_1h
            + record.output)


def row(record: UsageRecord) -> dict[str, Any]:
    """A usage record as named fields (FIELDS order)."""
    return {
        "time": iso_utc(record.at),
        "provider": record.provider,
        "model": record.model,
        "org_id": record.org_id,
        "user_id": record.user_id,
        "key_id": record.key_id,
        "mode": record.mode,
        "status": record.status,
        "error": record.error,
        "cost_usd": to_usd(record.cost_nusd),
        "estimated": record.estimated,
        "input_tokens": record.input,
        "cached_input_tokens": record.cached_input,
        "cache_write_tokens": record.cache_write,
        "cache_write_1h_tokens": record.cache_write_1h,
        "output_tokens": record.output,
        "reasoning_tokens": record.reasoning,
        "total_tokens": total_tokens(record),
        "grace_who": record.grace_who,
    }
