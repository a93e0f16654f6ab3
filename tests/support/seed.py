"""Records for tests, written straight in the Workers gateway's KV layout."""

import json
from dataclasses import dataclass

from store import Store
from store.records import apikey_key, org_config_key, user_config_key


@dataclass
class Seeded:
    org_id: str
    user_id: str
    key_id: str
    api_key: str


def seed(
    store: Store,
    *,
    suffix: str = "1",
    org_budget: float | None = 100.0,
    user_limit: float | None = 20.0,
    key_limit: float | None = None,
    failure_mode: str = "fail_closed",
    fallback_daily_limit: float = 10.0,
    provider_keys: dict | None = None,
    allowed_models: list[str] | None = None,
    key_status: str = "active",
    user_status: str = "active",
    passthrough_key: str | None = None,
    with_org: bool = True,
    rates: dict[str, dict] | None = None,
) -> Seeded:
    """An org, a user and a key (a fake `gw_live_` key, or a registered pass-through key);
    `rates` adds fields per level, e.g. {"key": {"rpm_limit": 3}}."""
    org_id, user_id, key_id = f"org_{suffix}", f"user_{suffix}", f"key_{suffix}"
    api_key = passthrough_key or f"gw_live_{suffix.rjust(32, '0')[-32:]}"
    records = {
        user_config_key(user_id): {
            "user_id": user_id,
            "email": f"{user_id}@example.com",
            "monthly_limit_usd": user_limit,
            "org_id": org_id,
            "status": user_status,
        },
        apikey_key(store.hash(api_key)): {
            "key_id": key_id,
            "user_id": user_id,
            "org_id": org_id,
            "name": "test",
            "status": key_status,
            "monthly_limit_usd": key_limit,
            "passthrough": passthrough_key is not None,
        },
    }
    if with_org:
        records[org_config_key(org_id)] = {
            "org_id": org_id,
            "name": f"Org {suffix}",
            "monthly_budget_usd": org_budget,
            "failure_mode": failure_mode,
            "fallback_daily_limit": fallback_daily_limit,
            "provider_keys": provider_keys or {},
            "allowed_models": allowed_models,
        }
    for level, fields in (rates or {}).items():
        target = {"key": apikey_key(store.hash(api_key)), "user": user_config_key(user_id),
                  "org": org_config_key(org_id)}[level]
        records[target].update(fields)
    store.records.write({k: json.dumps(v).encode() for k, v in records.items()})
    return Seeded(org_id, user_id, key_id, api_key)


def later_gateway_records(
    hash_of, *, suffix: str = "1", key_status: str = "active", key_limit: float = 10.0,
    user_limit: float = 20.0, org_budget: float = 100.0, failure_mode: str = "fail-closed",
    key_quota: dict | None = None, user_org: str | None = None, with_user: bool = True,
) -> tuple[dict[str, bytes | str], str, str]:
    """An org, a user and a virtual key as the later Workers gateway writes them (`vkey:`
    records, `fail-closed`, a 48-hex raw key); `hash_of` hashes the raw key as the namespace
    does. Returns (records by KV key, raw key, key_id); the index is plain text."""
    org_id, user_id = f"org_{suffix}", f"user_{suffix}"
    key_id = f"vkey_1735689600000_{suffix.rjust(6, '0')[-6:]}"
    raw = f"gw_live_{suffix.rjust(48, 'a')[-48:]}"
    key_hash = hash_of(raw)
    records: dict[str, bytes | str] = {
        org_config_key(org_id): json.dumps({
            "org_id": org_id, "name": f"Org {suffix}", "monthly_budget_usd": org_budget,
            "failure_mode": failure_mode, "provider_keys": {},
            "created_at": "2025-01-01T00:00:00.000Z"}),
        f"vkey:{key_hash}:config": json.dumps({
            "key_id": key_id, "key_hash": key_hash, "org_id": org_id, "user": user_id,
            "name": "laptop", "monthly_limit_usd": key_limit, "status": key_status,
            "created_at": "2025-01-01T00:00:00.000Z"}),
        f"vkey:id:{key_id}": key_hash,
    }
    if with_user:
        records[user_config_key(user_id)] = json.dumps({
            "user": user_id, "org_id": user_org or org_id, "monthly_limit_usd": user_limit,
            "created_at": "2025-01-01T00:00:00.000Z"})
    if key_quota is not None:
        records[f"vkey:{key_hash}:quota"] = json.dumps(key_quota)
    return records, raw, key_id


def seed_later_gateway(store: Store, **options) -> tuple[str, str]:
    """`later_gateway_records` written into a local store: (raw key, key_id)."""
    records, raw, key_id = later_gateway_records(store.hash, **options)
    store.records.write({k: v.encode() if isinstance(v, str) else v for k, v in records.items()})
    return raw, key_id
