"""Admin operations on orgs, users and keys, over any `AdminTarget`: the local store or the
Cloudflare KV namespace alike."""

import json
import math
import os
import secrets
import string
import time
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from store.admin_base import (
    DEFAULT_KEY_NAME,
    ISO_FORMAT,
    REDACTED,
    AdminError,
    Conflict,
    NotFound,
    _check_text,
    _dump,
    _json_or_none,
    _load,
    _redacted,
    _write,
    check_number,
    check_usd,
    new_id,
    now_iso,
)
from store.hashing import looks_like_gateway_key, new_gateway_key
from store.money import month_of, utc_now
from store.records import (
    DEFAULT_FALLBACK_DAILY_LIMIT_USD,
    FAIL_CLOSED,
    KEY_LAYOUTS,
    KEY_STATUSES,
    MAX_COUNT,
    RATE_FIELDS,
    USER_STATUSES,
    VKEY_INDEX_PREFIX,
    VKEY_PREFIX,
    ApiKey,
    Org,
    RecordError,
    User,
    VirtualKey,
    apikey_key,
    normalize_failure_mode,
    org_config_key,
    parse_vkey_index,
    user_config_key,
    user_key_listing_key,
    validate_record,
    vkey_config_key,
    vkey_index_key,
    vkey_quota_key,
)
from store.target import AdminTarget

RateLimits = Mapping[str, int | None]  # rpm_limit, tpm_limit, max_parallel_requests; None: remove
MAX_GRACE_S = 30 * 24 * 3600  # the longest a rotated-out key may keep working
RAW_KEY_HEX = {"apikey": 32, "vkey": 48}  # a raw key's hex characters in each layout


def key_layout_of(store: AdminTarget) -> str:
    """The layout new keys are written in: `store.key_layout` when set, else `vkey` when the
    records hold any `vkey:` record (a namespace of the later Workers gateway), else `apikey`."""
    layout = getattr(store, "key_layout", None)
    if layout is None:  # a key config of the later layout, not any stray `vkey:` name
        later = any(name.endswith(":config") and not name.startswith(VKEY_INDEX_PREFIX)
                    for name in store.records.names(VKEY_PREFIX))
        return "vkey" if later else "apikey"
    if layout not in KEY_LAYOUTS:
        raise AdminError(f"store.key_layout must be one of {', '.join(KEY_LAYOUTS)}, "
                         f"not {layout!r}")
    return layout


def new_vkey_id() -> str:
    """A key id as the later Workers gateway makes them: `vkey_{epoch ms}_{6 base36}`."""
    tail = "".join(secrets.choice(string.digits + string.ascii_lowercase) for _ in range(6))
    return f"vkey_{int(time.time() * 1000)}_{tail}"


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
    mode = _failure_mode(failure_mode)
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
    known_providers: Collection[str] | None = None,
) -> dict:
    """Create `org:{id}:config`; returns the record (provider keys redacted). See
    `update_org` for `allowed_models`, `provider_keys`, `rates` and `known_providers`."""
    record = _new_org(name, budget_usd, failure_mode, fallback_daily_limit_usd)
    _set_access(record, allowed_models, provider_keys, known_providers)
    _set_rates(record, rates)
    _write(store, {org_config_key(record["org_id"]): _dump(record)})
    return _redacted(record)


def _set_access(record: dict, allowed_models: Sequence[str] | None,
                provider_keys: Mapping[str, str | None] | None,
                known_providers: Collection[str] | None = None) -> None:
    """`allowed_models`: the models the org may use (empty: any). `provider_keys`: provider
    name (or kind) -> the org's credential, or `env:VAR` for a variable on the gateway hosts;
    None removes one (whatever its name: a typo can be cleaned up). `known_providers`: the names
    and kinds of the configured providers, the only names a credential may be set under (None:
    not checked)."""
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
                continue
            if known_providers is not None and name not in known_providers:
                known = ", ".join(sorted(known_providers)) or "none"
                raise AdminError(f"provider_keys: unknown provider {name!r} (the configured "
                                 f"providers and kinds: {known})")
            ref = _check_text(ref, f"provider_keys.{name}")
            if ref == REDACTED:
                raise AdminError(f"provider_keys.{name}: {REDACTED} is what aigw shows in place "
                                 "of a key, not a key (give the key, or env:VAR)")
            keys[name] = ref
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
    known_providers: Collection[str] | None = None,
) -> dict:
    """Change the given fields of an org; returns the record (provider keys redacted).
    `allowed_models`: replaces the list (empty: any model); `provider_keys`: sets or (None)
    removes the named providers' credentials, keeping the others; `rates`: sets or (None)
    removes the named rate limits; `known_providers`: the provider names and kinds of the
    gateway's configuration, the only names a credential may be set under (None: not checked,
    for a caller without a configuration)."""
    key = org_config_key(org_id)
    record = _load(store, key, f"org {org_id}")
    _stored_valid(Org.parse, org_id, record)
    if name is not None:
        record["name"] = _check_text(name, "name")
    if budget_usd is not None:
        record["monthly_budget_usd"] = check_usd(budget_usd, "monthly_budget_usd")
    if failure_mode is not None:
        record["failure_mode"] = _failure_mode(failure_mode)
    if fallback_daily_limit_usd is not None:
        record["fallback_daily_limit"] = check_usd(
            fallback_daily_limit_usd, "fallback_daily_limit"
        )
    _set_access(record, allowed_models, provider_keys, known_providers)
    _set_rates(record, rates)
    record["updated_at"] = now_iso()
    _write(store, {key: _dump(record)})
    return _redacted(record)


