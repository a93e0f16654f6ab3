"""Admin operations over the Store API: orgs, users, keys, usage, quota resets, bulk import/export.

Every operation takes an open `Store` and returns a JSON-ready dict. Records keep the Workers
gateway's KV layout, so an export can be bulk-put back into a KV namespace.
"""

import base64
import binascii
import json
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from store.db import LMDB_MAX_KEY, Store, StoreError
from store.hashing import looks_like_gateway_key, new_gateway_key
from store.money import from_usd, month_of, to_usd, utc_now
from store.records import (
    DEFAULT_FALLBACK_DAILY_LIMIT_USD,
    FAIL_CLOSED,
    USER_STATUSES,
    ApiKey,
    Org,
    QuotaRecord,
    RecordError,
    User,
    apikey_key,
    normalize_failure_mode,
    org_config_key,
    org_quota_key,
    record_label,
    user_config_key,
    user_key_listing_key,
    user_quota_key,
    validate_record,
)

LEVELS = ("user", "org", "key")
DEFAULT_KEY_NAME = "default"
DEMO_META = "demo"
QUOTA_RESETS_META = "quota_resets"


class AdminError(StoreError):
    """An admin operation cannot be carried out (unknown id, invalid value)."""


def now_iso() -> str:
    """The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`."""
    return utc_now().strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id(prefix: str) -> str:
    """A fresh id such as `org_1a2b3c4d5e6f`."""
    return f"{prefix}_{secrets.token_hex(6)}"


