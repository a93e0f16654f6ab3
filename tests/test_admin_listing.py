"""Listing and lookup (orgs, users by org or email, keys of a user or an org), the email rule,
provider key names checked against mitm.yaml, and provider keys shown right: `env:VAR` in
clear, literal keys redacted in every answer and in `aigw export`, which `aigw import` refuses.
Operations on the local store and on the fake Cloudflare KV target; the CLI in-process."""

import json
from collections.abc import Iterator

import pytest
from click.testing import CliRunner, Result

from store import admin
from store.cli import cli
from store.db import Store
from store.money import month_of, utc_now
from store.records import (
    apikey_key,
    org_config_key,
    org_quota_key,
    user_config_key,
    user_key_listing_key,
)
from store.settings import SHIPPED_CONFIG, ConfigError, load_yaml, provider_names
from tests.support.fake_kv import FakeKV

LITERAL = "sk-proj-fake-literal-org-key-0000"
SHIPPED = frozenset({"openai", "anthropic", "gemini", "azure", "azure_openai"})


@pytest.fixture
def store(tmp_path) -> Iterator[Store]:
    with Store(tmp_path / "store") as s:
        yield s


def put(target, key: str, value: dict) -> None:
    """A record as `aigw import` or a sync would bring it (not through an admin operation)."""
    target.records.write({key: json.dumps(value).encode()})


# --- orgs ---------------------------------------------------------------------------------


def test_list_orgs_sorted_by_name_then_id_with_provider_keys_shown_right(store):
    beta = admin.create_org(store, "beta", 1)
    alpha_b = admin.create_org(store, "Alpha", 2)
    alpha_a = admin.create_org(store, "alpha", 3, provider_keys={"openai": "env:ACME_OPENAI"})
    put(store, org_config_key("o_old"), {"name": "Old", "monthly_budget_usd": 5,
                                         "provider_keys": {"openai": LITERAL,
                                                           "gemini": "env:OLD_GEMINI"}})
    put(store, org_quota_key(beta["org_id"]), {"month_usage_usd": 1.0,
                                               "current_month": month_of(utc_now())})

    listed = admin.list_orgs(store)["organizations"]

    alphas = sorted([alpha_a, alpha_b], key=lambda org: org["org_id"])
    assert [org["org_id"] for org in listed] == [
        *(org["org_id"] for org in alphas), beta["org_id"], "o_old"]
    old = listed[-1]
    assert old["org_id"] == "o_old"  # the key's id, when the record leaves it out
    assert old["provider_keys"] == {"openai": "<redacted>", "gemini": "env:OLD_GEMINI"}
    assert next(org for org in listed if org["org_id"] == alpha_a["org_id"])[
        "provider_keys"] == {"openai": "env:ACME_OPENAI"}
    assert LITERAL not in json.dumps(listed)
    assert all("invalid" not in org for org in listed)


def test_list_orgs_names_a_record_the_gateway_would_refuse(store):
    put(store, org_config_key("o_bad"), {"name": "Bad", "monthly_budget_usd": "5",
                                         "provider_keys": {"openai": LITERAL}})
    (bad,) = admin.list_orgs(store)["organizations"]
    assert bad["invalid"] == "monthly_budget_usd: expected a number or null, got \"5\""
    assert bad["provider_keys"] == {"openai": "<redacted>"}
    assert admin.list_orgs(Store(store.path.parent / "empty")) == {"organizations": []}


@pytest.mark.parametrize(("stored", "shown"), [
    ("env:ACME_KEY", "env:ACME_KEY"), ("env:_A1", "env:_A1"), (LITERAL, "<redacted>"),
    # Not a variable name: the request path would read no variable, and it may be a key.
    ("env:sk-proj-pasted-after-env-0000", "<redacted>"), ("env: ACME", "<redacted>"),
    ("ENV:ACME", "<redacted>"), ("env:", "<redacted>"), ("AIzaFakeGeminiKey000", "<redacted>"),
])
def test_show_org_prints_env_references_in_clear_and_redacts_literal_keys(store, stored, shown):
    put(store, org_config_key("o1"), {"name": "A", "provider_keys": {"openai": stored}})
    assert admin.show_org(store, "o1")["provider_keys"] == {"openai": shown}