def show_org(store: AdminTarget, org_id: str) -> dict:
    """The org's config record (provider keys redacted)."""
    return _redacted(_load(store, org_config_key(org_id), f"org {org_id}"))


def list_orgs(store: AdminTarget) -> dict:
    """Every org's config record (provider keys redacted), sorted by name then id; a record
    the gateway would refuse is listed with the reason (`invalid`)."""
    orgs = [_listed(key, raw, "org_id", record_id)
            for key, raw, record_id in _configs(store.records.scan("org:"), "org")]
    orgs.sort(key=lambda org: (str(org.get("name") or "").casefold(), org["org_id"]))
    return {"organizations": [_redacted(org) for org in orgs]}


def _configs(items: Iterable[tuple[str, bytes]], kind: str
             ) -> Iterable[tuple[str, bytes, str]]:
    """(key, value, id) of the `{kind}:{id}:config` records among `items`."""
    for key, raw in items:
        parts = key.split(":")
        if len(parts) == 3 and parts[0] == kind and parts[2] == "config" and parts[1]:
            yield key, raw, parts[1]


def _listed(key: str, raw: bytes, id_field: str, record_id: str) -> dict:
    """A stored record as a listing shows it: its id first (the key's), and `invalid` with
    the reason when the request path would refuse it."""
    record = _json_or_none(raw) or {}
    entry = {id_field: record_id, **{k: v for k, v in record.items() if k != id_field}}
    try:
        validate_record(key, raw)
    except RecordError as exc:
        entry["invalid"] = str(exc).removeprefix(f"{key}: ")
    return entry


# Users


def _new_user(org_id: str, email: str, limit_usd: float) -> dict:
    email = _check_text(email, "email", visible=True)
    local, at, domain = email.partition("@")
    if not (local and at and domain) or any(c.isspace() for c in email):
        raise AdminError(f"email must look like name@domain, not {email!r}")
    return {
        "user_id": new_id("user"),
        "email": email,
        "monthly_limit_usd": check_usd(limit_usd, "monthly_limit_usd"),
        "org_id": org_id,
        "status": "active",
        "created_at": now_iso(),
    }


def _email_key(email: object) -> str | None:
    """An email as emails are compared everywhere: stripped, its compatibility forms folded
    (a fullwidth letter is the letter) and case-insensitively."""
    return unicodedata.normalize("NFKC", email).strip().casefold() \
        if isinstance(email, str) else None


def _users(store: AdminTarget) -> list[tuple[str, bytes, str]]:
    """(key, value, id) of every user config record."""
    return list(_configs(store.records.scan("user:"), "user"))


def create_user(store: AdminTarget, org_id: str, email: str, limit_usd: float,
                *, rates: RateLimits | None = None) -> dict:
    """Create `user:{id}:config` in an existing org; returns the record. An email is unique
    within an org (compared case-insensitively): Conflict if a user of the org has it."""
    record = _checked_new_user(store, org_id, email, limit_usd, rates)
    _write(store, {user_config_key(record["user_id"]): _dump(record)})
    return record


def _checked_new_user(store: AdminTarget, org_id: str, email: str, limit_usd: float,
                      rates: RateLimits | None) -> dict:
    """A new user record for an existing org, its email not yet used in the org."""
    _load(store, org_config_key(org_id), f"org {org_id}")
    record = _new_user(org_id, email, limit_usd)
    _email_free(store, org_id, record["email"])
    _set_rates(record, rates)
    return record


def _email_free(store: AdminTarget, org_id: str | None, email: str) -> None:
    """Conflict if a user of the org has this email (compared as `_email_key` does)."""
    wanted = _email_key(email)
    for _key, raw, user_id in _users(store):
        other = _json_or_none(raw) or {}
        if other.get("org_id") == org_id and _email_key(other.get("email")) == wanted:
            raise Conflict(f"email {email!r} is already used by user {user_id} of org {org_id}")


def _stored_valid(parse: Any, record_id: str, record: dict) -> None:
    """AdminError if the stored record is one the gateway refuses: an update would build on
    it (replace it whole with `aigw import`)."""
    try:
        parse(record_id, record)
    except RecordError as exc:
        raise AdminError(f"the stored record is invalid ({exc}); replace it with aigw import"
                         ) from None


