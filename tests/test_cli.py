import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

AIGW = shutil.which("aigw", path=str(Path(sys.executable).parent)) or shutil.which("aigw")


@pytest.fixture
def aigw(tmp_path):
    store = tmp_path / "store"

    def run(*args: str, env: dict | None = None, stdin: str | None = None,
            store_args: bool = True) -> subprocess.CompletedProcess:
        prefix = ["--store", str(store)] if store_args else []
        return subprocess.run(
            [AIGW, *prefix, *args], cwd=tmp_path, capture_output=True, text=True,
            env=env, input=stdin, timeout=30,
        )

    return run


CREATED = "aigw: created a new store at "


def ok(result: subprocess.CompletedProcess) -> dict:
    """The JSON answer of a command that succeeded, saying nothing on stderr (but, for the
    first command on a store, that it created it)."""
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if not line.startswith(CREATED)] == []
    return json.loads(result.stdout)


def one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aigw: error: "), result.stderr
    return lines[0]


def test_console_script_is_installed():
    assert AIGW is not None


def test_org_user_key_usage_flow(aigw):
    org = ok(aigw("org", "create", "--name", "Acme", "--budget", "100",
                  "--failure-mode", "fail-open"))
    assert org["org_id"].startswith("org_") and org["failure_mode"] == "fail_open"
    user = ok(aigw("user", "create", "--org", org["org_id"], "--email", "dev@example.com",
                   "--limit", "20"))
    assert user["status"] == "active"
    key = ok(aigw("key", "create", "--user", user["user_id"], "--name", "laptop",
                  "--limit", "5"))
    assert key["api_key"].startswith("gw_live_") and key["status"] == "active"
    usage = ok(aigw("usage", "user", user["user_id"]))
    assert usage["current_usage_usd"] == 0.0 and usage["remaining_usd"] == 20.0
    assert ok(aigw("usage", "org", org["org_id"]))["monthly_budget_usd"] == 100.0
    assert ok(aigw("usage", "key", key["key_id"]))["monthly_limit_usd"] == 5.0
    listed = ok(aigw("key", "list", "--user", user["user_id"]))
    assert key["api_key"] not in json.dumps(listed)
    revoked = ok(aigw("key", "revoke", key["key_id"]))
    assert revoked["status"] == "revoked"
    health = ok(aigw("health"))
    assert health["ok"] is True and health["records"]["apikeys"] == 1


def test_register_from_env(aigw):
    org = ok(aigw("org", "create", "--name", "A", "--budget", "1"))
    user = ok(aigw("user", "create", "--org", org["org_id"], "--email", "a@b.c",
                   "--limit", "1"))
    env = {"PATH": "/usr/bin:/bin", "MY_KEY": "sk-secret-value"}
    result = aigw("key", "register", "--user", user["user_id"], "--name", "own",
                  "--from-env", "MY_KEY", env=env)
    assert "sk-secret-value" not in result.stdout + result.stderr
    registered = ok(result)
    assert "api_key" not in registered and registered["passthrough"] is True
    missing = aigw("key", "register", "--user", user["user_id"], "--name", "own",
                   "--from-env", "UNSET_VAR", env={"PATH": "/usr/bin:/bin"})
    assert "UNSET_VAR" in one_error_line(missing, 1)


def test_unknown_id_is_one_line_exit_1(aigw):
    ok(aigw("org", "create", "--name", "A", "--budget", "1"))
    line = one_error_line(aigw("usage", "user", "user_nope"), 1)
    assert "user_nope" in line
    one_error_line(aigw("key", "revoke", "key_nope"), 1)


def test_bad_budget_is_exit_2(aigw):
    for value in ("-5", "abc", "nan", "inf"):
        line = one_error_line(aigw("org", "create", "--name", "A", "--budget", value), 2)
        assert "--budget" in line
    one_error_line(aigw(), 2)
    one_error_line(aigw("org", "update", "org_x"), 2)


