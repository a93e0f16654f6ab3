"""Usage of a level (key, user, org) as the request path counts it, and quota resets: on the
local store, whose ledger holds this node's metering, or on the Cloudflare KV namespace, which
holds every node's pushed totals (a reset there holds on every node)."""

import contextlib
from typing import TYPE_CHECKING

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
from store.db import Store, StoreError
from store.money import from_usd, to_usd, utc_now
from store.records import (
    MAX_COUNT,
    RATE_FIELDS,
    ApiKey,
    Org,
    QuotaRecord,
    RecordError,
    Reset,
    User,
    counts_after_reset,
    org_config_key,
    org_quota_key,
    parse_reset_listing,
    parse_usage_key,
    reset_marker_key,
    user_config_key,
    user_quota_key,
    vkey_quota_key,
)
from store.target import AdminTarget

if TYPE_CHECKING:
    from store.cloudflare import CloudflareTarget

# Usage


def _check_level(level: str) -> None:
    if level not in LEVELS:
        raise AdminError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")


def _quota_key(store: AdminTarget, level: str, level_id: str) -> str | None:
    """The Workers gateway's quota record of a level: a user's, an org's, and a key's in the
    later layout (`vkey:{hash}:quota`, under its current raw key's hash)."""
    if level == "user":
        return user_quota_key(level_id)
    if level == "org":
        return org_quota_key(level_id)
    ref = find_key(store, level_id)
    return vkey_quota_key(ref.key_hash) if ref.layout == "vkey" and ref.key_hash else None


def _quota_usage(store: AdminTarget, level: str, level_id: str, month: str) -> tuple[int, int]:
    """What the Workers gateway's own quota record counts for `month` (the request path adds
    it to the level's budget; a key of the first layout has none)."""
    key = _quota_key(store, level, level_id)
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


def _record_of(store: AdminTarget, level: str, level_id: str) -> ApiKey | User | Org | None:
    """The level's record as the request path reads it (a key without one: None)."""
    try:
        if level == "key":
            ref = find_key(store, level_id)
            if ref.record is None or ref.key_hash is None:
                return None
            return ref.parsed()
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


def level_usage(target: AdminTarget, level: str, level_id: str, month: str | None = None
                ) -> dict:
    """Usage of one level (user, org or key) in `month` (default: the current UTC month), as
    the request path counts it for the budget.

    On the local store: this node's ledger, the other nodes' replicated totals and (user and
    org) the Workers gateway's quota record of that month, each shown beside the sum;
    `remaining_usd` leaves out what requests in flight have reserved; a level with rate limits
    adds them, with `rpm_used`, `tpm_used` and `in_flight` now. On the Cloudflare target: the
    same fields, with every node's pushed totals under `other_nodes_*` (`this_node_*` 0), and
    `reserved_usd` None (reservations are in each node's ledger only), no rate fields."""
    _check_level(level)
    month = month or _current_month()
    if isinstance(target, Store):
        return _local_usage(target, level, level_id, month)
    return _fleet_usage(_cloudflare(target), level, level_id, month)


def _cloudflare(target: AdminTarget) -> "CloudflareTarget":
    """The target as the Cloudflare one: the admin operations know these two."""
    from store.cloudflare import CloudflareTarget  # httpx, for this target only

    if not isinstance(target, CloudflareTarget):
        raise TypeError(f"not an admin target: {type(target).__name__}")
    return target


def _usage_answer(level: str, level_id: str, month: str, limit: float | None,
                  this_node: tuple[int, int], other_nodes: tuple[int, int],
                  quota: tuple[int, int], reserved_nusd: int | None) -> dict:
    used = this_node[0] + other_nodes[0] + quota[0]
    remaining = None if limit is None else to_usd(
        max(0, from_usd(limit) - used - (reserved_nusd or 0)))
    return {
        "level": level,
        "id": level_id,
        "current_usage_usd": to_usd(used),
        "this_node_usd": to_usd(this_node[0]),
        "other_nodes_usd": to_usd(other_nodes[0]),
        "quota_record_usd": to_usd(quota[0]),
        "request_count": this_node[1] + other_nodes[1] + quota[1],
        "this_node_requests": this_node[1],
        "other_nodes_requests": other_nodes[1],
        "quota_record_requests": quota[1],
        ("monthly_budget_usd" if level == "org" else "monthly_limit_usd"): limit,
        "remaining_usd": remaining,
        "reserved_usd": None if reserved_nusd is None else to_usd(reserved_nusd),
        "current_month": month,
    }


def _local_usage(store: Store, level: str, level_id: str, month: str) -> dict:
    record = _record_of(store, level, level_id)
    (counter,) = store.ledger.counters([(level, level_id)], month)
    return {
        **_usage_answer(level, level_id, month, _limit_of(record),
                        (counter.used_nusd, counter.requests),
                        _other_nodes(store, level, level_id, month),
                        _quota_usage(store, level, level_id, month), counter.reserved_nusd),
        **_rates_of(store, level, level_id, record),
    }


def _fleet_usage(target: "CloudflareTarget", level: str, level_id: str, month: str) -> dict:
    record = _record_of(target, level, level_id)
    return _usage_answer(level, level_id, month, _limit_of(record), (0, 0),
                         _nodes_totals(target, level, level_id, month),
                         _quota_usage(target, level, level_id, month), None)