def _failure_mode(value: str) -> str:
    """A failure mode as given, in either spelling (`fail_open`, `fail-open`: the later
    Workers gateway reads only the hyphenated one); RecordError's message otherwise."""
    try:
        normalize_failure_mode(value)
    except RecordError as exc:
        raise AdminError(str(exc)) from None
    return value.strip().lower()


def delete_user(store: AdminTarget, user_id: str) -> dict:
    """Delete a user, as the Workers gateway's `DELETE /admin/users/{id}` does: the config and
    quota records, and with them the user's keys (records and listings), which could no longer
    be used (a key of no user gets 401). Usage already metered stays in the ledger."""
    _load(store, user_config_key(user_id), f"user {user_id}")
    prefix = f"user:{user_id}:"
    deletes = [name for name in store.records.names(prefix)]
    key_ids = {name.removeprefix(f"{prefix}keys:") for name in deletes
               if name.startswith(f"{prefix}keys:")}
    for key_id in sorted(key_ids):
        try:
            ref = find_key(store, key_id)
        except NotFound:
            continue
        deletes += [ref.record_key(h) for h in (ref.key_hash, *ref.grace) if h]
    for key_hash, record in _vkey_configs(store):  # the later layout's keys name their user
        if record.get("user") == user_id:  # rotated-out raw keys in their grace too
            deletes += [vkey_config_key(key_hash), vkey_quota_key(key_hash)]
            if isinstance(record.get("key_id"), str):
                key_ids.add(record["key_id"])
                deletes.append(vkey_index_key(record["key_id"]))
    _write(store, {}, list(dict.fromkeys(deletes)))
    return {"user_id": user_id, "deleted": True, "keys_deleted": sorted(key_ids)}


def create_user_with_key(store: AdminTarget, org_id: str, email: str, limit_usd: float,
                         *, rates: RateLimits | None = None) -> dict:
    """A user and a first gateway key (named `default`, no limit of its own) in one write, as
    the Workers gateway's `POST /admin/users` makes them; the raw key is returned this once."""
    user = _checked_new_user(store, org_id, email, limit_usd, rates)
    layout = key_layout_of(store)
    raw = new_gateway_key(RAW_KEY_HEX[layout])
    puts, key = _new_key(store, user["user_id"], org_id, raw, DEFAULT_KEY_NAME, None, False,
                         layout=layout)
    puts[user_config_key(user["user_id"])] = _dump(user)
    _write(store, puts)
    return {"user": user, "api_key": raw, "key_id": key["key_id"]}


def update_user(
    store: AdminTarget, user_id: str, *, limit_usd: float | None = None, status: str | None = None,
    rates: RateLimits | None = None, email: str | None = None,
) -> dict:
    """Change a user's monthly limit, status, rate limits and/or email (still unique within
    the org: Conflict otherwise); returns the record."""
    key = user_config_key(user_id)
    record = _load(store, key, f"user {user_id}")
    _stored_valid(User.parse, user_id, record)
    if email is not None:
        changed = _new_user(record.get("org_id") or "", email, 0)["email"]
        if _email_key(changed) != _email_key(record.get("email")):
            _email_free(store, record.get("org_id"), changed)
        record["email"] = changed
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


def list_users(store: AdminTarget, org_id: str | None = None, email: str | None = None
               ) -> dict:
    """The users' config records, sorted by email then id: those of org `org_id` (NotFound if
    there is no such org) and/or with the email `email` (compared case-insensitively), or all.
    A record the gateway would refuse is listed with the reason (`invalid`)."""
    if org_id is not None:
        org_id = _check_text(org_id, "org_id")
        _load(store, org_config_key(org_id), f"org {org_id}")
    wanted = None if email is None else _email_key(_check_text(email, "email", visible=True))
    users = []
    for key, raw, user_id in _users(store):
        entry = _listed(key, raw, "user_id", user_id)
        if org_id is not None and entry.get("org_id") != org_id:
            continue
        if wanted is not None and _email_key(entry.get("email")) != wanted:
            continue
        users.append(entry)
    users.sort(key=lambda user: (_email_key(user.get("email")) or "", user["user_id"]))
    return {"users": users}


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
    *,
    layout: str = "apikey",
) -> tuple[dict[str, bytes], dict]:
    """The records of a new key in `layout`, and the admin answer (without the raw key)."""
    limit = None if limit_usd is None else check_usd(limit_usd, "monthly_limit_usd")
    name = _check_text(name, "name")
    key_hash = store.hash(raw_key)
    if store.records.get_many([apikey_key(key_hash), vkey_config_key(key_hash)]):
        raise Conflict("this key is already registered")
    if layout == "vkey":
        return _new_vkey(user_id, org_id, key_hash, name, limit, passthrough, rates)
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