def test_bad_config_names_file_and_key(aigw, tmp_path):
    (tmp_path / "mitm.yaml").write_text("store:\n  hash: md5\n")
    line = one_error_line(aigw("health", store_args=False), 1)
    assert "mitm.yaml" in line and "store.hash" in line
    other = tmp_path / "other.yaml"
    other.write_text("store: {hash: md5}\n")
    line = one_error_line(aigw("--config", str(other), "org", "show", "org_x"), 1)
    assert "other.yaml" in line and "store.hash" in line
    missing = aigw("--config", str(tmp_path / "absent.yaml"), "health")
    assert missing.returncode == 1 and "absent.yaml" in missing.stderr


def test_health_reports_unopenable_store(aigw, tmp_path):
    (tmp_path / "file").write_text("")
    result = aigw("--store", str(tmp_path / "file"), "health", store_args=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["ok"] is False


def test_import_sha256_wrangler_dump(aigw, tmp_path):
    raw = "gw_live_" + "ab" * 16
    digest = hashlib.sha256(raw.encode()).hexdigest()
    dump = [
        {"key": "org:org_old:config", "value": json.dumps({
            "org_id": "org_old", "name": "Old", "monthly_budget_usd": 50,
            "failure_mode": "fail-closed"})},
        {"key": "user:user_old:config", "value": json.dumps({
            "user_id": "user_old", "email": "old@example.com", "monthly_limit_usd": 10,
            "org_id": "org_old", "status": "active"})},
        {"key": f"apikey:{digest}", "value": json.dumps({
            "user_id": "user_old", "key_id": "key_old", "name": "k", "status": "active"})},
        {"key": "user:user_old:keys:key_old", "value": json.dumps({
            "name": "k", "status": "active", "revoked_at": None})},
    ]
    (tmp_path / "dump.json").write_text(json.dumps(dump))
    (tmp_path / "mitm.yaml").write_text(f"store:\n  path: {tmp_path / 'sha'}\n  hash: sha256\n")
    assert ok(aigw("import", "dump.json", store_args=False)) == {"imported": 4}
    health = ok(aigw("health", store_args=False))
    assert health["hash"] == "sha256" and health["records"]["apikeys"] == 1
    assert ok(aigw("usage", "key", "key_old", store_args=False))["level"] == "key"
    exported = aigw("export", store_args=False)
    assert exported.returncode == 0
    assert sorted(json.loads(exported.stdout), key=lambda i: i["key"]) == sorted(
        dump, key=lambda i: i["key"])
    revoked = ok(aigw("key", "revoke", "key_old", store_args=False))
    assert revoked["status"] == "revoked"


def test_import_invalid_item_writes_nothing(aigw):
    bad = json.dumps([{"key": "misc", "value": "1"},
                      {"key": "user:u:config", "value": "{not json"}])
    line = one_error_line(aigw("import", "-", stdin=bad), 1)
    assert "item 1" in line and "user:u:config" in line
    assert "no store at" in one_error_line(aigw("export"), 1)  # nothing written, none left


def test_demo_once(aigw):
    first = ok(aigw("demo"))
    assert first["created"] is True and first["api_key"].startswith("gw_live_")
    second = ok(aigw("demo"))
    assert second["created"] is False and "api_key" not in second
    assert second["key_id"] == first["key_id"]


def test_a_missing_store_is_an_error_not_an_empty_one(aigw, tmp_path):
    store = tmp_path / "store"
    health = aigw("health")
    assert health.returncode == 1 and json.loads(health.stdout)["ok"] is False
    assert f"no store at {store}" in health.stderr
    assert "no store at" in one_error_line(aigw("usage", "org", "org_x"), 1)
    assert "no store at" in one_error_line(aigw("export"), 1)
    assert not store.exists()  # nothing was created on the way
    ok(aigw("org", "create", "--name", "A", "--budget", "1"))  # the first record makes one
    assert ok(aigw("health"))["ok"] is True


def test_org_models_and_provider_keys_from_the_command_line(aigw):
    org = ok(aigw("org", "create", "--name", "A", "--budget", "1",
                  "--allowed-models", "gpt-4o, gpt-4o-mini",
                  "--provider-key", "openai=env:ACME_OPENAI_KEY"))
    assert org["allowed_models"] == ["gpt-4o", "gpt-4o-mini"]
    assert org["provider_keys"] == {"openai": "<redacted>"}
    org_id = org["org_id"]
    ok(aigw("org", "update", org_id, "--provider-key", "anthropic=env:ACME_ANTHROPIC_KEY"))
    stored = next(json.loads(item["value"]) for item in ok(aigw("export"))
                  if item["key"] == f"org:{org_id}:config")
    assert stored["provider_keys"] == {"openai": "env:ACME_OPENAI_KEY",
                                       "anthropic": "env:ACME_ANTHROPIC_KEY"}
    updated = ok(aigw("org", "update", org_id, "--allowed-models", "",
                      "--provider-key", "openai="))
    assert "allowed_models" not in updated and updated["provider_keys"] == {
        "anthropic": "<redacted>"}
    # A literal key would sit in shell history: refused before anything is written.
    line = one_error_line(aigw("org", "update", org_id, "--provider-key",
                               "openai=sk-literal-fake"), 2)
    assert "env:VAR" in line and "sk-literal-fake" not in line


def test_provider_key_errors_never_repeat_what_was_typed(aigw):
    ok(aigw("org", "create", "--name", "A", "--budget", "1"))
    for typed in ("sk-proj-fake-typed-0000", "=sk-proj-fake-typed-0000",
                  "openai:sk-proj-fake-typed-0000", "openai=env:sk-proj-fake-typed-0000"):
        line = one_error_line(aigw("org", "create", "--name", "B", "--budget", "1",
                                   "--provider-key", typed), 2)
        assert "sk-proj-fake" not in line


def test_a_failed_first_command_leaves_no_store_behind(aigw, tmp_path):
    (tmp_path / "bad.json").write_text('[{"key": "org:x:config", "value": "not json"}]')
    one_error_line(aigw("import", str(tmp_path / "bad.json")), 1)
    one_error_line(aigw("org", "create", "--name", " ", "--budget", "1"), 1)
    assert not (tmp_path / "store").exists()


def test_a_command_that_creates_a_store_says_where_on_stderr(aigw, tmp_path):
    first = aigw("org", "create", "--name", "A", "--budget", "1")
    assert first.returncode == 0 and first.stderr == f"{CREATED}{tmp_path / 'store'}\n"
    assert aigw("org", "create", "--name", "B", "--budget", "1").stderr == ""  # it exists now
    for name, args in (("demo", ("demo",)), ("import", ("import", "-"))):
        other = tmp_path / name
        done = aigw("--store", str(other), *args, stdin="[]", store_args=False)
        assert done.returncode == 0 and done.stderr == f"{CREATED}{other}\n", name
    failed = aigw("--store", str(tmp_path / "never"), "org", "create", "--name", " ",
                  "--budget", "1", store_args=False)
    assert CREATED not in failed.stderr and not (tmp_path / "never").exists()
    assert CREATED not in aigw("--store", str(tmp_path / "never"), "health",
                               store_args=False).stderr


BAD_IMPORT = [
    ("user:u1:quota", {"month_usage_usd": 1, "current_month": "2026-11", "request_count": "1.5"},
     'item 1: user:u1:quota: request_count: expected an integer, got "1.5"'),
    ("apikey:" + "ab" * 32, {"user_id": "u1", "passthrough": "false"},
     'item 1: apikey:abababababab...: passthrough: expected a boolean, got "false"'),
    ("org:o2:config", {"org_id": "o2", "monthly_budget_usd": "inf"},
     'item 1: org:o2:config: monthly_budget_usd: expected a number or null, got "inf"'),
    ("user:u2:config", {"user_id": "u2", "status": "Active"},
     'item 1: user:u2:config: status: expected one of active, suspended'),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_IMPORT)
def test_import_refuses_a_bad_record_naming_key_field_and_reason(aigw, tmp_path, key, value,
                                                                 message):
    good = {"key": "org:o1:config", "value": json.dumps({"org_id": "o1", "name": "A"})}
    (tmp_path / "dump.json").write_text(json.dumps([good, {"key": key,
                                                           "value": json.dumps(value)}]))
    line = one_error_line(aigw("import", "dump.json"), 1)
    assert message in line and "internal error" not in line
    assert not (tmp_path / "store").exists()  # nothing written, no store left behind


def test_errors_never_show_a_credential(aigw, tmp_path):
    provider_key = "sk-proj-" + "Zq7" * 15
    gateway_key = "gw_live_" + "ab" * 16
    dump = [
        {"key": "org:o1:config", "value": json.dumps({"provider_keys": provider_key})},
        {"key": "org:o2:config", "value": json.dumps({"provider_keys": {"openai": provider_key},
                                                      "failure_mode": provider_key})},
        {"key": "apikey:" + "cd" * 32, "value": json.dumps({"user_id": "u",
                                                            "passthrough": gateway_key})},
        {"key": "user:u:config", "value": json.dumps({"status": gateway_key[:20]})},
        {"key": "user:u:keys:k", "value": json.dumps({"key_id": provider_key})},
    ]
    (tmp_path / "dump.json").write_text(json.dumps(dump))
    result = aigw("import", "dump.json")
    line = one_error_line(result, 1)
    assert "provider_keys: expected an object" in line and "and 2 more bad items" in line
    # An org record already in the store, with a literal provider key, and a bad field.
    ok(aigw("import", "-", stdin=json.dumps([{"key": "org:o3:config", "value": json.dumps({
        "org_id": "o3", "provider_keys": {"openai": provider_key}})}])))
    shown = ok(aigw("org", "show", "o3"))
    assert shown["provider_keys"] == {"openai": "<redacted>"}
    updated = aigw("org", "update", "o3", "--name", provider_key)
    assert updated.returncode == 0
    for done in (result, updated, aigw("org", "update", "o3", "--budget", "1",
                                       "--provider-key", f"openai={provider_key}"),
                 aigw("user", "show", gateway_key), aigw("key", "revoke", gateway_key),
                 aigw("usage", "key", provider_key)):
        assert provider_key[:12] not in done.stderr and "gw_live_" not in done.stderr, done


def test_usage_shows_the_parts_the_gateway_counts(aigw):
    org = ok(aigw("org", "create", "--name", "A", "--budget", "10"))
    user = ok(aigw("user", "create", "--org", org["org_id"], "--email", "a@b.c",
                   "--limit", "5"))
    ok(aigw("import", "-", stdin=json.dumps([{
        "key": f"user:{user['user_id']}:quota",
        "value": json.dumps({"month_usage_usd": 1.25, "request_count": 2,
                             "current_month": ok(aigw("usage", "org", org["org_id"]))[
                                 "current_month"]})}])))
    usage = ok(aigw("usage", "user", user["user_id"]))
    assert {k: usage[k] for k in ("current_usage_usd", "this_node_usd", "other_nodes_usd",
                                  "quota_record_usd", "request_count", "this_node_requests",
                                  "other_nodes_requests", "quota_record_requests",
                                  "remaining_usd")} == {
        "current_usage_usd": 1.25, "this_node_usd": 0.0, "other_nodes_usd": 0.0,
        "quota_record_usd": 1.25, "request_count": 2, "this_node_requests": 0,
        "other_nodes_requests": 0, "quota_record_requests": 2, "remaining_usd": 3.75}


def test_import_of_json_nested_too_deeply_is_one_error_line(aigw, tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    line = one_error_line(aigw("import", "deep.json"), 1)
    assert "deep.json: not valid JSON: nested too deeply" in line
    for depth in (900, 5_000):  # within and past what Python's own JSON reader nests
        nested = "[" * depth + "]" * depth
        (tmp_path / "deep_value.json").write_text(
            '[{"key": "org:o:config", "value": {"name": ' + nested + '}}]')
        line = one_error_line(aigw("import", "deep_value.json"), 1)
        assert "internal error" not in line and "deep_value.json: " in line
