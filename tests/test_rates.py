"""Rate and concurrency limits (rpm_limit, tpm_limit, max_parallel_requests): the window
arithmetic, the ledger's transaction, and the addon's answers and headers."""

import json
import time

import pytest
from mitmproxy.test import taddons

from addon.gateway import Gateway
from addon.policy import Budget, decide_rates, rate_headers
from store import Store
from store.ledger import RateAsk, UsageRecord, rate_key
from store.rates import Window, duration_text
from store.records import ApiKey, Org, RecordError, User
from tests.support.seed import seed
from tests.test_gateway import (
    CONFIG,
    PROVIDER_KEY,
    chat_flow,
    decide,
    forward,
    openai_response,
)

T0 = 1_800_000_000.0  # a whole second, far from a month's end


# --- the window arithmetic ----------------------------------------------------------------


def test_a_request_counts_for_exactly_the_window_of_whole_seconds():
    w = Window(60)
    w.add(int(T0), 1, 10)
    assert w.advance(T0 + 59.999).requests == 1
    assert w.advance(T0 + 60.0).requests == 0


def test_buckets_of_one_second_merge_and_stay_in_order():
    w = Window(60)
    for dt in (0, 0.5, 1, 1.9, 3):
        w.add(int(T0 + dt), 1, 5)
    w.advance(T0 + 3)
    assert [b[:2] for b in w.buckets] == [[int(T0), 2], [int(T0) + 1, 2], [int(T0) + 3, 1]]
    assert (w.requests, w.tokens) == (5, 25)
    again = Window.unpack(w.pack(), 60)
    assert again == w


def test_wait_for_is_the_time_until_enough_old_buckets_leave():
    w = Window(60)
    w.add(int(T0), 2, 0)
    w.add(int(T0) + 10, 1, 0)
    # limit 3, 3 counted: one must leave; the oldest bucket leaves at T0 + 60
    assert w.wait_for(T0 + 20.5, 1, 3) == 40
    # limit 1: all three must leave: the second bucket at T0 + 70
    assert w.wait_for(T0 + 20.5, 1, 1) == 50
    assert w.wait_for(T0 + 59.9, 1, 3) == 1  # never 0


def test_a_clock_step_back_counts_future_buckets_from_now():
    w = Window(60)
    w.add(int(T0) + 3600, 1, 7)  # written before the clock went back an hour
    w.advance(T0)
    assert w.buckets == [[int(T0), 1, 7]]
    assert w.advance(T0 + 60).requests == 0  # gone one window later, not an hour later


def test_a_clock_step_forward_empties_the_window():
    w = Window(60)
    w.add(int(T0), 5, 50)
    assert w.advance(T0 + 86400).buckets == []


def test_duration_text_is_openais_format():
    assert [duration_text(s) for s in (0, 6, 60, 61, 3723)] == ["0s", "6s", "1m0s", "1m1s",
                                                                "1h2m3s"]


def test_decide_rates_admits_below_each_limit_only():
    b = Budget("key", "k", None, rpm_limit=3, tpm_limit=100, max_parallel=2)
    w = Window(60)
    assert decide_rates([b], [w], T0) is None
    w.add(int(T0), 2, 99)
    w.in_flight = 1
    assert decide_rates([b], [w], T0) is None  # 2 < 3 requests, 99 < 100 tokens, 1 < 2
    w.in_flight = 2
    denial = decide_rates([b], [w], T0)
    assert denial is not None and denial.details["limit"] == "max_parallel_requests"
    assert dict(denial.headers)["retry-after"] == "1"
    w.in_flight = 0
    w.add(int(T0), 0, 1)
    denial = decide_rates([b], [w], T0 + 5)
    assert denial.details["limit"] == "tpm_limit" and denial.details["current"] == 100
    assert dict(denial.headers) == {"retry-after": "55", "x-should-retry": "true"}
    w.add(int(T0), 1, -1)
    assert decide_rates([b], [w], T0).details["limit"] == "rpm_limit"