def _new_vkey(user_id: str, org_id: str | None, key_hash: str, name: str | None,
              limit: float | None,
              passthrough: bool, rates: RateLimits | None) -> tuple[dict[str, bytes], dict]:
    """A key in the later Workers gateway's layout: `vkey:{hash}:config` and its index
    `vkey:id:{key_id}` (the hash, as plain text). No limit: the field is left out, as the
    later gateway reads a key without one (a null would read as a $0 limit there)."""
    if not org_id:
        raise AdminError(f"user {user_id} has no org_id: a key of the vkey layout names its org")
    key_id = new_vkey_id()
    record: dict[str, Any] = {
        "key_id": key_id, "key_hash": key_hash, "org_id": org_id, "user": user_id,
        "name": name, "monthly_limit_usd": limit, "status": "active", "created_at": now_iso()}
    for field_name in ("monthly_limit_usd", "name"):  # absent, as the later gateway leaves it
        if record[field_name] is None:
            del record[field_name]
    if passthrough:
        record["passthrough"] = True
    _set_rates(record, rates)
    puts = {vkey_config_key(key_hash): _dump(record), vkey_index_key(key_id): key_hash.encode()}
    result = {"key_id": key_id, "user_id": user_id, "org_id": org_id, "name": name,
              "monthly_limit_usd": limit, "status": "active", "created_at": record["created_at"],
              "passthrough": passthrough, "key_layout": "vkey",
              **{name: record[name] for name in RATE_FIELDS if name in record}}
    return puts, result


def _store_key(
    store: AdminTarget,
    user_id: str,
    raw_key: str,
    name: str,
    limit_usd: float | None,
    passthrough: bool,
    rates: RateLimits | None = None,
    layout: str | None = None,
) -> dict:
    user = _load(store, user_config_key(user_id), f"user {user_id}")
    try:
        org_id = User.parse(user_id, user).org_id
    except RecordError as exc:
        raise AdminError(str(exc)) from None
    puts, result = _new_key(store, user_id, org_id, raw_key, name, limit_usd, passthrough, rates,
                            layout=layout or key_layout_of(store))
    _write(store, puts)
    return result


def create_key(
    store: AdminTarget, user_id: str, name: str | None = None, limit_usd: float | None = None,
    *, rates: RateLimits | None = None,
) -> dict:
    """Issue a gateway key for a user, in the store's key layout (`key_layout_of`); the result
    holds the raw key (`api_key`), shown once."""
    layout = key_layout_of(store)
    raw = new_gateway_key(RAW_KEY_HEX[layout])
    result = _store_key(store, user_id, raw, name or DEFAULT_KEY_NAME, limit_usd, False, rates,
                        layout)
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
    """Where a key's records are: `apikey:{hash}` and/or its `user:{id}:keys:{key_id}` listing
    (the first layout), or `vkey:{hash}:config` and its `vkey:id:{key_id}` index (the later
    one); and the records of the raw key it replaced by a rotation (`grace`, hash -> record),
    which may still be in their grace period."""

    key_id: str
    key_hash: str | None
    record: dict | None
    listing_key: str | None
    listing: dict | None
    grace: dict[str, dict] = field(default_factory=dict)
    layout: str = "apikey"

    def record_key(self, key_hash: str) -> str:
        """The record of one of the key's raw keys, in the key's layout."""
        return vkey_config_key(key_hash) if self.layout == "vkey" else apikey_key(key_hash)

    def parsed(self) -> ApiKey:
        """The current record as the request path reads it; AdminError if it would refuse it."""
        if self.record is None or self.key_hash is None:
            raise AdminError(f"key {self.key_id} has no key record")
        try:
            if self.layout == "vkey":
                return VirtualKey.parse(self.key_hash, self.record).as_api_key()
            return ApiKey.parse(self.key_hash, self.record)
        except RecordError as exc:
            raise AdminError(str(exc)) from None


def _find_vkey(store: AdminTarget, key_id: str) -> KeyRef | None:
    """A key of the later layout by its `vkey:id:{key_id}` index, with the record of the raw
    key it replaced (its config's `previous_key_hash`); None if there is no index."""
    index = store.records.get(vkey_index_key(key_id))
    if index is None:
        return None
    try:
        key_hash = parse_vkey_index(key_id, index)
    except RecordError as exc:
        raise AdminError(str(exc)) from None
    record = _json_or_none(store.records.get(vkey_config_key(key_hash)))
    if record is None or record.get("key_id") != key_id:
        raise NotFound(f"unknown key {key_id} (its index names no key record of it)")
    grace: dict[str, dict] = {}
    previous = record.get("previous_key_hash")
    if isinstance(previous, str) and previous and previous != key_hash:
        old = _json_or_none(store.records.get(vkey_config_key(previous)))
        if old is not None and old.get("key_id") == key_id:
            grace[previous] = old
    return KeyRef(key_id, key_hash, record, None, None, grace, "vkey")


