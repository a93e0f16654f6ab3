"""Money and calendar helpers: the ledger counts integer nano-dollars so sums are exact."""

import calendar
import math
import time
from datetime import UTC, datetime

USD = 1_000_000_000  # nano-dollars per dollar


def from_usd(value: float | int | str) -> int:
    """Dollars (float, int or decimal string) to integer nano-dollars, rounded to nearest."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not a finite amount: {value!r}")
    return round(number * USD)


def to_usd(nusd: int) -> float:
    """Integer nano-dollars to dollars, rounded to the nano-dollar."""
    return round(nusd / USD, 9)


def usd_text(nusd: int) -> str:
    """Dollars as exact decimal text, e.g. `0.000005625`, `12.5`, `0`."""
    if nusd < 0:
        return "-" + usd_text(-nusd)
    whole, frac = divmod(nusd, USD)
    return f"{whole}.{frac:09d}".rstrip("0") if frac else str(whole)


def utc_now() -> datetime:
    return datetime.now(UTC)


def month_of(now: datetime) -> str:
    """The UTC calendar month, `YYYY-MM`: the budget period."""
    return f"{now.year:04d}-{now.month:02d}"


def month_span(now_s: float) -> tuple[str, float, float]:
    """The UTC month of a UNIX time, with its start and end as UNIX times (for a cache that
    holds until the month changes)."""
    now = time.gmtime(now_s)  # truncates: datetime.fromtimestamp would round up near a month end
    start = datetime(now.tm_year, now.tm_mon, 1, tzinfo=UTC).timestamp()
    days = calendar.monthrange(now.tm_year, now.tm_mon)[1]
    return f"{now.tm_year:04d}-{now.tm_mon:02d}", start, start + days * 86400


def day_of(now: datetime) -> str:
    return f"{now.year:04d}-{now.month:02d}-{now.day:02d}"


def seconds_to_month_end(now: datetime | float) -> int:
    """Whole seconds until the next UTC month begins (at least 1); `now` may be a UNIX time."""
    if not isinstance(now, datetime):
        now = datetime.fromtimestamp(now, UTC)
    last_day = calendar.monthrange(now.year, now.month)[1]
    end = datetime(now.year, now.month, last_day, tzinfo=UTC).timestamp() + 86400
    return max(1, math.ceil(end - now.timestamp()))


def seconds_to_day_end(now: datetime) -> int:
    start = datetime(now.year, now.month, now.day, tzinfo=UTC).timestamp()
    return max(1, math.ceil(start + 86400 - now.timestamp()))