# --- provider key names -------------------------------------------------------------------


def test_a_provider_key_names_a_configured_provider_or_kind(store):
    known = {"openai", "groq", "azure", "azure_openai"}
    org = admin.create_org(store, "A", 1, provider_keys={"groq": "env:GROQ",
                                                         "azure_openai": "env:AZ"},
                           known_providers=known)
    assert org["provider_keys"] == {"groq": "env:GROQ", "azure_openai": "env:AZ"}
    before = store.records.scan("")
    for call in (
        lambda: admin.create_org(store, "B", 1, provider_keys={"opnai": "env:X"},
                                 known_providers=known),
        lambda: admin.update_org(store, org["org_id"], budget_usd=9,
                                 provider_keys={"groq": "env:G2", "Groq": "env:G3"},
                                 known_providers=known),
    ):
        with pytest.raises(admin.AdminError) as raised:
            call()
        assert type(raised.value) is admin.AdminError  # a bad value: 400, not 404 or 409
        message = str(raised.value)
        assert "unknown provider" in message and "azure, azure_openai, groq, openai" in message
    assert store.records.scan("") == before  # nothing half-written
    with pytest.raises(admin.AdminError, match=r"unknown provider 'openai' \(.*: none\)"):
        admin.create_org(store, "C", 1, provider_keys={"openai": "env:X"}, known_providers=())


def test_removing_a_provider_key_of_any_name_cleans_up_a_typo(store):
    org = admin.create_org(store, "A", 1, provider_keys={"opnai": "env:X", "openai": "env:Y"})
    updated = admin.update_org(store, org["org_id"], provider_keys={"opnai": None},
                               known_providers={"openai"})
    assert updated["provider_keys"] == {"openai": "env:Y"}


def test_without_known_providers_any_name_is_taken(store):
    org = admin.create_org(store, "A", 1, provider_keys={"anything": "env:X"})
    assert org["provider_keys"] == {"anything": "env:X"}


def test_the_redacted_placeholder_is_never_taken_as_a_key(store):
    org = admin.create_org(store, "A", 1)
    # What a script would send back after reading an org (a GET, then a PATCH of it all).
    with pytest.raises(admin.AdminError, match=r"provider_keys.openai: <redacted> is what"):
        admin.update_org(store, org["org_id"], provider_keys={"openai": " <redacted> "})
    assert "provider_keys" not in store.records.get_json(org_config_key(org["org_id"]))


def test_provider_names_are_the_configured_providers_and_their_kinds(tmp_path):
    config = {"providers": {"groq": {"kind": "openai", "hosts": ["api.groq.com"]},
                            1.5: {"kind": "anthropic"}, "odd": "not a mapping"}}
    assert provider_names(config, "m.yaml") == {"groq", "openai", "1.5", "anthropic", "odd"}
    assert provider_names({"providers": None}, "m.yaml") == frozenset()
    # No providers section: the shipped mitm.yaml's, as the gateway reads such a file.
    assert provider_names({"store": {"hash": "sha256"}}, "m.yaml") == SHIPPED
    assert provider_names(load_yaml(SHIPPED_CONFIG), str(SHIPPED_CONFIG)) == SHIPPED
    with pytest.raises(ConfigError, match=r"^m.yaml: providers: must be a mapping"):
        provider_names({"providers": ["openai"]}, "m.yaml")


# --- users --------------------------------------------------------------------------------


@pytest.fixture
def two_orgs(store) -> tuple[dict, dict]:
    return admin.create_org(store, "A", 10), admin.create_org(store, "B", 10)


