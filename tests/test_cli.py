import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from store.cli import cli, main

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
    assert org["org_id"].startswith("org_") and org["failure_mode"] == "fail-open"
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


def test_a_usage_error_of_the_real_binary_is_one_line_exit_2(aigw):
    # The in-process tests below cover every case; this one runs the installed console script.
    line = one_error_line(aigw("org", "create", "--name", "A", "--budget", "-5"), 2)
    assert "--budget" in line
    one_error_line(aigw(), 2)


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
    assert org["provider_keys"] == {"openai": "env:ACME_OPENAI_KEY"}  # a name, not a secret
    org_id = org["org_id"]
    ok(aigw("org", "update", org_id, "--provider-key", "anthropic=env:ACME_ANTHROPIC_KEY"))
    stored = next(json.loads(item["value"]) for item in ok(aigw("export"))
                  if item["key"] == f"org:{org_id}:config")
    assert stored["provider_keys"] == {"openai": "env:ACME_OPENAI_KEY",
                                       "anthropic": "env:ACME_ANTHROPIC_KEY"}
    updated = ok(aigw("org", "update", org_id, "--allowed-models", "",
                      "--provider-key", "openai="))
    assert "allowed_models" not in updated and updated["provider_keys"] == {
        "anthropic": "env:ACME_ANTHROPIC_KEY"}
    # A literal key would sit in shell history: refused before anything is written.
    line = one_error_line(aigw("org", "update", org_id, "--provider-key",
                               "openai=sk-literal-fake"), 2)
    assert "env:VAR" in line and "sk-literal-fake" not in line


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


# --------------------------------------------------------------------------- in-process (CliRunner)
# Argument handling, run in this process through click's CliRunner: the same contract as the
# binary (one JSON value on stdout, or one `aigw: error:` line on stderr; exit 2 for a wrong
# command line, 1 for a command that failed), without a Python start per case.


@pytest.fixture
def run(tmp_path, monkeypatch):
    """`aigw --store TMP/store ARGS` in-process, from a directory without a mitm.yaml."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"

    def invoke(*args: str, stdin: str | None = None, env: dict | None = None,
               store_args: bool = True) -> Result:
        prefix = ["--store", str(store)] if store_args else []
        return CliRunner().invoke(cli, [*prefix, *args], input=stdin, env=env,
                                  catch_exceptions=False)

    return invoke


def answer(result: Result) -> dict:
    assert result.exit_code == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if not line.startswith(CREATED)] == []
    return json.loads(result.stdout)


def error(result: Result, code: int) -> str:
    """The one error line of a failed command (nothing on stdout)."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aigw: error: "), result.stderr
    return lines[0]


def _commands(group=cli, path=()):
    """Every group and command, as its path of names."""
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))


@pytest.mark.parametrize("path", list(_commands()), ids=lambda p: " ".join(p) or "aigw")
def test_help_works_on_every_group_and_command(run, path):
    for flag in ("--help", "-h"):
        result = run(*path, flag, store_args=False)
        assert result.exit_code == 0 and result.stderr == ""
        assert result.stdout.startswith(f"Usage: {' '.join(('aigw', *path))} ")


def test_every_documented_command_is_there():
    assert set(_commands()) >= {
        (), ("org",), ("org", "create"), ("org", "update"), ("org", "show"), ("org", "list"),
        ("user",), ("user", "create"), ("user", "update"), ("user", "show"), ("user", "list"),
        ("key",), ("key", "create"),
        ("key", "register"), ("key", "rotate"), ("key", "revoke"), ("key", "list"), ("usage",), ("quota",),
        ("quota", "reset"), ("log",), ("report",), ("import",), ("export",), ("health",),
        ("sync",), ("demo",), ("admin-key",), ("admin-key", "create"), ("admin-key", "list"),
        ("admin-key", "revoke"), ("audit",), ("serve",)}


