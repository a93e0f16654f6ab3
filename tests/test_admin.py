import hashlib
import json
from datetime import UTC, datetime

import pytest

from store import admin
from store.audit import audited, entries
from store.db import Store
from store.hashing import hash_key
from store.money import USD, month_of, utc_now
from store.records import (
    ApiKey,
    apikey_key,
    org_config_key,
    org_quota_key,
    user_config_key,
    user_key_listing_key,
    user_quota_key,
)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as s:
        yield s


@pytest.fixture
def org(store):
    return admin.create_org(store, "Acme", 100)


@pytest.fixture
def user(store, org):
    return admin.create_user(store, org["org_id"], "dev@example.com", 20)


def month() -> str:
    return month_of(utc_now())


def test_org_create_update_show(store):
    org = admin.create_org(store, "Acme", 100, "fail-open", 3)
    assert org["org_id"].startswith("org_") and len(org["org_id"]) == 16
    assert org["failure_mode"] == "fail-open"  # as spelt: each Workers version reads its own
    assert org["monthly_budget_usd"] == 100.0 and org["fallback_daily_limit"] == 3.0
    assert org["created_at"].endswith("Z")
    assert store.records.get_json(org_config_key(org["org_id"])) == org

    updated = admin.update_org(store, org["org_id"], budget_usd=50, failure_mode="fail_closed")
    assert updated["monthly_budget_usd"] == 50.0 and updated["failure_mode"] == "fail_closed"
    assert updated["name"] == "Acme"
    assert admin.show_org(store, org["org_id"]) == updated


def test_org_defaults_and_validation(store):
    org = admin.create_org(store, "Acme", 0)
    assert org["failure_mode"] == "fail_closed" and org["fallback_daily_limit"] == 10.0
    with pytest.raises(admin.AdminError):
        admin.create_org(store, "Acme", -1)
    with pytest.raises(admin.AdminError):
        admin.create_org(store, "Acme", float("inf"))
    with pytest.raises(admin.AdminError):
        admin.create_org(store, "Acme", 1, "sometimes")
    with pytest.raises(admin.AdminError, match="unknown org"):
        admin.show_org(store, "org_missing")


def test_show_org_redacts_provider_keys(store):
    record = {"org_id": "o1", "name": "Old", "monthly_budget_usd": 5, "failure_mode": "fail-open",
              "provider_keys": {"openai": "sk-secret"}}
    store.records.write({org_config_key("o1"): json.dumps(record).encode()})
    assert admin.show_org(store, "o1")["provider_keys"] == {"openai": "<redacted>"}


def test_user_create_update_show(store, org):
    user = admin.create_user(store, org["org_id"], "dev@example.com", 20)
    assert user["user_id"].startswith("user_")
    assert user["status"] == "active" and user["org_id"] == org["org_id"]
    assert user["monthly_limit_usd"] == 20.0
    updated = admin.update_user(store, user["user_id"], limit_usd=30, status="suspended")
    assert updated["monthly_limit_usd"] == 30.0 and updated["status"] == "suspended"
    assert admin.show_user(store, user["user_id"]) == updated
    with pytest.raises(admin.AdminError, match="unknown org"):
        admin.create_user(store, "org_missing", "x@example.com", 1)
    with pytest.raises(admin.AdminError):
        admin.create_user(store, org["org_id"], "not-an-email", 1)
    with pytest.raises(admin.AdminError):
        admin.update_user(store, user["user_id"], status="deleted")


def test_key_hashes_match_the_published_vectors():
    # BLAKE3's and SHA-256's digests of the empty input, as their specifications publish them:
    # the Workers gateway's records are found under these hex digests.
    assert hash_key("") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert hash_key("", "sha256") == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


def test_key_create_stores_only_the_hash(store, user):
    key = admin.create_key(store, user["user_id"], "laptop", 5)
    raw = key["api_key"]
    assert raw.startswith("gw_live_") and len(raw) == len("gw_live_") + 32
    assert key["key_id"].startswith("key_") and key["org_id"] == user["org_id"]
    key_hash = hash_key(raw, "blake3")
    record = store.records.get_json(apikey_key(key_hash))
    assert record["key_id"] == key["key_id"] and record["key_hash"] == key_hash
    assert record["passthrough"] is False and record["monthly_limit_usd"] == 5.0
    listing = store.records.get_json(user_key_listing_key(user["user_id"], key["key_id"]))
    assert listing == {"key_id": key["key_id"], "key_hash": key_hash, "name": "laptop",
                       "created_at": key["created_at"], "status": "active",
                       "revoked_at": None, "last_used_at": None}
    dump = json.dumps(admin.export_bulk(store))
    assert raw not in dump
    assert store.records.resolve(key_hash).key.active
    no_limit = admin.create_key(store, user["user_id"])
    assert no_limit["monthly_limit_usd"] is None and no_limit["name"] == "default"


