"""`aigw sync` against the fake Cloudflare KV REST API (tests/support/fake_kv.py), store-level and
CLI-level: a Workers-gateway namespace replicated as is, incremental passes, atomic passes under
every fault, the request budget, keys over LMDB's limit, usage shared across three nodes (with
the overshoot measured), and `--target cloudflare` admin writes; and, when the environment holds
Cloudflare credentials, a read-only pass against that real namespace.

Retries are fast: small `SyncSettings` and a recording `sleep` (which advances a manual clock
where a test needs time to pass)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from addon.policy import budgets_of, check_identity, decide_budgets
from store import USD, Store
from store.cloudflare import (
    STAMP,
    USAGE_PREFIX,
    CloudflareSettings,
    CloudflareTarget,
    KVClient,
    Replicator,
    RequestBudget,
    SyncError,
    SyncSettings,
    load_sync_settings,
    previous_month,
    run_loop,
    stamp_of,
)
from store.money import month_of, utc_now
from store.records import apikey_key
from store.settings import ConfigError
from tests.support.fake_kv import FakeKV

AIGW = str(Path(sys.executable).parent / "aigw")
OLD_KEY = "gw_live_" + "0a" * 16  # the older Workers version: apikey record with user_id only
NEW_KEY = "gw_live_" + "1b" * 16  # the three-level version: key, user, org


def sha256(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def this_month() -> str:
    return month_of(utc_now())


class Clock:
    """A manual clock; `sleep` advances it and records what was asked."""

    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


# --------------------------------------------------------------------------- namespaces


def workers_namespace(month: str) -> list[dict]:
    """A namespace as the Workers gateway laid it out (no aigw stamps anywhere): one org, user
    and key of the older version (sha256 `apikey:` with user_id only, `fail_closed`), and one of
    the three-level version (`apikey:` with key_id, key_hash, org_id, a nested user and a key
    limit; `fail-open` spelling), quota records of this month and of last month, key listings."""

    def item(key: str, value: dict) -> dict:
        return {"key": key, "value": json.dumps(value)}

    last = previous_month(month)
    return [
        item("org:org_old:config", {
            "org_id": "org_old", "name": "Old Co", "monthly_budget_usd": 500,
            "failure_mode": "fail_closed", "fallback_daily_limit": 10,
            "provider_keys": {"openai": "sk-org-old-provider"},
            "created_at": "2024-03-01T10:00:00Z"}),
        item("org:org_old:quota", {
            "month_usage_usd": 120.5, "current_month": month, "request_count": 40,
            "last_update": 1_717_000_000_000}),
        item("user:user_old:config", {
            "user_id": "user_old", "email": "old@example.com", "monthly_limit_usd": 50,
            "org_id": "org_old", "status": "active", "created_at": "2024-03-01T10:00:00Z",
            "updated_at": "2024-03-02T10:00:00Z"}),
        item("user:user_old:quota", {
            "month_usage_usd": 12.25, "current_month": month, "request_count": 7,
            "last_update": 1_717_000_000_000}),
        item(f"apikey:{sha256(OLD_KEY)}", {
            "user_id": "user_old", "key_id": "key_old", "name": "laptop", "status": "active",
            "created_at": "2024-03-01T10:00:00Z"}),
        item("user:user_old:keys:key_old", {
            "name": "laptop", "created_at": "2024-03-01T10:00:00Z", "last_used_at": None,
            "status": "active", "revoked_at": None}),
        item("org:org_new:config", {
            "org_id": "org_new", "name": "New Co", "monthly_budget_usd": 80,
            "failure_mode": "fail-open", "fallback_daily_limit": 5,
            "created_at": "2025-01-01T00:00:00Z"}),
        item("org:org_new:quota", {  # last month's: does not count this month
            "month_usage_usd": 999.0, "current_month": last, "request_count": 900,
            "last_update": 1_717_000_000_000}),
        item("user:user_new:config", {
            "user_id": "user_new", "email": "new@example.com", "monthly_limit_usd": 30,
            "org_id": "org_new", "status": "active", "created_at": "2025-01-01T00:00:00Z"}),
        item(f"apikey:{sha256(NEW_KEY)}", {
            "key_id": "key_new", "key_hash": sha256(NEW_KEY), "org_id": "org_new",
            "user": {"user_id": "user_new", "email": "new@example.com"}, "name": "ci",
            "monthly_limit_usd": 5, "status": "active", "created_at": "2025-01-02T00:00:00Z"}),
        item("user:user_new:keys:key_new", {
            "name": "ci", "created_at": "2025-01-02T00:00:00Z", "last_used_at": None,
            "status": "active", "revoked_at": None}),
    ]


def stamped(key: str, value: str) -> dict:
    """A pair as aigw writes it: the version stamp in its metadata."""
    return {"key": key, "value": value, "metadata": {STAMP: stamp_of(value.encode())}}


def cache_keys(n: int) -> list[dict]:
    """`n` stamped filler records: with the Workers records, a listing of two pages."""
    return [stamped(f"cache:{i:04d}", json.dumps({"i": i})) for i in range(n)]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server() -> Iterator[FakeKV]:
    with FakeKV() as fake:
        yield fake


@pytest.fixture
def kv(server: FakeKV) -> Iterator[FakeKV]:
    server.reset()
    yield server
    server.reset()


def cf_settings(kv: FakeKV) -> CloudflareSettings:
    return CloudflareSettings(kv.account_id, kv.namespace_id, kv.token, kv.api_base)


@dataclass
class Node:
    """One gateway node's store and its sync."""

    name: str
    store: Store
    client: KVClient
    replicator: Replicator
    settings: SyncSettings
    sleeps: list[float] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.replicator.node_id

    def snapshot(self, *key_hashes: str) -> tuple:
        """Everything a pass could change: records, stamps, last pass, other nodes' totals."""
        month = this_month()
        return (
            self.store.records.scan(""),
            self.store.records.stamps(),
            self.store.records.meta("last_sync"),
            [self.store.records.resolve(h, month).remote for h in key_hashes],
        )


@pytest.fixture
def make_node(tmp_path: Path, kv: FakeKV) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(name: str = "a", *, hash_algorithm: str = "sha256", clock: Clock | None = None,
             budget: RequestBudget | None = None, **overrides) -> Node:
        settings = SyncSettings(**{"node_id": f"node-{name}", "max_attempts": 3,
                                   "max_backoff_s": 0.01, "timeout_s": 2.0, **overrides})
        store = Store(tmp_path / f"store-{name}", hash_algorithm=hash_algorithm)
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if clock is not None:
                clock.advance(seconds)

        client = KVClient(cf_settings(kv), settings, budget=budget, sleep=sleep)
        node = Node(name, store, client, Replicator(store, client, settings), settings, sleeps)
        made.append(node)
        return node

    yield make
    for node in made:
        node.client.close()
        node.store.close()