def test_an_email_is_unique_within_an_org_whatever_its_case(store, two_orgs):
    a, b = two_orgs
    first = admin.create_user(store, a["org_id"], "Dev@Example.com", 1)
    before = store.records.scan("")
    with pytest.raises(admin.Conflict) as raised:
        admin.create_user(store, a["org_id"], "  dev@EXAMPLE.com ", 1)
    assert first["user_id"] in str(raised.value) and a["org_id"] in str(raised.value)
    assert store.records.scan("") == before
    other = admin.create_user(store, b["org_id"], "dev@example.com", 1)  # another org may
    assert other["email"] == "dev@example.com"
    assert admin.create_user(store, a["org_id"], "dev2@example.com", 1)["org_id"] == a["org_id"]


def test_an_email_imported_in_another_case_counts_too(store, two_orgs):
    a, _ = two_orgs
    put(store, user_config_key("u_old"), {"email": "OLD@example.com", "org_id": a["org_id"]})
    with pytest.raises(admin.Conflict, match="u_old"):
        admin.create_user(store, a["org_id"], "old@example.com", 1)


def test_list_users_of_an_org_or_by_email(store, two_orgs):
    a, b = two_orgs
    zed = admin.create_user(store, a["org_id"], "zed@example.com", 1)
    amy = admin.create_user(store, a["org_id"], "Amy@Example.com", 1)
    amy_b = admin.create_user(store, b["org_id"], "amy@example.com", 2)
    admin.create_key(store, zed["user_id"])  # key listings under user: are not users
    put(store, "user:u_bad:config", {"email": "bad@example.com", "org_id": b["org_id"],
                                     "status": "Active"})

    def ids(answer: dict) -> list[str]:
        return [user["user_id"] for user in answer["users"]]

    assert ids(admin.list_users(store, a["org_id"])) == [amy["user_id"], zed["user_id"]]
    assert ids(admin.list_users(store, email=" AMY@example.COM")) == sorted(
        [amy["user_id"], amy_b["user_id"]])
    assert ids(admin.list_users(store, b["org_id"], "amy@example.com")) == [amy_b["user_id"]]
    assert admin.list_users(store, a["org_id"], "nobody@example.com") == {"users": []}
    everyone = admin.list_users(store)["users"]
    assert len(everyone) == 4 and everyone[0] in (amy, amy_b)
    (bad,) = [user for user in everyone if user["user_id"] == "u_bad"]
    assert bad["invalid"].startswith("status: expected one of active, suspended")


def test_list_users_refuses_an_unknown_org_and_an_empty_filter(store, two_orgs):
    with pytest.raises(admin.NotFound, match="unknown org org_missing"):
        admin.list_users(store, "org_missing")
    for bad in ({"org_id": " "}, {"email": ""}):
        with pytest.raises(admin.AdminError, match=next(iter(bad))):
            admin.list_users(store, **bad)


# --- keys ---------------------------------------------------------------------------------


