"""Fleet-wide quota resets (`aigw --target cloudflare quota reset`) and the usage of a level read
from Cloudflare KV (`aigw --target cloudflare usage`), against the fake KV (tests/support/fake_kv.py):
two nodes syncing one namespace, the marker each pass applies, other nodes' figures pushed before
it counting zero, and malformed markers reported, never crashing a pass.

Time between passes is a manual clock (the fake's write times), never a sleep."""

# ruff: noqa: F811  (the fixtures imported from test_sync are arguments of the tests)

from __future__ import annotations

import json

import pytest

from store import USD, admin
from store.cloudflare import STAMP, USAGE_PREFIX, CloudflareTarget, stamp_of
from store.cloudflare.sync import previous_month
from store.records import RESET_PREFIX
from tests.test_sync import (  # noqa: F401  (kv, make_node, server: fixtures)
    Clock,
    Node,
    admit,
    cf_env,
    kv,
    make_node,
    put_account,
    run_aigw,
    server,
    sha256,
    this_month,
)

RAW = "gw_live_" + "5e" * 16
CENT = USD // 100


@pytest.fixture
def pair(kv, make_node) -> tuple[Clock, Node, Node, str]:
    """Nodes A and B on one namespace, with a user limited to $1 (key and org unlimited)."""
    clock = Clock()
    kv.clock = clock
    _, user, _ = put_account(kv, "r", org_budget=None, raw_key=RAW, user_limit=1.0)
    a, b = make_node("a"), make_node("b")
    for node in (a, b):
        node.replicator.sync_once()
    return clock, a, b, user


def next_pass(clock: Clock, node: Node):
    """One sync interval later, a pass of `node`."""
    clock.advance(30)
    return node.replicator.sync_once()


def fleet(node: Node) -> CloudflareTarget:
    """The Cloudflare target of the admin operations, over `node`'s client."""
    return CloudflareTarget(node.client, "sha256")


def remote_user(node: Node) -> tuple[int, int]:
    """Other nodes' totals of the user as the request path reads them (Records.resolve)."""
    return node.store.records.resolve(node.store.hash(RAW), this_month()).remote[1]


def own(node: Node, level: str, level_id: str) -> int:
    (counter,) = node.store.ledger.counters([(level, level_id)], this_month())
    return counter.used_nusd


def test_a_fleet_wide_reset_holds_on_every_node(kv, pair, tmp_path):
    clock, a, b, user = pair
    month = this_month()
    assert admit(a, RAW, 60 * CENT) is None and admit(b, RAW, 40 * CENT) is None
    for node in (a, b, a):
        next_pass(clock, node)
    assert remote_user(a) == (40 * CENT, 1)
    denied = admit(a, RAW, CENT)  # $0.60 here + $0.40 on B: the $1 is spent
    assert denied is not None and denied.error_type == "user_quota_exceeded"
    assert admin.level_usage(fleet(a), "user", user)["current_usage_usd"] == 1.0

    (tmp_path / "admin.yaml").write_text("store:\n  hash: sha256\n")
    done = run_aigw(tmp_path, "--config", str(tmp_path / "admin.yaml"), "--target",
                    "cloudflare", "--api-base", kv.api_base, "quota", "reset", "user", user,
                    "--reason", "new project", env=cf_env(kv))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "level": "user", "id": user, "reset": True, "previous_usage_usd": 1.0,
        "reason": "new project", "current_month": month}
    marker_key = f"{RESET_PREFIX}user:{user}"
    marker = json.loads(kv.get(marker_key))
    assert marker == {"level": "user", "id": user, "month": month, "at_ms": marker["at_ms"],
                      "reason": "new project"}
    assert kv.metadata(marker_key) == {STAMP: stamp_of(kv.get(marker_key)),
                                       "t": marker["at_ms"], "m": month}
    # At once, for the admin view: nobody's figures were pushed after the reset.
    assert admin.level_usage(fleet(a), "user", user)["current_usage_usd"] == 0.0

    # A's next pass: its own counter zeroed, B's pre-reset figures no longer counted; the key
    # and the org were not reset.
    summary = next_pass(clock, a)
    assert (summary.reset_markers, summary.resets_applied, summary.usage_before_reset) == (1, 1,
                                                                                           1)
    assert "resets applied 1" in summary.line() and summary.rejected == []
    assert own(a, "user", user) == 0 and own(a, "key", "key_r") == 60 * CENT
    assert remote_user(a) == (0, 0)
    assert a.store.records.resolve(a.store.hash(RAW), month).remote[0] == (40 * CENT, 1)
    a_key = f"{USAGE_PREFIX}node-a:{month}:user:{user}"
    assert kv.metadata(a_key) | {STAMP: None} == {STAMP: None, "n": 0, "r": 0,
                                                  "z": marker["at_ms"]}
    assert admit(a, RAW, 20 * CENT) is None  # refused before the reset, admitted now
    assert own(a, "user", user) == 20 * CENT

    # A request B admitted before the reset settles before B's pass has seen the marker: the
    # pass resets it too (the bound).
    b.store.ledger.settle(None, [("key", "key_r"), ("user", user), ("org", "org_r")], month,
                          10 * CENT)
    summary = next_pass(clock, b)
    assert summary.resets_applied == 1 and own(b, "user", user) == 0
    assert admit(b, RAW, 30 * CENT) is None  # after B's pass: post-reset usage
    next_pass(clock, b)
    summary = next_pass(clock, a)
    assert summary.resets_applied == 0 and summary.usage_before_reset == 0
    assert remote_user(a) == (30 * CENT, 1)  # B's post-reset usage counts on A
    assert own(a, "user", user) == 20 * CENT  # not reset a second time
    next_pass(clock, a)
    usage = admin.level_usage(fleet(a), "user", user)
    assert (usage["current_usage_usd"], usage["this_node_usd"], usage["other_nodes_usd"],
            usage["request_count"], usage["remaining_usd"]) == (0.5, 0.0, 0.5, 2, 0.5)
    assert admit(a, RAW, 50 * CENT) is None
    assert admit(a, RAW, CENT).error_type == "user_quota_exceeded"  # $0.50 + $0.50 here
    assert kv.write_violations() == []


