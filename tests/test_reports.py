"""The usage log and its reports: retention pruning in bounded batches, the log read as a
stream, grouping a month, and the text formats (store/report, Ledger.iter_log/prune_log)."""

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest

from store import admin
from store.db import Store
from store.ledger import PRUNE_BATCH, PRUNE_BATCHES, UsageRecord
from store.money import from_usd, to_usd
from store.report import (
    FIELDS,
    LogFilter,
    month_report,
    parse_month,
    parse_time,
    read_log,
    report_text,
    row,
)
from store.report.text import csv_lines, table
from tests import test_gateway

gateway = test_gateway.gateway  # the addon in taddons, as tests/test_gateway.py builds it


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@dataclass
class Seeded:
    """What `seed` wrote: the ids, and the records in the order written."""

    org_id: str
    other_org_id: str
    user_ids: list[str]
    key_ids: list[str]
    records: list[UsageRecord]


def settle_at(store: Store, record: UsageRecord, settled_s: float | None = None,
              levels: list | None = None) -> None:
    """Settle `record` as the gateway does, with the ledger's clock at `settled_s` (default:
    the request's start plus a second), so the log's keys fall in the past month."""
    when = record.at + 1 if settled_s is None else settled_s
    clock = mock.Mock(time_ns=mock.Mock(return_value=int(when * 1e9)))
    month = datetime.fromtimestamp(record.at, UTC).strftime("%Y-%m")
    if levels is None:
        levels = [(name, value) for name, value in (("key", record.key_id),
                  ("user", record.user_id), ("org", record.org_id)) if value]
    with mock.patch("store.ledger.time", clock):
        if record.mode == "grace":
            store.ledger.grace_charge(month + "-01", record.grace_who or "x", record.cost_nusd,
                                      record)
        else:
            store.ledger.settle(None, levels, month, record.cost_nusd, record)


def seed(store: Store, month: str = "2026-11") -> Seeded:
    """Two orgs, three users, three keys and a month of requests over four models."""
    org = admin.create_org(store, "Acme <b>Corp</b>", 40)["org_id"]
    other = admin.create_org(store, "Beta", 5)["org_id"]
    users = [admin.create_user(store, org, "dev@acme.test", 20)["user_id"],
             admin.create_user(store, org, "ops@acme.test", 2)["user_id"],
             admin.create_user(store, other, "solo@beta.test", 1)["user_id"]]
    keys = [admin.create_key(store, user, "k")["key_id"] for user in users]
    owners = [(keys[0], users[0], org), (keys[1], users[1], org), (keys[2], users[2], other)]
    models = [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"),
              ("anthropic", "claude-sonnet-4-5"), ("gemini", "<img src=x onerror=alert(1)>")]
    records = []
    for i in range(40):
        day = 1 + (i * 11) % 30
        provider, model = models[i % len(models)]
        key_id, user_id, org_id = owners[i % 3]
        cost = from_usd(0.0125 * (1 + i % 5) + 0.5 * (i % 11 == 0))
        record = UsageRecord(
            ts(f"{month}-{day:02d}T{i % 24:02d}:15:00"), provider, model, key_id, user_id,
            org_id, "metered", 200, None, cost, i % 9 == 0, 100 + i, 10 * (i % 3), i % 2,
            0, 50 + i, 5 * (i % 4))
        settle_at(store, record)
        records.append(record)
    grace = UsageRecord(ts(f"{month}-15T12:00:00"), "openai", "gpt-4o", keys[0], users[0],
                        org, "grace", 200, None, from_usd(0.25), False, 10, 0, 0, 0, 20,
                        grace_who=users[0])
    settle_at(store, grace)
    records.append(grace)
    return Seeded(org, other, users, keys, records)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "store") as opened:
        yield opened


# --- retention -------------------------------------------------------------------------------


def _record(at: float, mode: str = "metered") -> UsageRecord:
    return UsageRecord(at, "openai", "gpt-4o", "k", "u", "o", mode, 200, None, 7, False, 1,
                       grace_who="u" if mode == "grace" else None)