def test_key_create_uses_the_store_hash(tmp_path):
    with Store(tmp_path / "sha", hash_algorithm="sha256") as store:
        org = admin.create_org(store, "Acme", 1)
        u = admin.create_user(store, org["org_id"], "a@example.com", 1)
        key = admin.create_key(store, u["user_id"])
        digest = hashlib.sha256(key["api_key"].encode()).hexdigest()
        assert store.records.get(apikey_key(digest)) is not None


def test_register_reads_env_and_marks_passthrough(store, user, monkeypatch):
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-proj-abc123")
    result = admin.register_key(store, user["user_id"], "own", "MY_OPENAI_KEY", 7)
    assert "api_key" not in result and result["name"] == "own"
    assert "sk-proj-abc123" not in json.dumps(result)
    record = store.records.get_json(apikey_key(hash_key("sk-proj-abc123")))
    assert record["passthrough"] is True and record["monthly_limit_usd"] == 7.0
    assert ApiKey.parse("h", record).passthrough
    with pytest.raises(admin.AdminError, match="already registered"):
        admin.register_key(store, user["user_id"], "again", "MY_OPENAI_KEY")
    monkeypatch.delenv("MY_OPENAI_KEY")
    with pytest.raises(admin.AdminError, match="MY_OPENAI_KEY is not set"):
        admin.register_key(store, user["user_id"], "own", "MY_OPENAI_KEY")
    monkeypatch.setenv("EMPTY_KEY", "")
    with pytest.raises(admin.AdminError):
        admin.register_key(store, user["user_id"], "own", "EMPTY_KEY")


def test_revoke_and_list(store, user):
    key = admin.create_key(store, user["user_id"], "k")
    result = admin.revoke_key(store, key["key_id"])
    assert result["status"] == "revoked" and result["revoked_at"]
    key_hash = hash_key(key["api_key"])
    assert store.records.get_json(apikey_key(key_hash))["status"] == "revoked"
    assert not store.records.resolve(key_hash).key.active
    listed = admin.list_keys(store, user["user_id"])
    assert listed["user_id"] == user["user_id"]
    assert [(k["key_id"], k["status"]) for k in listed["keys"]] == [(key["key_id"], "revoked")]
    assert admin.revoke_key(store, key["key_id"]) == result
    with pytest.raises(admin.AdminError, match="unknown key"):
        admin.revoke_key(store, "key_missing")


def test_revoke_workers_listing_without_key_hash(store):
    key_hash = hashlib.sha256(b"gw_live_" + b"0" * 32).hexdigest()
    store.records.write({
        apikey_key(key_hash): json.dumps({"user_id": "u1", "key_id": "k1", "name": "old",
                                          "status": "active"}).encode(),
        user_key_listing_key("u1", "k1"): json.dumps({"name": "old", "status": "active",
                                                      "revoked_at": None}).encode(),
    })
    admin.revoke_key(store, "k1")
    assert store.records.get_json(apikey_key(key_hash))["status"] == "revoked"
    listing = store.records.get_json(user_key_listing_key("u1", "k1"))
    assert listing["status"] == "revoked" and listing["revoked_at"]


def test_usage_adds_ledger_and_current_month_quota(store, org, user):
    uid, oid = user["user_id"], org["org_id"]
    key = admin.create_key(store, uid, limit_usd=5)
    this_month = month()
    levels = [("key", key["key_id"]), ("user", uid), ("org", oid)]
    store.ledger.settle(None, levels, this_month, 2 * USD)
    store.ledger.settle(None, levels, "2001-01", 50 * USD)
    store.records.write({
        user_quota_key(uid): json.dumps({"month_usage_usd": 1.5, "current_month": this_month,
                                         "request_count": 3}).encode(),
        org_quota_key(oid): json.dumps({"month_usage_usd": 40, "current_month": "2001-01",
                                        "request_count": 9}).encode(),
    })
    u = admin.level_usage(store, "user", uid, this_month)
    assert u == {"level": "user", "id": uid, "current_usage_usd": 3.5, "this_node_usd": 2.0,
                 "other_nodes_usd": 0.0, "quota_record_usd": 1.5, "request_count": 4,
                 "this_node_requests": 1, "other_nodes_requests": 0, "quota_record_requests": 3,
                 "monthly_limit_usd": 20.0, "remaining_usd": 16.5, "reserved_usd": 0.0,
                 "current_month": this_month}
    o = admin.level_usage(store, "org", oid)
    assert o["current_usage_usd"] == 2.0 and o["request_count"] == 1
    assert o["monthly_budget_usd"] == 100.0 and "monthly_limit_usd" not in o
    k = admin.level_usage(store, "key", key["key_id"])
    assert k["current_usage_usd"] == 2.0 and k["remaining_usd"] == 3.0
    old = admin.level_usage(store, "user", uid, "2001-01")
    assert old["current_usage_usd"] == 50.0 and old["remaining_usd"] == 0.0