def find_key(store: AdminTarget, key_id: str) -> KeyRef:
    """Locate a key by id: in the later layout by its index; else via its listing's key_hash
    (and previous_key_hash), else by scanning `apikey:` records, where a record with
    `expires_at` is a rotated-out one, never the current."""
    later = _find_vkey(store, key_id)
    if later is not None:
        return later
    suffix = f":keys:{key_id}"
    listing_key = listing = None
    # Names first, then the one value: on KV a listing is a call per 1,000 names, where
    # reading every user's values would be a call per 100.
    for k in store.records.names("user:"):
        if k.endswith(suffix) and k.count(":") == 3:
            raw = store.records.get(k)
            if raw is not None:
                listing_key, listing = k, _json_or_none(raw) or {}
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
        unindexed = _scan_vkeys(store, key_id)
        if unindexed is None:
            raise NotFound(f"unknown key {key_id}")
        return unindexed
    return KeyRef(key_id, key_hash, record, listing_key, listing, grace)


def _vkey_configs(store: AdminTarget) -> list[tuple[str, dict]]:
    """Every `vkey:{hash}:config` record as (hash, record), rotated-out ones included."""
    out = []
    for name, raw in store.records.scan(VKEY_PREFIX):
        parts = name.split(":")
        record = _json_or_none(raw) if len(parts) == 3 and parts[2] == "config" \
            and parts[1] != "id" else None
        if record is not None:
            out.append((parts[1], record))
    return out


def _scan_vkeys(store: AdminTarget, key_id: str) -> KeyRef | None:
    """A key of the later layout whose `vkey:id:` index is missing (a namespace written by
    another tool): found by its configs, so it can still be revoked or deleted."""
    key_hash = record = None
    grace: dict[str, dict] = {}
    for found_hash, found in _vkey_configs(store):
        if found.get("key_id") != key_id:
            continue
        if found.get("expires_at") is None and record is None:
            key_hash, record = found_hash, found
        else:
            grace[found_hash] = found
    if record is None and not grace:
        return None
    return KeyRef(key_id, key_hash, record, None, None, grace, "vkey")


def revoke_key(store: AdminTarget, key_id: str) -> dict:
    """Mark a key revoked on its key record (either layout), the record of a raw key it
    replaced by a rotation (if any), and its listing, in one write."""
    ref = find_key(store, key_id)
    records = {h: r for h, r in ((ref.key_hash, ref.record), *ref.grace.items())
               if h is not None and r is not None}
    already = [*records.values(), *([ref.listing] if ref.listing is not None else [])]
    if all(r.get("status") == "revoked" for r in already):
        revoked_at = next((r["revoked_at"] for r in already if r.get("revoked_at")), None)
        return {"key_id": key_id, "status": "revoked", "revoked_at": revoked_at}
    revoked_at = now_iso()
    extra = {"revoked_at": revoked_at} if ref.layout == "vkey" else {}
    puts: dict[str, bytes] = {
        ref.record_key(h): _dump({**r, "status": "revoked", **extra}) for h, r in records.items()}
    if ref.listing_key is not None:
        listing = {**(ref.listing or {}), "status": "revoked", "revoked_at": revoked_at}
        puts[ref.listing_key] = _dump(listing)
    _write(store, puts)
    return {"key_id": key_id, "status": "revoked", "revoked_at": revoked_at}


def update_key(store: AdminTarget, key_id: str, *, limit_usd: float | None = None,
               rates: RateLimits | None = None, name: str | None = None,
               status: str | None = None, user_id: str | None = None) -> dict:
    """Change a key's monthly limit, rate limits and/or name on its key record (and on the
    record of a raw key it replaced, still in its grace period: the same fields; the listing's
    name too); returns the key's fields (never its hash's record in full, never a raw key).
    A key of the later layout may also change `status` (active or revoked, as the later
    gateway's PATCH does) and its user (`user_id`: a user of the key's org)."""
    ref = find_key(store, key_id)
    if ref.record is None or ref.key_hash is None:
        raise AdminError(f"key {key_id} has no key record to update")
    if ref.layout != "vkey" and (status is not None or user_id is not None):
        raise AdminError(f"key {key_id} is in the apikey layout: its user cannot change, and "
                         "`key revoke` revokes it")
    if status is not None and status not in KEY_STATUSES:
        raise AdminError(f"status must be one of {', '.join(KEY_STATUSES)}, not {status!r}")
    if name is not None:
        name = _check_text(name, "name")
    if user_id is not None:
        user_id = _check_text(user_id, "user")
        owner = _load(store, user_config_key(user_id), f"user {user_id}")
        if owner.get("org_id") != ref.record.get("org_id"):
            raise AdminError(f"user: {user_id} is not of the key's org "
                             f"{ref.record.get('org_id')}")
    limit = None if limit_usd is None else check_usd(limit_usd, "monthly_limit_usd")
    updated_at = now_iso()

    def changed(found: dict) -> dict:
        record = dict(found)
        if limit is not None:
            record["monthly_limit_usd"] = limit
        if name is not None:
            record["name"] = name
        if user_id is not None:
            record["user"] = user_id
        if status is not None and status != record.get("status"):
            record["status"] = status
            if status == "revoked":
                record["revoked_at"] = updated_at
            else:
                record.pop("revoked_at", None)
        _set_rates(record, rates)
        record["updated_at"] = updated_at
        return record

    record = changed(ref.record)
    puts = {ref.record_key(ref.key_hash): _dump(record)}
    puts.update({ref.record_key(h): _dump(changed(r)) for h, r in ref.grace.items()})
    if name is not None and ref.listing_key is not None:
        puts[ref.listing_key] = _dump({**(ref.listing or {}), "name": name})
    _write(store, puts)
    shown = ("key_id", "user_id", "user", "org_id", "name", "status", "monthly_limit_usd",
             *RATE_FIELDS, "updated_at")
    return {"key_id": key_id, **{k: record[k] for k in shown if k in record}}