def test_prune_deletes_only_older_records_in_bounded_batches(store):
    day = 86400.0
    now = ts("2026-12-01T00:00:00")
    for i in range(120):  # one every 2 days back from now
        settle_at(store, _record(now - 2 * day * i - 60), levels=[("key", "k")])
    for i in range(30):
        settle_at(store, _record(now - 7 * day * i - 60, "grace"))
    old_metered = sum(1 for i in range(120) if 2 * i * day + 60 > 90 * day)
    old_grace = sum(1 for i in range(30) if 7 * i * day + 60 > 90 * day)
    writes = []
    real_write = store.ledger._env.write

    def counting_write(fn):
        writes.append(fn)
        return real_write(fn)

    with mock.patch.object(store.ledger._env, "write", counting_write):
        first = store.ledger.prune_usage(90, now_s=now, batch=10, batches=3)
        assert first == 30 and len(writes) == 3  # bounded per transaction and per call
        total = first
        while (deleted := store.ledger.prune_usage(90, now_s=now, batch=10, batches=3)):
            assert deleted <= 30
            total += deleted
    assert total == old_metered + old_grace
    left = [record for _, record in store.ledger.iter_log()]
    assert len(left) == 150 - total
    assert all(record.at >= now - 90 * day for record in left)
    assert len(store.ledger.grace_log()) == 30 - old_grace
    # The monthly counters (budgets, `aigw usage --month`) are never pruned.
    (counter,) = store.ledger.counters([("key", "k")], "2026-06")
    assert counter.requests > 0


def test_prune_with_nothing_to_prune_takes_no_write_transaction(store):
    settle_at(store, _record(ts("2026-11-30T00:00:00")), levels=[("key", "k")])
    with mock.patch.object(store.ledger._env, "write", side_effect=AssertionError):
        assert store.ledger.prune_usage(90, now_s=ts("2026-12-01T00:00:00")) == 0


def test_prune_defaults_bound_one_call():
    assert PRUNE_BATCH * PRUNE_BATCHES <= 5000  # a few milliseconds of deletions a tick


def test_retention_is_a_policy_setting_with_a_default_of_90_days(tmp_path):
    from addon.config import load_config
    from store.settings import ConfigError

    config = tmp_path / "mitm.yaml"
    config.write_text("store: {path: ./s}\n")
    assert load_config(config).policy.usage_log_retention_days == 90
    config.write_text("store: {path: ./s}\npolicy: {usage_log_retention_days: 7}\n")
    assert load_config(config).policy.usage_log_retention_days == 7
    for bad in ("0", "-1", "1.5", "'x'"):
        config.write_text(f"store: {{path: ./s}}\npolicy: {{usage_log_retention_days: {bad}}}\n")
        with pytest.raises(ConfigError, match="usage_log_retention_days"):
            load_config(config)


def test_maintenance_prunes_every_tick(tmp_path):
    from addon.maintenance import Maintenance

    runtime = mock.Mock(not_ready=None)
    runtime.config_changed.return_value = False
    runtime.config.policy.usage_log_retention_days = 30
    Maintenance(runtime, mock.Mock(), mock.Mock()).tick(1)
    runtime.store.ledger.prune_usage.assert_called_once_with(30)


# --- the log as a stream --------------------------------------------------------------------


def test_the_log_streams_in_pages_and_merges_grace_records_in_time_order(store):
    seeded = seed(store)
    pages = []
    real_read = store.ledger._env.read

    def counting_read(fn):
        pages.append(fn)
        return real_read(fn)

    with mock.patch.object(store.ledger._env, "read", counting_read):
        streamed = list(store.ledger.iter_log(page=7))
    assert sorted(r for _, r in streamed) == sorted(seeded.records)
    times = [settled for settled, _ in streamed]
    assert times == sorted(times)
    assert len(pages) >= 41 // 7  # one short read transaction a page, not one for all


def test_a_record_written_between_pages_is_not_read_twice(store):
    for i in range(10):
        settle_at(store, _record(1000.0 + i), levels=[("key", "k")])
    stream = store.ledger.iter_log(page=3)
    first = [next(stream) for _ in range(4)]
    settle_at(store, _record(1002.5), settled_s=1003.6, levels=[("key", "k")])  # behind
    settle_at(store, _record(1008.5), settled_s=1009.5, levels=[("key", "k")])  # ahead
    rest = list(stream)
    keys = [settled for settled, _ in first + rest]
    assert len(keys) == len(set(keys)) == 11 and keys == sorted(keys)
    assert 1009_500_000_000 in keys and 1003_600_000_000 not in keys


def test_filters_by_time_and_ids(store):
    seeded = seed(store)
    since, until = ts("2026-11-08T00:00:00"), ts("2026-11-22T00:00:00")
    where = LogFilter(since=since, until=until, user_id=seeded.user_ids[0])
    got = list(read_log(store, where))
    expected = [r for r in seeded.records
                if since <= r.at < until and r.user_id == seeded.user_ids[0]]
    assert sorted(got) == sorted(expected) and expected
    mini = list(read_log(store, LogFilter(model="gpt-4o-mini")))
    assert sorted(mini) == sorted(r for r in seeded.records if r.model == "gpt-4o-mini")
    assert [r.at for r in mini] == sorted(r.at for r in mini)  # settled a second after start
    assert list(read_log(store, LogFilter(org_id="nope"))) == []


