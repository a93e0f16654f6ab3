"""The LMDB store: atomic reservations across processes, map growth, months, record parsing."""

import json
import math
import multiprocessing
import time

import pytest

from store import USD, Store
from store.db import GATEWAY_TIMEOUT_S, Ledger, UsageRecord
from store.money import month_of, month_span, seconds_to_month_end, usd_text
from store.records import ApiKey, Org, RecordError, normalize_failure_mode
from tests.support.elsewhere import in_another_process


def never(counters):
    return None  # no reason to refuse


def _spend(path: str, worker: int, rounds: int, limit: int, cost: int, results) -> None:
    admitted = 0
    with Store(path) as store:
        for i in range(rounds):
            rid = f"w{worker}-{i}"

            def refuse(counters):
                c = counters[0]
                return None if c.used_nusd + c.reserved_nusd < limit else "full"

            if store.ledger.reserve(rid, [("org", "o")], "2026-11", cost, refuse) is None:
                admitted += 1
                store.ledger.settle(rid, [("org", "o")], "2026-11", cost)
    results.put(admitted)


def test_reservations_hold_a_budget_across_processes(tmp_path):
    """Four processes race for a budget with room for ten requests: exactly ten get in, and the
    ledger equals the sum of what was settled (no lost update)."""
    Store(tmp_path / "s").close()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    cost = USD // 100
    workers = [
        ctx.Process(target=_spend, args=(str(tmp_path / "s"), w, 50, 10 * cost, cost, results))
        for w in range(4)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    admitted = sum(results.get(timeout=5) for _ in workers)
    with Store(tmp_path / "s") as store:
        counter = store.ledger.counters([("org", "o")], "2026-11")[0]
    assert admitted == 10
    assert counter.used_nusd == 10 * cost and counter.requests == 10
    assert counter.reserved_nusd == 0  # denied requests reserve nothing


def test_settle_releases_the_reservation_and_adds_the_real_cost(tmp_path):
    with Store(tmp_path / "s") as store:
        levels = [("key", "k"), ("user", "u"), ("org", "o")]
        store.ledger.reserve("r", levels, "2026-11", 500, never)
        assert [c.reserved_nusd for c in store.ledger.counters(levels, "2026-11")] == [500] * 3
        record = UsageRecord(1.0, "openai", "gpt-4o", "k", "u", "o", "metered", 200, None, 123,
                             False, input=10, output=5)
        after = store.ledger.settle("r", levels, "2026-11", 123, record)
        assert [(c.used_nusd, c.reserved_nusd, c.requests) for c in after] == [(123, 0, 1)] * 3
        # Settling twice (a retried write) never releases more than was reserved.
        store.ledger.settle("r", levels, "2026-11", 0)
        assert store.ledger.counters(levels, "2026-11")[0].reserved_nusd == 0
        assert store.ledger.log_entries() == [record]


def test_a_counter_saturates_instead_of_overflowing_so_every_settle_is_written(tmp_path):
    """9,224 requests at the $1,000,000 cap of one request overflow an int64 of nano-dollars:
    the counter stops at its maximum (every limit refuses it) rather than fail each write."""
    top = 2**63 - 1
    with Store(tmp_path / "s") as store:
        levels = [("org", "o")]
        store.ledger.settle(None, levels, "2026-11", top - 10)
        store.ledger.reserve("r", levels, "2026-11", top - 5, never)
        assert store.ledger.reserve("r2", levels, "2026-11", 100, never) is None
        assert store.ledger.counters(levels, "2026-11")[0].reserved_nusd == top
        after = store.ledger.settle("r", levels, "2026-11", 10**15)
        assert after[0].used_nusd == top and after[0].requests == 2


LEVELS = [("key", "k"), ("user", "u"), ("org", "o")]


def alive(gateway, entry):
    return True


def _reserved(path: str) -> list[int]:
    with Store(path) as store:
        return [c.reserved_nusd for c in store.ledger.counters(LEVELS, "2026-11")]


def reserved_seen_by_another_process(path) -> list[int]:
    return in_another_process(_reserved, str(path))


def second_gateway(store: Store) -> Ledger:
    """Another gateway on the same ledger (LMDB opens an environment once per process)."""
    return Ledger(store.ledger._env)


def test_a_gateway_alone_on_the_ledger_still_writes_each_reservation(tmp_path):
    """There is one reservation path: every admission is decided and reserved in one ledger
    write, so another process sees it at once, whoever is registered."""
    with Store(tmp_path / "s") as store:
        ledger = store.ledger
        assert ledger.join("host/a", {"pid": 101}, alive) == []
        owner = {"host": "host/a", "pid": 101}
        assert ledger.reserve("r1", LEVELS, "2026-11", 500, never, owner=owner) is None
        assert ledger.reserve("r2", LEVELS[1:], "2026-11", 200, never, owner=owner) is None
        assert reserved_seen_by_another_process(tmp_path / "s") == [500, 700, 700]
        assert {(r["host"], r["pid"], r["amount_nusd"]) for r in ledger.reservations()} == {
            ("host/a", 101, 500), ("host/a", 101, 200)}
        after = ledger.settle("r1", LEVELS, "2026-11", 123)
        assert [(c.used_nusd, c.reserved_nusd, c.requests) for c in after] == [
            (123, 0, 1), (123, 200, 1), (123, 200, 1)]
        assert ledger.release("r2") is True and ledger.release("r2") is False
        assert reserved_seen_by_another_process(tmp_path / "s") == [0] * 3


def test_a_refused_reservation_writes_nothing_and_sees_the_others(tmp_path):
    with Store(tmp_path / "s") as store:
        a, b = store.ledger, second_gateway(store)
        a.join("host/a", {"pid": 101}, alive)
        b.join("host/b", {"pid": 102}, alive)
        a.reserve("r1", LEVELS, "2026-11", 500, never)
        seen = []
        assert b.reserve("r2", LEVELS, "2026-11", 300,
                         lambda c: seen.append(c) or "full") == "full"
        assert [c.reserved_nusd for c in seen[-1]] == [500] * 3  # a's reservation was counted
        assert [c.reserved_nusd for c in b.counters(LEVELS, "2026-11")] == [500] * 3
        assert len(b.reservations()) == 1


def test_stale_reservations_are_released(tmp_path):
    """A crashed gateway's reservations are released; a live one's stay."""
    with Store(tmp_path / "s") as store:
        ledger = store.ledger
        ledger.reserve("r1", LEVELS, "2026-11", 500, never, owner={"host": "dead", "pid": 1})
        ledger.reserve("r2", LEVELS, "2026-11", 200, never, owner={"host": "live", "pid": 2})
        assert ledger.release_stale(lambda r: r["host"] == "dead") == 1
        assert [c.reserved_nusd for c in ledger.counters(LEVELS, "2026-11")] == [200] * 3
        assert [r["host"] for r in ledger.reservations()] == ["live"]


def test_registrations_of_dead_gateways_are_dropped(tmp_path, monkeypatch):
    with Store(tmp_path / "s") as store:
        a, b = store.ledger, second_gateway(store)
        dead: set[int] = set()
        a.join("host/a", {"pid": 101}, lambda gateway, entry: entry["pid"] not in dead)
        b.join("host/b", {"pid": 102}, alive)
        assert a.gateways() == ["host/a", "host/b"]
        dead.add(102)  # the liveness check (a pid, on the same host) says b is gone
        assert a.heartbeat() == [] and a.gateways() == ["host/a"]
        # b still runs after all: its heartbeat restores its registration.
        dead.clear()
        assert b.heartbeat() == ["host/a"] and a.gateways() == ["host/a", "host/b"]
        b.leave()  # a clean exit removes the registration
        assert a.gateways() == ["host/a"]
        # A gateway whose heartbeat stopped is gone once GATEWAY_TIMEOUT_S has passed.
        b.join("host/b", {"pid": 103}, alive)
        assert a.gateways() == ["host/a", "host/b"]
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + GATEWAY_TIMEOUT_S + 1)
        a.heartbeat()
        assert a.gateways() == ["host/a"]