def test_rate_headers_name_the_level_with_the_least_room():
    key = Budget("key", "k", None, rpm_limit=10)
    org = Budget("org", "o", None, rpm_limit=100, tpm_limit=1000)
    wk, wo = Window(60), Window(60)
    wk.add(int(T0), 4, 40)
    wo.add(int(T0), 95, 400)
    headers = dict(rate_headers([key, org], [wk, wo], T0 + 0.5))
    assert headers[b"x-ratelimit-limit-requests"] == b"100"
    assert headers[b"x-ratelimit-remaining-requests"] == b"5"
    assert headers[b"x-ratelimit-reset-requests"] == b"1m0s"
    assert headers[b"x-ratelimit-limit-tokens"] == b"1000"
    assert headers[b"x-ratelimit-remaining-tokens"] == b"600"


# --- the records ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls,ident", [(Org, "o"), (User, "u")])
def test_rate_fields_are_strict_positive_integers(cls, ident):
    record = cls.parse(ident, {"rpm_limit": 3, "tpm_limit": 1000, "max_parallel_requests": 2})
    assert (record.rpm_limit, record.tpm_limit, record.max_parallel_requests) == (3, 1000, 2)
    assert cls.parse(ident, {}).rpm_limit is None
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(RecordError, match="rpm_limit"):
            cls.parse(ident, {"rpm_limit": bad})


def test_key_records_carry_rate_fields():
    key = ApiKey.parse("h" * 64, {"user_id": "u", "max_parallel_requests": 4})
    assert key.max_parallel_requests == 4
    with pytest.raises(RecordError, match="at least 1"):
        ApiKey.parse("h" * 64, {"user_id": "u", "tpm_limit": 0})


# --- the ledger -----------------------------------------------------------------------------


def _ask(keys, now, tokens, limit=None, seen=None):
    def decide(windows):
        if seen is not None:
            seen[:] = windows
        if limit is not None and windows[0].requests >= limit:
            return "refused"
        return None

    return RateAsk(tuple(keys), 60, now, tokens, decide)


def _record(tokens_in: int, tokens_out: int) -> UsageRecord:
    return UsageRecord(T0, "openai", "m", "k", "u", "o", "metered", 200, None, 1, False,
                       tokens_in, 0, 0, 0, tokens_out)


def test_the_ledger_counts_decides_and_settles_in_one_transaction(tmp_path):
    store = Store(tmp_path / "s")
    levels = [("key", "k"), ("org", "o")]
    keys = [rate_key(level) for level in levels]
    month = "2027-01"
    now = time.time()
    for i in range(3):
        assert store.ledger.reserve(f"r{i}", levels, month, 10, lambda c: None,
                                    rates=_ask(keys, now, 500, limit=3)) is None
    assert store.ledger.reserve("r3", levels, month, 10, lambda c: None,
                                rates=_ask(keys, now, 500, limit=3)) == "refused"
    win = store.ledger.rate_windows(levels, now)
    assert [(w.requests, w.tokens, w.in_flight) for w in win] == [(3, 1500, 3)] * 2
    # refused: nothing reserved, nothing counted
    assert len(store.ledger.reservations()) == 3
    assert [r["levels"] for r in store.ledger.reservations()][0] == [["key", "k"], ["org", "o"]]

    store.ledger.settle("r0", levels, month, 7, _record(30, 12))  # metered 42 replaces 500
    store.ledger.release("r1")  # never forwarded: counts nothing
    win = store.ledger.rate_windows(levels, now)
    assert [(w.requests, w.tokens, w.in_flight) for w in win] == [(2, 542, 1)] * 2
    counters = store.ledger.counters(levels, month)
    assert counters[0].used_nusd == 7 and counters[0].reserved_nusd == 10
    store.close()


def test_a_crashed_gateways_in_flight_counts_are_released_with_its_reservations(tmp_path):
    store = Store(tmp_path / "s")
    levels = [("user", "u")]
    keys = [rate_key(levels[0])]
    now = time.time()
    store.ledger.reserve("r", levels, "2027-01", 10, lambda c: None,
                         rates=_ask(keys, now, 100), owner={"pid": 1, "host": "gone"})
    assert store.ledger.release_stale(lambda record: True) == 1
    (w,) = store.ledger.rate_windows(levels, now)
    assert (w.requests, w.tokens, w.in_flight) == (1, 100, 0)  # it may have been sent: counted
    store.close()


