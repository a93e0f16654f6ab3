"""Admin operations on orgs, users and keys, over any `AdminTarget`: the local store or the
Cloudflare KV namespace alike."""

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from store.admin_base import (
    DEFAULT_KEY_NAME,
    ISO_FORMAT,
    AdminError,
    Conflict,
    NotFound,
    _check_text,
    _dump,
    _json_or_none,
    _load,
    _redacted,
    _write,
    check_usd,
    new_id,
    now_iso,
)
from store.hashing import looks_like_gateway_key, new_gateway_key
from store.money import month_of, utc_now
from store.records import (
    DEFAULT_FALLBACK_DAILY_LIMIT_USD,
    FAIL_CLOSED,
    MAX_COUNT,
    RATE_FIELDS,
    USER_STATUSES,
    ApiKey,
    RecordError,
    User,
    apikey_key,
    normalize_failure_mode,
    org_config_key,
    user_config_key,
    user_key_listing_key,
)
from store.target import AdminTarget

RateLimits = Mapping[str, int | None]  # rpm_limit, tpm_limit, max_parallel_requests; None: remove
MAX_GRACE_S = 30 * 24 * 3600  # the longest a rotated-out key may keep working


def _set_rates(record: dict, rates: RateLimits | None) -> None:
    """Set (an integer, at least 1) or remove (None) the named rate limits of a record."""
    for name, value in (rates or {}).items():
        if name not in RATE_FIELDS:
            raise AdminError(f"unknown rate limit {name!r} (one of {', '.join(RATE_FIELDS)})")
        if value is None:
            record.pop(name, None)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
            raise AdminError(f"{name} must be a whole number of at least 1, not {value!r}")
        record[name] = value


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
    store: AdminTarget,
    name: str,
    budget_usd: float,
    failure_mode: str = FAIL_CLOSED,
    fallback_daily_limit_usd: float | None = None,
    *,
    allowed_models: Sequence[str] | None = None,
    provider_keys: Mapping[str, str | None] | None = None,
    rates: RateLimits | None = None,
) -> dict:
    """Create `org:{id}:config`; returns the record (provider keys redacted). See
    `update_org` for `allowed_models`, `provider_keys` and `rates`."""
    record = _new_org(name, budget_usd, failure_mode, fallback_daily_limit_usd)
    _set_access(record, allowed_models, provider_keys)
    _set_rates(record, rates)
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
    store: AdminTarget,
    org_id: str,
    *,
    name: str | None = None,
    budget_usd: float | None = None,
    failure_mode: str | None = None,
    fallback_daily_limit_usd: float | None = None,
    allowed_models: Sequence[str] | None = None,
    provider_keys: Mapping[str, str | None] | None = None,
    rates: RateLimits | None = None,
) -> dict:
    """Change the given fields of an org; returns the record (provider keys redacted).
    `allowed_models`: replaces the list (empty: any model); `provider_keys`: sets or (None)
    removes the named providers' credentials, keeping the others; `rates`: sets or (None)
    removes the named rate limits."""
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
    _set_rates(record, rates)
    record["updated_at"] = now_iso()
    _write(store, {key: _dump(record)})
    return _redacted(record)


def show_org(store: AdminTarget, org_id: str) -> dict:
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


def create_user(store: AdminTarget, org_id: str, email: str, limit_usd: float,
                *, rates: RateLimits | None = None) -> dict:
    """Create `user:{id}:config` in an existing org; returns the record."""
    _load(store, org_config_key(org_id), f"org {org_id}")
    record = _new_user(org_id, email, limit_usd)
    _set_rates(record, rates)
    _write(store, {user_config_key(record["user_id"]): _dump(record)})
    return record


def update_user(
    store: AdminTarget, user_id: str, *, limit_usd: float | None = None, status: str | None = None,
    rates: RateLimits | None = None,
) -> dict:
    """Change a user's monthly limit, status and/or rate limits; returns the record."""
    key = user_config_key(user_id)
    record = _load(store, key, f"user {user_id}")
    if limit_usd is not None:
        record["monthly_limit_usd"] = check_usd(limit_usd, "monthly_limit_usd")
    if status is not None:
        if status not in USER_STATUSES:
            raise AdminError(f"status must be one of {', '.join(USER_STATUSES)}, not {status!r}")
        record["status"] = status
    _set_rates(record, rates)
    record["updated_at"] = now_iso()
    _write(store, {key: _dump(record)})
    return record


