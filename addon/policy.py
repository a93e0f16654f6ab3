"""The decision, pure: records and usage in, allow or a denial out. No I/O, no mitmproxy."""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from addon.providers.base import Denial
from store.db import Counter, Identity, Level
from store.money import from_usd, seconds_to_month_end, to_usd, usd_text
from store.rates import Window, duration_text

QUOTA_ERROR_TYPES = {
    "key": "key_quota_exceeded",
    "user": "user_quota_exceeded",
    "org": "organization_quota_exceeded",
}
LEVEL_NAMES = {"key": "key", "user": "user", "org": "organization"}
BUSY_RETRY_AFTER_S = 5
PARALLEL_RETRY_AFTER_S = 1
RATE_LIMIT_ERROR = "rate_limit_exceeded"


@dataclass(slots=True)  # built per request: a frozen one costs a call per field
class Budget:
    """A level a request is charged to (key, user, org): its monthly limit, and what the Workers
    gateway itself already counted there this month (its replicated quota record)."""

    level: str
    id: str
    limit_nusd: int | None  # None: no limit at this level
    external_nusd: int = 0
    external_requests: int = 0
    rpm_limit: int | None = None  # requests admitted per rate window
    tpm_limit: int | None = None  # tokens per rate window
    max_parallel: int | None = None  # requests in flight

    @property
    def rate_limited(self) -> bool:
        return (self.rpm_limit is not None or self.tpm_limit is not None
                or self.max_parallel is not None)

    @property
    def ledger_level(self) -> Level:
        return (self.level, self.id)

    def usage(self, counter: Counter) -> "LevelUsage":
        return LevelUsage(
            self.level,
            self.id,
            self.limit_nusd,
            counter[0] + self.external_nusd,
            counter[1],
            counter[2] + self.external_requests,
        )


class LevelUsage(NamedTuple):
    """One level for this month, for messages and headers: limit, spent, reserved."""

    level: str
    id: str
    limit_nusd: int | None
    used_nusd: int
    reserved_nusd: int
    requests: int

    @property
    def remaining_nusd(self) -> int | None:
        if self.limit_nusd is None:
            return None
        return max(0, self.limit_nusd - self.used_nusd - self.reserved_nusd)


def budgets_of(identity: Identity, month: str) -> tuple[Budget, ...]:
    """The levels of an authenticated request, key first. What others spent counts too: the
    Workers gateway's own quota records and other gateway nodes' totals."""
    key, user, org = identity.key, identity.user, identity.org
    assert key is not None and user is not None
    remote_key, remote_user, remote_org = identity.remote
    user_ext = _plus(identity.user_quota.usage_in(month) if identity.user_quota else (0, 0),
                     remote_user)
    key_ext = _plus(identity.key_quota.usage_in(month) if identity.key_quota else (0, 0),
                    remote_key)
    budgets = [
        Budget("key", key.key_id, _nusd(key.monthly_limit_usd), *key_ext,
               key.rpm_limit, key.tpm_limit, key.max_parallel_requests),
        Budget("user", user.user_id, _nusd(user.monthly_limit_usd), *user_ext,
               user.rpm_limit, user.tpm_limit, user.max_parallel_requests),
    ]
    if org is not None:
        org_ext = _plus(identity.org_quota.usage_in(month) if identity.org_quota else (0, 0),
                        remote_org)
        budgets.append(Budget("org", org.org_id, _nusd(org.monthly_budget_usd), *org_ext,
                              org.rpm_limit, org.tpm_limit, org.max_parallel_requests))
    return tuple(budgets)


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def _nusd(usd: float | None) -> int | None:
    return None if usd is None else from_usd(usd)


def unauthorized(message: str) -> Denial:
    return Denial(401, "invalid_api_key", message)


def rotated_out(key_id: str) -> Denial:
    """A key rotated out whose grace period has ended (`expires_at`): refused as a revoked one."""
    return unauthorized(f"This gateway key ({key_id}) was replaced by a rotation and its grace "
                        "period has ended.")


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
    if identity.layout == "vkey" and identity.user.org_id != key.org_id:
        # The later gateway's key names its org and its user: both must agree, as a key whose
        # user is missing is refused (a misconfiguration, never charged to the wrong org).
        return unauthorized(f"The gateway key {key.key_id} names organization {key.org_id}, "
                            f"and its user {identity.user.user_id} is not of it.")
    org = identity.org
    if org is not None and org.allowed_models and model and model not in org.allowed_models:
        return model_not_allowed(org.org_id, model)
    return None


def model_not_allowed(org_id: str, model: str) -> Denial:
    return Denial(403, "model_not_allowed",
                  f"The model {model!r} is not allowed for organization {org_id}.")


def decide_budgets(
    budgets: Sequence[Budget],
    counters: Sequence[Counter],
    estimate_nusd: int,
    now: datetime | float,
    month: str,
) -> Denial | None:
    """None to admit the request at every level, else the denial. Denied when:
    - a level's usage has reached its monthly limit (final until the month ends), or
    - other requests are in flight at a level and this one's maximum cost (`estimate_nusd`)
      does not fit beside their reservations (transient: it may fit once they settle).
    A request alone at a level is admitted while usage is below the limit, as the Workers gateway
    did; in a burst only what fits gets in, so concurrency never multiplies the overshoot."""
    busy = None
    for budget, counter in zip(budgets, counters, strict=True):
        limit = budget.limit_nusd
        if limit is None:
            continue
        used = counter[0] + budget.external_nusd
        if used >= limit:
            return quota_denial(budget.usage(counter), now, month)
        if busy is None and counter[1] and used + counter[1] + estimate_nusd > limit:
            busy = budget, counter
    if busy is not None:
        return busy_denial(busy[0].usage(busy[1]), month, estimate_nusd)
    return None