def test_key_rotate_prints_the_new_key_once_and_refuses_in_one_line(run):
    org = answer(run("org", "create", "--name", "A", "--budget", "5"))
    user = answer(run("user", "create", "--org", org["org_id"], "--email", "a@b.c",
                      "--limit", "2"))
    key = answer(run("key", "create", "--user", user["user_id"]))
    rotated = answer(run("key", "rotate", key["key_id"], "--grace-s", "120"))
    assert rotated["key_id"] == key["key_id"] and rotated["api_key"] != key["api_key"]
    assert rotated["previous_key_expires_at"] > rotated["rotated_at"]
    assert key["api_key"] not in json.dumps(rotated)
    for bad in ("-1", "nan", "inf", "2592001", "soon"):
        line = error(run("key", "rotate", key["key_id"], "--grace-s", bad), 2)
        assert "--grace-s" in line and ("30 days" in line or "number of seconds" in line)
    assert "unknown key key_x" in error(run("key", "rotate", "key_x"), 1)
    answer(run("key", "revoke", key["key_id"]))
    assert "is revoked" in error(run("key", "rotate", key["key_id"]), 1)
    (listed,) = answer(run("key", "list", "--user", user["user_id"]))["keys"]
    assert listed["status"] == "revoked"
    assert listed["previous_key_expires_at"] == rotated["previous_key_expires_at"]


@pytest.mark.parametrize(("args", "flag"), [
    (("org", "create", "--name", "A", "--budget", "1", "--bogus"), "--bogus"),
    (("org", "show", "o", "--budget", "1"), "--budget"),
    (("user", "create", "--org", "o", "--email", "e", "--limit", "1", "--status", "active"),
     "--status"),
    (("key", "revoke", "k", "--force"), "--force"),
    (("usage", "user", "u", "--year", "2026"), "--year"),
    (("log", "--month", "2026-11"), "--month"),
    (("report", "--since", "2026-11-01"), "--since"),
    (("health", "--verbose"), "--verbose"),
    (("export", "--format", "csv"), "--format"),
    (("sync", "--forever"), "--forever"),
    (("demo", "--again"), "--again"),
    (("--bogus", "health"), "--bogus"),
])
def test_an_unknown_flag_is_exit_2_naming_it(run, args, flag):
    assert flag in error(run(*args), 2)


@pytest.mark.parametrize("args", [
    ("nope",), ("org",), ("org", "delete", "o"), ("org", "show", "o", "extra"),
    ("demo", "extra"), ("usage", "team", "x"), ("quota", "reset", "org", "o", "--reason"),
])
def test_a_wrong_command_line_is_exit_2(run, args):
    error(run(*args), 2)


@pytest.mark.parametrize("value", ["-5", "-0.01", "abc", "", "nan", "inf", "-inf", "1e400",
                                   "1,5", "$5", "0x10"])
@pytest.mark.parametrize("args", [
    ("org", "create", "--name", "A", "--budget", "{}"),
    ("org", "create", "--name", "A", "--budget", "1", "--fallback-daily-limit", "{}"),
    ("org", "update", "o", "--budget", "{}"),
    ("user", "create", "--org", "o", "--email", "e", "--limit", "{}"),
    ("user", "update", "u", "--limit", "{}"),
    ("key", "create", "--user", "u", "--limit", "{}"),
    ("key", "register", "--user", "u", "--name", "n", "--from-env", "V", "--limit", "{}"),
], ids=lambda a: " ".join(a[:2]) + " " + a[a.index("{}") - 1])
def test_a_bad_amount_is_exit_2_naming_the_flag(run, tmp_path, args, value):
    flag = args[args.index("{}") - 1]
    line = error(run(*(value if a == "{}" else a for a in args)), 2)
    assert f"'{flag}'" in line and "non-negative number of USD" in line
    assert not (tmp_path / "store").exists()  # refused before anything opened a store


@pytest.mark.parametrize(("value", "stored"), [("0", 0.0), ("12.5", 12.5), ("1e2", 100.0),
                                                (" 3 ", 3.0)])
def test_a_good_amount_is_taken_as_usd(run, value, stored):
    assert answer(run("org", "create", "--name", "A", "--budget", value))[
        "monthly_budget_usd"] == stored


@pytest.mark.parametrize(("args", "missing"), [
    (("org", "create", "--budget", "1"), "--name"),
    (("org", "create", "--name", "A"), "--budget"),
    (("org", "update"), "ORG_ID"),
    (("org", "show"), "ORG_ID"),
    (("user", "create", "--email", "e", "--limit", "1"), "--org"),
    (("user", "create", "--org", "o", "--limit", "1"), "--email"),
    (("user", "create", "--org", "o", "--email", "e"), "--limit"),
    (("user", "update"), "USER_ID"),
    (("user", "show"), "USER_ID"),
    (("key", "create"), "--user"),
    (("key", "register", "--user", "u", "--name", "n"), "--from-env"),
    (("key", "register", "--user", "u", "--from-env", "V"), "--name"),
    (("key", "revoke"), "KEY_ID"),
    (("key", "list"), "--user"),
    (("usage", "user"), "ID"),
    (("usage",), "user|org|key"),
    (("quota", "reset", "user", "u"), "--reason"),
    (("quota", "reset", "user"), "ID"),
    (("import",), "FILE"),
    (("--store",), "--store"),
])
def test_a_missing_id_or_required_option_is_exit_2_naming_it(run, args, missing):
    assert missing in error(run(*args), 2)