def show_user(store: AdminTarget, user_id: str) -> dict:
    """The user's config record."""
    return _load(store, user_config_key(user_id), f"user {user_id}")


# Keys


def _new_key(
    store: AdminTarget,
    user_id: str,
    org_id: str | None,
    raw_key: str,
    name: str,
    limit_usd: float | None,
    passthrough: bool,
    rates: RateLimits | None = None,
) -> tuple[dict[str, bytes], dict]:
    limit = None if limit_usd is None else check_usd(limit_usd, "monthly_limit_usd")
    name = _check_text(name, "name")
    key_hash = store.hash(raw_key)
    if store.records.get(apikey_key(key_hash)) is not None:
        raise Conflict("this key is already registered")
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
    _set_rates(record, rates)
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
        **{name: record[name] for name in RATE_FIELDS if name in record},
    }
    return puts, result


def _store_key(
    store: AdminTarget,
    user_id: str,
    raw_key: str,
    name: str,
    limit_usd: float | None,
    passthrough: bool,
    rates: RateLimits | None = None,
) -> dict:
    user = _load(store, user_config_key(user_id), f"user {user_id}")
    try:
        org_id = User.parse(user_id, user).org_id
    except RecordError as exc:
        raise AdminError(str(exc)) from None
    puts, result = _new_key(store, user_id, org_id, raw_key, name, limit_usd, passthrough, rates)
    _write(store, puts)
    return result


def create_key(
    store: AdminTarget, user_id: str, name: str | None = None, limit_usd: float | None = None,
    *, rates: RateLimits | None = None,
) -> dict:
    """Issue a gateway key for a user; the result holds the raw key (`api_key`), shown once."""
    raw = new_gateway_key()
    result = _store_key(store, user_id, raw, name or DEFAULT_KEY_NAME, limit_usd, False, rates)
    return {"key_id": result["key_id"], "api_key": raw, **result}