def test_list_keys_of_an_org(store, two_orgs):
    a, b = two_orgs
    u1 = admin.create_user(store, a["org_id"], "u1@example.com", 5)
    u2 = admin.create_user(store, a["org_id"], "u2@example.com", 5)
    ub = admin.create_user(store, b["org_id"], "ub@example.com", 5)
    k1 = admin.create_key(store, u1["user_id"], "laptop", 2, rates={"rpm_limit": 7})
    k2 = admin.create_key(store, u2["user_id"], "ci")
    admin.revoke_key(store, k2["key_id"])
    kb = admin.create_key(store, ub["user_id"], "b's")
    # The Workers gateway's three-level keys: one charged to org A by its own org_id though
    # its user is in B, one with no listing whose user is in A (the org comes from the user).
    put(store, apikey_key("ab" * 32), {"key_id": "k_charged", "user_id": ub["user_id"],
                                       "org_id": a["org_id"], "name": "shared",
                                       "monthly_limit_usd": 3})
    put(store, apikey_key("cd" * 32), {"key_id": "k_unlisted", "user": {"id": u1["user_id"]},
                                       "name": "old", "status": "revoked"})
    # A Workers listing without key_hash: its limits come from the apikey record of its id.
    put(store, apikey_key("ef" * 32), {"key_id": "k_nohash", "user_id": u2["user_id"],
                                       "monthly_limit_usd": 4})
    put(store, user_key_listing_key(u2["user_id"], "k_nohash"), {"name": "w", "status": "active"})
    store.ledger.settle(None, [("key", k1["key_id"])], month_of(utc_now()), 5)

    answer = admin.list_keys(store, org_id=a["org_id"])

    assert answer["org_id"] == a["org_id"]
    keys = {key["key_id"]: key for key in answer["keys"]}
    assert set(keys) == {k1["key_id"], k2["key_id"], "k_charged", "k_unlisted", "k_nohash"}
    assert [(k["user_id"], k["key_id"]) for k in answer["keys"]] == sorted(
        (k["user_id"], k["key_id"]) for k in answer["keys"])
    assert keys[k1["key_id"]]["user_id"] == u1["user_id"]
    assert keys[k1["key_id"]]["monthly_limit_usd"] == 2 and keys[k1["key_id"]]["rpm_limit"] == 7
    assert keys[k1["key_id"]]["last_used_at"] is not None  # this node metered it
    assert keys[k2["key_id"]]["status"] == "revoked"
    assert keys["k_charged"] == {
        "key_id": "k_charged", "key_hash": "ab" * 32, "name": "shared", "created_at": None,
        "status": "active", "revoked_at": None, "last_used_at": None,
        "user_id": ub["user_id"], "monthly_limit_usd": 3}
    assert keys["k_unlisted"]["user_id"] == u1["user_id"]
    assert keys["k_unlisted"]["status"] == "revoked"
    assert keys["k_nohash"]["monthly_limit_usd"] == 4
    assert "api_key" not in json.dumps(answer) and k1["api_key"] not in json.dumps(answer)
    assert [k["key_id"] for k in admin.list_keys(store, org_id=b["org_id"])["keys"]] == [
        kb["key_id"]]
    # A user's listing is as it was: its keys, without user_id on each.
    (mine,) = admin.list_keys(store, user_id=ub["user_id"])["keys"]
    assert mine["key_id"] == kb["key_id"] and "user_id" not in mine


def test_list_keys_takes_exactly_one_of_user_and_org(store, two_orgs):
    a, _ = two_orgs
    user = admin.create_user(store, a["org_id"], "u@example.com", 1)
    for kwargs in ({}, {"user_id": user["user_id"], "org_id": a["org_id"]}):
        with pytest.raises(admin.AdminError, match="exactly one of user_id or org_id"):
            admin.list_keys(store, **kwargs)
    with pytest.raises(admin.NotFound, match="unknown org org_missing"):
        admin.list_keys(store, org_id="org_missing")
    assert admin.list_keys(store, org_id=a["org_id"]) == {"org_id": a["org_id"], "keys": []}
    assert admin.list_keys(store, user["user_id"]) == {"user_id": user["user_id"], "keys": []}


# --- export and import --------------------------------------------------------------------


def test_export_redacts_literal_provider_keys_and_import_refuses_them(store, tmp_path):
    put(store, org_config_key("o1"), {"name": "Lit", "provider_keys": {
        "openai": LITERAL, "anthropic": "sk-ant-fake-literal-0000", "gemini": "env:GEM"}})
    org = admin.create_org(store, "Env", 1, provider_keys={"openai": "env:OPENAI_B"})
    env_only = store.records.get(org_config_key(org["org_id"]))

    dump = admin.export_bulk(store)

    assert LITERAL not in json.dumps(dump) and "sk-ant-fake" not in json.dumps(dump)
    values = {item["key"]: item["value"] for item in dump}
    assert json.loads(values["org:o1:config"]) == {"name": "Lit", "provider_keys": {
        "openai": "<redacted>", "anthropic": "<redacted>", "gemini": "env:GEM"}}
    assert values[org_config_key(org["org_id"])] == env_only.decode()  # nothing to redact
    assert admin.count_redacted(dump) == 2
    with Store(tmp_path / "other") as other:
        with pytest.raises(admin.AdminError) as raised:
            admin.import_bulk(other, dump)
        message = str(raised.value)
        assert "org:o1:config: provider_keys.openai, provider_keys.anthropic: <redacted>" \
            in message and "--include-secrets" in message and "(nothing imported)" in message
        assert other.records.scan("") == []
        # With the secrets, the export is the store, and imports as it is.
        full = admin.export_bulk(store, include_secrets=True)
        assert admin.count_redacted(full) == 0 and LITERAL in json.dumps(full)
        assert admin.import_bulk(other, full) == {"imported": 2}
        assert other.records.scan("") == store.records.scan("")


