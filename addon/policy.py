"""The decision, pure: records and usage in, allow or a denial out. No I/O, no mitmproxy."""

from dataclasses import dataclass
from datetime import datetime

from addon.providers.base import Denial
from store.db import Counter, Identity
from store.money import seconds_to_month_end, to_usd

QUOTA_ERROR_TYPES = {
    "key": "key_quota_exceeded",
    "user": "user_quota_exceeded",
    "org": "organization_quota_exceeded",
}
LEVEL_NAMES = {"key": "key", "user": "user", "org": "organization"}
BUSY_RETRY_AFTER_S = 5


@dataclass(frozen=True, slots=True)
class LevelUsage:
    """One budget level for this month: its limit and what is spent and reserved against it."""

    level: str  # key | user | org
    id: str
    limit_nusd: int | None  # None: no limit at this level
    used_nusd: int
    reserved_nusd: int
    requests: int
    external_nusd: int = 0  # part of used_nusd: the Workers gateway's own totals
    external_requests: int = 0

    def updated(self, counter: Counter) -> "LevelUsage":
        """This level after a ledger write that left `counter`."""
        return LevelUsage(
            self.level,
            self.id,
            self.limit_nusd,
            counter.used_nusd + self.external_nusd,
            counter.reserved_nusd,
            counter.requests + self.external_requests,
            self.external_nusd,
            self.external_requests,
        )

    @property
    def remaining_nusd(self) -> int | None:
        if self.limit_nusd is None:
            return None
        return max(0, self.limit_nusd - self.used_nusd - self.reserved_nusd)


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    allowed: bool
    levels: tuple[LevelUsage, ...]
    denial: Denial | None = None

    def __bool__(self) -> bool:
        return self.allowed

    def binding(self) -> LevelUsage | None:
        """The limited level with the least room: the one the client should hear about."""
        limited = [lv for lv in self.levels if lv.limit_nusd is not None]
        return min(limited, key=lambda lv: lv.remaining_nusd, default=None)


def unauthorized(message: str) -> Denial:
    return Denial(401, "invalid_api_key", message)


def check_identity(identity: Identity, model: str | None) -> Denial | None:
    """Key active, user active, model allowed; None when the request may go on to budgets.
    A missing org is not decided here: it means quota data is unavailable."""
    key = identity.key
    if key is None:
        return unauthorized("Incorrect API key provided: the key is not a known gateway key.")
    if not key.active:
        return unauthorized(f"The gateway key {key.key_id} has been revoked.")
    if identity.user is None:
        return unauthorized(f"The gateway key {key.key_id} belongs to no known user.")
    if not identity.user.active:
        return unauthorized(f"The user {identity.user.user_id} is {identity.user.status}.")
    org = identity.org
    if org is not None and org.allowed_models and model and model not in org.allowed_models:
        return Denial(
            403,
            "model_not_allowed",
            f"The model {model!r} is not allowed for organization {org.org_id}.",
        )
    return None


def decide_budgets(
    levels: list[LevelUsage], now: datetime, month: str, estimate_nusd: int
) -> BudgetDecision:
    """Admit a request at every level (key, user, org) unless:
    - the level's usage has reached its monthly limit (final until the month ends), or
    - other requests are in flight there and this one's maximum cost (`estimate_nusd`) does not
      fit beside their reservations (transient: it may fit once they settle).
    A request alone at a level is admitted while usage is below the limit, as the Workers gateway
    did; in a burst only what fits gets in, so concurrency never multiplies the overshoot."""
    for lv in levels:
        if lv.limit_nusd is not None and lv.used_nusd >= lv.limit_nusd:
            return BudgetDecision(False, tuple(levels), quota_denial(lv, now, month))
    for lv in levels:
        if (
            lv.limit_nusd is not None
            and lv.reserved_nusd > 0
            and lv.used_nusd + lv.reserved_nusd + estimate_nusd > lv.limit_nusd
        ):
            return BudgetDecision(False, tuple(levels), busy_denial(lv, month, estimate_nusd))
    return BudgetDecision(True, tuple(levels))


def quota_denial(lv: LevelUsage, now: datetime, month: str) -> Denial:
    used, limit = to_usd(lv.used_nusd), to_usd(lv.limit_nusd or 0)
    error_type = QUOTA_ERROR_TYPES[lv.level]
    message = (
        f"{error_type}: the {LEVEL_NAMES[lv.level]} {lv.id} has used ${used:.6f} "
        f"of its ${limit:.2f} monthly limit for {month}."
    )
    return Denial(
        429,
        error_type,
        message,
        headers=(("retry-after", str(seconds_to_month_end(now))), ("x-should-retry", "false")),
        details=_details(lv, month),
    )


def busy_denial(lv: LevelUsage, month: str, estimate_nusd: int) -> Denial:
    error_type = QUOTA_ERROR_TYPES[lv.level]
    left = to_usd(lv.remaining_nusd or 0)
    message = (
        f"{error_type}: the {LEVEL_NAMES[lv.level]} {lv.id} has ${left:.6f} left of its "
        f"${to_usd(lv.limit_nusd or 0):.2f} monthly limit once the requests in flight "
        f"(${to_usd(lv.reserved_nusd):.6f} reserved) settle, and this request may cost up to "
        f"${to_usd(estimate_nusd):.6f}. Retry when they finish."
    )
    return Denial(
        429,
        error_type,
        message,
        headers=(("retry-after", str(BUSY_RETRY_AFTER_S)), ("x-should-retry", "true")),
        details=_details(lv, month),
    )


def _details(lv: LevelUsage, month: str) -> dict:
    return {
        "level": lv.level,
        "id": lv.id,
        "usage_usd": to_usd(lv.used_nusd),
        "reserved_usd": to_usd(lv.reserved_nusd),
        "limit_usd": to_usd(lv.limit_nusd or 0),
        "remaining_usd": to_usd(lv.remaining_nusd or 0),
        "current_month": month,
    }


def level_usages(
    identity: Identity, counters: list[Counter], month: str, limits: list[int | None]
) -> list[LevelUsage]:
    """Combine ledger counters with the Workers gateway's own quota records (if replicated)."""
    assert identity.key is not None and identity.user is not None
    external = {
        "user": identity.user_quota.usage_in(month) if identity.user_quota else (0, 0),
        "org": identity.org_quota.usage_in(month) if identity.org_quota else (0, 0),
    }
    ids = [("key", identity.key.key_id), ("user", identity.user.user_id)]
    if identity.org is not None:
        ids.append(("org", identity.org.org_id))
    out = []
    for (level, level_id), counter, limit in zip(ids, counters, limits, strict=True):
        extra_usd, extra_requests = external.get(level, (0, 0))
        out.append(
            LevelUsage(
                level,
                level_id,
                limit,
                counter.used_nusd + extra_usd,
                counter.reserved_nusd,
                counter.requests + extra_requests,
                extra_usd,
                extra_requests,
            )
        )
    return out
