"""Admin operations in the later Workers gateway's layout (`store.key_layout: vkey`, or a store
holding `vkey:` records): keys created, revoked, updated, rotated, listed, deleted, their usage
with the `vkey:{hash}:quota` record, on the local store and the Cloudflare target; import and
export of both layouts."""

# ruff: noqa: F811  (the fixtures imported from test_sync are arguments of the tests)

import json
import re

import pytest

from store import Store, admin
from store.cloudflare import CloudflareTarget
from store.records import apikey_key, vkey_config_key, vkey_index_key, vkey_quota_key
from store.settings import store_settings
from tests.support.seed import later_gateway_records, seed_later_gateway
from tests.test_sync import kv, make_node, server, this_month  # noqa: F401

VKEY_RAW = re.compile(r"gw_live_[0-9a-f]{48}")


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "s", hash_algorithm="sha256") as opened:
        yield opened


def account(store) -> tuple[str, str]:
    org = admin.create_org(store, "Acme", 100, "fail-closed")
    user = admin.create_user(store, org["org_id"], "dev@example.com", 20)
    return org["org_id"], user["user_id"]


def config_of(store, key_id: str) -> dict:
    key_hash = store.records.get(vkey_index_key(key_id)).decode()
    return json.loads(store.records.get(vkey_config_key(key_hash)))


def test_the_layout_is_the_setting_else_what_the_records_hold(store, tmp_path):
    assert admin.key_layout_of(store) == "apikey"
    seed_later_gateway(store)
    assert admin.key_layout_of(store) == "vkey"
    with Store(tmp_path / "s2", key_layout="apikey") as other:
        seed_later_gateway(other)
        assert admin.key_layout_of(other) == "apikey"  # the setting wins
    got = store_settings({"store": {"key_layout": "vkey"}}, "mitm.yaml", None)
    assert (got.key_layout, store_settings({}, "mitm.yaml", None).key_layout) == ("vkey", None)
    with pytest.raises(ValueError, match="key_layout"):
        store_settings({"store": {"key_layout": "v2"}}, "mitm.yaml", None)


def test_a_key_created_in_the_vkey_layout_has_the_later_gateways_shape(tmp_path):
    with Store(tmp_path / "s", hash_algorithm="sha256", key_layout="vkey") as store:
        org_id, user_id = account(store)
        key = admin.create_key(store, user_id, "laptop", 5)
        assert VKEY_RAW.fullmatch(key["api_key"])
        assert re.fullmatch(r"vkey_[0-9]{13}_[0-9a-z]{6}", key["key_id"])
        key_hash = store.hash(key["api_key"])
        assert store.records.get(vkey_index_key(key["key_id"])) == key_hash.encode()
        assert config_of(store, key["key_id"]) == {
            "key_id": key["key_id"], "key_hash": key_hash, "org_id": org_id, "user": user_id,
            "name": "laptop", "monthly_limit_usd": 5.0, "status": "active",
            "created_at": key["created_at"]}
        assert store.records.get(apikey_key(key_hash)) is None
        assert not store.records.scan(f"user:{user_id}:keys:")
        found = store.records.resolve(key_hash, this_month())
        assert (found.layout, found.key.key_id, found.org.org_id) == ("vkey", key["key_id"],
                                                                      org_id)
        unlimited = admin.create_key(store, user_id)  # no limit: the field is left out
        assert "monthly_limit_usd" not in config_of(store, unlimited["key_id"])
        first = admin.create_user_with_key(store, org_id, "two@example.com", 5)
        assert VKEY_RAW.fullmatch(first["api_key"]) and config_of(store, first["key_id"])