def test_months_are_separate_periods(tmp_path):
    with Store(tmp_path / "s") as store:
        store.ledger.settle(None, [("user", "u")], "2026-10", 999)
        assert store.ledger.counters([("user", "u")], "2026-11")[0].used_nusd == 0
        assert store.ledger.counters([("user", "u")], "2026-10")[0].used_nusd == 999


def test_a_full_map_grows_instead_of_failing(tmp_path):
    with Store(tmp_path / "s", map_size=256 * 1024) as store:
        big = b"x" * 2000
        for batch in range(10):
            store.records.write({f"org:{batch}-{i}:config": big for i in range(100)})
        assert store.records.count()["orgs"] == 1000


def test_a_map_grown_by_another_process_is_picked_up(tmp_path):
    with Store(tmp_path / "s", map_size=256 * 1024) as reader:
        ctx = multiprocessing.get_context("spawn")
        writer = ctx.Process(target=_fill, args=(str(tmp_path / "s"),))
        writer.start()
        writer.join(60)
        assert writer.exitcode == 0
        assert reader.records.count()["orgs"] == 1000
        reader.records.write({"org:last:config": b"{}"})


def test_a_ledger_grown_by_another_process_is_read_on_the_request_path(tmp_path):
    with Store(tmp_path / "s", map_size=256 * 1024) as reader:
        ledger = reader.ledger
        assert ledger.counters(LEVELS, "2026-11") == [(0, 0, 0, 0)] * 3
        ctx = multiprocessing.get_context("spawn")
        writer = ctx.Process(target=_fill_ledger, args=(str(tmp_path / "s"),))
        writer.start()
        writer.join(60)
        assert writer.exitcode == 0
        seen = []
        ledger.reserve("r", LEVELS, "2026-11", 5, lambda c: seen.append(c) or None)
        assert [c[:3] for c in seen[-1]] == [(500, 0, 500)] * 3
        after = ledger.settle("r", LEVELS, "2026-11", 7)
        assert [c[:3] for c in after] == [(507, 0, 501)] * 3