def check_grace_s(value: Any) -> float:
    """A rotation's grace period in seconds: a finite number from 0 to 30 days."""
    return check_number(value, "grace_s", MAX_GRACE_S,
                        f"a number of seconds from 0 to {MAX_GRACE_S} (30 days)")


def rotate_key(store: AdminTarget, key_id: str, grace_s: float = 0) -> dict:
    """Replace a gateway key's raw key by a new one, shown once in the result (`api_key`): the
    same key_id, owner, name and limits, and so the same usage. The old raw key keeps working
    for `grace_s` seconds (its record gets `expires_at`), or stops at once (0: its record goes).
    One old key at a time: a raw key still in the grace of an earlier rotation stops now. The
    result never holds the old raw key or a hash."""
    grace_s = check_grace_s(grace_s)
    ref = find_key(store, key_id)
    if ref.record is None or ref.key_hash is None:
        raise AdminError(f"key {key_id} has no key record to rotate")
    current = ref.parsed()
    if current.passthrough:
        raise AdminError(f"key {key_id} is a developer's own provider key (passthrough): there "
                         "is nothing to rotate in aigw; register the new one instead")
    if not current.active or (ref.listing or {}).get("status") == "revoked":
        raise AdminError(f"key {key_id} is revoked: create a new key instead")
    raw = new_gateway_key(RAW_KEY_HEX[ref.layout])
    new_hash = store.hash(raw)
    if store.records.get_many([apikey_key(new_hash), vkey_config_key(new_hash)]):
        raise Conflict("this key is already registered")
    now = utc_now()
    rotated_at = now.strftime(ISO_FORMAT)
    expires_at = None
    if grace_s > 0:  # whole seconds, rounded up: the old key works for at least grace_s
        expires_at = datetime.fromtimestamp(math.ceil(now.timestamp() + grace_s), UTC
                                            ).strftime(ISO_FORMAT)
    record = {k: v for k, v in ref.record.items() if k not in ("expires_at", "revoked_at")}
    record.update(key_hash=new_hash, passthrough=False, rotated_at=rotated_at)
    answer = {"key_id": key_id, "api_key": raw, "user_id": current.user_id,
              "org_id": current.org_id, "name": current.name,
              "previous_key_expires_at": expires_at, "rotated_at": rotated_at}
    if ref.layout == "vkey":
        _rotate_vkey(store, ref, record, expires_at or rotated_at, grace=expires_at is not None)
        return answer
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
    return answer


def _rotate_vkey(store: AdminTarget, ref: KeyRef, record: dict, expires_at: str, *,
                 grace: bool) -> None:
    """`rotate_key` in the later layout: the new config, the index pointing at it, and the
    key's `vkey:{hash}:quota` (its Workers usage) copied under the new hash, in one write. The
    old config is written expired and, without grace, goes with its quota record; a raw key
    still in an earlier rotation's grace goes now."""
    assert ref.record is not None and ref.key_hash is not None
    old_hash, new_hash = ref.key_hash, record["key_hash"]
    record.pop("previous_key_hash", None)
    if grace:
        record["previous_key_hash"] = old_hash
    puts = {vkey_config_key(new_hash): _dump(record),
            vkey_index_key(ref.key_id): new_hash.encode(),
            vkey_config_key(old_hash): _dump({**ref.record, "expires_at": expires_at})}
    quota = store.records.get(vkey_quota_key(old_hash))
    if quota is not None:
        puts[vkey_quota_key(new_hash)] = quota
    deletes = [name for h in ref.grace for name in (vkey_config_key(h), vkey_quota_key(h))]
    if not grace:
        deletes += [vkey_config_key(old_hash), vkey_quota_key(old_hash)]
    _write(store, puts, deletes)


def delete_key(store: AdminTarget, key_id: str) -> dict:
    """Remove a key of the later layout, as its gateway's DELETE does: its config, its quota
    record and its index (and those of a raw key it replaced, still in its grace), in one
    write. A key of the first layout is revoked, never deleted (its listing keeps its history):
    AdminError."""
    ref = find_key(store, key_id)
    if ref.layout != "vkey" or ref.key_hash is None:
        raise AdminError(f"key {key_id} is in the apikey layout: revoke it instead")
    hashes = [ref.key_hash, *ref.grace]
    deletes = [name for h in hashes for name in (vkey_config_key(h), vkey_quota_key(h))]
    _write(store, {}, [*deletes, vkey_index_key(key_id)])
    return {"key_id": key_id, "deleted": True}