def test_usage_reports_reservations_and_no_limit(store, user):
    key = admin.create_key(store, user["user_id"])
    store.ledger.reserve("r1", [("key", key["key_id"])], month(), USD // 4,
                         lambda counters: None)
    k = admin.level_usage(store, "key", key["key_id"])
    assert k["reserved_usd"] == 0.25 and k["remaining_usd"] is None
    assert k["monthly_limit_usd"] is None


def test_usage_unknown_ids(store):
    for level in admin.LEVELS:
        with pytest.raises(admin.AdminError, match="unknown"):
            admin.level_usage(store, level, "missing")
    with pytest.raises(admin.AdminError):
        admin.level_usage(store, "team", "x")


def test_reset_zeroes_ledger_and_quota_and_audits(store, user):
    uid = user["user_id"]
    this_month = month()
    store.ledger.settle(None, [("user", uid)], this_month, 3 * USD)
    store.records.write({user_quota_key(uid): json.dumps({
        "month_usage_usd": 1, "current_month": this_month, "request_count": 2,
        "last_update": 1}).encode()})
    result = admin.reset_quota(store, "user", uid, "new project")
    assert result == {"level": "user", "id": uid, "reset": True, "previous_usage_usd": 4.0,
                      "reason": "new project", "current_month": this_month}
    after = admin.level_usage(store, "user", uid)
    assert after["current_usage_usd"] == 0.0 and after["request_count"] == 0
    quota = store.records.get_json(user_quota_key(uid))
    assert quota["month_usage_usd"] == 0 and quota["request_count"] == 0
    with audited("cli:tester", "quota reset"):
        admin.reset_quota(store, "user", uid, "again")
        admin.reset_quota(store, "org", user["org_id"], "no quota record")
    again, org_reset = entries(store)["entries"]
    assert again["actor"] == "cli:tester" and again["action"] == "quota reset"
    assert again["details"]["quota_reset"]["reason"] == "again"
    assert again["details"]["quota_reset"]["previous_usage_usd"] == 0.0
    (change,) = again["changes"]
    assert change["key"] == user_quota_key(uid) and change["after"]["month_usage_usd"] == 0
    assert org_reset["changes"] == [] and org_reset["details"]["quota_reset"]["level"] == "org"
    with pytest.raises(admin.AdminError):
        admin.reset_quota(store, "user", uid, " ")


def test_reset_key_level(store, user):
    key = admin.create_key(store, user["user_id"], limit_usd=1)
    store.ledger.settle(None, [("key", key["key_id"])], month(), USD)
    result = admin.reset_quota(store, "key", key["key_id"], "limit raised")
    assert result["previous_usage_usd"] == 1.0
    assert admin.level_usage(store, "key", key["key_id"])["remaining_usd"] == 1.0
    with pytest.raises(admin.AdminError, match="unknown key"):
        admin.reset_quota(store, "key", "key_missing", "x")


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ({"key": "x"}, "array"),
        ([{"key": "ok", "value": "1"}, "nope"], "item 1"),
        ([{"key": "", "value": "1"}], "item 0"),
        ([{"key": "k"}], "no value"),
        ([{"key": "k", "value": 5}], "item 0"),
        ([{"key": "x" * 512, "value": "1"}], "511"),
        ([{"key": "ok", "value": "{}"}, {"key": "org:o:config", "value": "{bad"}],
         "item 1: org:o:config: not valid JSON"),
        ([{"key": "org:o:config", "value": {"failure_mode": "maybe"}}], "failure_mode"),
        ([{"key": "user:u:config", "value": {"monthly_limit_usd": "lots"}}], "monthly_limit"),
        ([{"key": "apikey:abc", "value": {"name": "no user"}}], "user_id: missing"),
        ([{"key": "user:u:quota", "value": "[]"}], "object"),
    ],
)
def test_import_rejects_bad_items_and_writes_nothing(store, items, match):
    with pytest.raises(admin.AdminError, match=match):
        admin.import_bulk(store, items)
    assert store.records.scan("") == []


def test_import_accepts_objects_and_strings(store):
    items = [
        {"key": "org:o1:config", "value": {"name": "Old", "monthly_budget_usd": 10,
                                           "failure_mode": "fail-open"}},
        {"key": "user:u1:config", "value": json.dumps({"email": "a@b.c", "org_id": "o1",
                                                       "monthly_limit_usd": 1})},
        {"key": "misc", "value": "plain text", "expiration_ttl": 60},
    ]
    assert admin.import_bulk(store, items) == {"imported": 3}
    assert store.records.get_json("org:o1:config")["failure_mode"] == "fail-open"
    assert store.records.get("misc") == b"plain text"
    assert admin.show_user(store, "u1")["email"] == "a@b.c"


def test_export_import_round_trip(tmp_path, store, user):
    admin.create_key(store, user["user_id"], "k", 1)
    store.records.write({user_quota_key(user["user_id"]): b'{"month_usage_usd": 0.5}'})
    dump = admin.export_bulk(store)
    assert all(set(item) == {"key", "value"} and isinstance(item["value"], str) for item in dump)
    text = json.dumps(dump)
    with Store(tmp_path / "other") as other:
        assert admin.import_bulk(other, json.loads(text)) == {"imported": len(dump)}
        assert other.records.scan("") == store.records.scan("")
        assert admin.export_bulk(other) == dump


