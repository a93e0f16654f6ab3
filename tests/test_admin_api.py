"""`aigw serve`, the admin REST API: a real server driven over HTTP with httpx, on a local store
and on the fake Cloudflare KV namespace (`--target cloudflare`): every endpoint, every error
status, viewer against admin, the audit log, and a key made through the API used through a real
mitmdump with the official openai SDK."""

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from store import Store
from store.admin_keys import AdminKeys, create_admin_key, revoke_admin_key
from store.api.backend import ADMIN_KEYS_TTL_S, Backend
from tests.support.admin_api import AdminServer
from tests.support.fake_kv import FakeKV
from tests.support.gateway import OPENAI_KEY, start_gateway
from tests.support.proxy import REPO_ROOT

LITERAL_PROVIDER_KEY = "sk-literal-provider-secret-0123456789"


def _config(tmp: Path, kv: FakeKV | None) -> Path:
    config = yaml.safe_load((REPO_ROOT / "mitm.yaml").read_text())
    if kv is not None:
        token = tmp / "cf-token"
        token.write_text(kv.token + "\n")
        config["store"] = {**(config.get("store") or {}), "hash": "sha256"}
        config["sync"] = {"node_id": "admin-node", "request_budget": 100_000, "cloudflare": {
            "account_id": kv.account_id, "namespace_id": kv.namespace_id,
            "api_token_file": str(token)}}
    path = tmp / "mitm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module", params=["local", "cloudflare"])
def server(request, tmp_path_factory) -> Iterator[AdminServer]:
    tmp = tmp_path_factory.mktemp(f"serve-{request.param}")
    kv = FakeKV().__enter__() if request.param == "cloudflare" else None
    config = _config(tmp, kv)
    args = ["--config", str(config), "--store", str(tmp / "store")]
    if kv is not None:
        args += ["--target", "cloudflare", "--api-base", kv.api_base]
    served = AdminServer(args, tmp / "serve.log")
    served.kv = kv
    served.store_dir = tmp / "store"
    served.config = config
    try:
        yield served.start()
    finally:
        served.stop()
        if kv is not None:
            kv.__exit__(None, None, None)