def test_revoke_update_and_list_act_on_a_virtual_key(store):
    raw, key_id = seed_later_gateway(store)
    (listed,) = admin.list_keys(store, user_id="user_1")["keys"]
    assert (listed["key_id"], listed["monthly_limit_usd"], listed["key_layout"]) == (
        key_id, 10, "vkey")
    assert [k["key_id"] for k in admin.list_keys(store, org_id="org_1")["keys"]] == [key_id]

    updated = admin.update_key(store, key_id, limit_usd=3, name="desktop")
    assert (updated["monthly_limit_usd"], updated["name"]) == (3, "desktop")
    with pytest.raises(admin.NotFound):
        admin.update_key(store, key_id, user_id="user_nobody")
    other_org = admin.create_org(store, "Other", 10)
    stranger = admin.create_user(store, other_org["org_id"], "s@example.com", 1)
    with pytest.raises(admin.AdminError, match="not of the key's org"):
        admin.update_key(store, key_id, user_id=stranger["user_id"])

    admin.revoke_key(store, key_id)
    assert config_of(store, key_id)["status"] == "revoked"
    assert not store.records.resolve(store.hash(raw), this_month()).key.active
    admin.update_key(store, key_id, status="active")  # as the later gateway's PATCH allows
    assert config_of(store, key_id)["status"] == "active"
    assert "revoked_at" not in config_of(store, key_id)


def test_status_and_user_of_a_first_layout_key_do_not_change(store):
    _, user_id = account(store)
    key = admin.create_key(store, user_id)
    with pytest.raises(admin.AdminError, match="apikey layout"):
        admin.update_key(store, key["key_id"], status="revoked")
    with pytest.raises(admin.AdminError, match="apikey layout"):
        admin.delete_key(store, key["key_id"])
    with pytest.raises(admin.NotFound, match="Virtual key not found"):
        admin.find_vkey(store, key["key_id"])  # /admin/vkeys answers 404 for it


@pytest.mark.parametrize("grace_s", [0, 3600])
def test_a_virtual_key_rotates_keeping_its_id_limits_and_workers_usage(store, grace_s):
    raw, key_id = seed_later_gateway(store, key_quota={
        "month_usage_usd": 4.0, "current_month": this_month(), "request_count": 2,
        "last_update": 1})
    old_hash = store.hash(raw)
    rotated = admin.rotate_key(store, key_id, grace_s)
    assert VKEY_RAW.fullmatch(rotated["api_key"])
    new_hash = store.hash(rotated["api_key"])
    assert store.records.get(vkey_index_key(key_id)) == new_hash.encode()
    new = store.records.resolve(new_hash, this_month())
    assert (new.key.key_id, new.key.monthly_limit_usd) == (key_id, 10)
    assert new.key_quota.usage_in(this_month()) == (4_000_000_000, 2)
    old = store.records.get(vkey_config_key(old_hash))
    if grace_s:
        assert json.loads(old)["expires_at"] == rotated["previous_key_expires_at"]
        assert config_of(store, key_id)["previous_key_hash"] == old_hash
        admin.revoke_key(store, key_id)  # the old raw key in its grace goes with the key
        assert json.loads(store.records.get(vkey_config_key(old_hash)))["status"] == "revoked"
    else:
        assert old is None and store.records.get(vkey_quota_key(old_hash)) is None
    assert admin.level_usage(store, "key", key_id)["quota_record_usd"] == 4.0


def test_usage_reset_and_delete_of_a_virtual_key(store):
    raw, key_id = seed_later_gateway(store, key_quota={
        "month_usage_usd": 1.25, "current_month": this_month(), "request_count": 5,
        "last_update": 1})
    usage = admin.level_usage(store, "key", key_id)
    assert (usage["quota_record_usd"], usage["quota_record_requests"]) == (1.25, 5)
    assert (usage["monthly_limit_usd"], usage["remaining_usd"]) == (10, 8.75)
    admin.reset_quota(store, "key", key_id, "new budget")
    assert admin.level_usage(store, "key", key_id)["current_usage_usd"] == 0
    key_hash = store.hash(raw)
    assert json.loads(store.records.get(vkey_quota_key(key_hash)))["month_usage_usd"] == 0

    assert admin.delete_key(store, key_id) == {"key_id": key_id, "deleted": True}
    for gone in (vkey_config_key(key_hash), vkey_quota_key(key_hash), vkey_index_key(key_id)):
        assert store.records.get(gone) is None
    with pytest.raises(admin.NotFound):
        admin.level_usage(store, "key", key_id)


