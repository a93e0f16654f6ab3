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
