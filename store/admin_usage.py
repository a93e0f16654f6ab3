"""Usage of a level (key, user, org) as the request path counts it, and quota resets: on the
local store, whose ledger holds this node's metering."""


from store import audit
from store.admin_accounts import find_key
from store.admin_base import (
    LEVELS,
    AdminError,
    _check_text,
    _current_month,
    _dump,
    _json_or_none,
    _load,
    _write,
    now_iso,
)
from store.db import Store
from store.money import from_usd, to_usd, utc_now
from store.records import (
    RATE_FIELDS,
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

# Usage


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise AdminError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")


def _quota_key(level: str, level_id: str) -> str | None:
    if level == "user":
        return user_quota_key(level_id)
    if level == "org":
        return org_quota_key(level_id)
    return None


def _quota_usage(store: Store, level: str, level_id: str, month: str) -> tuple[int, int]:
    """What the Workers gateway's own quota record counts for `month` (the request path adds
    it to user and org budgets; keys have none)."""
    key = _quota_key(level, level_id)
    raw = store.records.get(key) if key else None
    if key is None or raw is None:
        return 0, 0
    try:
        return QuotaRecord.parse(raw, key).usage_in(month)
    except RecordError as exc:
        raise AdminError(str(exc)) from None


def _other_nodes(store: Store, level: str, level_id: str, month: str) -> tuple[int, int]:
    """The other nodes' totals for `month` as the last sync pass replicated them: the figures
    `Records.resolve` gives the request path."""
    return store.records.remote_usage(month, level, level_id)


def _record_of(store: Store, level: str, level_id: str) -> ApiKey | User | Org | None:
    """The level's record as the request path reads it (a key without one: None)."""
    try:
        if level == "key":
            ref = find_key(store, level_id)
            if ref.record is None or ref.key_hash is None:
                return None
            return ApiKey.parse(ref.key_hash, ref.record)
        if level == "user":
            record = _load(store, user_config_key(level_id), f"user {level_id}")
            return User.parse(level_id, record)
        record = _load(store, org_config_key(level_id), f"org {level_id}")
        return Org.parse(level_id, record)
    except RecordError as exc:
        raise AdminError(str(exc)) from None


def _limit_of(record: ApiKey | User | Org | None) -> float | None:
    """The level's monthly limit as the request path reads it."""
    if record is None:
        return None
    return record.monthly_budget_usd if isinstance(record, Org) else record.monthly_limit_usd


def _rates_of(store: Store, level: str, level_id: str,
              record: ApiKey | User | Org | None) -> dict:
    """A level's rate limits and what its window counts now (this store's ledger, all the
    gateways on it): only for a level that sets one."""
    limits = {name: getattr(record, name, None) for name in RATE_FIELDS}
    if all(value is None for value in limits.values()):
        return {}
    (window,) = store.ledger.rate_windows([(level, level_id)])
    used = (0, 0, 0) if window is None else (window.requests, window.tokens, window.in_flight)
    return {
        "rpm_limit": limits["rpm_limit"], "rpm_used": used[0],
        "tpm_limit": limits["tpm_limit"], "tpm_used": used[1],
        "max_parallel_requests": limits["max_parallel_requests"], "in_flight": used[2],
        "rate_window_s": 60 if window is None else window.window_s,
    }


def level_usage(store: Store, level: str, level_id: str, month: str | None = None) -> dict:
    """Usage of one level (user, org or key) in `month` (default: the current UTC month), as
    the request path counts it for the budget: this node's ledger, the other nodes' replicated
    totals and (user and org) the Workers gateway's quota record of that month, each shown
    beside the sum. `remaining_usd` leaves out what requests in flight have reserved. A level
    with rate limits adds them, with `rpm_used`, `tpm_used` and `in_flight` now."""
    _check_level(level)
    month = month or _current_month()
    record = _record_of(store, level, level_id)
    limit = _limit_of(record)
    (counter,) = store.ledger.counters([(level, level_id)], month)
    other_nusd, other_requests = _other_nodes(store, level, level_id, month)
    quota_nusd, quota_requests = _quota_usage(store, level, level_id, month)
    used = counter.used_nusd + other_nusd + quota_nusd
    remaining = None if limit is None else to_usd(
        max(0, from_usd(limit) - used - counter.reserved_nusd))
    return {
        "level": level,
        "id": level_id,
        "current_usage_usd": to_usd(used),
        "this_node_usd": to_usd(counter.used_nusd),
        "other_nodes_usd": to_usd(other_nusd),
        "quota_record_usd": to_usd(quota_nusd),
        "request_count": counter.requests + other_requests + quota_requests,
        "this_node_requests": counter.requests,
        "other_nodes_requests": other_requests,
        "quota_record_requests": quota_requests,
        ("monthly_budget_usd" if level == "org" else "monthly_limit_usd"): limit,
        "remaining_usd": remaining,
        "reserved_usd": to_usd(counter.reserved_nusd),
        "current_month": month,
        **_rates_of(store, level, level_id, record),
    }


def reset_quota(store: Store, level: str, level_id: str, reason: str) -> dict:
    """Zero the current month's usage of a level (ledger and Workers quota record); the audit
    log (`store.audit`) keeps the reset with its reason and the usage it zeroed."""
    reason = _check_text(reason, "reason")
    month = _current_month()
    before = level_usage(store, level, level_id, month)
    entry = {
        "level": level,
        "id": level_id,
        "month": month,
        "reason": reason,
        "previous_usage_usd": before["current_usage_usd"],
        "previous_request_count": before["request_count"],
        "at": now_iso(),
    }
    store.ledger.reset((level, level_id), month)
    key = _quota_key(level, level_id)
    quota = _json_or_none(store.records.get(key)) if key is not None else None
    if key is not None and quota is not None:
        quota.update(month_usage_usd=0, request_count=0, current_month=month,
                     last_update=int(utc_now().timestamp() * 1000))
        _write(store, {key: _dump(quota)}, details={"quota_reset": entry})
    else:
        audit.note(store, {"quota_reset": entry})
    return {
        "level": level,
        "id": level_id,
        "reset": True,
        "previous_usage_usd": before["current_usage_usd"],
        "reason": reason,
        "current_month": month,
    }
