"""End to end: gateway nodes (real mitmdump with addon/gateway.py, each with its own store) kept
in sync with one fake Cloudflare KV namespace (tests/support/fake_kv.py), driven with the official
openai SDK against the fake provider: a Workers-gateway namespace used as is, spend on some nodes
enforced on another (with the overshoot measured), revocation on every node, and stale replicas
taking each org's failure mode."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import openai
import pytest
import yaml

from store import USD, Store
from store.cloudflare import (
    STAMP,
    USAGE_PREFIX,
    KVClient,
    Replicator,
    load_sync_settings,
    previous_month,
    stamp_of,
)
from store.money import month_of, utc_now
from tests.support.fake_kv import FakeKV
from tests.support.gateway import AIGW, OPENAI_KEY, aigw, chat, settled, start_gateway
from tests.support.proxy import REPO_ROOT, Proxy
from tests.support.seed import later_gateway_records, seed

pytestmark = pytest.mark.e2e

USAGE = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
COST = 10 * 150 + 100 * 600  # gpt-4o-mini: 10 x $0.15 + 100 x $0.60 per 1M, in nano-dollars
INTERVAL_S = 30.0


def sha256(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def this_month() -> str:
    return month_of(utc_now())


def gateway_config(**sections) -> dict:
    """The repository's mitm.yaml with sections merged in."""
    config = yaml.safe_load((REPO_ROOT / "mitm.yaml").read_text())
    for name, values in sections.items():
        config[name] = {**(config.get(name) or {}), **values}
    return config


def stamped(key: str, value: dict) -> dict:
    text = json.dumps(value)
    return {"key": key, "value": text, "metadata": {STAMP: stamp_of(text.encode())}}