def run_aigw(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([AIGW, *args], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=60)


def cf_env(kv: FakeKV) -> dict:
    return {**os.environ, "CLOUDFLARE_API_TOKEN": kv.token,
            "CLOUDFLARE_ACCOUNT_ID": kv.account_id, "CLOUDFLARE_KV_NAMESPACE_ID": kv.namespace_id}


# --------------------------------------------------------------------------- 1. Workers layout


def test_workers_namespace_replicates_as_is(kv, make_node):
    month = this_month()
    namespace = workers_namespace(month)
    kv.load_bulk(namespace)
    node = make_node()

    summary = node.replicator.sync_once()

    assert summary.full  # never synced: the first pass is a full one
    assert (summary.listed, summary.fetched, summary.changed) == (11, 11, 11)
    assert (summary.deleted, summary.rejected) == (0, [])
    for item in namespace:  # byte for byte, under the same keys
        assert node.store.records.get(item["key"]) == item["value"].encode(), item["key"]
    assert node.store.records.stamps() == {item["key"]: "" for item in namespace}
    assert node.store.records.count() == {"orgs": 2, "users": 2, "apikeys": 2,
                                          "key_listings": 2, "quotas": 3, "other": 0}

    old = node.store.records.resolve(node.store.hash(OLD_KEY), month)
    assert (old.key.key_id, old.key.user_id, old.key.org_id) == ("key_old", "user_old", None)
    assert old.org.org_id == "org_old" and old.org.failure_mode == "fail_closed"
    assert old.org.provider_keys == {"openai": "sk-org-old-provider"}
    budgets = {b.level: b for b in budgets_of(old, month)}
    assert budgets["user"].external_nusd == round(12.25 * USD)  # the Workers quota record
    assert budgets["org"].external_nusd == round(120.5 * USD)
    assert budgets["user"].external_requests == 7 and budgets["key"].limit_nusd is None

    new = node.store.records.resolve(node.store.hash(NEW_KEY), month)
    assert (new.key.key_id, new.key.user_id, new.key.org_id) == ("key_new", "user_new",
                                                                 "org_new")
    assert new.org.failure_mode == "fail_open"  # the `fail-open` spelling
    assert new.org.fallback_daily_limit_usd == 5
    budgets = {b.level: b for b in budgets_of(new, month)}
    assert budgets["key"].limit_nusd == 5 * USD
    assert budgets["org"].external_nusd == 0  # last month's quota record: reset on read
    assert check_identity(new, "gpt-4o-mini") is None


def test_cli_sync_once_with_wrangler_credentials_and_health(kv, tmp_path):
    kv.load_bulk(workers_namespace(this_month()))
    (tmp_path / "mitm.yaml").write_text(
        f"store:\n  path: {tmp_path / 'store'}\n  hash: sha256\nsync:\n  node_id: laptop-1\n")
    env = cf_env(kv)

    done = run_aigw(tmp_path, "sync", "--once", "--api-base", kv.api_base, env=env)

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["listed"] == 11 and result["fetched"] == 11
    assert result["full"] is True and result["requests"] == 2  # one list page, one bulk get
    assert "sync: listed 11, fetched 11, changed 11" in done.stderr
    assert f"aigw: created a new store at {tmp_path / 'store'}\n" in done.stderr
    assert kv.token not in done.stdout + done.stderr  # the token is never logged
    assert all(r.authorized for r in kv.requests)

    health = json.loads(run_aigw(tmp_path, "health", env=env).stdout)
    assert health["last_sync"]["node_id"] == "laptop-1" and health["last_sync"]["listed"] == 11
    assert abs(health["last_sync"]["finished_at"] - time.time()) < 30
    usage = json.loads(run_aigw(tmp_path, "usage", "user", "user_old", env=env).stdout)
    assert usage["current_usage_usd"] == 12.25 and usage["request_count"] == 7


def test_missing_credentials_name_what_is_missing(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_sync_settings({}, "mitm.yaml", environ={"CLOUDFLARE_API_TOKEN": "t"})
    assert "CLOUDFLARE_ACCOUNT_ID" in str(raised.value)
    assert "CLOUDFLARE_KV_NAMESPACE_ID" in str(raised.value)
    assert "CLOUDFLARE_API_TOKEN" not in str(raised.value)
    token_file = tmp_path / "token"
    token_file.write_text("secret-from-file\n")
    config = {"sync": {"node_id": "n1", "request_budget": 50, "cloudflare": {
        "account_id": "a" * 32, "namespace_id": "b" * 32, "api_token_file": str(token_file)}}}
    cf, sync = load_sync_settings(config, "mitm.yaml", "http://127.0.0.1:9/client/v4/",
                                  environ={})
    assert cf.api_token == "secret-from-file" and "secret" not in repr(cf)
    assert cf.api_base == "http://127.0.0.1:9/client/v4"
    assert (sync.node_id, sync.request_budget) == ("n1", 50)


def test_node_id_with_a_colon_is_refused():
    """`aigw:usage:{node}:{month}:{level}:{id}` is split on colons: a node id with one would
    make every other node ignore this node's spend."""
    config = {"sync": {"node_id": "berlin:1"}}
    env = {"CLOUDFLARE_API_TOKEN": "t", "CLOUDFLARE_ACCOUNT_ID": "a",
           "CLOUDFLARE_KV_NAMESPACE_ID": "n"}
    with pytest.raises(ConfigError) as raised:
        load_sync_settings(config, "mitm.yaml", environ=env)
    assert "sync.node_id" in str(raised.value)


BAD_SYNC = {
    "a string number": ({"interval_s": "30"}, "sync.interval_s", "finite number"),
    "below the bound": ({"interval_s": 0.5}, "sync.interval_s", "from 1 to"),
    "a string boolean": ({"push_usage": "false"}, "sync.push_usage", "true or false"),
    "a fractional count": ({"request_budget": 50.5}, "sync.request_budget", "an integer"),
    "a tiny budget": ({"request_budget": 5}, "sync.request_budget", "from 10 to"),
    "no attempts": ({"max_attempts": 0}, "sync.max_attempts", "from 1 to"),
    "an unknown key": ({"intervall_s": 30}, "sync.intervall_s", "unknown key"),
    "an unknown cloudflare key": ({"cloudflare": {"token": "x"}}, "sync.cloudflare.token",
                                  "unknown key"),
    "an empty account id": ({"cloudflare": {"account_id": ""}}, "sync.cloudflare.account_id",
                            "non-empty string"),
    "not a mapping": ([], "sync", "must be a mapping"),
}


@pytest.mark.parametrize("section, key, reason", BAD_SYNC.values(), ids=BAD_SYNC.keys())
def test_sync_settings_are_typed_and_name_the_key(section, key, reason):
    env = {"CLOUDFLARE_API_TOKEN": "t", "CLOUDFLARE_ACCOUNT_ID": "a",
           "CLOUDFLARE_KV_NAMESPACE_ID": "n"}
    with pytest.raises(ConfigError) as raised:
        load_sync_settings({"sync": section}, "mitm.yaml", environ=env)
    assert str(raised.value).startswith(f"mitm.yaml: {key}: ") and reason in str(raised.value)


def test_sync_settings_defaults_and_whole_numbers():
    env = {"CLOUDFLARE_API_TOKEN": "t", "CLOUDFLARE_ACCOUNT_ID": "a",
           "CLOUDFLARE_KV_NAMESPACE_ID": "n"}
    _, sync = load_sync_settings({"sync": None}, "mitm.yaml", environ=env)
    assert sync == SyncSettings()
    _, sync = load_sync_settings({"sync": {"interval_s": 5, "push_usage": False}}, "mitm.yaml",
                                 environ=env)
    assert (sync.interval_s, sync.push_usage) == (5.0, False)


# --------------------------------------------------------------------------- 2. incremental


def test_second_pass_with_nothing_changed_fetches_nothing(kv, make_node):
    kv.load_bulk(workers_namespace(this_month()) + cache_keys(20))
    node = make_node()
    node.replicator.sync_once()
    before = node.snapshot()
    kv.reset_counters()

    summary = node.replicator.sync_once()

    assert dict(kv.op_counts) == {"list": 1}  # one list page, nothing else
    assert (summary.listed, summary.fetched, summary.changed, summary.requests) == (31, 0, 0, 1)
    assert summary.full is False
    assert node.snapshot()[:2] == before[:2]


def test_changed_stamped_record_is_fetched_alone(kv, make_node):
    kv.load_bulk(workers_namespace(this_month()) + cache_keys(20))
    node = make_node()
    node.replicator.sync_once()
    kv.reset_counters()
    kv.load_bulk([stamped("cache:0007", '{"i": "seven"}')])

    summary = node.replicator.sync_once()

    assert [r.json["keys"] for r in kv.requests_for("bulk_get")] == [["cache:0007"]]
    assert (summary.fetched, summary.changed) == (1, 1)
    assert node.store.records.get("cache:0007") == b'{"i": "seven"}'
    assert node.store.records.stamps()["cache:0007"] == stamp_of(b'{"i": "seven"}')


def test_unstamped_records_are_refetched_only_on_a_full_pass(kv, make_node):
    kv.load_bulk(workers_namespace(this_month()) + cache_keys(5))
    node = make_node()
    node.replicator.sync_once()
    changed = json.dumps({"user_id": "user_old", "key_id": "key_old", "status": "revoked"})
    kv.put(f"apikey:{sha256(OLD_KEY)}", changed)  # as the Workers gateway writes: no stamp
    kv.put("org:org_late:config", json.dumps({"org_id": "org_late", "monthly_budget_usd": 1}))
    kv.reset_counters()

    summary = node.replicator.sync_once()  # incremental: only the new unstamped key
    assert summary.full is False
    assert [r.json["keys"] for r in kv.requests_for("bulk_get")] == [["org:org_late:config"]]
    assert node.store.records.get(f"apikey:{sha256(OLD_KEY)}") != changed.encode()

    kv.reset_counters()
    summary = node.replicator.sync_once(full=True)  # `--full`
    assert summary.full and summary.fetched == 12  # every unstamped record, no stamped one
    assert node.store.records.get(f"apikey:{sha256(OLD_KEY)}") == changed.encode()
    assert summary.changed == 1

    # The full cycle also comes by itself once full_interval_s has passed since the last one.
    kv.put("user:user_old:quota", json.dumps({"month_usage_usd": 13,
                                              "current_month": this_month()}))
    assert node.replicator.sync_once().fetched == 0
    last = node.store.records.meta("last_sync")
    node.store.records.set_meta("last_sync", {**last, "last_full_at": time.time() - 3601})
    summary = node.replicator.sync_once()
    assert summary.full and summary.changed == 1
    assert json.loads(node.store.records.get("user:user_old:quota"))["month_usage_usd"] == 13


def test_value_bulk_get_does_not_return_is_fetched_by_single_get(kv, make_node):
    kv.load_bulk(cache_keys(3))
    null_values = {"success": True, "errors": [], "messages": [], "result": {"values": {
        f"cache:{i:04d}": None for i in range(3)}}}
    kv.fail("bulk_get", status=200, body=json.dumps(null_values))
    node = make_node()

    summary = node.replicator.sync_once()

    assert kv.op_counts["bulk_get"] == 1 and kv.op_counts["get"] == 3
    assert summary.fetched == 3
    for i in range(3):
        assert node.store.records.get(f"cache:{i:04d}") == json.dumps({"i": i}).encode()
    assert node.replicator.sync_once().fetched == 0  # stamped: nothing to fetch again


def test_value_bulk_get_refuses_is_fetched_by_single_get(kv, make_node):
    """Bulk get answers text only: a namespace holding one binary value must still sync."""
    kv.load_bulk(cache_keys(3))
    kv.put("blob:logo", bytes(range(256)))  # not UTF-8: bulk get answers 400 for the batch
    node = make_node()

    summary = node.replicator.sync_once()

    assert summary.fetched == 4 and summary.rejected == []
    assert node.store.records.get("blob:logo") == bytes(range(256))
    assert node.store.records.get("cache:0002") == b'{"i": 2}'


# --------------------------------------------------------------------------- 3. atomic passes


def mid_pass_setup(kv: FakeKV, node: Node) -> dict:
    """A synced two-page namespace, then changes in KV that one more pass would apply: 150
    changed records (two bulk gets), one added, one key listing deleted (on page 2) and another
    node's usage for user_old."""
    kv.load_bulk(workers_namespace(this_month()) + cache_keys(1100))
    first = node.replicator.sync_once()
    assert first.requests == 2 + 12  # two list pages, 12 bulk gets
    kv.load_bulk([stamped(f"cache:{i:04d}", json.dumps({"i": i, "v": 2})) for i in range(150)])
    kv.load_bulk([stamped("cache:new", "{}")])
    kv.delete("user:user_old:keys:key_old")
    kv.put(f"{USAGE_PREFIX}node-z:{this_month()}:user:user_old", "{}",
           metadata={"n": 3 * USD, "r": 2})
    kv.reset_counters()
    return {"first": first}


def assert_mid_pass_applied(node: Node) -> None:
    records = node.store.records
    assert records.get("cache:0149") == b'{"i": 149, "v": 2}' and records.get("cache:new") == b"{}"
    assert records.get("user:user_old:keys:key_old") is None
    assert "user:user_old:keys:key_old" not in records.stamps()
    assert records.resolve(sha256(OLD_KEY), this_month()).remote[1] == (3 * USD, 2)


FAULTS = {
    "429 on page 2": ("list", {"status": 429, "retry_after": 2}, 1),
    "503 on page 2": ("list", {"status": 503}, 1),
    "malformed page 2": ("list", {"kind": "malformed"}, 1),
    "truncated page 2": ("list", {"kind": "truncate"}, 1),
    "page 2 without result_info": ("list", {"status": 200, "body": json.dumps(
        {"success": True, "errors": [], "messages": [], "result": []})}, 1),
    "page 2 with result null": ("list", {"status": 200, "body": json.dumps(
        {"success": True, "errors": [], "messages": [], "result": None,
         "result_info": {"count": 0, "cursor": ""}})}, 1),
    "success false on page 2": ("list", {"kind": "unsuccessful"}, 1),
    "timeout on bulk get 2": ("bulk_get", {"kind": "timeout", "delay": 1.0}, 1),
    "truncated bulk get 2": ("bulk_get", {"kind": "truncate"}, 1),
    "success false on bulk get 2": ("bulk_get", {"kind": "unsuccessful"}, 1),
    "502 on bulk get 2": ("bulk_get", {"status": 502}, 1),
    "bulk get 2 without values": ("bulk_get", {"status": 200, "body": json.dumps(
        {"success": True, "errors": [], "messages": [], "result": {}})}, 1),
}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_fault_in_the_middle_of_a_pass_is_retried(kv, make_node, fault):
    op, kwargs, after = fault
    # A short client timeout only where the fault is one: elsewhere a loaded machine's slow
    # answer would count as a failed attempt.
    node = make_node(timeout_s=0.25 if kwargs.get("kind") == "timeout" else 10)
    mid_pass_setup(kv, node)
    kv.fail(op, after=after, times=1, **kwargs)

    summary = node.replicator.sync_once()

    assert kv.op_counts[op] == after + 2  # the faulty call, then its retry
    assert len(node.sleeps) == 1
    if kwargs.get("status") == 429:
        assert node.sleeps[0] >= kwargs["retry_after"]  # retry-after honoured
    assert (summary.changed, summary.deleted) == (151, 1)
    assert_mid_pass_applied(node)


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_exhausted_retries_apply_nothing(kv, make_node, fault):
    op, kwargs, after = fault
    # A short client timeout only where the fault is one: elsewhere a loaded machine's slow
    # answer would count as a failed attempt.
    node = make_node(timeout_s=0.25 if kwargs.get("kind") == "timeout" else 10)
    mid_pass_setup(kv, node)
    before = node.snapshot(sha256(OLD_KEY))
    kv.fail(op, after=after, times=None, **kwargs)

    with pytest.raises(SyncError) as raised:
        node.replicator.sync_once()

    assert "gave up after 3 attempts" in str(raised.value)
    assert kv.op_counts[op] == after + 3  # retries stop at the bound
    assert node.snapshot(sha256(OLD_KEY)) == before  # records, stamps, last_sync, usage

    kv.clear_faults()
    node.replicator.sync_once()
    assert_mid_pass_applied(node)


def test_one_retry_policy_bounds_every_fault_of_a_call(kv, make_node):
    """Transport faults and malformed answers share one attempt budget per call (the policy is
    one tenacity loop, not a loop in a loop); waits double, and a retry-after longer than the
    backoff is waited out."""
    kv.load_bulk(cache_keys(3))
    node = make_node(max_backoff_s=10)
    for kind in ("status", "malformed", "status", "malformed"):
        kv.fail("list", kind, status=503, times=1)

    with pytest.raises(SyncError, match="gave up after 3 attempts"):
        node.replicator.sync_once()
    assert kv.op_counts["list"] == 3 and node.sleeps == [0.5, 1.0]

    kv.clear_faults()
    kv.reset_counters()
    node.sleeps.clear()
    kv.fail("list", status=429, retry_after=4, times=1)
    kv.fail("list", status=502, times=1)
    summary = node.replicator.sync_once()
    assert summary.listed == 3 and kv.op_counts["list"] == 3
    assert node.sleeps == [4.0, 1.0]  # retry-after, then the backoff of a second retry


def test_single_get_fault_exhausted_applies_nothing(kv, make_node):
    node = make_node()
    kv.load_bulk(cache_keys(2))
    node.replicator.sync_once()
    kv.load_bulk([stamped("cache:0000", '"new"'), stamped("cache:0001", '"new"')])
    before = node.snapshot()
    kv.fail("bulk_get", status=200, times=None, body=json.dumps({
        "success": True, "errors": [], "messages": [],
        "result": {"values": {"cache:0000": None, "cache:0001": None}}}))
    kv.fail("get", status=503, after=1, times=None)

    with pytest.raises(SyncError):
        node.replicator.sync_once()
    assert kv.op_counts["get"] == 1 + 3
    assert node.snapshot() == before


def test_deletion_is_applied_only_from_a_complete_listing(kv, make_node):
    node = make_node()
    kv.load_bulk(workers_namespace(this_month()) + cache_keys(1100))
    node.replicator.sync_once()
    victim = "user:user_new:keys:key_new"  # sorts onto page 2
    kv.delete(victim)
    kv.fail("list", after=1, status=503, times=None)

    with pytest.raises(SyncError):
        node.replicator.sync_once()
    assert node.store.records.get(victim) is not None
    assert victim in node.store.records.stamps()

    kv.clear_faults()
    summary = node.replicator.sync_once()
    assert summary.deleted == 1 and node.store.records.get(victim) is None
    assert len(node.store.records.scan("cache:")) == 1100


def test_empty_pages_while_more_remain_are_followed(kv, make_node):
    node = make_node()
    kv.load_bulk(workers_namespace(this_month()) + cache_keys(1100))
    node.replicator.sync_once()
    kv.delete("user:user_new:keys:key_new")
    kv.empty_pages = {1: 3, 2: 2}  # three empty pages between the data pages, two at the end
    kv.reset_counters()

    summary = node.replicator.sync_once()

    assert kv.op_counts["list"] == 2 + 5
    assert summary.listed == 1110 and summary.deleted == 1
    assert node.store.records.get("user:user_new:keys:key_new") is None
    assert node.store.records.get("user:user_new:config") is not None  # page 2 kept
    assert node.store.records.get("cache:1099") is not None


def test_cli_sync_once_that_cannot_complete_exits_with_one_line(kv, tmp_path):
    kv.load_bulk(workers_namespace(this_month()))
    (tmp_path / "mitm.yaml").write_text(
        f"store:\n  path: {tmp_path / 'store'}\nsync:\n  max_attempts: 1\n")
    kv.fail("list", status=503, times=None)

    done = run_aigw(tmp_path, "sync", "--once", "--api-base", kv.api_base, env=cf_env(kv))

    assert done.returncode == 1 and done.stdout == ""
    created, error = done.stderr.splitlines()  # the store the pass opened, then the error
    assert created == f"aigw: created a new store at {tmp_path / 'store'}"
    assert error.startswith("aigw: error: sync pass did not complete, nothing applied: ")
    assert "HTTP 503" in error and kv.token not in done.stderr
    health = json.loads(run_aigw(tmp_path, "health").stdout)
    assert health["last_sync"] is None and health["records"]["orgs"] == 0

    # A wrong token is not retried: one line at once, and the token is not in it.
    kv.clear_faults()
    env = {**cf_env(kv), "CLOUDFLARE_API_TOKEN": "wrong-token-123"}
    done = run_aigw(tmp_path, "sync", "--once", "--api-base", kv.api_base, env=env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "HTTP 401" in done.stderr
    assert "wrong-token-123" not in done.stderr


# --------------------------------------------------------------------------- 4. request budget


def test_request_budget_makes_a_large_sync_wait_instead_of_exceeding(kv, make_node):
    kv.load_bulk(cache_keys(1100))
    clock = Clock()
    budget = RequestBudget(5, 10.0, sleep=clock.sleep, clock=clock)
    node = make_node(budget=budget)
    sent: list[float] = []
    acquire = budget.acquire

    def recorded() -> None:
        acquire()
        sent.append(clock())

    budget.acquire = recorded

    summary = node.replicator.sync_once()

    assert summary.requests == kv.request_count == len(sent) == 2 + 11
    assert clock.sleeps and sum(clock.sleeps) >= 20  # 13 requests at 5 per 10 s: 2 waits
    for i in range(len(sent) - 5):  # never 6 requests within one window
        assert sent[i + 5] - sent[i] >= 10.0
    assert len(node.store.records.scan("cache:")) == 1100


def test_cloudflare_rate_limit_429_971_is_retried_after_retry_after(kv, make_node):
    kv.load_bulk(cache_keys(1100))
    clock = Clock()
    kv.clock = clock  # the fake's rate limit refills on the clock the client's sleep advances
    kv.rate_limit = (4, 60.0)  # one request per 15 s once the burst of 4 is spent
    node = make_node(clock=clock)

    summary = node.replicator.sync_once()

    refused = kv.request_count - 13
    assert refused >= 5 and len(node.sleeps) == refused
    assert min(node.sleeps) >= 15  # each retry waited for retry-after
    assert summary.requests == kv.request_count
    assert len(node.store.records.scan("cache:")) == 1100


# --------------------------------------------------------------------------- 5. limits, values


def test_key_over_lmdb_limit_and_invalid_values_are_rejected_not_blocking(kv, make_node):
    long_512 = "cache:" + "x" * (512 - len("cache:"))
    long_511 = long_512[:-1]
    kv.load_bulk(workers_namespace(this_month()))
    kv.put(long_512, "{}")  # KV allows 512 bytes, LMDB 511
    kv.put(long_511, "{}")
    kv.put("org:bad:config", "{not json")
    kv.put("user:bad:config", json.dumps({"user_id": "bad", "monthly_limit_usd": "lots"}))
    kv.put("apikey:" + "f" * 64, json.dumps({"name": "no owner"}))
    kv.put("org:bin:config", b"\xff\xfe\x00")
    node = make_node()

    summary = node.replicator.sync_once()

    assert len(summary.rejected) == 5 and "rejected 5" in summary.line()
    assert summary.listed == 11 + 6
    assert node.store.records.get(long_511) == b"{}"
    for key in ("org:bad:config", "user:bad:config", "apikey:" + "f" * 64, "org:bin:config"):
        assert node.store.records.get(key) is None
    assert len(node.store.records.scan("")) == 11 + 1  # every valid record replicated
    assert node.store.records.meta("last_sync")["rejected_count"] == 5

    fixed = json.dumps({"org_id": "bad", "name": "Fixed", "monthly_budget_usd": 3})
    kv.load_bulk([stamped("org:bad:config", fixed)])
    summary = node.replicator.sync_once()
    assert node.store.records.get("org:bad:config") == fixed.encode()


BAD_RECORDS = {  # the holes of issue 10, each as another tool could write it to KV
    "user:user_old:quota": ({"month_usage_usd": 1, "current_month": "2026-01",
                             "request_count": "1.5"}, 'request_count: expected an integer'),
    f"apikey:{sha256('gw_live_' + '5e' * 16)}": (
        {"user_id": "user_old", "key_id": "key_pt", "passthrough": "false"},
        'passthrough: expected a boolean, got "false"'),
    "org:org_inf:config": ({"org_id": "org_inf", "monthly_budget_usd": "inf"},
                           "monthly_budget_usd: expected a number or null"),
    "user:user_paused:config": ({"user_id": "user_paused", "status": "paused"},
                                "status: expected one of active, suspended"),
    "user:user_caps:config": ({"user_id": "user_caps", "status": "Active"}, 'got "Active"'),
}


def test_bad_records_among_good_ones_are_rejected_and_the_rest_applies(kv, make_node, caplog):
    namespace = workers_namespace(this_month())
    kv.load_bulk([item for item in namespace if item["key"] != "user:user_old:quota"])
    for key, (value, _) in BAD_RECORDS.items():
        kv.put(key, json.dumps(value))
    kv.put("org:org_big:config", '{"org_id": "org_big", "monthly_budget_usd": 1e400}')
    kv.put("org:org_deep:config", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    node = make_node()

    with caplog.at_level("WARNING", logger="aigw.sync"):
        summary = node.replicator.sync_once()

    rejected = {r["key"]: r["reason"] for r in summary.rejected}
    assert set(rejected) == {*BAD_RECORDS, "org:org_big:config", "org:org_deep:config"}
    for key, (_, reason) in BAD_RECORDS.items():
        assert reason in rejected[key], key
        assert node.store.records.get(key) is None  # never applied
    assert "expected a finite number" in rejected["org:org_big:config"]
    assert rejected["org:org_deep:config"] == "nested too deeply"
    assert all(r["kept_previous"] is False for r in summary.rejected)
    for item in namespace:  # every good record applied
        if item["key"] != "user:user_old:quota":
            assert node.store.records.get(item["key"]) == item["value"].encode()
    identity = node.store.records.resolve(node.store.hash(OLD_KEY), this_month())
    assert check_identity(identity, None) is None
    stored = node.store.records.meta("last_sync")
    assert stored["rejected_count"] == 7 and stored["rejected"] == summary.rejected
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("not replicated" in line for line in warnings) == 7
    assert any("apikey:" in line and "passthrough" in line for line in warnings)


def test_a_bad_new_version_keeps_the_good_one_until_it_is_fixed(kv, make_node):
    kv.load_bulk(workers_namespace(this_month()))
    good = json.dumps({"org_id": "org_s", "name": "S", "monthly_budget_usd": 7,
                       "failure_mode": "fail_closed"})
    kv.load_bulk([stamped("org:org_s:config", good)])
    node = make_node()
    node.replicator.sync_once()
    assert node.store.records.get("org:org_s:config") == good.encode()
    old_key = f"apikey:{sha256(OLD_KEY)}"
    good_key = node.store.records.get(old_key)

    bad = json.dumps({"org_id": "org_s", "name": "S", "monthly_budget_usd": 7,
                      "failure_mode": "Fail-Open"})
    kv.load_bulk([stamped("org:org_s:config", bad)])  # aigw-stamped: fetched next pass
    kv.put(old_key, json.dumps({"user_id": "user_old", "key_id": "key_old",
                                "status": "active", "passthrough": 1}))  # unstamped
    new_good = json.dumps({"org_id": "org_t", "name": "T", "monthly_budget_usd": 1})
    kv.load_bulk([stamped("org:org_t:config", new_good)])

    for _ in range(2):  # rejected on every pass that fetches it, never deleted
        summary = node.replicator.sync_once(full=True)
        rejected = {r["key"]: r for r in summary.rejected}
        assert set(rejected) == {"org:org_s:config", old_key}
        assert "failure_mode: expected one of" in rejected["org:org_s:config"]["reason"]
        assert "passthrough: expected a boolean, got 1" in rejected[old_key]["reason"]
        assert all(r["kept_previous"] for r in summary.rejected)
        assert summary.deleted == 0
        assert node.store.records.get("org:org_s:config") == good.encode()
        assert node.store.records.get(old_key) == good_key
        assert node.store.records.get("org:org_t:config") == new_good.encode()
    assert node.store.records.resolve(node.store.hash(OLD_KEY)).key.passthrough is False

    fixed = json.dumps({"org_id": "org_s", "name": "S", "monthly_budget_usd": 9,
                        "failure_mode": "fail-open"})
    kv.load_bulk([stamped("org:org_s:config", fixed)])
    summary = node.replicator.sync_once()
    assert summary.rejected == [] and summary.changed == 1
    assert node.store.records.get("org:org_s:config") == fixed.encode()


def test_malformed_usage_figures_of_other_nodes_are_rejected_not_a_crash(kv, make_node):
    month = this_month()
    raw = "gw_live_" + "4d" * 16
    org, user, key = put_account(kv, "u", org_budget=10.0, raw_key=raw)
    good = f"{USAGE_PREFIX}node-x:{month}:org:{org}"
    kv.put(good, "{}", {"n": 2 * USD, "r": 3})
    bad = {
        f"{USAGE_PREFIX}node-y:{month}:org:{org}": {"n": "5", "r": 1},
        f"{USAGE_PREFIX}node-z:{month}:org:{org}": {"n": True, "r": 1},
        f"{USAGE_PREFIX}node-w:{month}:org:{org}": {"n": -1, "r": 1},
        f"{USAGE_PREFIX}node-v:{month}:org:{org}": {"n": 2**70, "r": 1},
        f"{USAGE_PREFIX}node-u:{month}:org:{org}": {"n": 1.5, "r": 1},
        f"{USAGE_PREFIX}node-t:{month}:user:{user}": {"r": 1},
        f"{USAGE_PREFIX}node-s:{month}:user:{user}": None,
        f"{USAGE_PREFIX}node-r:{month}:team:{user}": {"n": 1, "r": 1},
        f"{USAGE_PREFIX}node-q:2026-13:user:{user}": {"n": 1, "r": 1},
        f"{USAGE_PREFIX}node-p:{month}:user": {"n": 1, "r": 1},
    }
    for name, metadata in bad.items():
        kv.put(name, "{}", metadata)
    # Two figures that fit alone but whose sum does not fit the ledger's 64 bits.
    kv.put(f"{USAGE_PREFIX}node-o:{month}:key:{key}", "{}", {"n": 2**62, "r": 1})
    kv.put(f"{USAGE_PREFIX}node-n:{month}:key:{key}", "{}", {"n": 2**62, "r": 1})
    node = make_node()

    summary = node.replicator.sync_once()

    rejected = {r["key"]: r["reason"] for r in summary.rejected}
    assert set(bad) <= set(rejected) and len(rejected) == len(bad) + 1
    assert "overflow" in next(reason for name, reason in rejected.items()
                              if ":key:" in name)
    identity = node.store.records.resolve(sha256(raw), month)
    assert identity.remote[2] == (2 * USD, 3)  # the good figures count
    assert identity.remote[1] == (0, 0)
    assert admit(node, raw, USD) is None


def test_a_store_that_refuses_the_pass_fails_it_cleanly(kv, make_node, monkeypatch):
    from store.db import StoreUnavailable

    kv.load_bulk(workers_namespace(this_month()))
    kv.put("", "{}", check=False)  # KV never lists an empty name; LMDB could not hold one
    node = make_node()

    def full_disk(*args, **kwargs):
        raise StoreUnavailable("store write failed: No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(node.store.records, "replicate", full_disk)
        with pytest.raises(SyncError, match="the local store refused the pass: .*No space"):
            node.replicator.sync_once()
        reports: list[str] = []
        run_loop(node.replicator, 1.0, stop=lambda: len(reports) >= 2, sleep=lambda s: None,
                 report=reports.append)
        assert all("pass failed, nothing applied" in line for line in reports)
    summary = node.replicator.sync_once()
    assert [r["key"] for r in summary.rejected] == [""] and summary.changed == 11


def test_cli_sync_reports_each_rejected_record_and_exits_0(kv, tmp_path):
    kv.load_bulk(workers_namespace(this_month()))
    bad_key = f"apikey:{sha256('gw_live_' + '6f' * 16)}"
    kv.put(bad_key, json.dumps({"user_id": "user_old", "passthrough": "false"}))
    kv.put("org:org_old:quota", json.dumps({"current_month": this_month(),
                                            "request_count": "1.5"}))
    (tmp_path / "mitm.yaml").write_text(
        f"store:\n  path: {tmp_path / 'store'}\n  hash: sha256\nsync:\n  node_id: n1\n")

    done = run_aigw(tmp_path, "sync", "--once", "--api-base", kv.api_base, env=cf_env(kv))

    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert sorted(r["key"] for r in result["rejected"]) == sorted([bad_key, "org:org_old:quota"])
    assert result["changed"] == 10 and "rejected 2" in done.stderr
    assert (f"{bad_key[:19]}... not replicated: passthrough: expected a boolean, got "
            '"false"') in done.stderr
    assert 'org:org_old:quota not replicated: request_count: expected an integer, got "1.5"' \
        in done.stderr
    assert "Traceback" not in done.stderr and "sk-org-old-provider" not in done.stderr


# --------------------------------------------------------------------------- 8. several nodes


def put_account(kv: FakeKV, suffix: str, *, org_budget: float | None, raw_key: str,
                user_limit: float | None = None) -> tuple[str, str, str]:
    org, user, key = f"org_{suffix}", f"user_{suffix}", f"key_{suffix}"
    kv.load_bulk([
        stamped(f"org:{org}:config", json.dumps({
            "org_id": org, "name": org, "monthly_budget_usd": org_budget,
            "failure_mode": "fail_closed"})),
        stamped(f"user:{user}:config", json.dumps({
            "user_id": user, "email": f"{user}@example.com", "monthly_limit_usd": user_limit,
            "org_id": org, "status": "active"})),
        stamped(apikey_key(sha256(raw_key)), json.dumps({
            "key_id": key, "user_id": user, "org_id": org, "name": "k", "status": "active"})),
    ])
    return org, user, key


def admit(node: Node, raw_key: str, cost: int):
    """The gateway's decision and charge (addon/gateway.py `_admit` and `_settle`), on the
    node's store: reserve under the budgets (own live usage + other nodes' synced totals),
    then settle at `cost`. Returns the denial, or None when charged."""
    month, now = this_month(), utc_now()
    identity = node.store.records.resolve(node.store.hash(raw_key), month)
    budgets = budgets_of(identity, month)
    levels = [b.ledger_level for b in budgets]
    rid = os.urandom(8).hex()
    denial = node.store.ledger.reserve(
        rid, levels, month, cost, lambda counters: decide_budgets(budgets, counters, cost, now,
                                                                  month))
    if denial is None:
        node.store.ledger.settle(rid, levels, month, cost)
    return denial


def sync_round(kv: FakeKV, clock: Clock, nodes: list[Node], interval: float = 30.0
               ) -> dict[str, list[str]]:
    """One sync interval later, every node pushes, then every node pulls. Returns the keys
    each node wrote."""
    clock.advance(interval)
    written = {}
    for node in nodes:
        before = len(kv.writes)
        node.replicator.push_usage()
        node.replicator.sync_once()  # pushes again: nothing changed since, so nothing written
        written[node.name] = [key for key, _ in kv.writes[before:]]
    for node in nodes:
        node.replicator.sync_once()
    return written


@pytest.fixture
def three(kv: FakeKV, make_node) -> tuple[Clock, list[Node]]:
    clock = Clock()
    kv.clock = clock
    return clock, [make_node(name) for name in "abc"]


def test_usage_on_one_node_shows_the_spend_another_node_made(kv, three):
    from store import admin

    clock, (a, b, _) = three
    raw = "gw_live_" + "7e" * 16
    org, user, key = put_account(kv, "w", org_budget=1.0, raw_key=raw)
    kv.put(f"org:{org}:quota", json.dumps({"month_usage_usd": 0.25, "request_count": 5,
                                          "current_month": this_month()}))
    sync_round(kv, clock, [a, b])
    assert admit(a, raw, 80 * USD // 100) is None  # A spends $0.80 of the org's $1
    sync_round(kv, clock, [a, b])

    denial = admit(b, raw, USD // 100)  # B refuses: A's spend plus the Workers' quota record
    assert denial is not None and denial.error_type == "organization_quota_exceeded"
    usage = admin.level_usage(b.store, "org", org)
    assert (usage["this_node_usd"], usage["other_nodes_usd"], usage["quota_record_usd"]) == (
        0.0, 0.8, 0.25)
    assert usage["current_usage_usd"] == 1.05 and usage["remaining_usd"] == 0.0
    assert (usage["this_node_requests"], usage["other_nodes_requests"],
            usage["quota_record_requests"], usage["request_count"]) == (0, 1, 5, 6)
    assert admin.level_usage(b.store, "key", key)["other_nodes_usd"] == 0.8
    assert admin.level_usage(a.store, "org", org)["this_node_usd"] == 0.8


def test_three_nodes_count_each_others_spend(kv, three):
    clock, (a, b, c) = three
    raw = "gw_live_" + "3c" * 16
    org, user, key = put_account(kv, "m", org_budget=1.0, raw_key=raw)
    sync_round(kv, clock, [a, b, c])
    month = this_month()
    levels = [("key", key), ("user", user), ("org", org)]
    a.store.ledger.settle(None, levels, month, 40 * USD // 100)
    b.store.ledger.settle(None, levels, month, 60 * USD // 100)
    b.store.ledger.settle(None, levels, previous_month(month), 7 * USD)  # last month's
    assert admit(c, raw, 1000) is None  # before the pass, C has not seen A's and B's spend
    kv.reset_counters()

    written = sync_round(kv, clock, [a, b, c])

    # Each node wrote only its own usage keys, each once, in bulk.
    for node in (a, b, c):
        assert written[node.name], node.name
        assert all(k.startswith(f"{USAGE_PREFIX}{node.node_id}:") for k in written[node.name])
        assert len(set(written[node.name])) == len(written[node.name])
    assert len(written["b"]) == 6  # key, user and org, for this month and for last month
    assert kv.write_violations() == []
    org_key = f"{USAGE_PREFIX}node-b:{month}:org:{org}"
    assert kv.metadata(org_key) == {STAMP: kv.metadata(org_key)[STAMP], "n": 60 * USD // 100,
                                    "r": 1}
    assert json.loads(kv.get(org_key))["node"] == "node-b"

    # C's decision sees A's and B's totals (and not last month's); A's sees B's, not its own.
    identity = c.store.records.resolve(c.store.hash(raw), month)
    assert identity.remote[2] == (USD, 2)
    assert a.store.records.resolve(a.store.hash(raw), month).remote[2] == (
        60 * USD // 100 + 1000, 2)
    denial = admit(c, raw, 1000)
    assert denial is not None and denial.status == 429
    assert denial.error_type == "organization_quota_exceeded"
    assert admit(a, raw, 1000).error_type == "organization_quota_exceeded"

    # Unchanged counters are not pushed again.
    kv.reset_counters()
    written = sync_round(kv, clock, [a, b, c])
    assert written == {"a": [], "b": [], "c": []} and kv.op_counts["bulk_put"] == 0
    a.store.ledger.settle(None, levels, month, 5)
    written = sync_round(kv, clock, [a, b, c])
    assert sorted(written["a"]) == sorted(f"{USAGE_PREFIX}node-a:{month}:{lv}:{i}"
                                          for lv, i in levels)
    assert written["b"] == written["c"] == [] and kv.write_violations() == []


def test_push_retries_what_cloudflare_did_not_write(kv, make_node):
    node = make_node()
    month = this_month()
    node.store.ledger.settle(None, [("key", "k1"), ("user", "u1")], month, 123)
    refused = f"{USAGE_PREFIX}node-a:{month}:user:u1"
    kv.fail_keys(refused)

    assert node.replicator.push_usage() == 1
    assert kv.get(refused) is None
    assert node.replicator.push_usage() == 1  # only the refused one, again
    assert kv.metadata(refused)["n"] == 123
    assert node.replicator.push_usage() == 0


def test_overshoot_is_bounded_by_one_interval_of_the_other_nodes_spend(kv, three):
    """Three nodes share a $1.00 org budget, spending $0.05 a request at 3, 2 and 1 requests
    per sync interval until refused. Each node sees the others' spend one interval late, so the
    budget is overshot by at most what the other nodes spent in the last interval."""
    clock, nodes = three
    raw = "gw_live_" + "4d" * 16
    org, _, _ = put_account(kv, "o", org_budget=1.0, raw_key=raw)
    budget, cost = USD, 5 * USD // 100
    rates = {"a": 3, "b": 2, "c": 1}
    sync_round(kv, clock, nodes)
    intervals: list[dict[str, int]] = []
    for _ in range(30):
        spent = {}
        for node in nodes:
            spent[node.name] = 0
            for _ in range(rates[node.name]):
                if admit(node, raw, cost) is not None:
                    break
                spent[node.name] += cost
        sync_round(kv, clock, nodes)
        if not any(spent.values()):
            break
        intervals.append(spent)

    month = this_month()
    total = sum(n.store.ledger.counters([("org", org)], month)[0].used_nusd for n in nodes)
    overshoot = total - budget
    last = intervals[-1]
    bound = min(sum(last.values()) - last[name] for name in last)
    print(f"\nmulti-node overshoot: ${overshoot / USD:.2f} over a ${budget / USD:.2f} budget "
          f"({100 * overshoot / budget:.0f}%), {len(intervals)} intervals; bound (the other "
          f"nodes' spend in the last interval): ${bound / USD:.2f}")
    assert 0 < overshoot <= bound
    assert len(intervals) == 4  # $0.30 an interval: the budget is reached in the fourth
    for node in nodes:  # after one more pass, every node refuses
        assert admit(node, raw, cost).error_type == "organization_quota_exceeded"
    assert kv.write_violations() == []


def test_run_loop_spaces_passes_and_survives_failed_ones(kv, make_node):
    kv.load_bulk(cache_keys(3))
    node = make_node(max_attempts=2)
    kv.fail("list", status=503, times=4)  # two passes fail (two attempts each)
    sleeps: list[float] = []
    reports: list[str] = []
    passes = []

    run_loop(node.replicator, 5.0, stop=lambda: len(reports) >= 4, sleep=sleeps.append,
             report=reports.append, on_pass=passes.append)

    assert [r.split(" (")[0] for r in reports[:2]] == ["sync: pass failed, nothing applied"] * 2
    assert reports[2].startswith("sync: listed 3, fetched 3")
    assert reports[3].startswith("sync: listed 3, fetched 0")
    assert sleeps == [5.0, 10.0, 5.0, 5.0]  # backoff after failures, the interval otherwise
    assert [p.full for p in passes] == [True, False]
    sleeps.clear()
    reports.clear()
    run_loop(node.replicator, 0.01, stop=lambda: len(reports) >= 2, sleep=sleeps.append,
             report=reports.append)
    assert sleeps == [1.0, 1.0]  # never faster than one write per key per second


# --------------------------------------------------------------------------- 9. --target cloudflare


def test_target_cloudflare_writes_stamped_records_the_next_pass_fetches(kv, make_node, tmp_path):
    kv.load_bulk(workers_namespace(this_month()))
    node = make_node(hash_algorithm="sha256")
    node.replicator.sync_once()  # a full pass: the next full one is an hour away
    config = tmp_path / "admin.yaml"
    config.write_text("store:\n  hash: sha256\n")
    env = cf_env(kv)

    def admin(*args: str) -> dict:
        done = run_aigw(tmp_path, "--config", str(config), "--target", "cloudflare",
                        "--api-base", kv.api_base, *args, env=env)
        assert done.returncode == 0, done.stderr
        assert kv.token not in done.stdout + done.stderr
        return json.loads(done.stdout)

    org = admin("org", "create", "--name", "Remote", "--budget", "40", "--failure-mode",
                "fail-open")
    user = admin("user", "create", "--org", org["org_id"], "--email", "r@example.com",
                 "--limit", "9")
    key = admin("key", "create", "--user", user["user_id"], "--limit", "2")
    written = [f"org:{org['org_id']}:config", f"user:{user['user_id']}:config",
               f"apikey:{sha256(key['api_key'])}",
               f"user:{user['user_id']}:keys:{key['key_id']}"]
    for name in written:
        assert kv.metadata(name) == {STAMP: stamp_of(kv.get(name))}, name
    assert not (tmp_path / "var").exists()  # nothing was written to a local store
    kv.reset_counters()
    listed = admin("key", "list", "--user", user["user_id"])["keys"]
    assert [(k["key_id"], k["monthly_limit_usd"]) for k in listed] == [(key["key_id"], 2)]
    # The key records in bulk, not one request a key (the one GET: the user, checked first).
    assert [r.key for r in kv.requests_for("get")] == [f"user:{user['user_id']}:config"]
    kv.reset_counters()

    summary = node.replicator.sync_once()

    assert summary.full is False
    assert (summary.fetched, summary.changed) == (4, 4)
    assert sorted(k for r in kv.requests_for("bulk_get") for k in r.json["keys"]) == sorted(
        written)
    identity = node.store.records.resolve(sha256(key["api_key"]), this_month())
    assert identity.key.key_id == key["key_id"] and identity.org.failure_mode == "fail_open"
    assert check_identity(identity, None) is None

    # Revocation of a Workers-gateway key (unstamped until now) and of the new one.
    admin("key", "revoke", "key_old")
    admin("key", "revoke", key["key_id"])
    kv.reset_counters()
    summary = node.replicator.sync_once()
    assert summary.full is False and summary.fetched == 4
    for raw in (OLD_KEY, key["api_key"]):
        identity = node.store.records.resolve(sha256(raw), this_month())
        assert identity.key.status == "revoked" and check_identity(identity, None).status == 401


def test_target_cloudflare_rotates_a_workers_key_on_every_node(kv, make_node, tmp_path):
    """`aigw --target cloudflare key rotate` on a key of the Workers gateway's layout (nested
    user, a listing without key_hash): the nodes' next pass brings the new raw key for the
    same key_id, the old one with its expires_at, and, rotated again without grace, neither
    old key."""
    kv.load_bulk(workers_namespace(this_month()))
    node = make_node(hash_algorithm="sha256")
    node.replicator.sync_once()
    config = tmp_path / "admin.yaml"
    config.write_text("store:\n  hash: sha256\n")

    def admin(*args: str) -> dict:
        done = run_aigw(tmp_path, "--config", str(config), "--target", "cloudflare",
                        "--api-base", kv.api_base, *args, env=cf_env(kv))
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    rotated = admin("key", "rotate", "key_new", "--grace-s", "600")
    assert (rotated["key_id"], rotated["user_id"], rotated["org_id"]) == (
        "key_new", "user_new", "org_new")
    second = sha256(rotated["api_key"])
    assert kv.metadata(f"apikey:{second}") == {STAMP: stamp_of(kv.get(f"apikey:{second}"))}
    listing = json.loads(kv.get("user:user_new:keys:key_new"))
    assert (listing["key_hash"], listing["previous_key_hash"]) == (second, sha256(NEW_KEY))
    node.replicator.sync_once()
    old = node.store.records.resolve(sha256(NEW_KEY), this_month()).key
    new = node.store.records.resolve(second, this_month()).key
    assert old.key_id == new.key_id == "key_new" and new.monthly_limit_usd == 5
    assert old.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ") == rotated["previous_key_expires_at"]
    assert new.expires_at is None and new.user_id == "user_new"

    third = admin("key", "rotate", "key_new")  # no grace: both older raw keys go
    assert kv.get(f"apikey:{sha256(NEW_KEY)}") is None and kv.get(f"apikey:{second}") is None
    node.replicator.sync_once()
    for gone in (NEW_KEY, rotated["api_key"]):
        assert node.store.records.resolve(sha256(gone), this_month()).key is None
    current = node.store.records.resolve(sha256(third["api_key"]), this_month())
    assert current.key.key_id == "key_new" and check_identity(current, None) is None


def test_a_rotation_whose_delete_does_not_reach_kv_still_stops_the_old_key(kv, make_node):
    """Without grace the old record is deleted, and written expired in the same write: KV runs
    the deletes after the puts, so a delete that fails leaves a key every node refuses."""
    from store import admin

    kv.load_bulk(workers_namespace(this_month()))
    node = make_node(hash_algorithm="sha256")
    kv.fail("bulk_delete", status=503, times=None)
    with pytest.raises(SyncError):
        admin.rotate_key(CloudflareTarget(node.client, "sha256"), "key_new")
    kv.clear_faults()
    assert kv.get(f"apikey:{sha256(NEW_KEY)}") is not None  # the delete did not happen
    node.replicator.sync_once()
    old = node.store.records.resolve(sha256(NEW_KEY), this_month()).key
    assert old.key_id == "key_new" and old.expires_at.timestamp() <= time.time()


# --------------------------------------------------------------------------- a real namespace

LIVE = all(os.environ.get(name) for name in (
    "CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_KV_NAMESPACE_ID"))


@pytest.mark.skipif(not LIVE, reason="no Cloudflare credentials in the environment")
def test_live_namespace_read_only(tmp_path):
    """Against the real namespace of the environment's credentials (AIGW_LIVE_API_BASE may point
    elsewhere): two passes, reading only (this node's usage is not pushed)."""
    cf, _ = load_sync_settings({}, "env", os.environ.get("AIGW_LIVE_API_BASE"))
    settings = SyncSettings(node_id="aigw-live-test", push_usage=False, max_attempts=3,
                            request_budget=60)
    with Store(tmp_path / "store") as store, KVClient(cf, settings) as client:
        replicator = Replicator(store, client, settings)
        first = replicator.sync_once()
        second = replicator.sync_once()
        assert store.records.meta("last_sync")["listed"] == second.listed
    assert first.full and not second.full
    assert second.requests <= first.requests and second.fetched <= first.fetched