def test_a_request_settled_in_the_next_month_leaves_its_window_right(tmp_path):
    """Windows are not per month: a request admitted at a month's end settles in its window."""
    store = Store(tmp_path / "s")
    levels = [("key", "k")]
    keys = [rate_key(levels[0])]
    now = time.time()
    store.ledger.reserve("r", levels, "2027-01", 10, lambda c: None, rates=_ask(keys, now, 900))
    store.ledger.settle("r", levels, "2027-01", 5, _record(1, 2))
    (w,) = store.ledger.rate_windows(levels, now)
    assert (w.requests, w.tokens, w.in_flight) == (1, 3, 0)
    assert store.ledger.counters(levels, "2027-02")[0].requests == 0
    store.close()


def test_reservations_without_rates_keep_their_old_shape(tmp_path):
    store = Store(tmp_path / "s")
    store.ledger.reserve("r", [("key", "k")], "2027-01", 10, lambda c: None)
    (record,) = store.ledger.reservations()
    assert record["levels"] == [["key", "k"]] and record["amount_nusd"] == 10
    assert store.ledger.rate_windows([("key", "k")]) == [None]
    store.close()


# --- through the addon ----------------------------------------------------------------------


class Clock:
    """The wall clock as the gateway reads it, moved by the test (no sleeps)."""

    def __init__(self, monkeypatch, start: float) -> None:
        self.now = start
        monkeypatch.setattr(time, "time", lambda: self.now)