def test_usage_from_kv_has_the_local_shape_and_every_nodes_figures(kv, pair, tmp_path):
    clock, a, b, user = pair
    month = this_month()
    kv.put(f"user:{user}:quota", json.dumps({"month_usage_usd": 0.25, "request_count": 5,
                                            "current_month": month}))
    assert admit(a, RAW, 10 * CENT) is None and admit(b, RAW, 20 * CENT) is None
    b.store.ledger.settle(None, [("user", user)], previous_month(month), 7 * USD)
    next_pass(clock, a)
    next_pass(clock, b)
    kv.put(f"{USAGE_PREFIX}node-x:{month}:user:{user}", "{}", {"n": "5", "r": 1})  # malformed

    from_kv = admin.level_usage(fleet(a), "user", user)
    local = admin.level_usage(a.store, "user", user)  # A has not pulled B's figures yet

    assert set(from_kv) == set(local)  # one shape for a script; rate fields: none set
    assert from_kv == {
        "level": "user", "id": user, "current_usage_usd": 0.55, "this_node_usd": 0.0,
        "other_nodes_usd": 0.3, "quota_record_usd": 0.25, "request_count": 7,
        "this_node_requests": 0, "other_nodes_requests": 2, "quota_record_requests": 5,
        "monthly_limit_usd": 1.0, "remaining_usd": 0.45, "reserved_usd": None,
        "current_month": month}
    last = admin.level_usage(fleet(a), "user", user, previous_month(month))
    assert (last["other_nodes_usd"], last["quota_record_usd"]) == (7.0, 0.0)
    assert admin.level_usage(fleet(a), "key", "key_r")["other_nodes_usd"] == 0.3
    with pytest.raises(admin.NotFound):
        admin.level_usage(fleet(a), "user", "user_missing")

    (tmp_path / "admin.yaml").write_text("store:\n  hash: sha256\n")
    done = run_aigw(tmp_path, "--config", str(tmp_path / "admin.yaml"), "--target",
                    "cloudflare", "--api-base", kv.api_base, "usage", "user", user,
                    env=cf_env(kv))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == from_kv


def test_a_reset_zeroes_the_workers_quota_record_every_node_then_fetches(kv, pair):
    clock, a, b, user = pair
    month = this_month()
    kv.put(f"user:{user}:quota", json.dumps({"month_usage_usd": 1.0, "request_count": 9,
                                            "current_month": month, "extra": "kept"}))
    next_pass(clock, a)  # not stamped: fetched as a new record
    assert admit(a, RAW, 10 * CENT).error_type == "user_quota_exceeded"

    result = admin.reset_quota(fleet(b), "user", user, "quota record too")

    assert result["previous_usage_usd"] == 1.0
    quota = json.loads(kv.get(f"user:{user}:quota"))
    assert (quota["month_usage_usd"], quota["request_count"], quota["current_month"],
            quota["extra"]) == (0, 0, month, "kept")
    assert kv.metadata(f"user:{user}:quota") == {STAMP: stamp_of(kv.get(f"user:{user}:quota"))}
    summary = next_pass(clock, a)
    assert summary.changed == 1 and summary.resets_applied == 1
    assert admit(a, RAW, 10 * CENT) is None