def test_a_request_that_started_before_until_but_settled_after_is_in(store):
    record = _record(ts("2026-11-30T23:59:00"))
    settle_at(store, record, settled_s=ts("2026-12-01T00:30:00"), levels=[("key", "k")])
    assert list(read_log(store, LogFilter(until=ts("2026-12-01T00:00:00")))) == [record]
    assert list(read_log(store, LogFilter(since=ts("2026-12-01T00:00:00")))) == []


def test_a_row_names_every_field_with_time_in_iso_utc_and_cost_in_usd():
    record = UsageRecord(ts("2026-11-03T04:05:06.789"), "anthropic", "claude-sonnet-4-5", "k",
                         "u", "o", "metered", 200, None, 1_234_567, True, 10, 20, 30, 40, 50, 6)
    assert row(record) == {
        "time": "2026-11-03T04:05:06.789Z", "provider": "anthropic",
        "model": "claude-sonnet-4-5", "org_id": "o", "user_id": "u", "key_id": "k",
        "mode": "metered", "status": 200, "error": None, "cost_usd": 0.001234567,
        "estimated": True, "input_tokens": 10, "cached_input_tokens": 20,
        "cache_write_tokens": 30, "cache_write_1h_tokens": 40, "output_tokens": 50,
        "reasoning_tokens": 6, "total_tokens": 150, "grace_who": None}
    assert tuple(row(record)) == FIELDS


@pytest.mark.parametrize("text", ["2026-11-01", "2026-11-01T00:00:00Z",
                                  "2026-11-01T01:00:00+01:00", "2026-11-01T00:00:00"])
def test_iso_times_with_or_without_a_zone(text):
    assert parse_time(text) == ts("2026-11-01T00:00:00")


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "2026-11-01T25:00", "", "1700000000"])
def test_a_bad_iso_time_is_a_value_error_naming_the_form(text):
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time(text, "--since")


@pytest.mark.parametrize("text", ["2026-1", "2026-13", "26-11", "2026-11-01", "x"])
def test_a_bad_month(text):
    with pytest.raises(ValueError, match="YYYY-MM"):
        parse_month(text)


# --- grouping a month -----------------------------------------------------------------------


def _expected(records: list[UsageRecord], by: str) -> dict:
    out: dict = defaultdict(lambda: {"requests": 0, "cost_nusd": 0, "tokens": 0})
    for r in records:
        name = {"org": r.org_id, "user": r.user_id, "key": r.key_id, "model": r.model,
                "provider": r.provider,
                "day": datetime.fromtimestamp(r.at, UTC).strftime("%Y-%m-%d")}[by]
        out[name]["requests"] += 1
        out[name]["cost_nusd"] += r.cost_nusd
        out[name]["tokens"] += r.input + r.cached_input + r.cache_write + r.output
    return dict(out)


@pytest.mark.parametrize("by", ["org", "user", "key", "model", "provider", "day"])
def test_grouping_adds_up_exactly(store, by):
    seeded = seed(store)
    settle_at(store, _record(ts("2026-10-31T23:59:59")), levels=[("key", "k")])  # not November
    settle_at(store, _record(ts("2026-12-01T00:00:00")), levels=[("key", "k")])
    answer = month_report(store, "2026-11", by)
    got = {g[by]: {"requests": g["requests"], "cost_nusd": from_usd(g["cost_usd"]),
                   "tokens": g["total_tokens"]} for g in answer["groups"]}
    assert got == _expected(seeded.records, by)
    assert answer["total"]["requests"] == 41
    assert from_usd(answer["total"]["cost_usd"]) == sum(r.cost_nusd for r in seeded.records)
    assert answer["total"]["grace_requests"] == 1
    assert answer["total"]["estimated_requests"] == sum(r.estimated for r in seeded.records)
    if by == "day":
        assert [g["day"] for g in answer["groups"]] == sorted(got)
    else:
        costs = [g["cost_usd"] for g in answer["groups"]]
        assert costs == sorted(costs, reverse=True)


def test_budgets_of_every_org_and_user_against_their_limits(store):
    seeded = seed(store)
    answer = month_report(store, "2026-11", "org")
    budgets = {(b["level"], b["id"]): b for b in answer["budgets"]}
    assert set(budgets) == {("org", seeded.org_id), ("org", seeded.other_org_id),
                            *(("user", u) for u in seeded.user_ids)}
    metered = [r for r in seeded.records if r.mode == "metered"]
    for user_id, limit in zip(seeded.user_ids, (20, 2, 1), strict=True):
        entry = budgets[("user", user_id)]
        used = sum(r.cost_nusd for r in metered if r.user_id == user_id)
        assert entry["used_usd"] == to_usd(used) and entry["limit_usd"] == limit
        assert entry["used_ratio"] == round(to_usd(used) / limit, 6)
    assert budgets[("org", seeded.org_id)]["limit_usd"] == 40
    assert budgets[("org", seeded.org_id)]["name"] == "Acme <b>Corp</b>"
    assert budgets[("user", seeded.user_ids[0])]["name"] == "dev@acme.test"