@pytest.mark.parametrize(("args", "flags"), [
    (("org", "update", "o"), "--name, --budget, --failure-mode, --fallback-daily-limit, "
                             "--allowed-models, --provider-key, --rpm, --tpm, --max-parallel"),
    (("user", "update", "u"), "--limit, --status, --email, --rpm, --tpm, --max-parallel"),
    (("key", "update", "k"), "--limit, --rpm, --tpm, --max-parallel"),
])
def test_an_update_with_nothing_to_change_is_exit_2(run, args, flags):
    line = error(run(*args), 2)
    assert f"{' '.join(args[:2])}: nothing to change (give one of {flags})" in line


@pytest.mark.parametrize("typed", [
    "sk-proj-fake-typed-0000", "=sk-proj-fake-typed-0000", "openai:sk-proj-fake-typed-0000",
    "openai=env:sk-proj-fake-typed-0000", "openai=sk-proj-fake-typed-0000",
    "openai=env:", "openai=env", "openai=ENV:VAR", "openai=env:1VAR", "openai=env:MY-VAR",
    "openai=env:A B", "openai=$VAR", "open ai=env:VAR", "=env:VAR", "openai", "",
])
def test_a_bad_provider_key_form_is_exit_2_and_never_repeats_it(run, tmp_path, typed):
    line = error(run("org", "create", "--name", "B", "--budget", "1", "--provider-key", typed), 2)
    assert "'--provider-key'" in line and "env:VAR" in line
    for part in ("sk-proj-fake", "1VAR", "MY-VAR", "$VAR"):
        assert part not in line
    assert not (tmp_path / "store").exists()


def test_good_provider_key_forms(run):
    org = answer(run("org", "create", "--name", "A", "--budget", "1",
                     "--provider-key", "openai=env:ACME_OPENAI", "--provider-key",
                     " azure_openai = env: _AZ1 ", "--allowed-models", " a, ,b "))
    assert org["provider_keys"] == {"openai": "env:ACME_OPENAI", "azure_openai": "env:_AZ1"}
    assert org["allowed_models"] == ["a", "b"]
    stored = next(json.loads(item["value"]) for item in json.loads(run("export").stdout)
                  if item["key"] == f"org:{org['org_id']}:config")
    assert stored["provider_keys"] == {"openai": "env:ACME_OPENAI", "azure_openai": "env:_AZ1"}
    removed = answer(run("org", "update", org["org_id"], "--provider-key", "openai="))
    assert removed["provider_keys"] == {"azure_openai": "env:_AZ1"}


@pytest.mark.parametrize(("typed", "stored"), [("fail_open", "fail_open"),
                                               ("FAIL-OPEN", "fail-open"),
                                               (" fail-closed ", "fail-closed")])
def test_failure_mode_spellings(run, typed, stored):
    assert answer(run("org", "create", "--name", "A", "--budget", "1", "--failure-mode",
                      typed))["failure_mode"] == stored


def test_a_bad_failure_mode_or_status_is_exit_2(run):
    assert "'--failure-mode'" in error(run("org", "create", "--name", "A", "--budget", "1",
                                           "--failure-mode", "open"), 2)
    assert "'--status'" in error(run("user", "update", "u", "--status", "Active"), 2)


def test_register_reads_the_named_variable_only(run):
    org = answer(run("org", "create", "--name", "A", "--budget", "1"))
    user = answer(run("user", "create", "--org", org["org_id"], "--email", "a@b.c",
                      "--limit", "1"))
    done = run("key", "register", "--user", user["user_id"], "--name", "own", "--from-env",
               "AIGW_TEST_OWN_KEY", env={"AIGW_TEST_OWN_KEY": "sk-own-secret-0000"})
    assert "sk-own-secret" not in done.stdout + done.stderr
    assert answer(done)["passthrough"] is True
    line = error(run("key", "register", "--user", user["user_id"], "--name", "own2",
                     "--from-env", "AIGW_TEST_UNSET_VAR", env={"AIGW_TEST_UNSET_VAR": None}), 1)
    assert "AIGW_TEST_UNSET_VAR" in line


