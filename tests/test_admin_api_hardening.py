"""The admin API against what an outside review tried: token floods, malformed requests,
records the gateway would refuse, partial writes, misspelt filters, look-alike emails."""

import asyncio
import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store import Store, admin, admin_accounts
from store.admin_keys import create_admin_key
from store.api import backend as backend_module
from store.api.backend import Backend, admin_kv_policy
from store.audit import audited, entries
from store.cloudflare import CloudflareSettings, CloudflareTarget, KVClient, SyncError, SyncSettings
from store.db import StoreError
from store.records import org_config_key, user_quota_key
from tests.support.fake_kv import FakeKV, Fault
from tests.test_admin_api import email, error_of, make_org, make_user, server  # noqa: F401

LITERAL = "sk-live-not-a-map-secret-0123456789"


# --- authentication under a flood ---------------------------------------------------------


def test_a_burst_of_tokens_rereads_the_admin_keys_once(tmp_path, monkeypatch):
    reads = []

    class Counting(backend_module.AdminKeys):
        def __init__(self, target):
            reads.append(1)
            super().__init__(target)

    monkeypatch.setattr(backend_module, "AdminKeys", Counting)
    now = [0.0]
    with Store(tmp_path / "store") as store:
        key = create_admin_key(store, "ops")
        backend = Backend(store, store, target_name="local", clock=lambda: now[0])

        async def burst(tokens):
            return await asyncio.gather(*(backend.authenticate(t) for t in tokens))

        try:
            # Not shaped like an admin key: never looked up.
            assert asyncio.run(burst(["x", "Bearer", "gw_live_" + "0" * 32] * 20)) == [None] * 60
            assert reads == []
            # Fifty look-alikes and the real key at once: one read of the keys.
            bogus = [f"aigw_admin_{i:040x}" for i in range(50)]
            found = asyncio.run(burst([*bogus, key["api_key"]]))
            assert found[:50] == [None] * 50 and found[50].admin_key_id == key["admin_key_id"]
            assert len(reads) == 1
            now[0] += 1.0  # within the TTL: no read at all
            asyncio.run(burst(bogus))
            assert len(reads) == 1
        finally:
            backend.close()


def test_keys_read_before_stay_in_use_when_a_reread_fails(tmp_path, monkeypatch):
    now = [0.0]
    with Store(tmp_path / "store") as store:
        key = create_admin_key(store, "ops")
        backend = Backend(store, store, target_name="local", clock=lambda: now[0])
        try:
            assert asyncio.run(backend.authenticate(key["api_key"])) is not None

            def broken(target):
                raise StoreError("the store did not answer")

            monkeypatch.setattr(backend_module, "AdminKeys", broken)
            now[0] += 60
            assert asyncio.run(backend.authenticate(key["api_key"])) is not None
        finally:
            backend.close()


def test_the_admin_servers_kv_client_gives_up_quickly():
    policy = admin_kv_policy(SyncSettings())
    assert (policy.max_attempts, policy.max_retry_after_s, policy.wait_for_budget) == \
        (2, 5.0, False)


def test_a_kv_block_answers_502_rather_than_holding_the_server(server):  # noqa: F811
    if server.kv is None:
        pytest.skip("the Cloudflare target only")
    org = make_org(server.client())
    # Cloudflare's block: 429 with a retry-after of minutes, on every call for a while.
    server.kv.add_fault(Fault("get", status=429, retry_after=300, times=None))
    server.kv.add_fault(Fault("bulk_get", status=429, retry_after=300, times=None))
    try:
        response = server.client().get(f"/admin/organizations/{org['org_id']}")
        error_of(response, 502, "upstream_error")
    finally:
        server.kv.clear_faults()
    assert server.client().get(f"/admin/organizations/{org['org_id']}").status_code == 200


# --- what aiohttp itself would echo -------------------------------------------------------


