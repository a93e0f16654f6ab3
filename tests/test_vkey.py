"""The later Workers gateway's layout on the request path: `vkey:{hash}:config` records found when
`apikey:{hash}` misses, validated strictly, and their `vkey:{hash}:quota` counted at the key level."""

import json

import pytest

from store import Store, StoreUnavailable
from store.hashing import looks_like_gateway_key
from store.money import month_of, utc_now
from store.records import RecordError, VirtualKey, validate_record
from tests import test_gateway
from tests.support.seed import seed, seed_later_gateway
from tests.test_gateway import chat_flow, decide, forward, openai_response, usage

gateway = test_gateway.gateway  # the fixture: a Gateway on a fresh store

HASH = "ab" * 32
CONFIG = {"key_id": "vkey_1_abc", "key_hash": HASH, "org_id": "org_1", "user": "user_1",
          "name": "laptop", "monthly_limit_usd": 10, "status": "active",
          "created_at": "2025-01-01T00:00:00.000Z"}


def this_month() -> str:
    return month_of(utc_now())


def test_a_later_gateways_key_record_reads_as_the_key_it_is():
    key = VirtualKey.parse(HASH, json.dumps(CONFIG)).as_api_key()
    assert (key.key_id, key.user_id, key.org_id, key.monthly_limit_usd, key.active) == (
        "vkey_1_abc", "user_1", "org_1", 10, True)


@pytest.mark.parametrize("change,needle", [
    ({"status": None}, "status: missing"),  # the later gateway refuses a key without one
    ({"status": "Active"}, "status: expected one of active, revoked"),
    ({"user": None}, "user: missing"),
    ({"org_id": ""}, "org_id: expected a non-empty string"),
    ({"monthly_limit_usd": "10"}, "monthly_limit_usd: expected a number"),
    ({"monthly_limit_usd": -1}, "monthly_limit_usd: expected a non-negative number"),
    ({"key_hash": "cd" * 32}, "key_hash: not the hash its key names"),
])
def test_a_key_record_that_is_not_the_later_gateways_shape_is_refused(change, needle):
    record = {k: v for k, v in {**CONFIG, **change}.items() if v is not None}
    with pytest.raises(RecordError, match=needle) as err:
        validate_record(f"vkey:{HASH}:config", json.dumps(record))
    assert str(err.value).startswith("vkey:abababababab...:config: ")


def test_the_index_is_a_plain_hash_and_the_key_quota_a_quota_record():
    validate_record("vkey:id:vkey_1_abc", HASH.encode())
    for bad in (json.dumps(HASH).encode(), b"", b"not a hash", ("AB" * 32).encode()):
        with pytest.raises(RecordError, match="vkey:id:vkey_1_abc: expected a key's hash"):
            validate_record("vkey:id:vkey_1_abc", bad)
    validate_record(f"vkey:{HASH}:quota", b'{"month_usage_usd":1.5,"current_month":"2025-01",'
                                          b'"request_count":3,"last_update":1735689600000}')
    with pytest.raises(RecordError, match="month_usage_usd: expected a non-negative number"):
        validate_record(f"vkey:{HASH}:quota", b'{"month_usage_usd":-1}')


def test_both_key_lengths_are_gateway_keys():
    assert looks_like_gateway_key("gw_live_" + "a" * 32)
    assert looks_like_gateway_key("gw_live_" + "a" * 48)
    assert not looks_like_gateway_key("sk-proj-" + "a" * 48)


def test_resolve_finds_the_key_in_either_layout_apikey_first(tmp_path):
    with Store(tmp_path / "s", hash_algorithm="sha256") as store:
        old = seed(store)
        raw, key_id = seed_later_gateway(store, suffix="2", key_quota={
            "month_usage_usd": 2.5, "current_month": this_month(), "request_count": 4,
            "last_update": 1})
        first = store.records.resolve(store.hash(old.api_key), this_month())
        later = store.records.resolve(store.hash(raw), this_month())
        assert (first.layout, first.key.key_id, first.key_quota) == ("apikey", old.key_id, None)
        assert (later.layout, later.key.key_id, later.key.user_id, later.org.org_id) == (
            "vkey", key_id, "user_2", "org_2")
        assert later.org.failure_mode == "fail_closed"
        assert later.key_quota.usage_in(this_month()) == (2_500_000_000, 4)
        # A key under both: neither is believed (revoking one would leave the other working),
        # and health names it.
        store.records.write({f"vkey:{store.hash(old.api_key)}:config": json.dumps(
            {**CONFIG, "key_id": "other", "key_hash": store.hash(old.api_key)}).encode()})
        assert store.records.resolve(store.hash(old.api_key), this_month()).key is None
        from store import admin

        reasons = [r["reason"] for r in admin.invalid_records(store)]
        assert any("also a vkey" in reason for reason in reasons)


def test_an_unreadable_key_record_is_a_store_fault_not_a_stranger(tmp_path):
    with Store(tmp_path / "s") as store:
        raw, _ = seed_later_gateway(store)
        store.records.write({f"vkey:{store.hash(raw)}:config": b'{"key_id":"k"}'})
        with pytest.raises(StoreUnavailable, match="org_id: missing"):
            store.records.resolve(store.hash(raw), this_month())


def test_an_active_virtual_key_is_metered_at_its_three_levels(gateway):
    gw = gateway()
    raw, key_id = seed_later_gateway(gw.store)
    flow = chat_flow(raw)
    decide(gw, flow)
    assert flow.response is None
    assert raw not in str(flow.request.headers)
    forward(gw, flow, openai_response(prompt=1000, completion=200))
    for level, level_id in (("key", key_id), ("user", "user_1"), ("org", "org_1")):
        assert usage(gw, level, level_id).requests == 1
    assert flow.response.headers["x-gateway-limit-level"] == "key"
    assert float(flow.response.headers["x-gateway-limit-usd"]) == 10.0


@pytest.mark.parametrize("options,needle", [
    ({"key_status": "revoked"}, "has been revoked"),
    ({"with_user": False}, "belongs to no known user"),
    ({"user_org": "org_other"}, "is not of it"),
])
def test_a_revoked_or_misconfigured_virtual_key_is_401(gateway, options, needle):
    gw = gateway()
    raw, _ = seed_later_gateway(gw.store, **options)
    flow = chat_flow(raw)
    decide(gw, flow)
    assert flow.response.status_code == 401
    assert needle in json.loads(flow.response.content)["error"]["message"]
    assert gw.store.ledger.reservations() == []


def test_the_current_months_key_quota_record_counts_and_another_months_does_not(gateway):
    gw = gateway()
    raw, key_id = seed_later_gateway(gw.store, key_limit=1.0, key_quota={
        "month_usage_usd": 1.0, "current_month": this_month(), "request_count": 7,
        "last_update": 1735689600000})
    flow = chat_flow(raw)
    decide(gw, flow)
    assert flow.response.status_code == 429
    error = json.loads(flow.response.content)["error"]
    assert (error["type"], error["details"]["level"]) == ("key_quota_exceeded", "key")

    stale, _ = seed_later_gateway(gw.store, suffix="2", key_limit=1.0, key_quota={
        "month_usage_usd": 1.0, "current_month": "2020-01", "request_count": 7,
        "last_update": 1})
    flow = chat_flow(stale)
    decide(gw, flow)
    assert flow.response is None  # last month's usage is not this month's