def test_export_and_import_round_trip_both_layouts(store, tmp_path):
    _, user_id = account(store)
    admin.create_key(store, user_id)
    raw, key_id = seed_later_gateway(store, suffix="2", key_quota={
        "month_usage_usd": 1, "current_month": this_month(), "request_count": 1,
        "last_update": 1})
    items = admin.export_bulk(store, include_secrets=True)
    index = next(i for i in items if i["key"] == vkey_index_key(key_id))
    assert index["value"] == store.hash(raw)  # the plain-text index, as it is
    with Store(tmp_path / "copy", hash_algorithm="sha256") as copy:
        assert admin.import_bulk(copy, json.loads(json.dumps(items)))["imported"] == len(items)
        assert copy.records.scan("") == [
            (k, v) for k, v in store.records.scan("") if not k.startswith("aigw:")]
        assert copy.records.resolve(copy.hash(raw), this_month()).key.key_id == key_id


def test_the_cloudflare_target_writes_the_layout_the_namespace_uses(kv, make_node):
    records, raw, key_id = later_gateway_records(
        lambda text: __import__("hashlib").sha256(text.encode()).hexdigest(),
        key_quota={"month_usage_usd": 2.0, "current_month": this_month(),
                   "request_count": 3, "last_update": 1})
    kv.load_bulk([{"key": k, "value": v} for k, v in records.items()])
    node = make_node()
    target = CloudflareTarget(node.client, "sha256")
    assert admin.key_layout_of(target) == "vkey"
    assert admin.level_usage(target, "key", key_id)["quota_record_usd"] == 2.0
    created = admin.create_key(target, "user_1", "ci")
    assert VKEY_RAW.fullmatch(created["api_key"])
    node.replicator.sync_once()
    found = node.store.records.resolve(node.store.hash(created["api_key"]), this_month())
    assert (found.layout, found.key.key_id, found.user.user_id) == (
        "vkey", created["key_id"], "user_1")
    admin.revoke_key(target, key_id)
    node.replicator.sync_once()
    assert not node.store.records.resolve(node.store.hash(raw), this_month()).key.active


def test_a_stray_vkey_name_does_not_change_the_layout_of_new_keys(tmp_path):
    """Only a key config of the later layout says the namespace is one; an index or a quota
    record alone (a stray write) does not."""
    from store import Store, admin

    with Store(tmp_path / "s") as store:
        store.records.write({"vkey:id:junk": b"0" * 64})
        assert admin.key_layout_of(store) == "apikey"


def test_a_virtual_key_without_its_index_can_still_be_revoked_and_deleted(store):
    raw, key_id = seed_later_gateway(store)
    store.records.write({}, [vkey_index_key(key_id)])  # a namespace another tool wrote
    key_hash = store.hash(raw)
    assert admin.revoke_key(store, key_id)["status"] == "revoked"
    assert json.loads(store.records.get(vkey_config_key(key_hash)))["status"] == "revoked"
    assert store.records.resolve(key_hash, this_month()).key.status == "revoked"
    admin.delete_key(store, key_id)
    assert store.records.get(vkey_config_key(key_hash)) is None


def test_deleting_a_user_deletes_its_virtual_keys_rotated_out_ones_included(tmp_path):
    with Store(tmp_path / "s", hash_algorithm="sha256", key_layout="vkey") as store:
        _, user_id = account(store)
        key = admin.create_key(store, user_id, "laptop", 5)
        old_hash = store.hash(key["api_key"])
        rotated = admin.rotate_key(store, key["key_id"], 3600)
        assert store.records.get(vkey_config_key(old_hash)) is not None  # in its grace
        deleted = admin.delete_user(store, user_id)
        assert key["key_id"] in deleted["keys_deleted"]
        for raw in (key["api_key"], rotated["api_key"]):
            assert store.records.get(vkey_config_key(store.hash(raw))) is None
        assert store.records.get(vkey_index_key(key["key_id"])) is None
        assert store.records.names("vkey:") == []