# --- against the Cloudflare KV namespace --------------------------------------------------


@pytest.fixture(scope="module")
def kv() -> Iterator[FakeKV]:
    with FakeKV() as fake:
        yield fake


def test_listing_and_the_email_rule_on_the_cloudflare_target(kv):
    from store.cloudflare import CloudflareSettings, CloudflareTarget, KVClient, SyncSettings

    kv.reset()
    kv.load_bulk([{"key": "org:o_old:config", "value": json.dumps({
        "name": "Old", "provider_keys": {"openai": LITERAL, "gemini": "env:OLD_GEMINI"}})}])
    cf = CloudflareSettings(kv.account_id, kv.namespace_id, kv.token, kv.api_base)
    with KVClient(cf, SyncSettings()) as client:
        remote = CloudflareTarget(client, "sha256")
        org = admin.create_org(remote, "New", 5, provider_keys={"openai": "env:NEW_OPENAI"},
                               known_providers=SHIPPED)
        user = admin.create_user(remote, org["org_id"], "Remote@example.com", 1)
        with pytest.raises(admin.Conflict):
            admin.create_user(remote, org["org_id"], "remote@EXAMPLE.com", 1)
        key = admin.create_key(remote, user["user_id"], "laptop", 2)

        orgs = admin.list_orgs(remote)["organizations"]
        assert [o["name"] for o in orgs] == ["New", "Old"]
        assert orgs[1]["provider_keys"] == {"openai": "<redacted>", "gemini": "env:OLD_GEMINI"}
        assert [u["user_id"] for u in admin.list_users(
            remote, org["org_id"], "REMOTE@example.com")["users"]] == [user["user_id"]]
        with pytest.raises(admin.NotFound):
            admin.list_users(remote, "o_missing")
        (listed,) = admin.list_keys(remote, org_id=org["org_id"])["keys"]
        assert (listed["key_id"], listed["user_id"], listed["monthly_limit_usd"]) == (
            key["key_id"], user["user_id"], 2)
    assert len([k for k in kv.keys() if k.endswith(":config")]) == 3  # the refused one: none


# --- the command line ---------------------------------------------------------------------