def test_each_reset_is_applied_once_and_a_later_one_again(kv, pair):
    clock, a, b, user = pair
    assert admit(a, RAW, 30 * CENT) is None
    admin.reset_quota(fleet(a), "user", user, "first")
    assert next_pass(clock, a).resets_applied == 1 and own(a, "user", user) == 0
    assert admit(a, RAW, 20 * CENT) is None
    for _ in range(2):  # the same marker: never applied twice
        assert next_pass(clock, a).resets_applied == 0
    assert own(a, "user", user) == 20 * CENT
    first = json.loads(kv.get(f"{RESET_PREFIX}user:{user}"))["at_ms"]

    clock.advance(5)
    admin.reset_quota(fleet(a), "user", user, "second")

    assert json.loads(kv.get(f"{RESET_PREFIX}user:{user}"))["at_ms"] > first
    assert next_pass(clock, a).resets_applied == 1 and own(a, "user", user) == 0
    assert a.store.ledger.applied_resets()[("user", user)][1] > first


def test_a_reset_is_newer_than_the_one_it_replaces_whatever_this_hosts_clock(kv, pair):
    clock, a, _, user = pair
    ahead = 4_102_444_800_000  # 2100-01-01: a marker written by a host whose clock is ahead
    kv.put(f"{RESET_PREFIX}user:{user}", json.dumps({
        "level": "user", "id": user, "month": this_month(), "at_ms": ahead, "reason": "x"}),
        {"t": ahead, "m": this_month()})
    assert next_pass(clock, a).resets_applied == 1
    assert admit(a, RAW, 10 * CENT) is None

    admin.reset_quota(fleet(a), "user", user, "from a host with the right time")

    assert json.loads(kv.get(f"{RESET_PREFIX}user:{user}"))["at_ms"] == ahead + 1
    assert next_pass(clock, a).resets_applied == 1 and own(a, "user", user) == 0


def test_a_marker_of_an_old_month_resets_nothing_and_last_months_resets_last_month(kv, pair):
    clock, a, _, user = pair
    month = this_month()
    last = previous_month(month)
    before_last = previous_month(last)
    for m in (month, last, before_last):
        a.store.ledger.settle(None, [("user", user), ("org", "org_r")], m, 10 * CENT)
    kv.put(f"{RESET_PREFIX}user:{user}", "{}", {"t": 5, "m": before_last})
    kv.put(f"{RESET_PREFIX}org:org_r", "{}", {"t": 5, "m": last})

    summary = next_pass(clock, a)

    assert summary.resets_applied == 1  # the org's, of last month
    counters = {m: a.store.ledger.counters([("user", user), ("org", "org_r")], m)
                for m in (month, last, before_last)}
    assert [c.used_nusd for c in counters[month]] == [10 * CENT, 10 * CENT]
    assert [c.used_nusd for c in counters[last]] == [10 * CENT, 0]
    assert [c.used_nusd for c in counters[before_last]] == [10 * CENT, 10 * CENT]
    assert a.store.ledger.applied_resets() == {("org", "org_r"): (last, 5)}
    assert kv.metadata(f"{USAGE_PREFIX}node-a:{last}:org:org_r")["z"] == 5
    assert "z" not in kv.metadata(f"{USAGE_PREFIX}node-a:{month}:org:org_r")


MALFORMED_MARKERS = {
    "no metadata": None,
    "no time": {"m": "MONTH"},
    "a string time": {"t": "1780000000000", "m": "MONTH"},
    "a zero time": {"t": 0, "m": "MONTH"},
    "a boolean time": {"t": True, "m": "MONTH"},
    "a fractional time": {"t": 1.5, "m": "MONTH"},
    "a bad month": {"t": 5, "m": "2026-13"},
}