def _reset_marker(target: "CloudflareTarget", level: str, level_id: str) -> Reset | None:
    """The level's reset marker as a sync pass reads it (from its listing); None if there is
    none or it is malformed (a pass rejects it and counts the figures as if there were none)."""
    name = reset_marker_key(level, level_id)
    for item in target.records.listing(name):
        if item.get("name") == name:
            try:
                return parse_reset_listing(name, item.get("metadata"))
            except RecordError:
                return None
    return None


def _nodes_totals(target: "CloudflareTarget", level: str, level_id: str, month: str
                  ) -> tuple[int, int]:
    """Every node's pushed totals of a level for `month` (nano-dollars, requests), counted as a
    sync pass counts them for the request path: malformed figures, figures that would overflow
    the sum and figures pushed before the level's reset marker are left out."""
    from store.cloudflare import USAGE_PREFIX

    reset = _reset_marker(target, level, level_id)
    suffix = f":{month}:{level}:{level_id}"
    used = requests = 0
    for item in target.records.listing(USAGE_PREFIX):
        name = item.get("name")
        if not isinstance(name, str) or not name.endswith(suffix):
            continue
        try:
            figures = parse_usage_key(name, item.get("metadata"), USAGE_PREFIX)
        except RecordError:
            continue
        if (figures.month, figures.level, figures.id) != (month, level, level_id) \
                or not counts_after_reset(figures, reset):
            continue
        if max(used + figures.used_nusd, requests + figures.requests) <= MAX_COUNT:
            used, requests = used + figures.used_nusd, requests + figures.requests
    return used, requests


def _zeroed_quota(target: AdminTarget, level: str, level_id: str, month: str
                  ) -> dict[str, bytes]:
    """The Workers gateway's quota record of a user or org zeroed for `month` (to write), if
    the level has one."""
    key = _quota_key(target, level, level_id)
    quota = None if key is None else _json_or_none(target.records.get(key))
    if key is None or quota is None:
        return {}
    quota.update(month_usage_usd=0, request_count=0, current_month=month,
                 last_update=_now_ms())
    return {key: _dump(quota)}


def _now_ms() -> int:
    return int(utc_now().timestamp() * 1000)


def reset_quota(target: AdminTarget, level: str, level_id: str, reason: str) -> dict:
    """Zero the current month's usage of a level.

    On the local store: this node's ledger counter and the Workers quota record. On the
    Cloudflare target: on every node, by a reset
    marker `aigw:reset:{level}:{id}` (each node's next sync pass zeroes its own counter, and
    every node stops counting figures pushed before it) and the Workers quota record zeroed.
    The audit log (`store.audit`) keeps the reset with its reason and the usage it zeroed."""
    reason = _check_text(reason, "reason")
    month = _current_month()
    before = level_usage(target, level, level_id, month)
    entry = {"quota_reset": {
        "level": level, "id": level_id, "month": month, "reason": reason,
        "previous_usage_usd": before["current_usage_usd"],
        "previous_request_count": before["request_count"], "at": now_iso()}}
    if not isinstance(target, Store):
        return _fleet_reset(_cloudflare(target), level, level_id, reason, month, before, entry)
    store = target
    # The record and the audit entry first, then the ledger (another environment: no one
    # transaction holds both). Should the ledger refuse, the log says so: never a reset that
    # happened without its entry.
    quota = _zeroed_quota(store, level, level_id, month)
    if quota:
        _write(store, quota, details=entry)
    else:
        audit.note(store, entry)
    try:
        store.ledger.reset((level, level_id), month)
    except StoreError:
        with contextlib.suppress(StoreError):
            audit.note(store, {"quota_reset_failed": entry["quota_reset"]})
        raise
    return _reset_answer(level, level_id, reason, month, before)


def _reset_answer(level: str, level_id: str, reason: str, month: str, before: dict) -> dict:
    return {
        "level": level,
        "id": level_id,
        "reset": True,
        "previous_usage_usd": before["current_usage_usd"],
        "reason": reason,
        "current_month": month,
    }


def _fleet_reset(target: "CloudflareTarget", level: str, level_id: str, reason: str,
                 month: str, before: dict, entry: dict) -> dict:
    """Write the level's reset marker (and its zeroed Workers quota record) in one bulk write.
    The marker's `at_ms` is its version: later than the marker it replaces even if this host's
    clock is behind the one that wrote that, so every node applies the newer reset."""
    key = reset_marker_key(level, level_id)
    previous = _json_or_none(target.records.get(key)) or {}
    previous_ms = previous.get("at_ms")
    at_ms = _now_ms()
    if isinstance(previous_ms, int) and not isinstance(previous_ms, bool) \
            and previous_ms < MAX_COUNT:
        at_ms = max(at_ms, previous_ms + 1)
    marker = {"level": level, "id": level_id, "month": month, "at_ms": at_ms, "reason": reason}
    _write(target, {key: _dump(marker), **_zeroed_quota(target, level, level_id, month)},
           details=entry)
    return _reset_answer(level, level_id, reason, month, before)