def list_keys(store: AdminTarget, user_id: str | None = None, org_id: str | None = None
              ) -> dict:
    """The keys (never raw keys) of a user, or of an org: the keys of every user of the org, and
    those whose apikey record names the org (`org_id`, else its user's org, as the request path
    charges them). Exactly one of `user_id`, `org_id`. Each key with its own monthly limit and,
    from this node's ledger, when it was last metered this month (`last_used_at`); an org's
    keys also name their user (`user_id`)."""
    if (user_id is None) == (org_id is None):
        raise AdminError("give exactly one of user_id or org_id")
    if user_id is not None:
        _load(store, user_config_key(user_id), f"user {user_id}")
        prefix = f"user:{user_id}:keys:"
        keys = [{"key_id": k.removeprefix(prefix), **(_json_or_none(v) or {})}
                for k, v in store.records.scan(prefix)]
        names = [_apikey_of(k) for k in keys]
        found = store.records.get_many(name for name in names if name)
        later = [(entry, raw) for entry, raw in _vkeys(store) if entry["user_id"] == user_id]
        return {"user_id": user_id, "keys": _with_grace(store, _with_limits(
            store, [*keys, *(entry for entry, _ in later)],
            [*(found.get(n) if n else None for n in names), *(raw for _, raw in later)]))}
    return {"org_id": org_id,
            "keys": _with_grace(store, _org_keys(store, _check_text(org_id, "org_id")))}


def _vkeys(store: AdminTarget) -> list[tuple[dict, bytes]]:
    """Every current key of the later layout (a rotated-out raw key's config left out) as a
    listing shows it, sorted by key id, with its config."""
    out = []
    for key, raw in store.records.scan(VKEY_PREFIX):
        parts = key.split(":")
        record = _json_or_none(raw) if len(parts) == 3 and parts[2] == "config" \
            and parts[1] != "id" else None
        if record is None or record.get("expires_at") is not None:
            continue
        out.append(({"key_id": record.get("key_id"), "key_hash": parts[1],
                     "name": record.get("name", ""), "created_at": record.get("created_at"),
                     "status": record.get("status"), "revoked_at": record.get("revoked_at"),
                     "last_used_at": None, "user_id": record.get("user"),
                     "org_id": record.get("org_id"), "key_layout": "vkey",
                     "previous_key_hash": record.get("previous_key_hash")}, raw))
    out.sort(key=lambda item: str(item[0]["key_id"]))
    return out


def _apikey_of(listing: dict) -> str | None:
    """The apikey record a key listing names by its key_hash, if it does."""
    key_hash = listing.get("key_hash")
    return apikey_key(key_hash) if isinstance(key_hash, str) and key_hash else None


def _org_keys(store: AdminTarget, org_id: str) -> list[dict]:
    """The keys of an org (see `list_keys`), sorted by user then key id, each with its user."""
    _load(store, org_config_key(org_id), f"org {org_id}")
    users: dict[str, dict] = {}
    listings: list[tuple[str, str, dict]] = []
    for key, raw in store.records.scan("user:"):
        parts = key.split(":")
        if len(parts) == 3 and parts[2] == "config":
            users[parts[1]] = _json_or_none(raw) or {}
        elif len(parts) == 4 and parts[2] == "keys":
            listings.append((parts[1], parts[3], _json_or_none(raw) or {}))
    apikeys = dict(store.records.scan("apikey:"))
    by_id: dict[str, bytes] = {}
    charged: list[tuple[str, ApiKey]] = []  # (hash, record) of the keys charged to the org
    for key, raw in apikeys.items():
        key_hash = key.removeprefix("apikey:")
        try:
            record = ApiKey.parse(key_hash, raw)
        except RecordError:
            continue  # the request path refuses it, and charges no org (`aigw health` names it)
        by_id.setdefault(record.key_id, raw)
        owner_org = record.org_id or users.get(record.user_id, {}).get("org_id")
        if owner_org == org_id:
            charged.append((key_hash, record))
    members = {uid for uid, user in users.items() if user.get("org_id") == org_id}
    keys = {key_id: {"key_id": key_id, **listing, "user_id": uid}
            for uid, key_id, listing in listings if uid in members}
    for key_hash, record in charged:
        keys.setdefault(record.key_id, {
            "key_id": record.key_id, "key_hash": key_hash, "name": record.name,
            "created_at": record.created_at, "status": record.status,
            "revoked_at": record.revoked_at, "last_used_at": None, "user_id": record.user_id})
    later: dict[str, bytes] = {}
    for entry, raw in _vkeys(store):  # the later layout's key names its org itself
        if entry["org_id"] == org_id:
            later[entry["key_id"]] = raw
            keys.setdefault(entry["key_id"], entry)
    ordered = sorted(keys.values(), key=lambda k: (str(k["user_id"]), str(k["key_id"])))
    raws = [later[k["key_id"]] if k.get("key_layout") == "vkey"
            else apikeys.get(name) if (name := _apikey_of(k)) else by_id.get(k["key_id"])
            for k in ordered]
    return _with_limits(store, ordered, raws)