def error_of(response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind, body
    return body["error"]["message"]


def make_org(api, **fields) -> dict:
    response = api.post("/admin/organizations", json={"name": "Acme", **fields})
    assert response.status_code == 201, response.text
    return response.json()


def make_user(api, org_id: str, email: str, **fields) -> dict:
    response = api.post("/admin/users", json={"email": email, "org_id": org_id, **fields})
    assert response.status_code == 201, response.text
    return response.json()


_emails = iter(range(1, 1_000_000))


def email() -> str:
    return f"dev{next(_emails)}@acme.test"


# --- authentication and roles -------------------------------------------------------------


def test_every_admin_request_needs_a_valid_admin_key(server):
    for headers in ({}, {"authorization": "Bearer aigw_admin_" + "0" * 40},
                    {"authorization": "Basic abc"}, {"authorization": f"Bearer {server.admin}x"}):
        response = server.client("").get("/admin/health", headers=headers)
        error_of(response, 401, "auth_error")
    assert server.client().get("/admin/health").json()["status"] == "ok"
    # An unknown path without a key says nothing of the path.
    error_of(server.client("").get("/admin/nothing-here"), 401, "auth_error")
    error_of(server.client().get("/admin/nothing-here"), 404, "not_found")


def test_a_viewer_may_read_but_not_write(server):
    viewer = server.client(server.viewer)
    org = make_org(server.client())
    assert viewer.get(f"/admin/organizations/{org['org_id']}").status_code == 200
    error_of(viewer.post("/admin/organizations", json={"name": "V"}), 403, "permission_denied")
    error_of(viewer.patch(f"/admin/organizations/{org['org_id']}", json={"name": "V"}), 403,
             "permission_denied")
    assert server.client().get(f"/admin/organizations/{org['org_id']}").json()["name"] == "Acme"


def test_a_revoked_admin_key_stops_at_the_next_reread(tmp_path):
    """The server re-reads the admin keys every ADMIN_KEYS_TTL_S (here on a clock we move)."""
    now = [0.0]
    with Store(tmp_path / "store") as store:
        key = create_admin_key(store, "ops")
        backend = Backend(store, store, target_name="local", clock=lambda: now[0])
        try:
            assert asyncio.run(backend.authenticate(key["api_key"])).admin_key_id == \
                key["admin_key_id"]
            revoke_admin_key(store, key["admin_key_id"])
            now[0] += ADMIN_KEYS_TTL_S - 0.1
            assert asyncio.run(backend.authenticate(key["api_key"])) is not None
            now[0] += 0.2
            assert asyncio.run(backend.authenticate(key["api_key"])) is None
        finally:
            backend.close()


def test_admin_keys_are_stored_as_hashes_and_compared_whole(tmp_path):
    with Store(tmp_path / "store") as store:
        key = create_admin_key(store, "ops", "viewer")
        raw = key["api_key"]
        assert raw.startswith("aigw_admin_") and len(raw) == len("aigw_admin_") + 40
        dumped = json.dumps(store.records.scan(""), default=repr)
        assert raw not in dumped
        keys = AdminKeys(store)
        assert keys.authenticate(raw).role == "viewer"
        assert keys.authenticate(raw[:-1]) is None and keys.authenticate("") is None
        assert keys.authenticate("gw_live_" + raw[11:]) is None


# --- organizations ------------------------------------------------------------------------


def test_organizations_create_show_update_and_list(server):
    api = server.client()
    org = make_org(api, monthly_budget_usd=250, failure_mode="fail-open",
                   fallback_daily_limit=3, rpm_limit=60)
    assert org["org_id"].startswith("org_") and org["organization"]["org_id"] == org["org_id"]
    assert (org["monthly_budget_usd"], org["failure_mode"], org["fallback_daily_limit"],
            org["rpm_limit"]) == (250, "fail-open", 3, 60)
    shown = api.get(f"/admin/organizations/{org['org_id']}").json()
    assert shown["organization"]["name"] == "Acme"
    patched = api.patch(f"/admin/organizations/{org['org_id']}",
                        json={"monthly_budget_usd": 300, "rpm_limit": None, "tpm_limit": 1000})
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["monthly_budget_usd"] == 300 and "rpm_limit" not in body
    assert body["tpm_limit"] == 1000 and body["failure_mode"] == "fail-open"
    listed = api.get("/admin/organizations").json()["organizations"]
    assert org["org_id"] in [o["org_id"] for o in listed]


def test_the_workers_defaults_apply_to_a_bare_org(server):
    org = make_org(server.client())
    assert org["monthly_budget_usd"] == 100 and org["failure_mode"] == "fail_closed"


@pytest.mark.parametrize(("body", "field"), [
    ({}, "name"),
    ({"name": "A", "monthly_budget_usd": "ten"}, "monthly_budget_usd"),
    ({"name": "A", "monthly_budget_usd": -1}, "monthly_budget_usd"),
    ({"name": "A", "monthly_budget": 5}, "monthly_budget"),
    ({"name": "A", "failure_mode": "sometimes"}, "failure_mode"),
    ({"name": "A", "rpm_limit": 0}, "rpm_limit"),
    ({"name": "A", "rpm_limit": True}, "rpm_limit"),
    ({"name": ""}, "name"),
])
def test_a_bad_org_payload_is_400_naming_the_field_and_writes_nothing(server, body, field):
    api = server.client()
    before = len(api.get("/admin/organizations").json()["organizations"])
    message = error_of(api.post("/admin/organizations", json=body), 400, "invalid_request")
    assert field in message
    assert len(api.get("/admin/organizations").json()["organizations"]) == before


def test_a_body_that_is_not_a_json_object_is_400(server):
    api = server.client()
    for content in (b"{", b"[1]", b'"x"', b"\xff"):
        error_of(api.post("/admin/organizations", content=content), 400, "invalid_request")


def test_unknown_ids_are_404(server):
    api = server.client()
    for path in ("/admin/organizations/org_none", "/admin/organizations/org_none/usage",
                 "/admin/users/user_none", "/admin/users/user_none/usage",
                 "/admin/users/user_none/api-keys"):
        error_of(api.get(path), 404, "not_found")
    error_of(api.patch("/admin/organizations/org_none", json={"name": "x"}), 404, "not_found")
    error_of(api.post("/admin/users", json={"email": email(), "org_id": "org_none"}), 404,
             "not_found")


def test_wrong_method_is_405(server):
    error_of(server.client().delete("/admin/organizations"), 405, "method_not_allowed")


def test_provider_keys_are_redacted_and_env_references_shown(server):
    api = server.client()
    org = make_org(api, provider_keys={"openai": LITERAL_PROVIDER_KEY,
                                       "anthropic": "env:ACME_ANTHROPIC_KEY"})
    for answer in (org, api.get(f"/admin/organizations/{org['org_id']}").json(),
                   api.get("/admin/organizations").json(),
                   api.get("/admin/audit").json()):
        assert LITERAL_PROVIDER_KEY not in json.dumps(answer)
    assert org["provider_keys"] == {"openai": "<redacted>", "anthropic": "env:ACME_ANTHROPIC_KEY"}
    # PATCH replaces the whole map, as the Workers gateway does.
    patched = api.patch(f"/admin/organizations/{org['org_id']}",
                        json={"provider_keys": {"gemini": "env:ACME_GEMINI"}}).json()
    assert patched["provider_keys"] == {"gemini": "env:ACME_GEMINI"}
    assert LITERAL_PROVIDER_KEY not in server.log_text()


def test_a_provider_key_must_name_a_provider_of_mitm_yaml(server):
    message = error_of(server.client().post("/admin/organizations", json={
        "name": "T", "provider_keys": {"opneai": "env:X"}}), 400, "invalid_request")
    assert "opneai" in message and "openai" in message


# --- users ---------------------------------------------------------------------------------


def test_users_create_with_a_first_key_show_update_and_find(server):
    api = server.client()
    org = make_org(api)
    address = email()
    user = make_user(api, org["org_id"], address, monthly_limit_usd=20)
    assert user["user_id"].startswith("user_") and user["user"]["email"] == address
    assert user["api_key"].startswith("gw_live_") and user["key_id"]
    assert api.get(f"/admin/users/{user['user_id']}").json()["user"]["monthly_limit_usd"] == 20
    patched = api.patch(f"/admin/users/{user['user_id']}",
                        json={"monthly_limit_usd": 30, "status": "suspended"}).json()
    assert (patched["monthly_limit_usd"], patched["status"]) == (30, "suspended")
    found = api.get("/admin/users", params={"email": address.upper()}).json()["users"]
    assert [u["user_id"] for u in found] == [user["user_id"]]
    by_org = api.get("/admin/users", params={"org_id": org["org_id"]}).json()["users"]
    assert [u["user_id"] for u in by_org] == [user["user_id"]]
    seed_shape = api.get(f"/admin/organizations/{org['org_id']}/users").json()
    assert seed_shape["organization_id"] == org["org_id"] and len(seed_shape["users"]) == 1
    error_of(api.patch(f"/admin/users/{user['user_id']}", json={"status": "gone"}), 400,
             "invalid_request")


def test_an_email_is_unique_within_its_org(server):
    api = server.client()
    org, other = make_org(api), make_org(api)
    address = email()
    make_user(api, org["org_id"], address)
    error_of(api.post("/admin/users", json={"email": address.upper(), "org_id": org["org_id"]}),
             409, "conflict")
    make_user(api, other["org_id"], address)  # another org may have it
    assert len(api.get("/admin/users", params={"org_id": org["org_id"]}).json()["users"]) == 1


# --- keys ----------------------------------------------------------------------------------


def test_keys_create_list_update_and_revoke(server):
    api = server.client()
    org = make_org(api)
    user = make_user(api, org["org_id"], email())
    path = f"/admin/users/{user['user_id']}/api-keys"
    created = api.post(path, json={"name": "laptop", "monthly_limit_usd": 5, "rpm_limit": 3})
    assert created.status_code == 201, created.text
    key = created.json()
    assert key["api_key"].startswith("gw_live_") and key["key_id"] and key["rpm_limit"] == 3
    listed = api.get(path).json()
    assert listed["user_id"] == user["user_id"]
    assert {k["key_id"] for k in listed["api_keys"]} == {key["key_id"], user["key_id"]}
    assert key["api_key"] not in json.dumps(listed)
    updated = api.patch(f"{path}/{key['key_id']}", json={"monthly_limit_usd": 7,
                                                         "max_parallel_requests": 2}).json()
    assert (updated["monthly_limit_usd"], updated["max_parallel_requests"]) == (7, 2)
    revoked = api.delete(f"{path}/{key['key_id']}")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    statuses = {k["key_id"]: k["status"] for k in api.get(path).json()["api_keys"]}
    assert statuses[key["key_id"]] == "revoked"


def test_a_key_is_reached_only_through_its_own_user(server):
    api = server.client()
    org = make_org(api)
    alice, bob = make_user(api, org["org_id"], email()), make_user(api, org["org_id"], email())
    error_of(api.delete(f"/admin/users/{bob['user_id']}/api-keys/{alice['key_id']}"), 404,
             "not_found")
    error_of(api.delete(f"/admin/users/{alice['user_id']}/api-keys/key_none"), 404, "not_found")
    listed = api.get(f"/admin/users/{alice['user_id']}/api-keys")
    assert listed.status_code == 200, listed.text
    assert [k["status"] for k in listed.json()["api_keys"]] == ["active"]


def test_key_rotation_keeps_the_key_id(server):
    api = server.client()
    org = make_org(api)
    user = make_user(api, org["org_id"], email())
    rotated = api.post(f"/admin/users/{user['user_id']}/api-keys/{user['key_id']}/rotate",
                       json={"grace_s": 60})
    assert rotated.status_code == 201, rotated.text
    body = rotated.json()
    assert body["key_id"] == user["key_id"] and body["api_key"] != user["api_key"]
    assert body["previous_key_expires_at"]
    error_of(api.post(f"/admin/users/{user['user_id']}/api-keys/{user['key_id']}/rotate",
                      json={"grace_s": -1}), 400, "invalid_request")


# --- usage, quota resets, audit ------------------------------------------------------------


def test_usage_answers_carry_the_workers_fields(server):
    api = server.client()
    org = make_org(api, monthly_budget_usd=40)
    user = make_user(api, org["org_id"], email(), monthly_limit_usd=12)
    usage = api.get(f"/admin/users/{user['user_id']}/usage").json()
    assert usage["user_id"] == user["user_id"] and usage["usage"]["limit_usd"] == 12
    for name in ("current_usage_usd", "request_count", "monthly_limit_usd", "current_month"):
        assert name in usage
    org_usage = api.get(f"/admin/organizations/{org['org_id']}/usage").json()
    assert org_usage["monthly_budget_usd"] == 40 and org_usage["remaining_budget_usd"] == 40
    assert org_usage["organization_id"] == org["org_id"]
    key_usage = api.get(f"/admin/users/{user['user_id']}/api-keys/{user['key_id']}/usage")
    assert key_usage.status_code == 200 and key_usage.json()["request_count"] == 0
    error_of(api.get(f"/admin/users/{user['user_id']}/usage", params={"month": "2026-13"}), 400,
             "invalid_request")


def test_quota_resets_are_audited_with_their_reason(server):
    api = server.client()
    org = make_org(api)
    user = make_user(api, org["org_id"], email())
    for path in (f"/admin/users/{user['user_id']}", f"/admin/organizations/{org['org_id']}",
                 f"/admin/users/{user['user_id']}/api-keys/{user['key_id']}"):
        response = api.post(f"{path}/reset-quota", json={"reset_reason": f"refund {path}"})
        assert response.status_code == 200, response.text
        assert response.json()["quota"]["month_usage_usd"] == 0
    entries = api.get("/admin/audit").json()["entries"]
    reasons = [json.dumps(e) for e in entries if "reset-quota" in e["action"]]
    assert len(reasons) >= 3 and any(f"refund /admin/users/{user['user_id']}" in r
                                     for r in reasons)
    error_of(api.post(f"/admin/users/{user['user_id']}/reset-quota", json={"why": "x"}), 400,
             "invalid_request")


def test_every_write_is_audited_with_who_what_and_before_after(server):
    api = server.client()
    org = make_org(api, monthly_budget_usd=10)
    api.patch(f"/admin/organizations/{org['org_id']}", json={"monthly_budget_usd": 11})
    since = api.get("/admin/audit").json()["entries"][-1]["at"]
    server.aigw("org", "update", org["org_id"], "--budget", "12")
    entries = api.get("/admin/audit", params={"since": since}).json()["entries"]
    api_entry, cli_entry = entries[0], entries[-1]
    assert api_entry["actor"] == f"admin_key:{server.admin_id}"
    assert api_entry["action"] == f"PATCH /admin/organizations/{org['org_id']}"
    (change,) = api_entry["changes"]
    assert change["key"] == f"org:{org['org_id']}:config"
    assert (change["before"]["monthly_budget_usd"], change["after"]["monthly_budget_usd"]) == \
        (10, 11)
    assert cli_entry["actor"].startswith("cli:") and cli_entry["action"] == "org update"
    assert cli_entry["changes"][0]["after"]["monthly_budget_usd"] == 12
    # The CLI lists the same log.
    assert server.aigw("audit", "--since", since)["entries"][-1]["id"] == cli_entry["id"]
    # A refused write leaves no entry.
    count = len(api.get("/admin/audit").json()["entries"])
    api.patch(f"/admin/organizations/{org['org_id']}", json={"monthly_budget_usd": -5})
    assert len(api.get("/admin/audit").json()["entries"]) == count


def test_no_key_is_ever_logged(server):
    api = server.client()
    org = make_org(api)
    user = make_user(api, org["org_id"], email())
    log = server.log_text()
    assert "/admin/users" in log  # the access log names the request...
    for secret in (server.admin, server.viewer, user["api_key"]):  # ...never a key
        assert secret not in log
    assert user["api_key"] not in json.dumps(api.get("/admin/audit").json())


# --- this node's usage log and reports ----------------------------------------------------


def test_usage_log_report_and_dashboard(server):
    if server.kv is not None and not Store.exists(server.store_dir):
        error_of(server.client().get("/admin/usage/log"), 503, "store_unavailable")
        return
    api = server.client()
    log = api.get("/admin/usage/log", params={"format": "csv"})
    assert log.status_code == 200 and log.headers["content-type"].startswith("text/csv")
    report = api.get("/admin/usage/report", params={"by": "org"})
    assert report.status_code == 200 and report.json()["by"] == "org"
    page = api.get("/admin/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    error_of(api.get("/admin/usage/report", params={"by": "planet"}), 400, "invalid_request")
    error_of(api.get("/admin/usage/log", params={"since": "yesterday"}), 400, "invalid_request")


# --- a key made through the API, used through the gateway ---------------------------------


def test_a_key_created_through_the_api_works_through_mitmdump(server, tmp_path,
                                                                fake_provider_server):
    if server.kv is not None:
        pytest.skip("the cloudflare target reaches a gateway through aigw sync (test_e2e_sync)")
    api = server.client()
    org = make_org(api, monthly_budget_usd=50)
    user = make_user(api, org["org_id"], email(), monthly_limit_usd=10)
    key = api.post(f"/admin/users/{user['user_id']}/api-keys", json={"name": "sdk"}).json()
    gateway = start_gateway(tmp_path / "gw", fake_provider_server.address,
                            store_dir=server.store_dir)
    try:
        client = gateway.openai_client(key["api_key"])
        completion = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
        assert completion.choices[0].message.content
        assert fake_provider_server.last.credential == OPENAI_KEY
        usage_path = f"/admin/users/{user['user_id']}/api-keys/{key['key_id']}/usage"
        deadline = time.monotonic() + 10  # the gateway settles just after the response
        while (usage := api.get(usage_path).json())["request_count"] < 1:
            assert time.monotonic() < deadline, usage
            time.sleep(0.02)
        assert usage["request_count"] == 1 and usage["current_usage_usd"] > 0
        api.delete(f"/admin/users/{user['user_id']}/api-keys/{key['key_id']}")
        import openai

        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    finally:
        gateway.stop()


# --- a script written against the Workers gateway -----------------------------------------


def test_the_workers_admin_script_runs_unchanged(server):
    """The calls of the Workers gateway's own scripts/admin.js, in its order, with its bodies and
    headers, reading the fields it reads (a failed `response.ok` is what would stop it)."""
    api = server.client()
    api.headers["content-type"] = "application/json"  # it sends one on every request

    def call(method: str, path: str, body: dict | None = None) -> dict:
        response = api.request(method, path, content=None if body is None else json.dumps(body))
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    metrics = call("GET", "/admin/metrics")["entities"]
    assert {"users", "organizations", "api_keys"} <= set(metrics)
    org = call("POST", "/admin/organizations", {"name": "Script Co", "monthly_budget_usd": 1000.0,
                                                "failure_mode": "fail-open"})["organization"]
    assert (org["name"], org["monthly_budget_usd"], org["failure_mode"]) == \
        ("Script Co", 1000, "fail-open")
    shown = call("GET", f"/admin/organizations/{org['org_id']}")["organization"]
    assert shown["created_at"]
    usage = call("GET", f"/admin/organizations/{org['org_id']}/usage")
    assert usage["organization_id"] == org["org_id"] and usage["last_update"]
    assert f"{usage['month_usage_usd']:.2f}" == "0.00"
    assert f"{usage['remaining_budget_usd']:.2f}" == "1000.00" and usage["request_count"] == 0
    created = call("POST", "/admin/users", {"email": email(), "org_id": org["org_id"],
                                            "monthly_limit_usd": 200.0})
    user = created["user"]
    assert user["status"] == "active" and created["api_key"].startswith("gw_live_")
    assert [u["user_id"] for u in call(
        "GET", f"/admin/organizations/{org['org_id']}/users")["users"]] == [user["user_id"]]
    assert call("GET", f"/admin/users/{user['user_id']}")["user"]["monthly_limit_usd"] == 200
    seed_usage = call("GET", f"/admin/users/{user['user_id']}/usage")
    assert seed_usage["user_id"] == user["user_id"] and seed_usage["usage"]["limit_usd"] == 200
    assert f"{seed_usage['usage']['remaining_usd']:.2f}" == "200.00"
    reset = call("POST", f"/admin/users/{user['user_id']}/reset-quota",
                 {"reset_reason": "Manual reset via admin script"})
    assert reset["user_id"] == user["user_id"] and reset["quota"]["month_usage_usd"] == 0
    key = call("POST", f"/admin/users/{user['user_id']}/api-keys", {})
    assert key["key_id"] and key["api_key"].startswith("gw_live_")
    keys = call("GET", f"/admin/users/{user['user_id']}/api-keys")["api_keys"]
    assert {k["key_id"] for k in keys} == {key["key_id"], created["key_id"]}
    revoked = call("DELETE", f"/admin/users/{user['user_id']}/api-keys/{key['key_id']}")
    assert (revoked["key_id"], revoked["user_id"]) == (key["key_id"], user["user_id"])
    call("DELETE", f"/admin/users/{user['user_id']}")
    assert api.get(f"/admin/users/{user['user_id']}").status_code == 404