@pytest.fixture
def run(tmp_path, monkeypatch):
    """`aigw --store TMP/store ARGS` in-process, from a directory without a mitm.yaml."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args: str, stdin: str | None = None) -> Result:
        return CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), *args], input=stdin,
                                  catch_exceptions=False)

    return invoke


def answer(result: Result):
    assert result.exit_code == 0, result.stderr
    assert [line for line in result.stderr.splitlines()
            if not line.startswith("aigw: created a new store at ")] == []
    return json.loads(result.stdout)


def error(result: Result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("aigw: error: ")
    return line


def test_org_user_and_key_list_on_the_command_line(run):
    a = answer(run("org", "create", "--name", "Zeta", "--budget", "5",
                   "--provider-key", "openai=env:ZETA_OPENAI"))
    b = answer(run("org", "create", "--name", "acme", "--budget", "5"))
    assert [o["org_id"] for o in answer(run("org", "list"))["organizations"]] == [
        b["org_id"], a["org_id"]]
    assert answer(run("org", "show", a["org_id"]))["provider_keys"] == {
        "openai": "env:ZETA_OPENAI"}
    user = answer(run("user", "create", "--org", a["org_id"], "--email", "Dev@example.com",
                      "--limit", "1"))
    line = error(run("user", "create", "--org", a["org_id"], "--email", "dev@EXAMPLE.com",
                     "--limit", "1"), 1)
    assert "already used by user " + user["user_id"] in line
    answer(run("user", "create", "--org", b["org_id"], "--email", "dev@example.com",
               "--limit", "1"))
    by_org = answer(run("user", "list", "--org", a["org_id"]))["users"]
    assert [u["user_id"] for u in by_org] == [user["user_id"]]
    assert len(answer(run("user", "list", "--email", "DEV@example.com"))["users"]) == 2
    assert len(answer(run("user", "list"))["users"]) == 2
    assert "unknown org org_missing" in error(run("user", "list", "--org", "org_missing"), 1)
    key = answer(run("key", "create", "--user", user["user_id"]))
    by_org = answer(run("key", "list", "--org", a["org_id"]))
    assert [(k["key_id"], k["user_id"]) for k in by_org["keys"]] == [
        (key["key_id"], user["user_id"])]
    assert answer(run("key", "list", "--user", user["user_id"]))["keys"][0]["key_id"] == \
        key["key_id"]
    assert "unknown org org_missing" in error(run("key", "list", "--org", "org_missing"), 1)
    for args in ((), ("--user", user["user_id"], "--org", a["org_id"])):
        assert "exactly one of --user or --org" in error(run("key", "list", *args), 2)


def test_a_provider_key_name_typo_names_the_providers_of_mitm_yaml(run, tmp_path):
    line = error(run("org", "create", "--name", "A", "--budget", "1",
                     "--provider-key", "opnai=env:X"), 1)
    assert "unknown provider 'opnai'" in line
    assert "anthropic, azure, azure_openai, gemini, openai" in line  # the shipped ones
    assert not (tmp_path / "store").exists()
    (tmp_path / "mitm.yaml").write_text(
        "providers:\n  groq: {kind: openai, hosts: [api.groq.com]}\n")
    org = answer(run("org", "create", "--name", "A", "--budget", "1",
                     "--provider-key", "groq=env:GROQ", "--provider-key", "openai=env:OAI"))
    line = error(run("org", "update", org["org_id"], "--provider-key", "anthropic=env:X"), 1)
    assert "unknown provider 'anthropic'" in line and "(the configured providers and kinds: " \
        "groq, openai)" in line
    assert answer(run("org", "update", org["org_id"], "--provider-key", "stale=",
                      "--provider-key", "groq="))["provider_keys"] == {"openai": "env:OAI"}
    (tmp_path / "mitm.yaml").write_text("providers: [groq]\n")
    line = error(run("org", "update", org["org_id"], "--provider-key", "groq=env:G"), 1)
    assert "mitm.yaml: providers: must be a mapping" in line
    # Without --provider-key the section is not read here (the gateway checks it).
    assert answer(run("org", "update", org["org_id"], "--budget", "2"))[
        "monthly_budget_usd"] == 2


def test_export_says_how_many_keys_it_redacted_and_import_refuses_them(run, tmp_path):
    items = [{"key": "org:o1:config", "value": json.dumps({
        "name": "Lit", "provider_keys": {"openai": LITERAL}})}]
    answer(run("import", "-", stdin=json.dumps(items)))
    exported = run("export")
    assert exported.exit_code == 0 and LITERAL not in exported.stdout + exported.stderr
    assert exported.stderr == ("aigw: 1 literal provider key redacted: `aigw import` refuses "
                               "them (--include-secrets exports them)\n")
    (tmp_path / "dump.json").write_text(exported.stdout)
    line = error(run("--store", str(tmp_path / "other"), "import", "dump.json"), 1)
    assert "dump.json: item 0: org:o1:config: provider_keys.openai: <redacted>" in line
    assert not (tmp_path / "other").exists()
    full = answer(run("export", "--include-secrets"))
    assert json.loads(full[0]["value"])["provider_keys"] == {"openai": LITERAL}
    (tmp_path / "full.json").write_text(json.dumps(full))
    assert answer(run("--store", str(tmp_path / "other"), "import", "full.json")) == {
        "imported": 1}