def test_the_global_options_go_before_the_command_or_after_it(run, tmp_path):
    other = tmp_path / "other"
    before = run("--store", str(other), "demo", store_args=False)
    assert answer(before)["created"] is True and before.stderr == f"{CREATED}{other}\n"
    after = run("demo", "--store", str(other), store_args=False)
    assert answer(after)["created"] is False
    # After the command, it overrides the one before it.
    assert answer(run("health", "--store", str(other)))["store"] == str(other)
    config = tmp_path / "conf.yaml"
    config.write_text("store: {hash: md5}\n")
    for args in (("--config", str(config), "health"), ("health", "--config", str(config))):
        assert "conf.yaml" in error(run(*args), 1)


@pytest.mark.parametrize("args", [("--target", "x", "health"), ("health", "--target", "x"),
                                  ("--target", "cloudflare", "health"),
                                  ("--target", "cloudflare", "log"),
                                  ("export", "--target", "cloudflare"),
                                  ("--target", "cloudflare", "sync", "--once")])
def test_target_is_local_or_cloudflare_and_cloudflare_only_for_admin_commands(run, args):
    line = error(run(*args), 2)
    assert "--target" in line
    if "cloudflare" in args:  # names every command that takes it (serve too, admin-key, audit)
        for command in ("org", "user", "key", "usage", "quota", "admin-key", "audit", "serve"):
            assert command in line


def test_sync_once_and_interval_exclude_each_other(run):
    assert "--interval" in error(run("sync", "--once", "--interval", "5"), 2)
    assert "--interval" in error(run("sync", "--interval", "soon"), 2)