def test_health(store):
    result = admin.health(store)
    assert result["ok"] is True and result["hash"] == "blake3"
    assert result["records"]["orgs"] == 0 and result["reservations_in_flight"] == 0
    assert result["node_id"].startswith("node_") and result["last_sync"] is None
    assert (result["invalid_records"], result["invalid"]) == (0, [])


def test_health_names_stored_records_the_gateway_would_refuse(store, user):
    # As an older aigw imported them, or another tool wrote them into the store.
    store.records.write({
        "org:o1:config": b'{"monthly_budget_usd": "100"}',
        f"apikey:{HASH}": b'{"user_id": "u1", "passthrough": "false"}',
        "misc": b"anything",
    })
    result = admin.health(store)
    assert result["invalid_records"] == 2
    assert sorted(result["invalid"], key=lambda r: r["key"]) == [
        {"key": f"apikey:{HASH}", "reason": 'passthrough: expected a boolean, got "false"'},
        {"key": "org:o1:config",
         "reason": 'monthly_budget_usd: expected a number or null, got "100"'}]


def test_demo_is_idempotent(store):
    first = admin.ensure_demo(store)
    assert first["created"] is True and first["api_key"].startswith("gw_live_")
    identity = store.records.resolve(store.hash(first["api_key"]))
    assert identity.org.name == "Demo Org" and identity.org.monthly_budget_usd == 100
    assert identity.org.failure_mode == "fail_closed"
    assert identity.user.email == "demo@example.com" and identity.user.monthly_limit_usd == 20
    assert identity.key.name == "demo" and identity.key.monthly_limit_usd == 5
    second = admin.ensure_demo(store)
    assert second == {"created": False, "org_id": first["org_id"],
                      "user_id": first["user_id"], "key_id": first["key_id"]}
    assert store.records.count()["orgs"] == 1
    store.records.write({}, [user_config_key(first["user_id"])])
    assert admin.ensure_demo(store)["created"] is True


