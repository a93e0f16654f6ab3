"""Bulk import and export in wrangler's `kv bulk put` JSON, the store's health, and the demo
account of scripts/run."""

import base64
import binascii
import json
import time
from typing import Any

from store import audit
from store.admin_accounts import _new_key, _new_org, _new_user, find_key
from store.admin_base import (
    DEMO_META,
    REDACTED,
    AdminError,
    _dump,
    _json_or_none,
    _load,
    _write,
    shown_provider_key,
)
from store.db import LMDB_MAX_KEY, Store
from store.hashing import new_gateway_key
from store.records import (
    ADMIN_KEY_PREFIX,
    FAIL_CLOSED,
    RecordError,
    org_config_key,
    record_label,
    user_config_key,
    validate_record,
)

# Bulk import / export (wrangler `kv bulk put` JSON)

ADMIN_ONLY = (audit.AUDIT_PREFIX, ADMIN_KEY_PREFIX)  # not records of the Workers layout


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
    if redacted := redacted_provider_keys(key, raw):
        names = ", ".join(f"provider_keys.{name}" for name in redacted)
        raise RecordError(f"{label}: {names}: {REDACTED}, from `aigw export` without "
                          "--include-secrets (put the key back, or env:VAR, before importing)")
    return key, raw


def _is_org_config(key: str) -> bool:
    parts = key.split(":")
    return len(parts) == 3 and parts[0] == "org" and parts[2] == "config"


def redacted_provider_keys(key: str, raw: bytes) -> list[str]:
    """The providers whose key an org config record holds as `<redacted>` (an export without
    secrets): importing it would break the org's requests to them."""
    if not _is_org_config(key):
        return []
    keys = (_json_or_none(raw) or {}).get("provider_keys")
    return [name for name, ref in keys.items() if ref == REDACTED] if isinstance(keys, dict) \
        else []


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
        store.records.write({**puts, **audit.entry_for(store, puts)})
    return {"imported": len(puts)}


def export_bulk(store: Store, include_secrets: bool = False) -> list[dict]:
    """Every record as wrangler bulk JSON items (values are the stored JSON text; the audit log
    and the admin API's keys stay where they are), literal
    provider keys replaced by `<redacted>` unless `include_secrets` (`env:VAR` references stay:
    they name a variable, they are not keys); `redacted_provider_keys` finds them again, and
    import refuses them."""
    out = []
    for key, raw in store.records.scan(""):
        if key.startswith(ADMIN_ONLY):
            continue
        if not include_secrets:
            raw = _without_secrets(key, raw)
        try:
            out.append({"key": key, "value": raw.decode("utf-8")})
        except UnicodeDecodeError:
            out.append({"key": key, "value": base64.b64encode(raw).decode(), "base64": True})
    return out


def _without_secrets(key: str, raw: bytes) -> bytes:
    """An org config record with its literal provider keys redacted (others as they are)."""
    if not _is_org_config(key):
        return raw
    record = _json_or_none(raw)
    keys = record.get("provider_keys") if record is not None else None
    if not isinstance(keys, dict):
        return raw
    shown = {name: shown_provider_key(ref) for name, ref in keys.items()}
    return raw if shown == keys else _dump({**record, "provider_keys": shown})


def count_redacted(items: list[dict]) -> int:
    """How many provider keys of a bulk export read `<redacted>`."""
    return sum(len(redacted_provider_keys(item["key"], item["value"].encode()))
               for item in items if not item.get("base64"))


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
    later = {name.split(":")[1] for name in store.records.names("vkey:")
             if name.endswith(":config")}
    for name in store.records.names("apikey:"):
        if name.removeprefix("apikey:") in later:
            out.append({"key": record_label(name), "reason": "the same key is also a vkey:"
                        "{hash}:config record: the gateway refuses it (401) until one goes"})
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