def test_cloudflare_target_without_credentials_is_one_line_exit_1(run, monkeypatch):
    for name in ("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_KV_NAMESPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    assert "CLOUDFLARE_API_TOKEN" in error(run("--target", "cloudflare", "org", "show", "o"), 1)


def test_missing_store_and_unknown_ids_are_exit_1(run):
    assert "no store at" in error(run("usage", "org", "o"), 1)
    health = run("health")
    assert health.exit_code == 1 and json.loads(health.stdout)["ok"] is False
    answer(run("org", "create", "--name", "A", "--budget", "1"))
    for args, named in ((("org", "show", "org_nope"), "org_nope"),
                        (("user", "show", "user_nope"), "user_nope"),
                        (("key", "revoke", "key_nope"), "key_nope"),
                        (("usage", "key", "key_nope"), "key_nope"),
                        (("quota", "reset", "user", "user_nope", "--reason", "r"), "user_nope")):
        assert named in error(run(*args), 1)


@pytest.mark.parametrize(("args", "code"), [
    (("org", "show", "gw_live_" + "ab" * 16), 1),
    (("usage", "key", "sk-proj-" + "Zq7" * 15), 1),
    (("--sk-proj-" + "Zq7" * 15, "health"), 2),
    (("org", "create", "--name", "A", "--budget", "gw_live_" + "ab" * 16), 2),
    (("org", "show", "o", "gw_live_" + "ab" * 16), 2),
])
def test_error_lines_are_redacted_whatever_raised_them(run, args, code):
    answer(run("org", "create", "--name", "A", "--budget", "1"))
    line = error(run(*args), code)
    assert "gw_live_" not in line and "sk-proj-Zq7" not in line and "<redacted>" in line


def test_main_returns_the_exit_status_without_exiting(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    assert main([]) == 2
    assert main(["--store", str(tmp_path / "s"), "usage", "org", "o"]) == 1
    capsys.readouterr()
    assert main(["--store", str(tmp_path / "s"), "demo"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is True


def test_ctrl_c_is_one_line_not_a_traceback(run, monkeypatch, tmp_path):
    def interrupted(store):
        raise KeyboardInterrupt

    monkeypatch.setattr("store.admin.health", interrupted)
    answer(run("demo"))
    assert error(run("health"), 130) == "aigw: error: interrupted"
    monkeypatch.setattr("store.admin.ensure_demo", interrupted)
    assert error(run("--store", str(tmp_path / "new"), "demo", store_args=False), 130)
    assert not (tmp_path / "new").exists()  # the store it was creating is gone


# `aigw log`, `aigw report`, `aigw usage --month`: the usage records of a seeded store.


@pytest.fixture
def seeded(tmp_path):
    from store.db import Store
    from tests.test_reports import seed

    with Store(tmp_path / "store") as store:
        return seed(store)


def test_log_streams_every_record_as_json_lines(run, seeded):
    result = run("log")
    assert result.exit_code == 0 and result.stderr == ""
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(seeded.records) == 41
    assert rows[0]["time"].endswith("Z") and rows[0]["time"].startswith("2026-11-")
    assert {"cost_usd", "input_tokens", "output_tokens", "total_tokens", "key_id", "user_id",
            "org_id", "model", "provider", "mode"} <= set(rows[0])
    assert round(sum(r["cost_usd"] for r in rows), 9) == round(
        sum(r.cost_nusd for r in seeded.records) / 1e9, 9)


def test_log_filters_and_csv(run, seeded):
    user = seeded.user_ids[1]
    result = run("log", "--user", user, "--since", "2026-11-05", "--until",
                 "2026-11-20T00:00:00Z", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    import csv
    import io

    from store.report import FIELDS

    lines = result.stdout.splitlines()
    assert tuple(lines[0].split(",")) == FIELDS
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    expected = [r for r in seeded.records if r.user_id == user
                and "2026-11-05" <= _day(r.at) < "2026-11-20"]
    assert len(rows) == len(expected) > 0
    assert {row["user_id"] for row in rows} == {user}
    for flag, value in (("--org", seeded.other_org_id), ("--key", seeded.key_ids[0]),
                        ("--model", "gpt-4o-mini")):
        got = [json.loads(line) for line in run("log", flag, value).stdout.splitlines()]
        field = {"--org": "org_id", "--key": "key_id", "--model": "model"}[flag]
        assert got and {row[field] for row in got} == {value}


def _day(at: float) -> str:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime(at))


@pytest.mark.parametrize(("args", "flag"), [
    (("log", "--since", "yesterday"), "--since"),
    (("log", "--until", "2026-11-31"), "--until"),
    (("log", "--format", "xml"), "--format"),
    (("report", "--month", "2026-13"), "--month"),
    (("report", "--month", "11-2026"), "--month"),
    (("report", "--by", "week"), "--by"),
    (("report", "--format", "pdf"), "--format"),
    (("usage", "user", "u", "--month", "2026-1"), "--month"),
])
def test_a_bad_time_month_or_choice_is_one_line_exit_2(run, args, flag):
    assert flag in error(run(*args), 2)


def test_log_and_report_need_an_existing_local_store(run, tmp_path):
    for args in (("log",), ("report",), ("report", "--format", "html")):
        assert "no store at" in error(run(*args), 1)
    assert not (tmp_path / "store").exists()
    assert "--target cloudflare" in error(run("--target", "cloudflare", "log"), 2)


def test_report_json_groups_the_month(run, seeded):
    answer_ = answer(run("report", "--month", "2026-11", "--by", "user"))
    assert answer_["month"] == "2026-11" and answer_["by"] == "user"
    assert {g["user"] for g in answer_["groups"]} == set(seeded.user_ids)
    assert answer_["total"]["requests"] == 41
    assert {(b["level"], b["id"]) for b in answer_["budgets"]} >= {
        ("user", u) for u in seeded.user_ids}
    assert answer(run("report", "--month", "2026-10"))["groups"] == []


def test_report_csv_table_and_html_on_stdout_or_in_a_file(run, seeded, tmp_path):
    csv_text = run("report", "--month", "2026-11", "--by", "provider", "--format", "csv")
    assert csv_text.exit_code == 0 and csv_text.stdout.startswith("provider,requests,cost_usd")
    assert len(csv_text.stdout.splitlines()) == 1 + 3
    table_text = run("report", "--month", "2026-11", "--by", "day", "--format", "table")
    assert table_text.stdout.splitlines()[-1].split()[:2] == ["total", "41"]
    page = run("report", "--month", "2026-11", "--format", "html")
    assert page.stdout.startswith("<!DOCTYPE html>") and "<script" not in page.stdout
    out = tmp_path / "nov.html"
    wrote = answer(run("report", "--month", "2026-11", "--format", "html", "--output", str(out)))
    assert wrote["output"] == str(out) and wrote["bytes"] == len(out.read_bytes())
    assert out.read_text().startswith("<!DOCTYPE html>") and 'data-day="2026-11-30"' in (
        out.read_text())
    json_file = tmp_path / "nov.json"
    answer(run("report", "--month", "2026-11", "--output", str(json_file)))
    assert json.loads(json_file.read_text())["total"]["requests"] == 41
    missing_dir = tmp_path / "nope" / "x.html"
    assert "x.html" in error(run("report", "--format", "html", "--output", str(missing_dir)), 1)
    assert not list(tmp_path.glob(".nov.html.*"))


def test_usage_month_reads_a_past_month(run, seeded):
    past = answer(run("usage", "user", seeded.user_ids[0], "--month", "2026-11"))
    metered = [r for r in seeded.records
               if r.user_id == seeded.user_ids[0] and r.mode == "metered"]
    assert past["current_month"] == "2026-11"
    assert past["this_node_usd"] == round(sum(r.cost_nusd for r in metered) / 1e9, 9)
    assert past["this_node_requests"] == len(metered)
    from store.money import month_of, utc_now

    assert answer(run("usage", "user", seeded.user_ids[0]))["current_month"] == month_of(
        utc_now())


@pytest.mark.e2e
def test_log_and_report_hold_what_a_real_gateway_metered(gateway, account, fake_provider,
                                                         tmp_path):
    """Known requests through mitmdump with the official SDKs, then the `aigw` binary: every
    format holds exactly what the ledger metered."""
    import csv
    import io

    from tests.support.gateway import chat, settled

    acct = account()
    chat(gateway.openai_client(acct.api_key), model="gpt-4o")
    list(chat(gateway.openai_client(acct.api_key), model="gpt-4o-mini", stream=True,
              stream_options={"include_usage": True}))
    gateway.anthropic_client(acct.api_key).messages.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    counter = settled(gateway.store, acct.key_id, requests=3)

    def binary(*args: str) -> str:
        done = subprocess.run([AIGW, "--config", str(gateway.config), "--store",
                               str(gateway.store_dir), *args], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        return done.stdout

    rows = [json.loads(line) for line in binary("log", "--key", acct.key_id).splitlines()]
    assert [r["model"].split("-20")[0] for r in rows] == ["gpt-4o", "gpt-4o-mini",
                                                          "claude-sonnet-4-5"]
    assert round(sum(r["cost_usd"] for r in rows) * 1e9) == counter.used_nusd
    u = fake_provider.expected_usage("openai")
    assert rows[0]["input_tokens"] + rows[0]["cached_input_tokens"] == u["prompt_tokens"]
    assert rows[0]["output_tokens"] == u["completion_tokens"]
    assert {r["key_id"] for r in rows} == {acct.key_id} and not any(r["estimated"] for r in rows)
    assert len(list(csv.DictReader(io.StringIO(binary("log", "--key", acct.key_id, "--format",
                                                       "csv"))))) == 3

    by_key = json.loads(binary("report", "--by", "key"))
    (mine,) = [g for g in by_key["groups"] if g["key"] == acct.key_id]
    assert mine["requests"] == 3 and round(mine["cost_usd"] * 1e9) == counter.used_nusd
    assert mine["total_tokens"] == sum(r["total_tokens"] for r in rows)
    (csv_row,) = [r for r in csv.DictReader(io.StringIO(binary("report", "--by", "key",
                                                               "--format", "csv")))
                  if r["key"] == acct.key_id]
    assert float(csv_row["cost_usd"]) == mine["cost_usd"] and csv_row["requests"] == "3"
    table_line = [line for line in binary("report", "--by", "key", "--format", "table")
                  .splitlines() if line.startswith(acct.key_id)]
    assert table_line and table_line[0].split()[1] == "3"
    page = tmp_path / "report.html"
    binary("report", "--format", "html", "--output", str(page))
    by_model = json.loads(binary("report", "--by", "model"))
    html = page.read_text()
    for group in by_model["groups"]:
        assert f'data-cost-usd="{group["cost_usd"]}" data-requests="{group["requests"]}"' in html
    users = [b for b in by_key["budgets"] if b["level"] == "user" and b["id"] == acct.user_id]
    assert users and round(users[0]["used_usd"] * 1e9) == counter.used_nusd