def test_an_empty_month_is_a_report_of_zeros(store):
    seed(store)
    answer = month_report(store, "2025-01", "model")
    assert answer["groups"] == [] and answer["total"]["requests"] == 0
    assert answer["total"]["cost_usd"] == 0


def test_usage_of_a_past_month_reads_that_month(store):
    seeded = seed(store, "2026-10")
    usage = admin.level_usage(store, "user", seeded.user_ids[1], "2026-10")
    metered = [r for r in seeded.records if r.mode == "metered"]
    assert usage["current_month"] == "2026-10"
    assert usage["this_node_usd"] == to_usd(
        sum(r.cost_nusd for r in metered if r.user_id == seeded.user_ids[1]))
    assert admin.level_usage(store, "user", seeded.user_ids[1], "2026-09")["this_node_usd"] == 0


# --- text formats ---------------------------------------------------------------------------


def test_report_csv_and_table_hold_the_groups(store):
    seed(store)
    answer = month_report(store, "2026-11", "model")
    parsed = list(csv.DictReader(io.StringIO(report_text(store, "2026-11", "model", "csv"))))
    assert [p["model"] for p in parsed] == [g["model"] for g in answer["groups"]]
    assert [float(p["cost_usd"]) for p in parsed] == [g["cost_usd"] for g in answer["groups"]]
    text = report_text(store, "2026-11", "model", "table")
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["model", "requests", "cost_usd"]
    assert lines[-1].split()[0] == "total" and len(lines) == 2 + len(answer["groups"]) + 1


def test_csv_cells_never_start_a_formula_and_tables_show_no_control_characters():
    rows = [{"model": "=HYPERLINK(\"http://x\")", "n": 1}, {"model": "@SUM(A1)", "n": 2},
            {"model": "ok", "n": None}]
    parsed = list(csv.reader(io.StringIO("".join(csv_lines(rows, ["model", "n"])))))
    assert parsed == [["model", "n"], ["'=HYPERLINK(\"http://x\")", "1"], ["'@SUM(A1)", "2"],
                      ["ok", ""]]
    assert "\x1b" not in table([{"model": "\x1b[31mred", "n": 1}], ["model", "n"])
    assert "".join(csv_lines([], ["a", "b"])) == "a,b\n"


def test_jsonl_rows_round_trip(store):
    from store.report import log_lines

    seeded = seed(store)
    lines = list(log_lines(store, LogFilter(), "jsonl"))
    assert len(lines) == len(seeded.records) and all(line.endswith("\n") for line in lines)
    parsed = [json.loads(line) for line in lines]
    assert sum(from_usd(p["cost_usd"]) for p in parsed) == sum(
        r.cost_nusd for r in seeded.records)
    assert {p["mode"] for p in parsed} == {"metered", "grace"}


# --- what the gateway writes to the log ------------------------------------------------------


def test_the_gateway_logs_what_it_meters_and_never_a_denied_request(gateway):
    from store.report import row as report_row
    from tests.support.seed import seed as seed_accounts
    chat_flow, decide = test_gateway.chat_flow, test_gateway.decide
    forward, openai_response = test_gateway.forward, test_gateway.openai_response
    gw = gateway()
    s = seed_accounts(gw.store, key_limit=0.001, allowed_models=["gpt-4o"])
    allowed = chat_flow(s.api_key)
    decide(gw, allowed)
    forward(gw, allowed, openai_response(prompt=1000, completion=200))
    denied = [chat_flow("gw_live_" + "0" * 40),  # unknown key: 401
              chat_flow(s.api_key, {"model": "gpt-5", "messages": []}),  # not allowed: 403
              chat_flow(s.api_key)]  # the key's limit is spent: 429
    for flow in denied:
        decide(gw, flow)
        assert flow.response is not None and flow.response.status_code in (401, 403, 429)
    (logged,) = list(read_log(gw.store))
    line = report_row(logged)
    assert line["key_id"] == s.key_id and line["model"].startswith("gpt-4o")
    assert (line["input_tokens"], line["output_tokens"]) == (1000, 200)
    assert line["cost_usd"] == 0.0045  # 1000 x $2.5/1M + 200 x $10/1M
    assert month_report(gw.store, line["time"][:7], "key")["total"]["requests"] == 1