class Clock:
    """The fake KV's clock: each sync round is one interval later, so no key is written twice
    within Cloudflare's one second."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@dataclass
class Node:
    name: str
    proxy: Proxy
    store: Store
    replicator: Replicator
    client: KVClient

    def openai(self, api_key: str):
        return self.proxy.openai_client(api_key)


@dataclass
class Fleet:
    kv: FakeKV
    clock: Clock
    nodes: list[Node]

    def sync_round(self) -> dict[str, list[str]]:
        """One interval later: every node pushes its usage, then every node pulls (a pass).
        Returns the keys each node wrote."""
        self.clock.t += INTERVAL_S
        written = {}
        for node in self.nodes:
            before = len(self.kv.writes)
            node.replicator.push_usage()
            written[node.name] = [key for key, _ in self.kv.writes[before:]]
        for node in self.nodes:
            node.replicator.sync_once()
        return written

    def admin(self, *args: str) -> dict:
        """`aigw --target cloudflare ...` with node a's mitm.yaml (credentials from there)."""
        node = self.nodes[0]
        done = subprocess.run(
            [AIGW, "--config", str(node.proxy.config), "--target", "cloudflare",
             "--api-base", self.kv.api_base, *args],
            capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def usage_violations(self) -> list:
        return [v for v in self.kv.write_violations() if v[0].startswith(USAGE_PREFIX)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, fake_provider_server) -> Iterator[Fleet]:
    """Three gateway nodes (node-a, node-b, node-c), each a mitmdump with its own store, all
    syncing from one fake KV namespace (the Workers layout: store.hash sha256)."""
    tmp = tmp_path_factory.mktemp("fleet")
    clock = Clock()
    with FakeKV() as kv:
        kv.clock = clock
        token_file = tmp / "cf-token"
        token_file.write_text(kv.token + "\n")
        nodes: list[Node] = []
        try:
            for name in "abc":
                config = gateway_config(
                    store={"hash": "sha256"},
                    sync={"node_id": f"node-{name}", "cloudflare": {
                        "account_id": kv.account_id, "namespace_id": kv.namespace_id,
                        "api_token_file": str(token_file)}})
                proxy = start_gateway(tmp / name, fake_provider_server.address,
                                      config_text=yaml.safe_dump(config), name=f"gw-{name}")
                store = Store(proxy.store_dir, hash_algorithm="sha256")
                cf, settings = load_sync_settings(config, str(proxy.config), kv.api_base)
                settings = replace(settings, max_attempts=3, max_backoff_s=0.01)
                client = KVClient(cf, settings)
                nodes.append(Node(name, proxy, store, Replicator(store, client, settings),
                                  client))
            yield Fleet(kv, clock, nodes)
        finally:
            for node in nodes:
                node.proxy.stop()
                node.client.close()
                node.store.close()


def put_account(kv: FakeKV, suffix: str, raw_key: str, *, org_budget: float | None,
                user_limit: float | None = None) -> str:
    """An org, user and key written to KV as aigw writes them (stamped); returns the key id."""
    org, user, key = f"org_{suffix}", f"user_{suffix}", f"key_{suffix}"
    kv.load_bulk([
        stamped(f"org:{org}:config", {"org_id": org, "name": org, "failure_mode": "fail_closed",
                                      "monthly_budget_usd": org_budget}),
        stamped(f"user:{user}:config", {"user_id": user, "email": f"{user}@example.com",
                                        "org_id": org, "monthly_limit_usd": user_limit,
                                        "status": "active"}),
        stamped(f"apikey:{sha256(raw_key)}", {"key_id": key, "user_id": user, "org_id": org,
                                              "name": "k", "status": "active"}),
    ])
    return key


# --------------------------------------------------------------------------- the Workers layout


def test_workers_namespace_syncs_as_is_and_its_keys_work_through_the_proxy(fleet, fake_provider):
    month = this_month()
    old_key, new_key = "gw_live_" + "5e" * 16, "gw_live_" + "6f" * 16
    fleet.kv.load_bulk([{"key": k, "value": json.dumps(v)} for k, v in {
        # The older version: sha256 apikey with user_id only; the org holds its OpenAI key.
        "org:org_wold:config": {"org_id": "org_wold", "name": "Old", "monthly_budget_usd": 500,
                                "failure_mode": "fail_closed",
                                "provider_keys": {"openai": "sk-org-wold-provider"}},
        "user:user_wold:config": {"user_id": "user_wold", "email": "o@example.com",
                                  "monthly_limit_usd": 10, "org_id": "org_wold",
                                  "status": "active"},
        # The Workers gateway already counted all but $0.000001 of the user's $10 this month.
        "user:user_wold:quota": {"month_usage_usd": 9.999999, "current_month": month,
                                 "request_count": 321, "last_update": 1},
        f"apikey:{sha256(old_key)}": {"user_id": "user_wold", "key_id": "key_wold",
                                      "name": "laptop", "status": "active"},
        "user:user_wold:keys:key_wold": {"name": "laptop", "status": "active",
                                         "revoked_at": None, "last_used_at": None},
        # The three-level version, `fail-open` spelling, a big quota record of last month.
        "org:org_wnew:config": {"org_id": "org_wnew", "name": "New", "monthly_budget_usd": 80,
                                "failure_mode": "fail-open", "fallback_daily_limit": 5},
        "org:org_wnew:quota": {"month_usage_usd": 999, "current_month": previous_month(month),
                               "request_count": 9, "last_update": 1},
        "user:user_wnew:config": {"user_id": "user_wnew", "email": "n@example.com",
                                  "monthly_limit_usd": 30, "org_id": "org_wnew",
                                  "status": "active"},
        f"apikey:{sha256(new_key)}": {"key_id": "key_wnew", "key_hash": sha256(new_key),
                                      "org_id": "org_wnew", "user": {"user_id": "user_wnew"},
                                      "monthly_limit_usd": 5, "name": "ci", "status": "active"},
        "user:user_wnew:keys:key_wnew": {"name": "ci", "status": "active", "revoked_at": None},
    }.items()])
    node = fleet.nodes[0]
    fleet.clock.t += INTERVAL_S

    result = aigw(node.proxy, "sync", "--once", "--api-base", fleet.kv.api_base)  # the CLI

    assert result["ok"] is True and result["rejected"] == []
    for name in ("org:org_wold:config", f"apikey:{sha256(old_key)}", "user:user_wold:quota"):
        assert node.store.records.get(name) == fleet.kv.get(name)
    fake_provider.set(usage=USAGE)
    client = node.openai(old_key)
    assert chat(client).choices[0].message.content
    assert fake_provider.last.credential == "sk-org-wold-provider"
    # The quota record's usage counts: this request crossed the user's limit, the next is 429.
    with pytest.raises(openai.RateLimitError) as raised:
        chat(client)
    error = raised.value.body
    assert error["type"] == "user_quota_exceeded"
    assert error["details"]["usage_usd"] == pytest.approx(9.999999 + COST / USD, abs=1e-9)

    assert chat(node.openai(new_key)).choices[0].message.content  # last month's quota: reset
    assert fake_provider.last.credential == OPENAI_KEY
    assert settled(node.store, "key_wnew").used_nusd == COST
    assert len(fake_provider.requests) == 2


def test_a_later_workers_namespace_syncs_and_its_virtual_keys_work_through_the_proxy(
        fleet, fake_provider):
    """vkey records, sha256 and `fail-closed`, as the later Workers gateway writes them: active
    keys metered, revoked ones 401, an exhausted key quota record 429; a key made with
    `aigw --target cloudflare key create` is of the namespace's layout and works on every node."""
    month = this_month()
    active, revoked, exhausted = (
        later_gateway_records(sha256, suffix=suffix, **options) for suffix, options in (
            ("lg1", {}), ("lg2", {"key_status": "revoked"}),
            ("lg3", {"key_limit": 1.0, "key_quota": {
                "month_usage_usd": 1.0, "current_month": month, "request_count": 40,
                "last_update": 1}})))
    namespace = {**active[0], **revoked[0], **exhausted[0]}
    fleet.kv.load_bulk([{"key": k, "value": v} for k, v in namespace.items()])
    a, b, c = fleet.nodes
    fleet.clock.t += INTERVAL_S

    result = aigw(a.proxy, "sync", "--once", "--api-base", fleet.kv.api_base)

    assert result["ok"] is True and result["rejected"] == []
    for name in namespace:  # the plain-text index too, byte for byte
        assert a.store.records.get(name) == fleet.kv.get(name), name
    fake_provider.set(usage=USAGE)
    assert chat(a.openai(active[1])).choices[0].message.content
    assert fake_provider.last.credential == OPENAI_KEY
    assert settled(a.store, active[2]).used_nusd == COST
    with pytest.raises(openai.AuthenticationError):
        chat(a.openai(revoked[1]))
    with pytest.raises(openai.RateLimitError) as raised:
        chat(a.openai(exhausted[1]))
    error = raised.value.body
    assert (error["type"], error["details"]["usage_usd"]) == ("key_quota_exceeded", 1.0)
    assert len(fake_provider.requests) == 1

    made = fleet.admin("key", "create", "--user", "user_lg1", "--name", "ci")
    assert len(made["api_key"]) == len("gw_live_") + 48 and made["key_layout"] == "vkey"
    assert fleet.kv.get(f"vkey:id:{made['key_id']}") == sha256(made["api_key"]).encode()
    fleet.sync_round()
    assert chat(b.openai(made["api_key"])).choices[0].message.content
    fleet.admin("key", "revoke", made["key_id"])
    fleet.sync_round()
    with pytest.raises(openai.AuthenticationError):
        chat(c.openai(made["api_key"]))
    assert len(fake_provider.requests) == 2
    for name in fleet.kv.keys("vkey:"):  # the fleet's later tests create keys: as aigw's own
        fleet.kv.delete(name)
    fleet.sync_round()


# --------------------------------------------------------------------------- usage across nodes


def test_spend_on_two_nodes_is_enforced_on_the_third(fleet, fake_provider):
    fake_provider.set(usage=USAGE)
    raw = "gw_live_" + "7a" * 16
    key_id = put_account(fleet.kv, "spread", raw, org_budget=2 * COST / USD)
    fleet.sync_round()
    a, b, c = fleet.nodes

    chat(a.openai(raw))
    chat(b.openai(raw))
    assert settled(a.store, key_id).used_nusd == settled(b.store, key_id).used_nusd == COST
    written = fleet.sync_round()

    # Each of A and B wrote its own totals (key, user, org), and nothing of anyone else's.
    month = this_month()
    for node in (a, b):
        mine = {k for k in written[node.name] if f":{month}:" in k and k.endswith("_spread")}
        assert mine == {f"{USAGE_PREFIX}node-{node.name}:{month}:{level}:{level}_spread"
                        for level in ("key", "user", "org")}
    for name, keys in written.items():
        assert all(k.startswith(f"{USAGE_PREFIX}node-{name}:") for k in keys)
    with pytest.raises(openai.RateLimitError) as raised:
        chat(c.openai(raw))
    error = raised.value.body
    assert error["type"] == "organization_quota_exceeded"
    assert error["details"]["usage_usd"] == pytest.approx(2 * COST / USD, abs=1e-9)
    with pytest.raises(openai.RateLimitError):
        chat(a.openai(raw))  # A sees B's spend beside its own
    assert len(fake_provider.requests) == 2
    assert fleet.usage_violations() == []
    # Nothing changed: nothing is pushed again.
    assert fleet.sync_round() == {"a": [], "b": [], "c": []}


def test_overshoot_across_three_gateways_is_bounded_by_one_interval(fleet, fake_provider):
    """A budget of 5 requests' cost, each node sending one request per sync interval until
    refused: every node sees the others' spend one interval late."""
    fake_provider.set(usage=USAGE)
    raw = "gw_live_" + "8b" * 16
    key_id = put_account(fleet.kv, "over", raw, org_budget=5 * COST / USD)
    fleet.sync_round()
    intervals: list[dict[str, int]] = []
    admitted = {node.name: 0 for node in fleet.nodes}
    for _ in range(6):
        spent = {}
        for node in fleet.nodes:
            try:
                chat(node.openai(raw))
            except openai.RateLimitError as exc:
                assert exc.body["type"] == "organization_quota_exceeded"
                spent[node.name] = 0
            else:
                admitted[node.name] += 1
                spent[node.name] = COST
        for node in fleet.nodes:
            settled(node.store, key_id, admitted[node.name])
        fleet.sync_round()
        if not any(spent.values()):
            break
        intervals.append(spent)

    month = this_month()
    total = sum(n.store.ledger.counters([("org", "org_over")], month)[0].used_nusd
                for n in fleet.nodes)
    overshoot = total - 5 * COST
    last = intervals[-1]
    bound = min(sum(last.values()) - last[name] for name in last)
    print(f"\nthree mitmdump nodes: overshoot {overshoot / COST:.0f} request(s) "
          f"(${overshoot / USD:.6f}, {100 * overshoot / (5 * COST):.0f}% of the budget); "
          f"bound, the other nodes' spend in the last interval: ${bound / USD:.6f}")
    assert total == COST * sum(admitted.values()) == COST * len(fake_provider.requests)
    assert 0 < overshoot <= bound
    assert len(intervals) == 2  # 3 requests in the first interval, 3 in the second
    assert fleet.usage_violations() == []


# --------------------------------------------------------------------------- revocation


def test_revocation_in_kv_stops_the_key_on_every_node_after_one_pass(fleet, fake_provider):
    org = fleet.admin("org", "create", "--name", "Revokers", "--budget", "100")
    user = fleet.admin("user", "create", "--org", org["org_id"], "--email", "r@example.com",
                       "--limit", "50")
    by_cli = fleet.admin("key", "create", "--user", user["user_id"], "--name", "cli")
    by_edit = fleet.admin("key", "create", "--user", user["user_id"], "--name", "edit")
    fleet.sync_round()
    for node in fleet.nodes:
        chat(node.openai(by_cli["api_key"]))
        chat(node.openai(by_edit["api_key"]))
    assert len(fake_provider.requests) == 6
    fleet.clock.t += INTERVAL_S

    revoked = fleet.admin("key", "revoke", by_cli["key_id"])
    fleet.kv.delete(f"apikey:{sha256(by_edit['api_key'])}")  # a direct edit of the namespace
    assert revoked["status"] == "revoked"
    for node in fleet.nodes:
        summary = node.replicator.sync_once()  # one pass each
        assert summary.full is False and summary.deleted == 1

    for node in fleet.nodes:
        for raw in (by_cli["api_key"], by_edit["api_key"]):
            with pytest.raises(openai.AuthenticationError) as raised:
                chat(node.openai(raw))
            assert raised.value.status_code == 401
    assert len(fake_provider.requests) == 6


# --------------------------------------------------------------------------- freshness


def test_stale_replica_applies_each_orgs_failure_mode(tmp_path, fake_provider):
    with FakeKV() as kv:
        token_file = tmp_path / "cf-token"
        token_file.write_text(kv.token)
        config = gateway_config(
            policy={"max_staleness_s": 60},
            sync={"node_id": "fresh-1", "cloudflare": {
                "account_id": kv.account_id, "namespace_id": kv.namespace_id,
                "api_token_file": str(token_file)}})
        store_dir = tmp_path / "store"
        with Store(store_dir) as store:
            closed = seed(store, suffix="closed", failure_mode="fail_closed")
            open1 = seed(store, suffix="open1", failure_mode="fail-open",
                         fallback_daily_limit=0.000001)
            open2 = seed(store, suffix="open2", failure_mode="fail_open",
                         fallback_daily_limit=0.000001)
        proxy = start_gateway(tmp_path, fake_provider.address, store_dir=store_dir,
                              config_text=yaml.safe_dump(config))
        store = Store(store_dir)
        try:
            def fail_closed_is_503() -> None:
                with pytest.raises(openai.InternalServerError) as raised:
                    chat(proxy.openai_client(closed.api_key))
                assert raised.value.status_code == 503
                assert raised.value.body["type"] == "quota_unavailable"
                assert raised.value.response.headers["retry-after"] == "30"

            def fail_open_forwards_within_the_fallback_limit(api_key: str) -> None:
                before = len(fake_provider.requests)
                assert chat(proxy.openai_client(api_key)).choices[0].message.content
                assert len(fake_provider.requests) == before + 1
                with pytest.raises(openai.RateLimitError) as raised:
                    chat(proxy.openai_client(api_key))
                assert raised.value.body["type"] == "fallback_daily_limit_exceeded"
                assert len(fake_provider.requests) == before + 1

            # Never synced.
            assert aigw(proxy, "health")["last_sync"] is None
            fail_closed_is_503()
            fail_open_forwards_within_the_fallback_limit(open1.api_key)
            assert [e.mode for e in store.ledger.grace_log()] == ["grace"]

            # One complete pass: fresh, decided on budgets again.
            assert aigw(proxy, "sync", "--once", "--api-base", kv.api_base)["ok"] is True
            health = aigw(proxy, "health")
            assert health["last_sync"]["node_id"] == "fresh-1"
            assert abs(health["last_sync"]["finished_at"] - time.time()) < 30
            chat(proxy.openai_client(closed.api_key))
            assert settled(store, closed.key_id).requests == 1

            # The last complete pass is now older than max_staleness_s.
            last = store.records.meta("last_sync")
            store.records.replicate({}, [], {}, None, {**last, "finished_at": time.time() - 61})
            assert aigw(proxy, "health")["last_sync"]["finished_at"] < time.time() - 60
            fail_closed_is_503()
            fail_open_forwards_within_the_fallback_limit(open2.api_key)
            assert settled(store, closed.key_id).requests == 1
        finally:
            proxy.stop()
            store.close()