def decide_rates(limited: Sequence[Budget], windows: Sequence[Window], now: float
                 ) -> Denial | None:
    """None to admit the request at every rate-limited level, else the denial. A level admits
    while its window's count (requests, tokens: in-flight requests by their estimate) is below
    its limit, and while fewer requests than `max_parallel` are in flight."""
    for budget, window in zip(limited, windows, strict=True):
        if budget.max_parallel is not None and window.in_flight >= budget.max_parallel:
            return rate_denial(budget, "max_parallel_requests", budget.max_parallel,
                               window.in_flight, window.window_s, PARALLEL_RETRY_AFTER_S)
        if budget.rpm_limit is not None:
            requests = window.requests
            if requests >= budget.rpm_limit:
                return rate_denial(budget, "rpm_limit", budget.rpm_limit, requests,
                                   window.window_s, window.wait_for(now, 1, budget.rpm_limit))
        if budget.tpm_limit is not None:
            tokens = window.tokens
            if tokens >= budget.tpm_limit:
                return rate_denial(budget, "tpm_limit", budget.tpm_limit, tokens,
                                   window.window_s, window.wait_for(now, 2, budget.tpm_limit))
    return None


_RATE_WHAT = {"rpm_limit": "requests", "tpm_limit": "tokens",
              "max_parallel_requests": "requests in flight"}


def rate_denial(budget: Budget, limit_name: str, limit: int, count: int, window_s: int,
                retry_after_s: int) -> Denial:
    """A rate or concurrency limit reached: transient, the SDKs back off and retry."""
    what = _RATE_WHAT[limit_name]
    if limit_name == "max_parallel_requests":
        span = "at once"
    else:
        span = f"in the last {window_s}s"
    message = (
        f"Rate limit reached for the {LEVEL_NAMES[budget.level]} {budget.id}: {limit_name} "
        f"{limit} {what} {span}, {count} counted. Retry in {retry_after_s}s."
    )
    return Denial(
        429,
        RATE_LIMIT_ERROR,
        message,
        headers=(("retry-after", str(retry_after_s)), ("x-should-retry", "true")),
        details={"level": budget.level, "id": budget.id, "limit": limit_name,
                 "limit_value": limit, "current": count, "window_s": window_s,
                 "retry_after_s": retry_after_s},
    )


def rate_headers(limited: Sequence[Budget], windows: Sequence[Window], now: float
                 ) -> tuple[tuple[bytes, bytes], ...]:
    """OpenAI's x-ratelimit-* headers for the level with the least room (requests and tokens
    each), from the windows as they hold this request."""
    requests = tokens = None  # (limit, room, window) of the tightest level
    for budget, window in zip(limited, windows, strict=True):
        if budget.rpm_limit is not None:
            room = budget.rpm_limit - window.requests
            if requests is None or room < requests[1]:
                requests = (budget.rpm_limit, room, window)
        if budget.tpm_limit is not None:
            room = budget.tpm_limit - window.tokens
            if tokens is None or room < tokens[1]:
                tokens = (budget.tpm_limit, room, window)
    out: tuple[tuple[bytes, bytes], ...] = ()
    if requests is not None:
        out += _rate_fields(b"requests", 1, *requests, now)
    if tokens is not None:
        out += _rate_fields(b"tokens", 2, *tokens, now)
    return out


def _rate_fields(name: bytes, index: int, limit: int, room: int, window: Window, now: float
                 ) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b"x-ratelimit-limit-" + name, str(limit).encode()),
        (b"x-ratelimit-remaining-" + name, str(room if room > 0 else 0).encode()),
        (b"x-ratelimit-reset-" + name, duration_text(window.reset_in(now, index)).encode()),
    )


def binding_level(budgets: Sequence[Budget], counters: Sequence[Counter]) -> LevelUsage | None:
    """The limited level with the least room: the one the client should hear about."""
    best = None
    best_room = 0
    for budget, counter in zip(budgets, counters, strict=True):
        if budget.limit_nusd is None:
            continue
        room = budget.limit_nusd - counter[0] - budget.external_nusd - counter[1]
        if best is None or room < best_room:
            best, best_room = (budget, counter), room
    return None if best is None else best[0].usage(best[1])


def dollars(nusd: int) -> str:
    """An amount for a message: exact, with at least cents (`10.00`, `0.00001`, `12.50`)."""
    whole, _, frac = usd_text(nusd).partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def quota_denial(lv: LevelUsage, now: datetime | float, month: str) -> Denial:
    error_type = QUOTA_ERROR_TYPES[lv.level]
    message = (
        f"{error_type}: the {LEVEL_NAMES[lv.level]} {lv.id} has used ${dollars(lv.used_nusd)} "
        f"of its ${dollars(lv.limit_nusd or 0)} monthly limit for {month}."
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
    message = (
        f"{error_type}: the {LEVEL_NAMES[lv.level]} {lv.id} has ${dollars(lv.remaining_nusd or 0)}"
        f" left of its ${dollars(lv.limit_nusd or 0)} monthly limit once the requests in flight "
        f"(${dollars(lv.reserved_nusd)} reserved) settle, and this request may cost up to "
        f"${dollars(estimate_nusd)}. Retry when they finish."
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