def test_a_request_too_malformed_to_parse_never_echoes_its_header(server):  # noqa: F811
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as conn:
        conn.sendall(b"GET /admin/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + server.admin.encode() + b"\x01\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split(b" ")[1] == b"400"
    assert json.loads(body)["error"]["type"] == "invalid_request"
    assert server.admin.encode() not in answer
    assert server.admin not in server.log_text()


# --- records the gateway would refuse -----------------------------------------------------


def _put_raw(store_dir: Path, key: str, value: dict) -> None:
    with Store(store_dir) as store:  # straight into the store: no check (a tool other than aigw)
        store.records.write({key: json.dumps(value).encode()})


@pytest.mark.parametrize("keys", [LITERAL, [{"openai": LITERAL}], 42])
def test_provider_keys_that_are_not_a_map_are_never_shown(server, keys):  # noqa: F811
    if server.kv is not None:
        pytest.skip("written straight into the local store")
    org_id = f"org_bad{abs(hash(json.dumps(keys))) % 10_000}"
    _put_raw(server.store_dir, org_config_key(org_id), {
        "org_id": org_id, "name": "Bad", "monthly_budget_usd": 1, "provider_keys": keys})
    viewer = server.client(server.viewer)
    for path in (f"/admin/organizations/{org_id}", "/admin/organizations"):
        response = viewer.get(path)
        assert response.status_code == 200, response.text
        assert LITERAL not in response.text
    shown = viewer.get(f"/admin/organizations/{org_id}").json()
    assert shown["provider_keys"] == "<redacted>"
    # An update never builds on a record the gateway refuses.
    for body in ({"name": "x"}, {"provider_keys": {"openai": "env:X"}}):
        message = error_of(server.client().patch(f"/admin/organizations/{org_id}", json=body),
                           400, "invalid_request")
        assert "invalid" in message and LITERAL not in message


def test_an_update_of_a_record_that_is_not_json_is_400(server):  # noqa: F811
    if server.kv is not None:
        pytest.skip("written straight into the local store")
    with Store(server.store_dir) as store:
        store.records.write({org_config_key("org_notjson"): b"{not json"})
    error_of(server.client().patch("/admin/organizations/org_notjson",
                                   json={"provider_keys": {"openai": "env:X"}}), 400,
             "invalid_request")


# --- nothing half-written -----------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as opened:
        yield opened


def _user(store) -> dict:
    org = admin.create_org(store, "O", 10)
    return admin.create_user(store, org["org_id"], email(), 5)


def test_a_quota_reset_the_ledger_refuses_says_so_in_the_audit_log(store, monkeypatch):
    user = _user(store)
    store.records.write({user_quota_key(user["user_id"]): json.dumps({
        "month_usage_usd": 1, "current_month": admin.level_usage(
            store, "user", user["user_id"])["current_month"], "request_count": 1}).encode()})

    def refuse(*args, **kwargs):
        raise StoreError("MDB_MAP_FULL")

    monkeypatch.setattr(store.ledger, "reset", refuse)
    with audited("cli:tester", "quota reset"), pytest.raises(StoreError):
        admin.reset_quota(store, "user", user["user_id"], "refund")
    reset, failed = entries(store)["entries"]
    assert reset["details"]["quota_reset"]["reason"] == "refund"
    assert failed["details"]["quota_reset_failed"]["reason"] == "refund"


def test_a_quota_reset_whose_record_write_fails_leaves_the_ledger_alone(store, monkeypatch):
    user = _user(store)
    calls = []
    monkeypatch.setattr(store.ledger, "reset", lambda *a, **k: calls.append(a))

    def refuse(*args, **kwargs):
        raise StoreError("MDB_MAP_FULL")

    monkeypatch.setattr(store.records, "write", refuse)
    with audited("cli:tester", "quota reset"), pytest.raises(StoreError):
        admin.reset_quota(store, "user", user["user_id"], "refund")
    assert calls == []


def test_a_partial_kv_write_is_put_back(monkeypatch):
    raw = "gw_live_" + "ab" * 16
    monkeypatch.setattr(admin_accounts, "new_gateway_key", lambda *a, **k: raw)
    with FakeKV() as kv:
        cf = CloudflareSettings(kv.account_id, kv.namespace_id, kv.token, kv.api_base)
        with KVClient(cf, SyncSettings(max_attempts=1)) as client:
            target = CloudflareTarget(client, "sha256")
            org = admin.create_org(target, "Acme", 10)
            before = {name for name, _ in target.records.scan("")}
            apikey = f"apikey:{target.hash(raw)}"
            kv.fail_keys(apikey, times=2)  # the write and its retry
            with audited("cli:tester", "user create"), pytest.raises(SyncError) as caught:
                admin.create_user_with_key(target, org["org_id"], email(), 5)
            assert target.hash(raw) not in str(caught.value)
            assert "put back" in str(caught.value)
            assert {name for name, _ in target.records.scan("")} == before
            # Nothing to conflict with: the same email goes in at once.
            kv.clear_faults()


# --- what is checked ----------------------------------------------------------------------


def test_query_parameters_are_checked(server):  # noqa: F811
    api = server.client()
    message = error_of(api.get("/admin/users", params={"orgid": "x"}), 400, "invalid_request")
    assert "orgid" in message
    for params in ({"since": "0001-01-01T00:00:00+14:00"}, {"since": "9999-12-31T23:59:59-14:00"},
                   {"limit": "-1"}, {"sinse": "2026-01-01"}):
        error_of(api.get("/admin/audit", params=params), 400, "invalid_request")
    # Every endpoint: a list, the vkeys (a "list then delete each" script must never get all).
    for path, params in (("/admin/vkeys", {"org": "A"}), ("/admin/organizations", {"x": "1"}),
                         ("/admin/metrics", {"mode": "exact", "extra": "1"})):
        error_of(api.get(path, params=params), 400, "invalid_request")
    assert api.get("/admin/metrics", params={"mode": "exact"}).status_code == 200


def test_look_alike_emails_are_the_same_email_or_refused(store):
    org = admin.create_org(store, "O", 10)
    admin.create_user(store, org["org_id"], "bob@x.com", 1)
    with pytest.raises(admin.Conflict):
        admin.create_user(store, org["org_id"], "\uff42ob@x.com", 1)  # fullwidth b
    for bad in ("bob@x.com\u200b", "bo b@x.com", "bob@x.com\n"):
        with pytest.raises(admin.AdminError):
            admin.create_user(store, org["org_id"], bad.rstrip("\n") + "\x00", 1)
    with pytest.raises(admin.AdminError):
        admin.create_key(store, admin.list_users(store, org_id=org["org_id"])["users"][0][
            "user_id"], "line\nbreak")
    assert admin.create_org(store, "Z", -0.0)["monthly_budget_usd"] == 0.0


def test_users_change_email_and_are_deleted_with_their_keys(server):  # noqa: F811
    api = server.client()
    org = make_org(api)
    alice, bob = make_user(api, org["org_id"], email()), make_user(api, org["org_id"], email())
    error_of(api.patch(f"/admin/users/{alice['user_id']}", json={"email": bob["email"]}), 409,
             "conflict")
    fresh = email()
    assert api.patch(f"/admin/users/{alice['user_id']}",
                     json={"email": fresh}).json()["email"] == fresh
    deleted = api.delete(f"/admin/users/{alice['user_id']}")
    assert deleted.status_code == 200 and deleted.json()["keys_deleted"] == [alice["key_id"]]
    error_of(api.get(f"/admin/users/{alice['user_id']}"), 404, "not_found")
    error_of(api.get(f"/admin/users/{alice['user_id']}/api-keys/{alice['key_id']}/usage"), 404,
             "not_found")
    assert server.aigw("user", "show", bob["user_id"])["user_id"] == bob["user_id"]


def test_the_audit_log_never_shows_an_admin_keys_digest(server):  # noqa: F811
    text = json.dumps(server.client(server.viewer).get("/admin/audit").json())
    assert "aigw:admin_key:" in text
    for name in (part.split('"')[0] for part in text.split("aigw:admin_key:")[1:]):
        assert name.endswith("...") and len(name) == 15
    listing = server.client().get(f"/admin/users/{make_user(server.client(), make_org(server.client())['org_id'], email())['user_id']}/api-keys").json()
    assert all("key_hash" not in key for key in listing["api_keys"])


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "monthly_budget_usd", "failure_mode", "provider_keys",
                         "rpm_limit", "x"]), inner, max_size=4), max_leaves=12).map(
    lambda value: json.dumps(value).encode())))
def test_any_body_is_a_struct_or_a_400_naming_why(body):
    from store.api.payloads import OrgCreate, PayloadError, UserUpdate, decode

    for kind in (OrgCreate, UserUpdate):
        try:
            decode(kind, body)
        except PayloadError as exc:
            assert str(exc) and LITERAL not in str(exc)