def check_usd(value: Any, name: str = "amount") -> float:
    """A non-negative finite USD amount as float; AdminError otherwise."""
    if isinstance(value, bool):
        raise AdminError(f"{name} must be a non-negative number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AdminError(f"{name} must be a non-negative number, not {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise AdminError(f"{name} must be a non-negative finite number, not {value!r}")
    return number


def _current_month() -> str:
    return month_of(utc_now())


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _load(store: Store, key: str, what: str) -> dict:
    try:
        value = store.records.get_json(key)
    except ValueError as exc:
        raise AdminError(f"{what}: stored record is not valid JSON: {exc}") from exc
    if value is None:
        raise AdminError(f"unknown {what}")
    if not isinstance(value, dict):
        raise AdminError(f"{what}: stored record is not a JSON object")
    return value


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise AdminError(f"{name} must be a non-empty string")
    return value.strip()


def _write(store: Store, puts: dict[str, bytes], deletes: Sequence[str] = ()) -> None:
    """Write records after checking each with the parser the request path uses: an admin
    operation never leaves a record the gateway would misread or refuse."""
    for key, raw in puts.items():
        try:
            validate_record(key, raw)
        except RecordError as exc:
            raise AdminError(str(exc)) from None
    store.records.write(puts, deletes)


def _redacted(record: dict) -> dict:
    out = dict(record)
    if isinstance(out.get("provider_keys"), dict):
        out["provider_keys"] = {name: "<redacted>" for name in out["provider_keys"]}
    return out


# Orgs


def _new_org(
    name: str,
    budget_usd: float,
    failure_mode: str = FAIL_CLOSED,
    fallback_daily_limit_usd: float | None = None,
) -> dict:
    fallback = (
        DEFAULT_FALLBACK_DAILY_LIMIT_USD
        if fallback_daily_limit_usd is None
        else check_usd(fallback_daily_limit_usd, "fallback_daily_limit")
    )
    try:
        mode = normalize_failure_mode(failure_mode)
    except RecordError as exc:
        raise AdminError(str(exc)) from None
    return {
        "org_id": new_id("org"),
        "name": _check_text(name, "name"),
        "monthly_budget_usd": check_usd(budget_usd, "monthly_budget_usd"),
        "failure_mode": mode,
        "fallback_daily_limit": fallback,
        "created_at": now_iso(),
    }


def create_org(
    store: Store,
    name: str,
    budget_usd: float,
    failure_mode: str = FAIL_CLOSED,
    fallback_daily_limit_usd: float | None = None,
    *,
    allowed_models: Sequence[str] | None = None,
    provider_keys: Mapping[str, str | None] | None = None,
) -> dict:
    """Create `org:{id}:config`; returns the record (provider keys redacted). See
    `update_org` for `allowed_models` and `provider_keys`."""
    record = _new_org(name, budget_usd, failure_mode, fallback_daily_limit_usd)
    _set_access(record, allowed_models, provider_keys)
    _write(store, {org_config_key(record["org_id"]): _dump(record)})
    return _redacted(record)


def _set_access(record: dict, allowed_models: Sequence[str] | None,
                provider_keys: Mapping[str, str | None] | None) -> None:
    """`allowed_models`: the models the org may use (empty: any). `provider_keys`: provider
    name (or kind) -> the org's credential, or `env:VAR` for a variable on the gateway hosts;
    None removes one."""
    if allowed_models is not None:
        models = [_check_text(model, "allowed_models entry") for model in allowed_models]
        if models:
            record["allowed_models"] = list(dict.fromkeys(models))
        else:
            record.pop("allowed_models", None)
    if provider_keys:
        keys = dict(record.get("provider_keys") or {})
        for name, ref in provider_keys.items():
            name = _check_text(name, "provider_keys name")
            if ref is None:
                keys.pop(name, None)
            else:
                keys[name] = _check_text(ref, f"provider_keys.{name}")
        if keys:
            record["provider_keys"] = keys
        else:
            record.pop("provider_keys", None)


def update_org(
    store: Store,
    org_id: str,
    *,
    name: str | None = None,
    budget_usd: float | None = None,
    failure_mode: str | None = None,
    fallback_daily_limit_usd: float | None = None,
    allowed_models: Sequence[str] | None = None,
    provider_keys: Mapping[str, str | None] | None = None,
) -> dict:
    """Change the given fields of an org; returns the record (provider keys redacted).
    `allowed_models`: replaces the list (empty: any model); `provider_keys`: sets or (None)
    removes the named providers' credentials, keeping the others."""
    key = org_config_key(org_id)
    record = _load(store, key, f"org {org_id}")
    if name is not None:
        record["name"] = _check_text(name, "name")
    if budget_usd is not None:
        record["monthly_budget_usd"] = check_usd(budget_usd, "monthly_budget_usd")
    if failure_mode is not None:
        try:
            record["failure_mode"] = normalize_failure_mode(failure_mode)
        except RecordError as exc:
            raise AdminError(str(exc)) from None
    if fallback_daily_limit_usd is not None:
        record["fallback_daily_limit"] = check_usd(
            fallback_daily_limit_usd, "fallback_daily_limit"
        )
    _set_access(record, allowed_models, provider_keys)
    record["updated_at"] = now_iso()
    _write(store, {key: _dump(record)})
    return _redacted(record)


def show_org(store: Store, org_id: str) -> dict:
    """The org's config record (provider keys redacted)."""
    return _redacted(_load(store, org_config_key(org_id), f"org {org_id}"))


# Users


def _new_user(org_id: str, email: str, limit_usd: float) -> dict:
    email = _check_text(email, "email")
    local, at, domain = email.partition("@")
    if not (local and at and domain):
        raise AdminError(f"email must look like name@domain, not {email!r}")
    return {
        "user_id": new_id("user"),
        "email": email,
        "monthly_limit_usd": check_usd(limit_usd, "monthly_limit_usd"),
        "org_id": org_id,
        "status": "active",
        "created_at": now_iso(),
    }


def create_user(store: Store, org_id: str, email: str, limit_usd: float) -> dict:
    """Create `user:{id}:config` in an existing org; returns the record."""
    _load(store, org_config_key(org_id), f"org {org_id}")
    record = _new_user(org_id, email, limit_usd)
    _write(store, {user_config_key(record["user_id"]): _dump(record)})
    return record


def update_user(
    store: Store, user_id: str, *, limit_usd: float | None = None, status: str | None = None
) -> dict:
    """Change a user's monthly limit and/or status; returns the record."""
    key = user_config_key(user_id)
    record = _load(store, key, f"user {user_id}")
    if limit_usd is not None:
        record["monthly_limit_usd"] = check_usd(limit_usd, "monthly_limit_usd")
    if status is not None:
        if status not in USER_STATUSES:
            raise AdminError(f"status must be one of {', '.join(USER_STATUSES)}, not {status!r}")
        record["status"] = status
    record["updated_at"] = now_iso()
    _write(store, {key: _dump(record)})
    return record


def show_user(store: Store, user_id: str) -> dict:
    """The user's config record."""
    return _load(store, user_config_key(user_id), f"user {user_id}")


# Keys


def _new_key(
    store: Store,
    user_id: str,
    org_id: str | None,
    raw_key: str,
    name: str,
    limit_usd: float | None,
    passthrough: bool,
) -> tuple[dict[str, bytes], dict]:
    limit = None if limit_usd is None else check_usd(limit_usd, "monthly_limit_usd")
    name = _check_text(name, "name")
    key_hash = store.hash(raw_key)
    if store.records.get(apikey_key(key_hash)) is not None:
        raise AdminError("this key is already registered")
    key_id = new_id("key")
    created_at = now_iso()
    record = {
        "key_id": key_id,
        "key_hash": key_hash,
        "user_id": user_id,
        "org_id": org_id,
        "name": name,
        "status": "active",
        "monthly_limit_usd": limit,
        "created_at": created_at,
        "passthrough": passthrough,
    }
    listing = {
        "key_id": key_id,
        "key_hash": key_hash,
        "name": name,
        "created_at": created_at,
        "status": "active",
        "revoked_at": None,
        "last_used_at": None,
    }
    puts = {
        apikey_key(key_hash): _dump(record),
        user_key_listing_key(user_id, key_id): _dump(listing),
    }
    result = {
        "key_id": key_id,
        "user_id": user_id,
        "org_id": org_id,
        "name": name,
        "monthly_limit_usd": limit,
        "status": "active",
        "created_at": created_at,
        "passthrough": passthrough,
    }
    return puts, result


def _store_key(
    store: Store,
    user_id: str,
    raw_key: str,
    name: str,
    limit_usd: float | None,
    passthrough: bool,
) -> dict:
    user = _load(store, user_config_key(user_id), f"user {user_id}")
    try:
        org_id = User.parse(user_id, user).org_id
    except RecordError as exc:
        raise AdminError(str(exc)) from None
    puts, result = _new_key(store, user_id, org_id, raw_key, name, limit_usd, passthrough)
    _write(store, puts)
    return result


def create_key(
    store: Store, user_id: str, name: str | None = None, limit_usd: float | None = None
) -> dict:
    """Issue a gateway key for a user; the result holds the raw key (`api_key`), shown once."""
    raw = new_gateway_key()
    result = _store_key(store, user_id, raw, name or DEFAULT_KEY_NAME, limit_usd, False)
    return {"key_id": result["key_id"], "api_key": raw, **result}


def register_key(
    store: Store,
    user_id: str,
    name: str,
    from_env: str,
    limit_usd: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict:
    """Register a developer's own provider key, read from environment variable `from_env`, to be
    metered and forwarded unchanged (passthrough). The key itself is never returned."""
    env = os.environ if environ is None else environ
    raw = env.get(from_env, "").strip()
    if not raw:
        raise AdminError(f"environment variable {from_env} is not set or empty")
    if looks_like_gateway_key(raw):
        raise AdminError(f"{from_env} holds a gateway key; register provider keys only")
    return _store_key(store, user_id, raw, name, limit_usd, True)


@dataclass
class KeyRef:
    """Where a key's records are: `apikey:{hash}` and/or its `user:{id}:keys:{key_id}` listing."""

    key_id: str
    key_hash: str | None
    record: dict | None
    listing_key: str | None
    listing: dict | None


def _json_or_none(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def find_key(store: Store, key_id: str) -> KeyRef:
    """Locate a key by id: via its listing's key_hash, else by scanning `apikey:` records."""
    suffix = f":keys:{key_id}"
    listing_key = listing = None
    for k, v in store.records.scan("user:"):
        if k.endswith(suffix) and k.count(":") == 3:
            listing_key, listing = k, _json_or_none(v) or {}
            break
    key_hash = record = None
    if listing and isinstance(listing.get("key_hash"), str):
        candidate = _json_or_none(store.records.get(apikey_key(listing["key_hash"])))
        if candidate is not None and candidate.get("key_id", key_id) == key_id:
            key_hash, record = listing["key_hash"], candidate
    if record is None:
        for k, v in store.records.scan("apikey:"):
            candidate = _json_or_none(v)
            if candidate is not None and candidate.get("key_id") == key_id:
                key_hash, record = k.removeprefix("apikey:"), candidate
                break
    if record is not None and listing_key is None:
        user = record.get("user_id") or record.get("user")
        if isinstance(user, dict):
            user = user.get("user_id") or user.get("id")
        if isinstance(user, str) and user:
            candidate_key = user_key_listing_key(user, key_id)
            found = store.records.get(candidate_key)
            if found is not None:
                listing_key, listing = candidate_key, _json_or_none(found) or {}
    if record is None and listing_key is None:
        raise AdminError(f"unknown key {key_id}")
    return KeyRef(key_id, key_hash, record, listing_key, listing)


def revoke_key(store: Store, key_id: str) -> dict:
    """Mark a key revoked on its apikey record and its listing, in one write."""
    ref = find_key(store, key_id)
    already = [r for r in (ref.record, ref.listing) if r is not None]
    if all(r.get("status") == "revoked" for r in already):
        revoked_at = next((r["revoked_at"] for r in already if r.get("revoked_at")), None)
        return {"key_id": key_id, "status": "revoked", "revoked_at": revoked_at}
    revoked_at = now_iso()
    puts: dict[str, bytes] = {}
    if ref.record is not None and ref.key_hash is not None:
        puts[apikey_key(ref.key_hash)] = _dump({**ref.record, "status": "revoked"})
    if ref.listing_key is not None:
        listing = {**(ref.listing or {}), "status": "revoked", "revoked_at": revoked_at}
        puts[ref.listing_key] = _dump(listing)
    _write(store, puts)
    return {"key_id": key_id, "status": "revoked", "revoked_at": revoked_at}


def list_keys(store: Store, user_id: str) -> dict:
    """A user's key listings (never raw keys), each with its own monthly limit and, from this
    node's ledger, when it was last metered this month (`last_used_at`)."""
    _load(store, user_config_key(user_id), f"user {user_id}")
    prefix = f"user:{user_id}:keys:"
    ledger = getattr(store, "ledger", None)  # none when the target is the KV namespace
    month = month_of(utc_now())
    keys = [{"key_id": k.removeprefix(prefix), **(_json_or_none(v) or {})}
            for k, v in store.records.scan(prefix)]
    names = [apikey_key(h) if isinstance(h := k.get("key_hash"), str) and h else None
             for k in keys]
    records = store.records.get_many(name for name in names if name)
    counters = ledger.counters([("key", k["key_id"]) for k in keys], month) if ledger else None
    for i, listing in enumerate(keys):
        record = _json_or_none(records.get(names[i])) if names[i] else None
        if record is not None:
            listing["monthly_limit_usd"] = record.get("monthly_limit_usd")
        if counters is not None and counters[i].requests and counters[i].updated_ms:
            listing["last_used_at"] = datetime.fromtimestamp(
                counters[i].updated_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"user_id": user_id, "keys": keys}


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


def _limit_of(store: Store, level: str, level_id: str) -> float | None:
    """The level's monthly limit as the request path reads it."""
    try:
        if level == "key":
            ref = find_key(store, level_id)
            if ref.record is None or ref.key_hash is None:
                return None
            return ApiKey.parse(ref.key_hash, ref.record).monthly_limit_usd
        if level == "user":
            record = _load(store, user_config_key(level_id), f"user {level_id}")
            return User.parse(level_id, record).monthly_limit_usd
        record = _load(store, org_config_key(level_id), f"org {level_id}")
        return Org.parse(level_id, record).monthly_budget_usd
    except RecordError as exc:
        raise AdminError(str(exc)) from None


def level_usage(store: Store, level: str, level_id: str, month: str | None = None) -> dict:
    """Usage of one level (user, org or key) in `month` (default: the current UTC month), as
    the request path counts it for the budget: this node's ledger, the other nodes' replicated
    totals and (user and org) the Workers gateway's quota record of that month, each shown
    beside the sum. `remaining_usd` leaves out what requests in flight have reserved."""
    _check_level(level)
    month = month or _current_month()
    limit = _limit_of(store, level, level_id)
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
    }


def reset_quota(store: Store, level: str, level_id: str, reason: str) -> dict:
    """Zero the current month's usage of a level (ledger and Workers quota record) and append an
    audit entry to the config meta `quota_resets`."""
    reason = _check_text(reason, "reason")
    month = _current_month()
    before = level_usage(store, level, level_id, month)
    key = _quota_key(level, level_id)
    if key is not None:
        quota = _json_or_none(store.records.get(key))
        if quota is not None:
            quota.update(
                month_usage_usd=0,
                request_count=0,
                current_month=month,
                last_update=int(utc_now().timestamp() * 1000),
            )
            _write(store, {key: _dump(quota)})
    store.ledger.reset((level, level_id), month)
    entry = {
        "level": level,
        "id": level_id,
        "month": month,
        "reason": reason,
        "previous_usage_usd": before["current_usage_usd"],
        "previous_request_count": before["request_count"],
        "at": now_iso(),
    }
    audit = store.records.meta(QUOTA_RESETS_META)
    store.records.set_meta(QUOTA_RESETS_META, [*(audit if isinstance(audit, list) else []), entry])
    return {
        "level": level,
        "id": level_id,
        "reset": True,
        "previous_usage_usd": before["current_usage_usd"],
        "reason": reason,
        "current_month": month,
    }


# Bulk import / export (wrangler `kv bulk put` JSON)


def _item_value(item: dict) -> bytes:
    value = item["value"]
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":")).encode()
    if not isinstance(value, str):
        raise RecordError(f"value must be a string (or a JSON object), not {type(value).__name__}")
    if item.get("base64") is True:
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise RecordError("value is not valid base64") from None
    return value.encode("utf-8")


def _bulk_item(item: Any) -> tuple[str, bytes]:
    """One wrangler bulk item as (key, value), checked like any record written; RecordError
    naming the key, the field and the reason otherwise."""
    if not isinstance(item, dict):
        raise RecordError("must be an object with key and value")
    key = item.get("key")
    if not isinstance(key, str) or not key:
        raise RecordError(f"key must be a non-empty string, not {type(key).__name__}")
    label = record_label(key)
    if "value" not in item:
        raise RecordError(f"{label}: no value")
    try:
        if len(key.encode("utf-8")) > LMDB_MAX_KEY:
            raise RecordError(f"{label}: key longer than {LMDB_MAX_KEY} bytes")
        raw = _item_value(item)
    except UnicodeError:
        raise RecordError(f"{label}: not valid UTF-8 text") from None
    except RecursionError:
        raise RecordError(f"{label}: nested too deeply") from None
    except RecordError as exc:
        if str(exc).startswith(label):
            raise
        raise RecordError(f"{label}: {exc}") from None
    validate_record(key, raw)
    return key, raw


def parse_bulk(items: Any) -> dict[str, bytes]:
    """Validate a wrangler bulk list `[{"key", "value"}, ...]` into puts; AdminError naming
    the bad items (index, key, field, reason), the first few of them, if any is bad."""
    if not isinstance(items, list):
        raise AdminError("bulk JSON must be an array of {\"key\": ..., \"value\": ...} objects")
    puts: dict[str, bytes] = {}
    problems: list[str] = []
    for index, item in enumerate(items):
        try:
            key, raw = _bulk_item(item)
        except RecordError as exc:
            problems.append(f"item {index}: {exc}")
            continue
        puts[key] = raw
    if problems:
        shown = "; ".join(problems[:3])
        more = f"; and {len(problems) - 3} more bad items" if len(problems) > 3 else ""
        raise AdminError(f"{shown}{more} (nothing imported)")
    return puts


def import_bulk(store: Store, items: Any) -> dict:
    """Validate every item, then write them all in one transaction."""
    puts = parse_bulk(items)
    if puts:
        store.records.write(puts)
    return {"imported": len(puts)}


def export_bulk(store: Store) -> list[dict]:
    """Every record as wrangler bulk JSON items (values are the stored JSON text)."""
    out = []
    for key, raw in store.records.scan(""):
        try:
            out.append({"key": key, "value": raw.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"key": key, "value": base64.b64encode(raw).decode(), "base64": True})
    return out


# Health and demo


INVALID_SHOWN = 20  # invalid records named by `health` (the count is whole)


def invalid_records(store: Store) -> list[dict]:
    """The stored records the request path would refuse ({"key", "reason"}): written before
    records were checked strictly, or by a tool other than aigw straight into the store."""
    out = []
    for key, raw in store.records.scan(""):
        try:
            validate_record(key, raw)
        except RecordError as exc:
            out.append({"key": key, "reason": str(exc).removeprefix(f"{record_label(key)}: ")})
    return out


def health(store: Store) -> dict:
    """What the store holds and whether it answers, and how fresh its replica is; records the
    gateway would refuse are named (it answers their keys with the org's failure mode)."""
    last_sync = store.records.meta("last_sync")
    invalid = invalid_records(store)
    return {
        "ok": True,
        "store": str(store.path),
        "hash": store.hash_algorithm,
        "records": store.records.count(),
        "invalid_records": len(invalid),
        "invalid": invalid[:INVALID_SHOWN],
        "reservations_in_flight": len(store.ledger.reservations()),
        "gateways": store.ledger.gateways(),  # the gateway processes registered on the ledger
        "node_id": (last_sync or {}).get("node_id") or store.node_id(),
        "last_sync": last_sync,
        "last_sync_age_s": None if not last_sync else round(
            time.time() - float(last_sync.get("finished_at", 0)), 1),
    }


def ensure_demo(store: Store) -> dict:
    """Create the demo org, user and key once; the raw key is returned only when created."""
    demo = store.records.meta(DEMO_META)
    if isinstance(demo, dict) and all(
        isinstance(demo.get(f), str) for f in ("org_id", "user_id", "key_id")
    ):
        try:
            _load(store, org_config_key(demo["org_id"]), "org")
            _load(store, user_config_key(demo["user_id"]), "user")
            find_key(store, demo["key_id"])
        except AdminError:
            pass
        else:
            return {"created": False, "org_id": demo["org_id"], "user_id": demo["user_id"],
                    "key_id": demo["key_id"]}
    org = _new_org("Demo Org", 100, FAIL_CLOSED)
    user = _new_user(org["org_id"], "demo@example.com", 20)
    raw = new_gateway_key()
    puts, key = _new_key(store, user["user_id"], org["org_id"], raw, "demo", 5, False)
    puts[org_config_key(org["org_id"])] = _dump(org)
    puts[user_config_key(user["user_id"])] = _dump(user)
    _write(store, puts)
    ids = {"org_id": org["org_id"], "user_id": user["user_id"], "key_id": key["key_id"]}
    store.records.set_meta(DEMO_META, ids)
    return {"created": True, **ids, "api_key": raw}