def register_key(
    store: AdminTarget,
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
    """Where a key's records are: `apikey:{hash}` and/or its `user:{id}:keys:{key_id}` listing,
    and the records of the raw key it replaced by a rotation (`grace`, hash -> record), which
    may still be in their grace period."""

    key_id: str
    key_hash: str | None
    record: dict | None
    listing_key: str | None
    listing: dict | None
    grace: dict[str, dict] = field(default_factory=dict)


def find_key(store: AdminTarget, key_id: str) -> KeyRef:
    """Locate a key by id: via its listing's key_hash (and previous_key_hash), else by scanning
    `apikey:` records, where a record with `expires_at` is a rotated-out one, never the
    current."""
    suffix = f":keys:{key_id}"
    listing_key = listing = None
    for k, v in store.records.scan("user:"):
        if k.endswith(suffix) and k.count(":") == 3:
            listing_key, listing = k, _json_or_none(v) or {}
            break
    key_hash = record = None
    grace: dict[str, dict] = {}
    pointers = [h if isinstance(h := (listing or {}).get(name), str) and h else None
                for name in ("key_hash", "previous_key_hash")]
    found = store.records.get_many(apikey_key(h) for h in pointers if h)
    for is_current, pointer in zip((True, False), pointers, strict=True):
        candidate = _json_or_none(found.get(apikey_key(pointer))) if pointer else None
        if candidate is None or candidate.get("key_id", key_id) != key_id:
            continue
        if is_current and candidate.get("expires_at") is None:
            key_hash, record = pointer, candidate
        elif pointer != key_hash:
            grace[pointer] = candidate
    if record is None:
        for k, v in store.records.scan("apikey:"):
            candidate = _json_or_none(v)
            if candidate is None or candidate.get("key_id") != key_id:
                continue
            if candidate.get("expires_at") is not None:
                grace[k.removeprefix("apikey:")] = candidate
            elif record is None:
                key_hash, record = k.removeprefix("apikey:"), candidate
    if record is not None and listing_key is None:
        user = record.get("user_id") or record.get("user")
        if isinstance(user, dict):
            user = user.get("user_id") or user.get("id")
        if isinstance(user, str) and user:
            candidate_key = user_key_listing_key(user, key_id)
            found_listing = store.records.get(candidate_key)
            if found_listing is not None:
                listing_key, listing = candidate_key, _json_or_none(found_listing) or {}
    if record is None and listing_key is None and not grace:
        raise NotFound(f"unknown key {key_id}")
    return KeyRef(key_id, key_hash, record, listing_key, listing, grace)


def revoke_key(store: AdminTarget, key_id: str) -> dict:
    """Mark a key revoked on its apikey record, the record of a raw key it replaced by a
    rotation (if any), and its listing, in one write."""
    ref = find_key(store, key_id)
    records = {h: r for h, r in ((ref.key_hash, ref.record), *ref.grace.items())
               if h is not None and r is not None}
    already = [*records.values(), *([ref.listing] if ref.listing is not None else [])]
    if all(r.get("status") == "revoked" for r in already):
        revoked_at = next((r["revoked_at"] for r in already if r.get("revoked_at")), None)
        return {"key_id": key_id, "status": "revoked", "revoked_at": revoked_at}
    revoked_at = now_iso()
    puts: dict[str, bytes] = {
        apikey_key(h): _dump({**r, "status": "revoked"}) for h, r in records.items()}
    if ref.listing_key is not None:
        listing = {**(ref.listing or {}), "status": "revoked", "revoked_at": revoked_at}
        puts[ref.listing_key] = _dump(listing)
    _write(store, puts)
    return {"key_id": key_id, "status": "revoked", "revoked_at": revoked_at}


def update_key(store: AdminTarget, key_id: str, *, limit_usd: float | None = None,
               rates: RateLimits | None = None) -> dict:
    """Change a key's monthly limit and/or rate limits on its apikey record (and on the record
    of a raw key it replaced, still in its grace period: the same limits); returns the key's
    fields (never its hash's record in full, never a raw key)."""
    ref = find_key(store, key_id)
    if ref.record is None or ref.key_hash is None:
        raise AdminError(f"key {key_id} has no apikey record to update")
    updated_at = now_iso()

    def changed(found: dict) -> dict:
        record = dict(found)
        if limit_usd is not None:
            record["monthly_limit_usd"] = check_usd(limit_usd, "monthly_limit_usd")
        _set_rates(record, rates)
        record["updated_at"] = updated_at
        return record

    record = changed(ref.record)
    puts = {apikey_key(ref.key_hash): _dump(record)}
    puts.update({apikey_key(h): _dump(changed(r)) for h, r in ref.grace.items()})
    _write(store, puts)
    shown = ("key_id", "user_id", "org_id", "name", "status", "monthly_limit_usd",
             *RATE_FIELDS, "updated_at")
    return {"key_id": key_id, **{k: record[k] for k in shown if k in record}}


def check_grace_s(value: Any) -> float:
    """A rotation's grace period in seconds: a finite number from 0 to 30 days."""
    if isinstance(value, bool):
        raise AdminError(f"grace_s must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise AdminError(f"grace_s must be a number of seconds, not {value!r}") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_GRACE_S:
        raise AdminError(f"grace_s must be from 0 to {MAX_GRACE_S} seconds (30 days), "
                         f"not {value!r}")
    return seconds


def rotate_key(store: AdminTarget, key_id: str, grace_s: float = 0) -> dict:
    """Replace a gateway key's raw key by a new one, shown once in the result (`api_key`): the
    same key_id, owner, name and limits, and so the same usage. The old raw key keeps working
    for `grace_s` seconds (its record gets `expires_at`), or stops at once (0: its record goes).
    One old key at a time: a raw key still in the grace of an earlier rotation stops now. The
    result never holds the old raw key or a hash."""
    grace_s = check_grace_s(grace_s)
    ref = find_key(store, key_id)
    if ref.record is None or ref.key_hash is None:
        raise AdminError(f"key {key_id} has no apikey record to rotate")
    try:
        current = ApiKey.parse(ref.key_hash, ref.record)
    except RecordError as exc:
        raise AdminError(str(exc)) from None
    if current.passthrough:
        raise AdminError(f"key {key_id} is a developer's own provider key (passthrough): there "
                         "is nothing to rotate in aigw; register the new one instead")
    if not current.active or (ref.listing or {}).get("status") == "revoked":
        raise AdminError(f"key {key_id} is revoked: create a new key instead")
    raw = new_gateway_key()
    new_hash = store.hash(raw)
    if store.records.get(apikey_key(new_hash)) is not None:
        raise Conflict("this key is already registered")
    now = utc_now()
    rotated_at = now.strftime(ISO_FORMAT)
    expires_at = None
    if grace_s > 0:  # whole seconds, rounded up: the old key works for at least grace_s
        expires_at = datetime.fromtimestamp(math.ceil(now.timestamp() + grace_s), UTC
                                            ).strftime(ISO_FORMAT)
    record = {k: v for k, v in ref.record.items() if k not in ("expires_at", "revoked_at")}
    record.update(key_hash=new_hash, passthrough=False, rotated_at=rotated_at)
    listing = ref.listing if ref.listing_key is not None else {
        "key_id": key_id, "name": current.name, "created_at": current.created_at,
        "status": "active", "revoked_at": None, "last_used_at": None}
    listing = {**(listing or {}), "key_hash": new_hash, "rotated_at": rotated_at}
    listing.pop("previous_key_hash", None)
    # Without grace the old record goes, but is also written expired in the same write: on KV
    # the deletes follow the puts, and should they fail the old key is refused all the same.
    puts = {apikey_key(new_hash): _dump(record),
            apikey_key(ref.key_hash): _dump({**ref.record, "expires_at": expires_at or rotated_at})}
    deletes = [apikey_key(h) for h in ref.grace]
    if expires_at is None:
        deletes.append(apikey_key(ref.key_hash))
    else:
        listing["previous_key_hash"] = ref.key_hash
    puts[ref.listing_key or user_key_listing_key(current.user_id, key_id)] = _dump(listing)
    _write(store, puts, deletes)
    return {"key_id": key_id, "api_key": raw, "user_id": current.user_id,
            "org_id": current.org_id, "name": current.name,
            "previous_key_expires_at": expires_at, "rotated_at": rotated_at}


def list_keys(store: AdminTarget, user_id: str) -> dict:
    """A user's key listings (never raw keys), each with its own monthly limit and, from this
    node's ledger, when it was last metered this month (`last_used_at`); a key rotated with a
    grace period also shows when its old raw key stops working (`previous_key_expires_at`)."""
    _load(store, user_config_key(user_id), f"user {user_id}")
    prefix = f"user:{user_id}:keys:"
    month = month_of(utc_now())
    keys = [{"key_id": k.removeprefix(prefix), **(_json_or_none(v) or {})}
            for k, v in store.records.scan(prefix)]
    names, previous = ([apikey_key(h) if isinstance(h := k.get(pointer), str) and h else None
                        for k in keys] for pointer in ("key_hash", "previous_key_hash"))
    records = store.records.get_many(name for name in (*names, *previous) if name)
    metered = store.last_metered([k["key_id"] for k in keys], month)
    for i, listing in enumerate(keys):
        record = _json_or_none(records.get(names[i])) if names[i] else None
        if record is not None:
            listing["monthly_limit_usd"] = record.get("monthly_limit_usd")
            listing.update({k: record[k] for k in RATE_FIELDS if k in record})
        old = _json_or_none(records.get(previous[i])) if previous[i] else None
        if old is not None and old.get("key_id", listing["key_id"]) == listing["key_id"]:
            listing["previous_key_expires_at"] = old.get("expires_at")
        if metered[i] is not None:
            listing["last_used_at"] = datetime.fromtimestamp(
                metered[i] / 1000, UTC).strftime(ISO_FORMAT)
    return {"user_id": user_id, "keys": keys}