def _with_limits(store: AdminTarget, keys: list[dict], records: list[bytes | None]
                 ) -> list[dict]:
    """Key listings with their apikey records' limits (`records`, in the same order) and this
    node's `last_used_at`."""
    metered = store.last_metered([k["key_id"] for k in keys], month_of(utc_now()))
    for listing, raw, last in zip(keys, records, metered, strict=True):
        record = _json_or_none(raw)
        if record is not None:
            listing["monthly_limit_usd"] = record.get("monthly_limit_usd")
            listing.update({k: record[k] for k in RATE_FIELDS if k in record})
        if last is not None:
            listing["last_used_at"] = datetime.fromtimestamp(
                last / 1000, UTC).strftime(ISO_FORMAT)
    return keys


def _with_grace(store: AdminTarget, keys: list[dict]) -> list[dict]:
    """Key listings with, for a key rotated with a grace period, when its old raw key stops
    working (`previous_key_expires_at`)."""
    previous = [(vkey_config_key(h) if k.get("key_layout") == "vkey" else apikey_key(h))
                if isinstance(h := k.get("previous_key_hash"), str) and h else None
                for k in keys]
    records = store.records.get_many(name for name in previous if name)
    for listing, name in zip(keys, previous, strict=True):
        old = _json_or_none(records.get(name)) if name else None
        if old is not None and old.get("key_id", listing["key_id"]) == listing["key_id"]:
            listing["previous_key_expires_at"] = old.get("expires_at")
    return keys


# The later Workers gateway's virtual keys (its /admin/vkeys API)

VKEY_SHOWN = ("key_id", "org_id", "user", "name", "monthly_limit_usd", "status", "created_at")


def shown_vkey(record: dict) -> dict:
    """A virtual key as the later gateway's API shows it (never its hash)."""
    return {name: record[name] for name in VKEY_SHOWN if name in record}


def find_vkey(store: AdminTarget, key_id: str) -> KeyRef:
    """A key of the later layout by its index; NotFound for any other (a first-layout key is
    not a virtual key)."""
    ref = _find_vkey(store, key_id)
    if ref is None:
        raise NotFound(f"Virtual key not found: {key_id}")
    return ref


def create_vkey(store: AdminTarget, org_id: str, user_id: str, name: str | None = None,
                limit_usd: float = 10.0) -> dict:
    """A key in the later layout for a user of an org, as its gateway's `POST /admin/vkeys`
    makes one (NotFound: no such org or user; AdminError: the user is of another org). The
    result holds the raw key (`api_key`), shown once, and the key (`virtual_key`)."""
    org_id, user_id = _check_text(org_id, "org_id"), _check_text(user_id, "user")
    _load(store, org_config_key(org_id), f"org {org_id}")
    user = _load(store, user_config_key(user_id), f"user {user_id}")
    if user.get("org_id") != org_id:
        raise AdminError(f"user: {user_id} does not belong to the organization {org_id}")
    raw = new_gateway_key(RAW_KEY_HEX["vkey"])
    key_hash = store.hash(raw)
    if store.records.get_many([apikey_key(key_hash), vkey_config_key(key_hash)]):
        raise Conflict("this key is already registered")
    puts, _ = _new_vkey(user_id, org_id, key_hash, None if name is None else _check_text(
        name, "name"), check_usd(limit_usd, "monthly_limit_usd"), False, None)
    _write(store, puts)
    return {"virtual_key": shown_vkey(json.loads(puts[vkey_config_key(key_hash)])),
            "api_key": raw}


def list_vkeys(store: AdminTarget, org_id: str | None = None, user_id: str | None = None
               ) -> dict:
    """Every virtual key (the later layout's), of an org and/or a user if given, by key id."""
    keys = [shown_vkey(json.loads(raw)) for entry, raw in _vkeys(store)
            if (org_id is None or entry["org_id"] == org_id)
            and (user_id is None or entry["user_id"] == user_id)]
    return {"virtual_keys": keys}


def count_entities(store: AdminTarget) -> dict:
    """Gateway keys of either layout (each once: by its `vkey:id:` index or its
    `user:{id}:keys:` listing), organizations and users, counted from key names only. The later
    Workers gateway names the keys `virtual_keys`, the first `api_keys`: both are given."""
    user_names = [name.split(":") for name in store.records.names("user:")]
    listings = sum(1 for parts in user_names if len(parts) == 4 and parts[2] == "keys")
    users = sum(1 for parts in user_names if len(parts) == 3 and parts[2] == "config")
    orgs = sum(1 for name in store.records.names("org:") if name.endswith(":config"))
    keys = len(store.records.names(VKEY_INDEX_PREFIX)) + listings
    return {"virtual_keys": keys, "organizations": orgs, "users": users, "api_keys": keys}