def test_malformed_markers_are_rejected_in_the_summary_not_a_crash(kv, pair, caplog):
    clock, a, b, user = pair
    month = this_month()
    assert admit(b, RAW, 30 * CENT) is None
    next_pass(clock, b)
    names = []
    for i, (what, metadata) in enumerate(MALFORMED_MARKERS.items()):
        name = f"{RESET_PREFIX}user:{user}{'' if i == 0 else f'_{i}'}"
        if isinstance(metadata, dict):
            metadata = {k: month if v == "MONTH" else v for k, v in metadata.items()}
        kv.put(name, "{}", metadata)
        names.append((name, what))
    kv.put(f"{RESET_PREFIX}team:{user}", "{}", {"t": 5, "m": month})
    kv.put(f"{RESET_PREFIX}user", "{}", {"t": 5, "m": month})
    assert admit(a, RAW, 10 * CENT) is None

    summary = next_pass(clock, a)

    rejected = {r["key"]: r for r in summary.rejected}
    assert set(rejected) == {name for name, _ in names} | {f"{RESET_PREFIX}team:{user}",
                                                          f"{RESET_PREFIX}user"}
    assert all(r["kept_previous"] is False for r in rejected.values())
    assert summary.reset_markers == len(rejected) and summary.resets_applied == 0
    assert "metadata: expected an object" in rejected[names[0][0]]["reason"]
    assert "not replicated" in caplog.text
    # The user's own marker is unreadable: figures count as if there were none.
    assert remote_user(a) == (30 * CENT, 1) and own(a, "user", user) == 10 * CENT
    assert all(a.store.records.get(name) is None for name in rejected)  # never replicated
    assert admin.level_usage(fleet(a), "user", user)["other_nodes_usd"] == 0.4

    admin.reset_quota(fleet(a), "user", user, "the fix: a good marker over the bad one")
    summary = next_pass(clock, a)
    assert len(summary.rejected) == len(rejected) - 1 and summary.resets_applied == 1
    assert remote_user(a) == (0, 0)


def test_an_admin_write_of_a_bad_marker_is_refused(pair):
    _, a, _, user = pair
    from store.admin_base import _write

    with pytest.raises(admin.AdminError, match="at_ms: expected an integer"):
        _write(fleet(a), {f"{RESET_PREFIX}user:{user}": json.dumps({
            "level": "user", "id": user, "month": this_month(), "at_ms": "now"}).encode()})
    with pytest.raises(admin.NotFound):
        admin.reset_quota(fleet(a), "user", "user_missing", "x")
    with pytest.raises(admin.AdminError, match="reason"):
        admin.reset_quota(fleet(a), "user", user, "  ")


def test_reset_applies_to_a_key_and_an_org_alike(kv, make_node):
    clock = Clock()
    kv.clock = clock
    put_account(kv, "k", org_budget=1.0, raw_key=RAW)
    a, b = make_node("a"), make_node("b")
    for node in (a, b):
        node.replicator.sync_once()
    assert admit(b, RAW, USD) is None
    next_pass(clock, b)
    next_pass(clock, a)
    assert admit(a, RAW, 20 * CENT).error_type == "organization_quota_exceeded"

    admin.reset_quota(fleet(a), "org", "org_k", "budget raised")
    admin.reset_quota(fleet(a), "key", "key_k", "key too")

    assert next_pass(clock, a).resets_applied == 2
    remote = a.store.records.resolve(a.store.hash(RAW), this_month()).remote
    assert remote[0] == remote[2] == (0, 0) and remote[1] == (USD, 1)  # the user's stays
    assert admit(a, RAW, 20 * CENT) is None
    assert admin.level_usage(fleet(a), "org", "org_k")["current_usage_usd"] == 0.0


def test_the_ledger_applies_a_marker_with_its_memory_in_one_transaction(tmp_path):
    from store import Store

    month = this_month()
    with Store(tmp_path / "s") as store:
        ledger = store.ledger
        ledger.settle(None, [("user", "u1")], month, 5)
        assert ledger.reserve("r1", [("user", "u1")], month, 7, lambda counters: None) is None
        months = (previous_month(month), month)

        reset = ledger.apply_resets({("user", "u1"): (month, 10), ("user", "u2"): (month, 10)},
                                    months)

        assert reset == [("user", "u1"), ("user", "u2")]
        (u1, u2) = ledger.counters([("user", "u1"), ("user", "u2")], month)
        assert (u1.used_nusd, u1.requests, u1.reserved_nusd) == (0, 0, 7)  # reservation stays
        assert ("user", "u2") not in ledger.month_counters(month)  # no counter made up
        assert ledger.apply_resets({("user", "u1"): (month, 10)}, months) == []
        assert ledger.apply_resets({("user", "u1"): (month, 9)}, months) == []
        assert ledger.applied_resets() == {("user", "u1"): (month, 10), ("user", "u2"): (month, 10)}
        # Markers of months no longer pushed are forgotten.
        assert ledger.apply_resets({}, ("2999-01",)) == []
        assert ledger.applied_resets() == {}