@pytest.fixture
def rated(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGW_TEST_OPENAI_KEY", PROVIDER_KEY)
    made: list[Gateway] = []

    def make(window_s: int = 60) -> Gateway:
        config = tmp_path / "mitm.yaml"
        text = CONFIG % {"store": tmp_path / "store", "unknown": "block"}
        text = text.replace("policy: {unknown_credentials: block}",
                            f"policy: {{unknown_credentials: block, rate_window_s: {window_s}}}")
        config.write_text(text)
        Store(tmp_path / "store").close()
        gw = Gateway()
        tctx = taddons.context(gw)
        tctx.configure(gw, aigw_config=str(config))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.done()


def test_the_fourth_request_in_a_minute_is_429_until_the_window_passes(rated, monkeypatch):
    clock = Clock(monkeypatch, T0 + 0.25)
    gw = rated()
    s = seed(gw.store, rates={"key": {"rpm_limit": 3}})
    for i in range(3):
        flow = chat_flow(s.api_key)
        decide(gw, flow)
        assert flow.response is None
        forward(gw, flow, openai_response(prompt=10, completion=5))
        assert flow.response.headers["x-ratelimit-limit-requests"] == "3"
        assert flow.response.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        clock.now += 10
    # the first was admitted at T0 + 0.25: it leaves the window at T0 + 60
    fourth = chat_flow(s.api_key)
    decide(gw, fourth)
    assert fourth.response.status_code == 429
    error = json.loads(fourth.response.content)["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "key key_1" in error["message"] and "rpm_limit 3" in error["message"]
    assert "60s" in error["message"]
    assert fourth.response.headers["retry-after"] == str(round(T0 + 60 - clock.now))
    assert fourth.response.headers["x-should-retry"] == "true"
    assert gw.store.ledger.reservations() == []
    clock.now = T0 + 60
    fifth = chat_flow(s.api_key)
    decide(gw, fifth)
    assert fifth.response is None


def test_a_short_window_is_a_documented_setting(rated, monkeypatch):
    clock = Clock(monkeypatch, T0)
    gw = rated(window_s=2)
    s = seed(gw.store, rates={"user": {"rpm_limit": 1}})
    first, second = chat_flow(s.api_key), chat_flow(s.api_key)
    decide(gw, first)
    decide(gw, second)
    assert first.response is None and second.response.status_code == 429
    assert second.response.headers["retry-after"] == "2"
    clock.now += 2
    third = chat_flow(s.api_key)
    decide(gw, third)
    assert third.response is None


def test_a_tpm_limit_is_exact_to_the_token(rated, monkeypatch):
    Clock(monkeypatch, T0)
    gw = rated()
    s = seed(gw.store, rates={"org": {"tpm_limit": 1000}})
    first = chat_flow(s.api_key)
    decide(gw, first)
    forward(gw, first, openai_response(prompt=900, completion=99))  # 999 tokens metered
    (w,) = gw.store.ledger.rate_windows([("org", s.org_id)])
    assert w.tokens == 999 and w.in_flight == 0
    assert first.response.headers["x-ratelimit-limit-tokens"] == "1000"
    second = chat_flow(s.api_key)
    decide(gw, second)
    assert second.response is None  # 999 < 1000
    forward(gw, second, openai_response(prompt=1, completion=0))  # now exactly 1000
    third = chat_flow(s.api_key)
    decide(gw, third)
    assert third.response.status_code == 429
    details = json.loads(third.response.content)["error"]["details"]
    assert details["limit"] == "tpm_limit" and details["current"] == 1000


def test_max_parallel_requests_counts_requests_in_flight(rated, monkeypatch):
    Clock(monkeypatch, T0)
    gw = rated()
    s = seed(gw.store, rates={"user": {"max_parallel_requests": 2}})
    first, second, third = (chat_flow(s.api_key) for _ in range(3))
    decide(gw, first)
    decide(gw, second)
    decide(gw, third)
    assert first.response is None and second.response is None
    assert third.response.status_code == 429
    assert third.response.headers["retry-after"] == "1"
    assert "max_parallel_requests 2" in json.loads(third.response.content)["error"]["message"]
    forward(gw, first, openai_response())
    fourth = chat_flow(s.api_key)
    decide(gw, fourth)
    assert fourth.response is None


def test_rate_denials_are_native_to_each_provider(rated, monkeypatch):
    Clock(monkeypatch, T0)
    monkeypatch.setenv("AIGW_TEST_ANTHROPIC_KEY", "sk-ant-provider-fake")
    monkeypatch.setenv("AIGW_TEST_GEMINI_KEY", "gemini-provider-fake")
    gw = rated()
    s = seed(gw.store, rates={"key": {"max_parallel_requests": 1}})
    decide(gw, chat_flow(s.api_key))
    anthropic = chat_flow(None, {"model": "claude-sonnet-4-5", "max_tokens": 10},
                          host="api.anthropic.com", path="/v1/messages",
                          headers={"x-api-key": s.api_key})
    decide(gw, anthropic)
    assert anthropic.response.status_code == 429
    assert json.loads(anthropic.response.content)["error"]["type"] == "rate_limit_error"
    gemini = chat_flow(None, {"contents": []}, host="generativelanguage.googleapis.com",
                       path="/v1beta/models/gemini-2.5-flash:generateContent",
                       headers={"x-goog-api-key": s.api_key})
    decide(gw, gemini)
    assert gemini.response.status_code == 429
    assert json.loads(gemini.response.content)["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_without_limits_no_window_is_written_and_no_header_added(rated, monkeypatch):
    gw = rated()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    forward(gw, flow, openai_response())
    assert "x-ratelimit-limit-requests" not in flow.response.headers
    assert gw.store.ledger.rate_windows([("key", s.key_id)]) == [None]


# --- the CLI and aigw usage -----------------------------------------------------------------


def _cli(store_dir, *args: str):
    from click.testing import CliRunner

    from store.cli import cli

    return CliRunner().invoke(cli, ["--store", str(store_dir), *args], catch_exceptions=False)


def _ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_sets_updates_and_removes_rate_limits_at_every_level(tmp_path):
    where = tmp_path / "store"
    org = _ok(_cli(where, "org", "create", "--name", "A", "--budget", "10", "--rpm", "100",
                   "--tpm", "50000", "--max-parallel", "8"))
    assert (org["rpm_limit"], org["tpm_limit"], org["max_parallel_requests"]) == (100, 50000, 8)
    org = _ok(_cli(where, "org", "update", org["org_id"], "--rpm", ""))
    assert "rpm_limit" not in org and org["tpm_limit"] == 50000
    user = _ok(_cli(where, "user", "create", "--org", org["org_id"], "--email", "a@b.c",
                    "--limit", "1", "--tpm", "1000"))
    assert user["tpm_limit"] == 1000
    user = _ok(_cli(where, "user", "update", user["user_id"], "--max-parallel", "2"))
    assert user["max_parallel_requests"] == 2 and user["tpm_limit"] == 1000
    key = _ok(_cli(where, "key", "create", "--user", user["user_id"], "--rpm", "3"))
    assert key["rpm_limit"] == 3
    updated = _ok(_cli(where, "key", "update", key["key_id"], "--limit", "2", "--rpm", "5",
                       "--tpm", "700"))
    assert (updated["monthly_limit_usd"], updated["rpm_limit"], updated["tpm_limit"]) == (
        2.0, 5, 700)
    assert key["api_key"] not in json.dumps(updated)
    listed = _ok(_cli(where, "key", "list", "--user", user["user_id"]))["keys"][0]
    assert listed["rpm_limit"] == 5
    usage = _ok(_cli(where, "usage", "key", key["key_id"]))
    assert usage["rpm_limit"] == 5 and usage["rpm_used"] == 0 and usage["in_flight"] == 0
    assert usage["tpm_limit"] == 700 and usage["max_parallel_requests"] is None
    store = Store(where)
    store.ledger.reserve("r", [("key", key["key_id"])], "2027-01", 1, lambda c: None,
                         rates=_ask([rate_key(("key", key["key_id"]))], time.time(), 40))
    store.close()
    usage = _ok(_cli(where, "usage", "key", key["key_id"]))
    assert (usage["rpm_used"], usage["tpm_used"], usage["in_flight"]) == (1, 40, 1)
    assert _ok(_cli(where, "usage", "org", org["org_id"]))["tpm_limit"] == 50000


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "x"])
def test_cli_refuses_a_rate_limit_that_is_not_a_positive_whole_number(tmp_path, value):
    result = _cli(tmp_path / "store", "org", "create", "--name", "A", "--budget", "1",
                  "--rpm", value)
    assert result.exit_code == 2 and "--rpm" in result.output


def test_key_update_needs_a_field_and_a_known_key(tmp_path):
    where = tmp_path / "store"
    _ok(_cli(where, "org", "create", "--name", "A", "--budget", "1"))
    assert _cli(where, "key", "update", "key_x").exit_code == 2
    assert _cli(where, "key", "update", "key_x", "--rpm", "1").exit_code == 1


def test_usage_of_a_level_without_rate_limits_has_no_rate_fields(tmp_path):
    where = tmp_path / "store"
    org = _ok(_cli(where, "org", "create", "--name", "A", "--budget", "1"))
    assert "rpm_used" not in _ok(_cli(where, "usage", "org", org["org_id"]))


def test_a_stream_is_in_flight_until_it_ends_and_settles_its_metered_tokens(rated, monkeypatch):
    from mitmproxy import http
    from mitmproxy.test import tutils

    from tests.test_gateway import run

    Clock(monkeypatch, T0)
    monkeypatch.setenv("AIGW_TEST_ANTHROPIC_KEY", "sk-ant-provider-fake")
    gw = rated()
    s = seed(gw.store, rates={"user": {"max_parallel_requests": 1, "tpm_limit": 10_000}})

    def stream_flow():
        return chat_flow(None, {"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True},
                         host="api.anthropic.com", path="/v1/messages",
                         headers={"x-api-key": s.api_key})

    flow = stream_flow()
    decide(gw, flow)
    flow.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"),
                                 content=None)
    gw.responseheaders(flow)
    assert flow.response.headers["x-ratelimit-limit-tokens"] == "10000"
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":'
        b'"claude-sonnet-4-5","usage":{"input_tokens":100,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":20}}\n\n'
    )
    flow.response.stream(events)
    other = stream_flow()
    decide(gw, other)
    assert other.response.status_code == 429  # the stream is still in flight
    flow.response.stream(b"")
    run(gw.response(flow))
    (w,) = gw.store.ledger.rate_windows([("user", s.user_id)])
    assert (w.requests, w.tokens, w.in_flight) == (1, 120, 0)
    again = stream_flow()
    decide(gw, again)
    assert again.response is None


@pytest.mark.parametrize("value", [0, 3601, 1.5, "60"])
def test_rate_window_s_is_checked(tmp_path, value):
    from addon.config import load_config
    from store.settings import ConfigError

    config = tmp_path / "mitm.yaml"
    config.write_text(f"policy: {{rate_window_s: {value!r}}}\n")
    with pytest.raises(ConfigError, match="rate_window_s"):
        load_config(config)