def _fill_ledger(path: str) -> None:
    record = UsageRecord(1.0, "openai", "gpt-4o", "k", "u", "o", "metered", 200, "x" * 1000, 1,
                         False)
    with Store(path, map_size=256 * 1024) as store:
        for i in range(500):
            store.ledger.settle(f"r{i}", LEVELS, "2026-11", 1, record)


def _fill(path: str) -> None:
    with Store(path, map_size=256 * 1024) as store:
        store.records.write({f"org:{i}:config": b"y" * 2000 for i in range(1000)})


def test_keys_over_lmdb_limit_are_refused_cleanly(tmp_path):
    with Store(tmp_path / "s") as store:
        with pytest.raises(Exception, match="511"):
            store.records.write({"apikey:" + "a" * 600: b"{}"})
        assert store.records.count()["apikeys"] == 0


def test_records_of_both_workers_gateway_versions_parse():
    old = ApiKey.parse("h", json.dumps({"user_id": "u1", "key_id": "k1", "name": "n",
                                        "status": "active", "created_at": "x"}))
    assert (old.user_id, old.org_id, old.monthly_limit_usd) == ("u1", None, None)
    new = ApiKey.parse("h", {"key_id": "k2", "key_hash": "h", "org_id": "o", "user": "u2",
                             "monthly_limit_usd": 5, "status": "revoked"})
    assert (new.user_id, new.org_id, new.active) == ("u2", "o", False)
    org = Org.parse("o", {"name": "Acme", "monthly_budget_usd": 100, "failure_mode": "fail-open"})
    assert org.failure_mode == "fail_open" and org.fallback_daily_limit_usd == 10.0
    with pytest.raises(RecordError):  # amounts are JSON numbers (store/records.py is strict)
        Org.parse("o", {"monthly_budget_usd": "100"})
    assert normalize_failure_mode("FAIL-CLOSED") == "fail_closed"
    with pytest.raises(RecordError):
        Org.parse("o", {"monthly_budget_usd": -1})
    with pytest.raises(RecordError):
        Org.parse("o", b"not json")