def test_key_list_shows_each_keys_limit_and_when_this_node_last_metered_it(store, user):
    used = admin.create_key(store, user["user_id"], "used", 5)
    idle = admin.create_key(store, user["user_id"], "idle")
    before = utc_now().replace(microsecond=0)
    store.ledger.settle(None, [("key", used["key_id"])], month(), USD // 100)
    listed = {k["key_id"]: k for k in admin.list_keys(store, user["user_id"])["keys"]}
    assert listed[used["key_id"]]["monthly_limit_usd"] == 5
    assert listed[idle["key_id"]]["monthly_limit_usd"] is None
    assert listed[idle["key_id"]]["last_used_at"] is None
    last = datetime.strptime(listed[used["key_id"]]["last_used_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert before <= last.replace(tzinfo=UTC) <= utc_now()


HASH = "ab12" * 16


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("user:u:quota", '{"month_usage_usd": 1, "current_month": "2026-01", '
                         '"request_count": "1.5"}', 'request_count: expected an integer, got "1.5"'),
        ("org:o:quota", '{"current_month": "2026-01", "request_count": 1.5}',
         "request_count: expected an integer, got 1.5"),
        (f"apikey:{HASH}", '{"user_id": "u", "passthrough": "false"}',
         'apikey:ab12ab12ab12...: passthrough: expected a boolean, got "false"'),
        ("org:o:config", '{"monthly_budget_usd": "inf"}', "monthly_budget_usd: expected a number"),
        ("org:o:config", '{"monthly_budget_usd": 1e400}', "monthly_budget_usd: expected a finite"),
        ("org:o:config", '{"monthly_budget_usd": "100"}', "monthly_budget_usd: expected a number"),
        ("user:u:config", '{"monthly_limit_usd": -0.5}', "monthly_limit_usd: expected a non-neg"),
        ("user:u:config", '{"status": "paused"}', 'status: expected one of active, suspended'),
        ("user:u:config", '{"status": "Active"}', 'got "Active"'),
        (f"apikey:{HASH}", '{"user_id": "u", "status": "Revoked"}', "status: expected one of"),
        ("org:o:config", '{"failure_mode": "FAIL_OPEN"}', "failure_mode: expected one of"),
        ("org:o:config", '{"allowed_models": ["gpt-4o", 5]}', "allowed_models[1]: expected a str"),
        ("org:o:config", '{"org_id": "o2"}', 'org_id: "o2" is not the id the key names'),
        ("user:u:keys:k", '{"status": "gone"}', "user:u:keys:k: status: expected one of"),
        ("user:u:quota", '{"current_month": "2026-13"}', "current_month: expected a month"),
    ],
)
def test_import_refuses_a_bad_record_naming_key_field_and_reason(store, key, value, reason):
    items = [{"key": "org:fine:config", "value": '{"name": "Fine"}'},
             {"key": key, "value": value}]
    with pytest.raises(admin.AdminError) as caught:
        admin.import_bulk(store, items)
    message = str(caught.value)
    assert reason in message and message.startswith("item 1: ")
    assert key.split(":")[0] in message and "nothing imported" in message
    assert store.records.scan("") == []


def test_import_errors_never_show_a_credential(store):
    provider_key = "sk-proj-" + "Q" * 40
    gateway_key = "gw_live_" + "9" * 32
    items = [
        {"key": "org:o:config", "value": json.dumps({"provider_keys": provider_key})},
        {"key": "org:p:config", "value": json.dumps({"provider_keys": {"openai": 7},
                                                     "name": provider_key})},
        {"key": f"apikey:{HASH}", "value": json.dumps({"user_id": "u",
                                                       "passthrough": gateway_key})},
        {"key": "user:u:config", "value": json.dumps({"status": provider_key[:20]})},
    ]
    with pytest.raises(admin.AdminError) as caught:
        admin.import_bulk(store, items)
    message = str(caught.value)
    assert "item 0: org:o:config: provider_keys: expected an object, got a string" in message
    assert "provider_keys (a value): expected a string" in message
    assert "passthrough: expected a boolean, got a string of 40 characters" in message
    assert "1 more bad items" in message
    assert provider_key[:12] not in message and "gw_live_" not in message
    assert HASH not in message


def test_a_valid_namespace_of_both_workers_versions_imports_unchanged(store):
    items = [
        {"key": "org:o1:config", "value": json.dumps({
            "org_id": "o1", "name": "Old", "monthly_budget_usd": 500, "failure_mode": "fail_closed",
            "fallback_daily_limit": 10, "provider_keys": {"openai": "sk-org"},
            "created_at": "2024-03-01T10:00:00Z", "some_future_field": [1, {"x": None}]})},
        {"key": "org:o2:config", "value": json.dumps({
            "org_id": "o2", "name": "New", "monthly_budget_usd": 80.5,
            "failure_mode": "fail-open", "fallback_daily_limit": 5})},
        {"key": "org:o1:quota", "value": json.dumps({
            "month_usage_usd": 120.5, "current_month": "2026-11", "request_count": 40,
            "last_update": 1_717_000_000_000})},
        {"key": "user:u1:config", "value": json.dumps({
            "user_id": "u1", "email": "a@b.c", "monthly_limit_usd": 50, "org_id": "o1",
            "status": "active", "created_at": "2024-03-01T10:00:00Z",
            "updated_at": "2024-03-02T10:00:00Z"})},
        {"key": "user:u1:quota", "value": json.dumps({
            "month_usage_usd": 0, "current_month": "2026-11", "request_count": 0,
            "last_update": 1_717_000_000_000})},
        {"key": f"apikey:{HASH}", "value": json.dumps({
            "user_id": "u1", "key_id": "k1", "name": "laptop", "status": "active",
            "created_at": "2024-03-01T10:00:00Z"})},
        {"key": "apikey:" + "cd" * 32, "value": json.dumps({
            "key_id": "k2", "key_hash": "cd" * 32, "org_id": "o2",
            "user": {"user_id": "u1", "email": "a@b.c"}, "name": "ci",
            "monthly_limit_usd": 5, "status": "revoked", "created_at": "2025-01-02T00:00:00Z"})},
        {"key": "user:u1:keys:k1", "value": json.dumps({
            "name": "laptop", "created_at": "2024-03-01T10:00:00Z", "last_used_at": None,
            "status": "active", "revoked_at": None})},
    ]
    assert admin.import_bulk(store, items) == {"imported": len(items)}
    assert admin.export_bulk(store, include_secrets=True) == sorted(
        items, key=lambda item: item["key"])


def test_admin_writers_refuse_what_the_request_path_would_refuse(store, org, user):
    bad = {**admin.show_user(store, user["user_id"]), "status": "Active"}
    store.records.write({user_config_key(user["user_id"]): json.dumps(bad).encode()})
    with pytest.raises(admin.AdminError, match="status: expected one of active, suspended"):
        admin.update_user(store, user["user_id"], limit_usd=3)
    assert admin.show_user(store, user["user_id"])["monthly_limit_usd"] == 20.0
    store.records.write({org_quota_key(org["org_id"]): b'{"request_count": "2"}'})
    with pytest.raises(admin.AdminError, match="request_count: expected an integer"):
        admin.reset_quota(store, "org", org["org_id"], "why")


def test_usage_counts_what_the_request_path_counts_with_the_parts(store, org, user):
    from addon.policy import budgets_of

    uid, oid = user["user_id"], org["org_id"]
    key = admin.create_key(store, uid, limit_usd=5)
    this_month = month()
    levels = [("key", key["key_id"]), ("user", uid), ("org", oid)]
    store.ledger.settle(None, levels, this_month, USD)
    # Another node's totals, as a sync pass replicates them, and the Workers' quota records.
    store.records.replicate(
        {user_quota_key(uid): json.dumps({"month_usage_usd": 0.25, "current_month": this_month,
                                          "request_count": 2}).encode(),
         org_quota_key(oid): json.dumps({"month_usage_usd": 10, "current_month": this_month,
                                         "request_count": 8}).encode()},
        [], {},
        {(this_month, "key", key["key_id"]): (2 * USD, 3), (this_month, "user", uid): (3 * USD, 4),
         (this_month, "org", oid): (30 * USD, 20), ("2001-01", "org", oid): (99 * USD, 1)},
        {"finished_at": 0})
    identity = store.records.resolve(store.hash(key["api_key"]), this_month)
    budgets = budgets_of(identity, this_month)
    counters = store.ledger.counters([b.ledger_level for b in budgets], this_month)
    for budget, counter in zip(budgets, counters, strict=True):
        usage = admin.level_usage(store, budget.level, budget.id)
        assert from_nusd(counter.used_nusd + budget.external_nusd) == usage["current_usage_usd"]
        assert counter.requests + budget.external_requests == usage["request_count"]
        assert usage["this_node_usd"] == 1.0 and usage["this_node_requests"] == 1
    k = admin.level_usage(store, "key", key["key_id"])
    assert (k["other_nodes_usd"], k["quota_record_usd"], k["current_usage_usd"]) == (2.0, 0, 3.0)
    assert k["remaining_usd"] == 2.0 and k["request_count"] == 4
    u = admin.level_usage(store, "user", uid)
    assert (u["other_nodes_usd"], u["quota_record_usd"], u["current_usage_usd"]) == (
        3.0, 0.25, 4.25)
    assert (u["other_nodes_requests"], u["quota_record_requests"]) == (4, 2)
    o = admin.level_usage(store, "org", oid)
    assert (o["other_nodes_usd"], o["quota_record_usd"], o["current_usage_usd"]) == (
        30.0, 10.0, 41.0)
    assert o["remaining_usd"] == 59.0 and o["request_count"] == 29
    assert admin.level_usage(store, "org", oid, "2001-01")["other_nodes_usd"] == 99.0


def test_usage_remaining_leaves_out_what_is_reserved(store, user):
    key = admin.create_key(store, user["user_id"], limit_usd=1)
    store.ledger.reserve("r1", [("key", key["key_id"])], month(), USD // 4,
                         lambda counters: None)
    k = admin.level_usage(store, "key", key["key_id"])
    assert k["reserved_usd"] == 0.25 and k["remaining_usd"] == 0.75


def from_nusd(nusd: int) -> float:
    return round(nusd / USD, 9)


class MemoryRecords:
    """Records in a dict: the smallest thing that answers `store.target.RecordOps`."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def get_json(self, key: str) -> dict | None:
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def get_many(self, keys) -> dict[str, bytes]:
        return {k: self.data[k] for k in keys if k in self.data}

    def names(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.data if k.startswith(prefix))

    def scan(self, prefix: str = "") -> list[tuple[str, bytes]]:
        return sorted((k, v) for k, v in self.data.items() if k.startswith(prefix))

    def write(self, puts: dict[str, bytes], deletes=()) -> None:
        self.data.update(puts)
        for k in deletes:
            self.data.pop(k, None)


class MemoryTarget:
    hash_algorithm = "sha256"
    key_layout = None

    def __init__(self) -> None:
        self.records = MemoryRecords()

    def hash(self, raw_key: str) -> str:
        return hash_key(raw_key, self.hash_algorithm)

    def last_metered(self, key_ids, month: str) -> list[int | None]:
        return [None] * len(key_ids)


def test_admin_operations_hold_a_target_without_asking_which(store, tmp_path):
    """The local store and the Cloudflare target answer one protocol; the org, user and key
    operations work on anything that does (here records in a dict, without a ledger)."""
    from store.cloudflare import CloudflareSettings, CloudflareTarget, KVClient, SyncSettings
    from store.target import AdminTarget, RecordOps

    assert isinstance(store, AdminTarget) and isinstance(store.records, RecordOps)
    cf = CloudflareSettings("acct", "ns", "token", "http://127.0.0.1:9")
    with KVClient(cf, SyncSettings()) as client:
        remote = CloudflareTarget(client, "sha256")
        assert isinstance(remote, AdminTarget) and isinstance(remote.records, RecordOps)
        assert remote.last_metered(["k1", "k2"], month()) == [None, None]

    target = MemoryTarget()
    assert isinstance(target, AdminTarget)
    org = admin.create_org(target, "Mem", 5)
    user = admin.create_user(target, org["org_id"], "m@example.com", 2)
    key = admin.create_key(target, user["user_id"])
    assert target.records.get(apikey_key(hashlib.sha256(key["api_key"].encode()).hexdigest()))
    admin.revoke_key(target, key["key_id"])
    (listed,) = admin.list_keys(target, user["user_id"])["keys"]
    assert listed["status"] == "revoked" and listed["last_used_at"] is None


def test_list_keys_reports_when_this_node_last_metered_a_key(store, user):
    key = admin.create_key(store, user["user_id"])
    assert store.last_metered([key["key_id"]], month()) == [None]
    store.ledger.settle(None, [("key", key["key_id"])], month(), 5)
    (metered,) = store.last_metered([key["key_id"]], month())
    assert metered is not None
    (listed,) = admin.list_keys(store, user["user_id"])["keys"]
    assert listed["last_used_at"] == datetime.fromtimestamp(metered / 1000, UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


# Key rotation

T_ROTATE = datetime(2030, 5, 6, 7, 8, 9, 250_000, tzinfo=UTC)


@pytest.fixture
def rotation_clock(monkeypatch):
    """The admin operations' clock, fixed at T_ROTATE."""
    monkeypatch.setattr("store.admin_accounts.utc_now", lambda: T_ROTATE)


def key_records(store, key_id: str) -> dict[str, dict]:
    """Every apikey record of `key_id`, by hash."""
    return {k.removeprefix("apikey:"): json.loads(v) for k, v in store.records.scan("apikey:")
            if json.loads(v).get("key_id") == key_id}


def test_rotate_gives_a_new_raw_key_with_the_same_id_limits_and_usage(store, user):
    key = admin.create_key(store, user["user_id"], "laptop", 7,
                           rates={"rpm_limit": 30, "tpm_limit": 9000})
    old_hash = store.hash(key["api_key"])
    levels = [("key", key["key_id"]), ("user", user["user_id"]), ("org", user["org_id"])]
    store.ledger.settle(None, levels, month(), 3 * USD // 10)
    before = admin.level_usage(store, "key", key["key_id"])
    assert before["request_count"] == 1 and before["current_usage_usd"] == 0.3

    rotated = admin.rotate_key(store, key["key_id"])

    assert set(rotated) == {"key_id", "api_key", "user_id", "org_id", "name",
                            "previous_key_expires_at", "rotated_at"}
    assert rotated["key_id"] == key["key_id"] and rotated["api_key"] != key["api_key"]
    assert rotated["api_key"].startswith("gw_live_")
    assert (rotated["user_id"], rotated["org_id"], rotated["name"]) == (
        user["user_id"], user["org_id"], "laptop")
    assert rotated["previous_key_expires_at"] is None
    assert old_hash not in json.dumps(rotated) and key["api_key"] not in json.dumps(rotated)
    new_hash = store.hash(rotated["api_key"])
    assert new_hash not in json.dumps(rotated)
    # grace 0: the old record is gone, the new one is the old one's twin under the new hash
    (only,) = key_records(store, key["key_id"]).items()
    assert only[0] == new_hash and store.records.get(apikey_key(old_hash)) is None
    record = ApiKey.parse(new_hash, only[1])
    assert (record.key_id, record.user_id, record.org_id, record.name, record.status) == (
        key["key_id"], user["user_id"], user["org_id"], "laptop", "active")
    assert (record.monthly_limit_usd, record.rpm_limit, record.tpm_limit) == (7, 30, 9000)
    assert record.passthrough is False and record.expires_at is None
    listing = store.records.get_json(user_key_listing_key(user["user_id"], key["key_id"]))
    assert listing["key_hash"] == new_hash and "previous_key_hash" not in listing
    assert listing["rotated_at"] == rotated["rotated_at"]
    # the request path: the old raw key is unknown, the new one the same key
    assert store.records.resolve(old_hash, month()).key is None
    assert store.records.resolve(new_hash, month()).key.key_id == key["key_id"]
    assert admin.level_usage(store, "key", key["key_id"]) == before


def test_rotate_with_grace_keeps_the_old_key_until_expires_at(store, user, rotation_clock):
    key = admin.create_key(store, user["user_id"], limit_usd=4)
    old_hash = store.hash(key["api_key"])

    rotated = admin.rotate_key(store, key["key_id"], grace_s=90.5)

    # whole seconds, rounded up: 07:08:09.25 + 90.5 s = 07:09:39.75 -> 07:09:40
    assert rotated["previous_key_expires_at"] == "2030-05-06T07:09:40Z"
    assert rotated["rotated_at"] == "2030-05-06T07:08:09Z"
    new_hash = store.hash(rotated["api_key"])
    records = key_records(store, key["key_id"])
    assert set(records) == {old_hash, new_hash}
    old = ApiKey.parse(old_hash, records[old_hash])
    assert old.active and old.expires_at == datetime(2030, 5, 6, 7, 9, 40, tzinfo=UTC)
    assert ApiKey.parse(new_hash, records[new_hash]).expires_at is None
    listing = store.records.get_json(user_key_listing_key(user["user_id"], key["key_id"]))
    assert (listing["key_hash"], listing["previous_key_hash"]) == (new_hash, old_hash)
    (listed,) = admin.list_keys(store, user["user_id"])["keys"]
    assert listed["previous_key_expires_at"] == "2030-05-06T07:09:40Z"
    # both resolve to the same key (the gateway refuses the old one from expires_at on)
    for h in (old_hash, new_hash):
        assert store.records.resolve(h, month()).key.key_id == key["key_id"]
    ref = admin.find_key(store, key["key_id"])
    assert (ref.key_hash, set(ref.grace)) == (new_hash, {old_hash})


def test_rotating_again_in_a_grace_period_ends_the_older_grace_at_once(store, user):
    key = admin.create_key(store, user["user_id"])
    first = store.hash(key["api_key"])
    second = admin.rotate_key(store, key["key_id"], grace_s=3600)
    third = admin.rotate_key(store, key["key_id"], grace_s=60)
    hashes = {store.hash(second["api_key"]), store.hash(third["api_key"])}
    assert set(key_records(store, key["key_id"])) == hashes  # the first raw key is gone
    assert store.records.get(apikey_key(first)) is None
    listing = store.records.get_json(user_key_listing_key(user["user_id"], key["key_id"]))
    assert listing["previous_key_hash"] == store.hash(second["api_key"])
    admin.rotate_key(store, key["key_id"])  # grace 0 ends the second one's too
    assert len(key_records(store, key["key_id"])) == 1
    listing = store.records.get_json(user_key_listing_key(user["user_id"], key["key_id"]))
    assert "previous_key_hash" not in listing


def test_revoke_and_update_after_a_rotation_reach_the_key_in_grace_too(store, user):
    key = admin.create_key(store, user["user_id"], limit_usd=5)
    rotated = admin.rotate_key(store, key["key_id"], grace_s=600)

    admin.update_key(store, key["key_id"], limit_usd=9, rates={"rpm_limit": 4})
    records = key_records(store, key["key_id"])
    assert len(records) == 2
    assert {(r["monthly_limit_usd"], r["rpm_limit"]) for r in records.values()} == {(9, 4)}

    admin.revoke_key(store, key["key_id"])
    for raw in (key["api_key"], rotated["api_key"]):
        assert store.records.resolve(store.hash(raw), month()).key.status == "revoked"
    with pytest.raises(admin.AdminError, match="revoked"):
        admin.rotate_key(store, key["key_id"])


def test_find_key_never_takes_a_key_in_grace_for_the_current_one(store, user):
    """A listing without key_hash (the Workers gateway's) makes find_key scan the apikey
    records: one with expires_at is a rotated-out key, whatever its place in the scan."""
    key = admin.create_key(store, user["user_id"])
    current = store.hash(key["api_key"])
    listing_key = user_key_listing_key(user["user_id"], key["key_id"])
    listing = store.records.get_json(listing_key)
    del listing["key_hash"]
    grace = {**json.loads(store.records.get(apikey_key(current))),
             "expires_at": "2030-01-01T00:00:00Z"}
    store.records.write({listing_key: json.dumps(listing).encode(),
                         apikey_key("0" * 64): json.dumps(grace).encode()})  # scanned first
    ref = admin.find_key(store, key["key_id"])
    assert ref.key_hash == current and set(ref.grace) == {"0" * 64}
    rotated = admin.rotate_key(store, key["key_id"], grace_s=5)
    assert set(key_records(store, key["key_id"])) == {current, store.hash(rotated["api_key"])}


def test_rotate_refuses_revoked_passthrough_and_unknown_keys_and_bad_grace(store, user):
    revoked = admin.create_key(store, user["user_id"])
    admin.revoke_key(store, revoked["key_id"])
    own = admin.register_key(store, user["user_id"], "own", "MY_KEY",
                             environ={"MY_KEY": "sk-own-provider-key-1234"})
    active = admin.create_key(store, user["user_id"])
    before = store.records.scan("")
    with pytest.raises(admin.AdminError, match="revoked"):
        admin.rotate_key(store, revoked["key_id"])
    with pytest.raises(admin.AdminError, match="passthrough"):
        admin.rotate_key(store, own["key_id"])
    with pytest.raises(admin.NotFound, match="unknown key key_nope"):
        admin.rotate_key(store, "key_nope")
    for bad in (-1, float("nan"), float("inf"), admin.MAX_GRACE_S + 1, "soon", None, True):
        with pytest.raises(admin.AdminError, match="grace_s"):
            admin.rotate_key(store, active["key_id"], grace_s=bad)
    assert store.records.scan("") == before  # nothing written
    assert admin.check_grace_s(admin.MAX_GRACE_S) == 30 * 24 * 3600
    assert admin.check_grace_s("2.5") == 2.5


def test_rotate_works_on_any_target():
    target = MemoryTarget()
    org = admin.create_org(target, "Mem", 5)
    owner = admin.create_user(target, org["org_id"], "m@example.com", 2)
    key = admin.create_key(target, owner["user_id"])
    rotated = admin.rotate_key(target, key["key_id"], grace_s=30)
    old, new = (json.loads(target.records.get(apikey_key(target.hash(raw))))
                for raw in (key["api_key"], rotated["api_key"]))
    assert old["key_id"] == new["key_id"] == key["key_id"]
    assert "expires_at" in old and "expires_at" not in new
