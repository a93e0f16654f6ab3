"""`aigw serve`'s `/admin/vkeys` and `/admin/metrics`: the later Workers gateway's paths, payloads,
status codes and answer shapes, on a real server over the local store and over the fake
Cloudflare KV namespace (the `server` fixture of test_admin_api)."""

# ruff: noqa: F811  (server: the fixture imported from test_admin_api)

import re

from tests.test_admin_api import email, error_of, make_org, make_user, server  # noqa: F401

VKEY_FIELDS = {"key_id", "org_id", "user", "name", "monthly_limit_usd", "status", "created_at"}


def account(api) -> tuple[str, str]:
    org = make_org(api, monthly_budget_usd=100, failure_mode="fail-closed")
    return org["org_id"], make_user(api, org["org_id"], email())["user_id"]


def create(api, **body) -> dict:
    response = api.post("/admin/vkeys", json=body)
    assert response.status_code == 200, response.text  # the later gateway answers 200
    return response.json()


def test_a_virtual_key_is_created_shown_once_and_read_without_its_hash(server):
    api = server.client()
    org_id, user_id = account(api)
    made = create(api, org_id=org_id, user=user_id, name="laptop")
    assert set(made) == {"virtual_key", "api_key", "message"}
    assert re.fullmatch(r"gw_live_[0-9a-f]{48}", made["api_key"])
    key = made["virtual_key"]
    assert set(key) == VKEY_FIELDS
    assert (key["org_id"], key["user"], key["name"], key["monthly_limit_usd"], key["status"]) \
        == (org_id, user_id, "laptop", 10, "active")  # the later gateway's default limit
    shown = api.get(f"/admin/vkeys/{key['key_id']}")
    assert shown.status_code == 200 and shown.json() == {"virtual_key": key}
    unnamed = create(api, org_id=org_id, user=user_id, monthly_limit_usd=2.5)["virtual_key"]
    assert "name" not in unnamed and unnamed["monthly_limit_usd"] == 2.5
    listed = api.get("/admin/vkeys", params={"org_id": org_id}).json()["virtual_keys"]
    assert {k["key_id"] for k in listed} == {key["key_id"], unnamed["key_id"]}
    assert api.get("/admin/metrics").json()["entities"]["virtual_keys"] >= 2
    assert server.admin_id not in str(listed) and made["api_key"] not in server.log_text()


def test_create_refuses_what_the_later_gateway_refuses(server):
    api = server.client()
    org_id, user_id = account(api)
    other_org, _ = account(api)
    error_of(api.post("/admin/vkeys", json={"org_id": "org_nobody", "user": user_id}), 404,
             "not_found")
    error_of(api.post("/admin/vkeys", json={"org_id": org_id, "user": "user_nobody"}), 404,
             "not_found")
    error_of(api.post("/admin/vkeys", json={"org_id": other_org, "user": user_id}), 400,
             "invalid_request")
    assert "user" in error_of(api.post("/admin/vkeys", json={"org_id": org_id}), 400,
                              "invalid_request")
    for limit in (0, -1, "10"):
        error_of(api.post("/admin/vkeys", json={"org_id": org_id, "user": user_id,
                                                "monthly_limit_usd": limit}),
                 400, "invalid_request")
    error_of(server.client(server.viewer).post(
        "/admin/vkeys", json={"org_id": org_id, "user": user_id}), 403, "permission_denied")


def test_patch_usage_reset_and_delete(server):
    api = server.client()
    org_id, user_id = account(api)
    key = create(api, org_id=org_id, user=user_id)["virtual_key"]
    path = f"/admin/vkeys/{key['key_id']}"
    patched = api.patch(path, json={"name": "ci", "monthly_limit_usd": 5, "status": "revoked"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["message"] == "Virtual key updated successfully"
    assert {k: patched.json()["virtual_key"][k] for k in ("name", "monthly_limit_usd", "status")} \
        == {"name": "ci", "monthly_limit_usd": 5, "status": "revoked"}
    error_of(api.patch(path, json={"status": "paused"}), 400, "invalid_request")
    error_of(api.patch(path, json={"monthly_limit_usd": 0}), 400, "invalid_request")
    error_of(api.patch(path, json={"colour": "red"}), 400, "invalid_request")
    error_of(api.patch("/admin/vkeys/vkey_0_none", json={"name": "x"}), 404, "not_found")

    usage = api.get(f"{path}/usage").json()
    assert (usage["key_id"], usage["name"], usage["user"]) == (key["key_id"], "ci", user_id)
    assert set(usage["usage"]) == {"current_month", "usage_usd", "limit_usd", "remaining_usd",
                                   "request_count", "last_update"}
    assert (usage["usage"]["usage_usd"], usage["usage"]["limit_usd"]) == (0, 5)
    reset = api.post(f"{path}/reset-quota")
    assert reset.status_code == 200, reset.text
    assert reset.json()["message"] == "Virtual key quota reset successfully"
    assert reset.json()["quota"]["month_usage_usd"] == 0

    # The records hold virtual keys now: a key made the first layout's way is one too.
    later = api.post(f"/admin/users/{user_id}/api-keys", json={"name": "more"}).json()
    assert api.get(f"/admin/vkeys/{later['key_id']}").json()["virtual_key"]["name"] == "more"

    deleted = api.delete(path)
    assert deleted.status_code == 200 and deleted.json() == {
        "message": "Virtual key deleted successfully"}
    for method, url in (("GET", path), ("GET", f"{path}/usage"), ("DELETE", path),
                        ("POST", f"{path}/reset-quota")):
        error_of(api.request(method, url), 404, "not_found")
    actions = [entry.get("action") for entry in api.get("/admin/audit").json()["entries"]]
    assert f"DELETE {path}" in actions and f"PATCH {path}" in actions


def test_metrics_counts_keys_and_organizations(server):
    api = server.client()
    before = api.get("/admin/metrics").json()
    assert set(before) == {"timestamp", "system", "entities"}
    # The later gateway's names, and the first's (`users`, `api_keys`) beside them.
    assert set(before["entities"]) == {"virtual_keys", "organizations", "users", "api_keys"}
    org_id, user_id = account(api)  # the user comes with a first key
    create(api, org_id=org_id, user=user_id)
    after = api.get("/admin/metrics", params={"mode": "exact"}).json()["entities"]
    keys = before["entities"]["virtual_keys"] + 2
    assert after == {"virtual_keys": keys, "organizations": before["entities"]["organizations"] + 1,
                     "users": before["entities"]["users"] + 1, "api_keys": keys}
    assert server.client(server.viewer).get("/admin/metrics").status_code == 200