def test_money_text_and_month_helpers():
    from datetime import UTC, datetime

    assert usd_text(5625) == "0.000005625" and usd_text(12 * USD + USD // 2) == "12.5"
    assert usd_text(0) == "0"
    now = datetime(2026, 12, 31, 23, 59, 0, tzinfo=UTC)
    assert month_of(now) == "2026-12" and seconds_to_month_end(now) == 60
    assert seconds_to_month_end(now.timestamp()) == 60
    # The request path's month cache: a month's span, ending where the next one starts.
    name, start, end = month_span(now.timestamp())
    assert name == "2026-12" and start == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert end == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert month_span(end)[0] == "2027-01" and month_span(end - 0.001)[0] == "2026-12"
    assert month_span(math.nextafter(end, 0))[0] == "2026-12"  # no rounding up into January
    leap = datetime(2028, 2, 1, tzinfo=UTC).timestamp()
    assert month_span(leap)[2] - leap == 29 * 86400


def test_the_store_layer_never_imports_mitmproxy():
    import subprocess
    import sys

    code = ("import sys, store, store.admin, store.cli; "
            "sys.exit(any(m.split('.')[0] == 'mitmproxy' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_a_store_that_cannot_be_looked_at_counts_as_existing(tmp_path, monkeypatch):
    assert not Store.exists(tmp_path / "none")
    with Store(tmp_path / "s"):
        pass
    assert Store.exists(tmp_path / "s")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    # Opening it then reports the real reason, instead of "no store".
    monkeypatch.setattr("pathlib.Path.is_file", denied)
    assert Store.exists(tmp_path / "none")


def test_release_stale_by_timeout_reads_liveness_in_its_own_transaction(tmp_path, monkeypatch):
    """`release_stale(timeout_ms)`: the registry is read inside the releasing transaction; a
    live gateway's fresh reservation stays, a gone gateway's and an old one go."""
    with Store(tmp_path / "s") as store:
        a, b = store.ledger, second_gateway(store)
        a.join("host/a", {"pid": 101}, alive)
        b.join("host/b", {"pid": 102}, alive)
        a.reserve("r1", LEVELS, "2026-11", 500, never, owner={"host": "host/a", "pid": 101})
        b.reserve("r2", LEVELS, "2026-11", 200, never, owner={"host": "host/b", "pid": 102})
        a.reserve("r3", LEVELS, "2026-11", 50, never, owner={"host": "gone", "pid": 7})
        assert a.release_stale(60_000) == 1  # only the unregistered gateway's
        assert sorted(r["host"] for r in a.reservations()) == ["host/a", "host/b"]
        b.leave()
        assert a.release_stale(60_000) == 1  # b left: its reservation is released
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 61)
        assert a.release_stale(60_000) == 1  # older than the timeout, though a is live
        assert a.reservations() == []
        assert [c.reserved_nusd for c in a.counters(LEVELS, "2026-11")] == [0] * 3


def _account_records(key_hash: str, status: str = "active") -> dict[str, bytes]:
    return {
        "org:o:config": json.dumps({"org_id": "o", "monthly_budget_usd": 10}).encode(),
        "user:u:config": json.dumps({"user_id": "u", "org_id": "o"}).encode(),
        f"apikey:{key_hash}": json.dumps({"key_id": "k", "user_id": "u",
                                          "status": status}).encode(),
    }


def test_a_sync_pass_that_changes_nothing_keeps_the_cached_answers(tmp_path):
    with Store(tmp_path / "s") as store:
        records = _account_records("h1")
        store.records.write(records)
        first = store.records.resolve("h1", "2026-11")
        assert store.records.resolve("h1", "2026-11") is first
        generation = store.records.generation()
        # A pass that brings the same values and the same totals: cached answers stay, the
        # pass's summary is seen.
        store.records.replicate(records, [], {k: "" for k in records}, {}, {"finished_at": 1.0})
        assert store.records.generation() == generation
        assert store.records.resolve("h1", "2026-11") is first
        assert store.records.last_sync() == {"finished_at": 1.0}
        # Other nodes' totals that changed: a new answer with them.
        store.records.replicate(records, [], {}, {("2026-11", "user", "u"): (5, 1)},
                                {"finished_at": 2.0})
        second = store.records.resolve("h1", "2026-11")
        assert second is not first and second.remote[1] == (5, 1)
        # The same write again (an admin command that changed nothing) keeps it too.
        store.records.write(records)
        assert store.records.resolve("h1", "2026-11") is second


def test_a_revocation_is_seen_by_the_next_resolve_in_another_process(tmp_path):
    with Store(tmp_path / "s") as store:
        store.records.write(_account_records("h1"))
        assert store.records.resolve("h1", "2026-11").key.active
        in_another_process(_revoke, str(tmp_path / "s"))
        assert store.records.resolve("h1", "2026-11").key.status == "revoked"


def _revoke(path: str) -> None:
    with Store(path) as store:
        store.records.write(_account_records("h1", status="revoked"))


def test_resolve_caches_evict_the_least_recently_used(tmp_path, monkeypatch):
    """At their bound the caches drop the coldest entries, not everything."""
    with Store(tmp_path / "s") as store:
        records = {}
        for i in range(5):
            records.update({k.replace("h1", f"h{i}").replace('"k"', f'"k{i}"'): v.replace(
                b'"k"', f'"k{i}"'.encode()) for k, v in _account_records("h1").items()})
        store.records.write(records)
        cache = store.records._cache
        cache.size = 3
        hot = store.records.resolve("h0", "2026-11")
        for i in (1, 2, 0, 3, 0, 4):  # h0 stays the most recently used
            store.records.resolve(f"h{i}", "2026-11")
        assert len(cache) == 3
        assert store.records.resolve("h0", "2026-11") is hot
        assert "h1" not in cache and "h2" not in cache


def test_lru_evicts_in_order_of_use():
    from store.lru import LRU

    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # b is now the coldest
    lru.put("c", 3)
    assert "b" not in lru and lru.get("a") == 1 and lru.get("c") == 3
    assert lru.pop("a") == 1 and len(lru) == 1
    with pytest.raises(ValueError):
        LRU(0)
