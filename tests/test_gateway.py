"""The addon's hooks with mitmproxy's taddons/tflow: decisions, injection, metering, failures."""

import asyncio
import gzip
import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow, tutils

from addon import admission
from addon.gateway import Gateway
from addon.policy import dollars
from store import USD, Store, StoreUnavailable
from store.admin import revoke_key, rotate_key, update_user
from store.money import month_of, utc_now
from tests.support.seed import seed

PROVIDER_KEY = "sk-provider-fake-0000"
CONFIG = """
store: {path: %(store)s}
policy: {unknown_credentials: %(unknown)s}
providers:
  openai: {kind: openai, hosts: [api.openai.com], api_key_env: AIGW_TEST_OPENAI_KEY}
  anthropic: {kind: anthropic, hosts: [api.anthropic.com], api_key_env: AIGW_TEST_ANTHROPIC_KEY}
  gemini: {kind: gemini, hosts: [generativelanguage.googleapis.com], api_key_env: AIGW_TEST_GEMINI_KEY}
pricing:
  fallback: {input_per_1m: 1.0, output_per_1m: 2.0}
  models:
    gpt-4o: {input_per_1m: 2.5, cached_input_per_1m: 1.25, output_per_1m: 10.0}
    claude-sonnet-4-5: {input_per_1m: 3.0, cached_input_per_1m: 0.3, cache_write_per_1m: 3.75, output_per_1m: 15.0}
"""


def run(result):
    """Run a hook's result: mitmproxy awaits it when the hook returned a coroutine."""
    if asyncio.iscoroutine(result):
        return asyncio.run(result)
    return result


def decide(gw: Gateway, flow: http.HTTPFlow) -> None:
    """What mitmproxy does with a request: the gateway's request hook, then (at the end of the
    addon chain) its credential injector's."""
    run(gw.request(flow))
    gw.injector.request(flow)


@pytest.fixture
def gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGW_TEST_OPENAI_KEY", PROVIDER_KEY)
    monkeypatch.setenv("AIGW_TEST_ANTHROPIC_KEY", "sk-ant-provider-fake")
    monkeypatch.setenv("AIGW_TEST_GEMINI_KEY", "gemini-provider-fake")

    def make(unknown: str = "block") -> Gateway:
        config = tmp_path / "mitm.yaml"
        config.write_text(CONFIG % {"store": tmp_path / "store", "unknown": unknown})
        Store(tmp_path / "store").close()  # the gateway opens a store, it never creates one
        gw = Gateway()
        tctx = taddons.context(gw)
        tctx.configure(gw, aigw_config=str(config))
        made.append(gw)
        return gw

    made: list[Gateway] = []
    yield make
    for gw in made:
        gw.done()


def chat_flow(key: str | None, body: dict | bytes | None = None, host="api.openai.com",
              path="/v1/chat/completions", headers: dict | None = None) -> http.HTTPFlow:
    if body is None:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 100}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    if key is not None and "authorization" not in hdrs and host == "api.openai.com":
        hdrs["authorization"] = f"Bearer {key}"
    req = tutils.treq(
        host=host, port=443, scheme=b"https", method=b"POST", path=path.encode(),
        headers=http.Headers(**{k.replace("-", "_"): v for k, v in hdrs.items()}),
        content=content,
    )
    return tunnelled(tflow.tflow(req=req), host)


def tunnelled(flow: http.HTTPFlow, host: str) -> http.HTTPFlow:
    """A flow as it comes through a CONNECT tunnel to `host`, with TLS SNI `host`."""
    flow.client_conn.sni = host
    flow.server_conn.address = (host, 443)
    return flow


def openai_response(prompt=1000, completion=200, cached=0, encoding=None) -> http.Response:
    body = json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }).encode()
    headers = {"content-type": "application/json"}
    if encoding == "gzip":
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    return tutils.tresp(status_code=200, headers=http.Headers(**{
        k.replace("-", "_"): v for k, v in headers.items()}), content=body)


def forward(gw: Gateway, flow: http.HTTPFlow, response: http.Response | None) -> None:
    """What mitmproxy does after an allowed request: the response arrives, hooks run."""
    if response is not None:
        flow.response = response
        gw.responseheaders(flow)
        run(gw.response(flow))


def usage(gw: Gateway, level: str, level_id: str):
    return gw.store.ledger.counters([(level, level_id)], month_of(utc_now()))[0]


def test_allowed_request_swaps_the_key_and_meters_the_usage(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response is None
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert s.api_key not in str(flow.request.headers)
    assert len(gw.store.ledger.reservations()) == 1
    assert usage(gw, "user", s.user_id).reserved_nusd > 0

    forward(gw, flow, openai_response(prompt=1000, completion=200, cached=400))
    # 600 uncached x $2.5 + 400 cached x $1.25 + 200 x $10 per 1M tokens
    expected = (600 * 2.5 + 400 * 1.25 + 200 * 10.0) * USD // 1_000_000
    for level, level_id in (("key", s.key_id), ("user", s.user_id), ("org", s.org_id)):
        counter = usage(gw, level, level_id)
        assert counter.used_nusd == expected
        assert counter.reserved_nusd == 0
        assert counter.requests == 1
    assert gw.store.ledger.reservations() == []
    headers = flow.response.headers
    assert float(headers["x-gateway-cost-usd"]) == pytest.approx(expected / USD)
    assert float(headers["x-gateway-usage-usd"]) == pytest.approx(expected / USD)
    assert headers["x-gateway-limit-level"] == "user"
    assert float(headers["x-gateway-limit-usd"]) == 20.0
    assert headers["x-gateway-request-count"] == "1"
    assert headers["x-gateway-current-month"] == month_of(utc_now())
    assert PROVIDER_KEY not in str(headers)


def test_gzip_response_is_metered(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    forward(gw, flow, openai_response(prompt=100, completion=10, encoding="gzip"))
    assert usage(gw, "key", s.key_id).used_nusd == (100 * 2.5 + 10 * 10) * 1000
    assert not flow.metadata["aigw"]["estimated"]


@pytest.mark.parametrize("key_status,user_status", [("revoked", "active"), ("active", "suspended")])
def test_revoked_key_or_suspended_user_is_401(gateway, key_status, user_status):
    gw = gateway()
    s = seed(gw.store, key_status=key_status, user_status=user_status)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response.status_code == 401
    error = json.loads(flow.response.content)["error"]
    assert error["code"] == "invalid_api_key"
    assert gw.store.ledger.reservations() == []


def test_unknown_gateway_key_is_401_in_the_providers_shape(gateway):
    gw = gateway()
    seed(gw.store)
    flow = chat_flow("gw_live_" + "f" * 32)
    decide(gw, flow)
    assert flow.response.status_code == 401
    assert json.loads(flow.response.content)["error"]["type"] == "invalid_request_error"

    anthropic = chat_flow(None, {"model": "claude-sonnet-4-5", "max_tokens": 10},
                          host="api.anthropic.com", path="/v1/messages",
                          headers={"x-api-key": "gw_live_" + "e" * 32})
    decide(gw, anthropic)
    body = json.loads(anthropic.response.content)
    assert anthropic.response.status_code == 401
    assert body == {"type": "error", "error": {"type": "authentication_error",
                                               "message": body["error"]["message"]}}


def test_missing_credential_is_401(gateway):
    gw = gateway()
    flow = chat_flow(None)
    decide(gw, flow)
    assert flow.response.status_code == 401


@pytest.mark.parametrize(
    "limits,level,error_type",
    [
        ({"key_limit": 0.001}, "key", "key_quota_exceeded"),
        ({"user_limit": 0.001}, "user", "user_quota_exceeded"),
        ({"org_budget": 0.001}, "org", "organization_quota_exceeded"),
    ],
)
def test_exhausted_budget_is_429_naming_the_level(gateway, limits, level, error_type):
    gw = gateway()
    s = seed(gw.store, **limits)
    first = chat_flow(s.api_key)
    decide(gw, first)
    assert first.response is None  # usage has not reached the limit yet
    forward(gw, first, openai_response(prompt=1000, completion=200))
    second = chat_flow(s.api_key)
    decide(gw, second)
    assert second.response.status_code == 429
    error = json.loads(second.response.content)["error"]
    assert error["type"] == error_type
    assert error["code"] == "insufficient_quota"
    assert error["details"]["level"] == level
    assert error["details"]["limit_usd"] == 0.001
    assert error_type in error["message"]
    assert "of its $0.001 monthly limit" in error["message"]  # exact, not rounded to cents
    assert second.response.headers["x-should-retry"] == "false"
    assert int(second.response.headers["retry-after"]) > 0


def test_in_flight_reservations_count_against_the_budget(gateway):
    gw = gateway()
    # max_tokens 100 at $10/1M output reserves about $0.001: a request alone is admitted while
    # usage is below the limit; beside one in flight, only what fits.
    s = seed(gw.store, key_limit=0.0015)
    first, second = chat_flow(s.api_key), chat_flow(s.api_key)
    decide(gw, first)
    decide(gw, second)
    assert first.response is None
    assert second.response.status_code == 429
    error = json.loads(second.response.content)["error"]
    assert error["type"] == "key_quota_exceeded" and "in flight" in error["message"]
    assert "of its $0.0015 monthly limit" in error["message"]
    assert second.response.headers["x-should-retry"] == "true"  # transient
    forward(gw, first, openai_response(prompt=10, completion=10))
    third = chat_flow(s.api_key)
    decide(gw, third)
    assert third.response is None  # the first settled far below its reservation


def test_model_not_allowed_is_403(gateway):
    gw = gateway()
    s = seed(gw.store, allowed_models=["gpt-4o-mini"])
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response.status_code == 403
    assert json.loads(flow.response.content)["error"]["code"] == "model_not_allowed"


def test_a_known_keys_cached_account_still_follows_its_records(gateway):
    """After a first request the key's account is cached: the model list is still checked per
    request, and a change of its records (a revocation, a suspended user) applies at once."""
    gw = gateway()
    s = seed(gw.store, allowed_models=["gpt-4o-mini"])
    allowed = {"model": "gpt-4o-mini", "messages": [], "max_tokens": 10}
    first = chat_flow(s.api_key, allowed)
    decide(gw, first)
    assert first.response is None
    forward(gw, first, openai_response(prompt=10, completion=10))
    other_model = chat_flow(s.api_key)  # gpt-4o
    decide(gw, other_model)
    assert other_model.response.status_code == 403
    again = chat_flow(s.api_key, allowed)
    decide(gw, again)
    assert again.response is None
    forward(gw, again, openai_response(prompt=10, completion=10))

    update_user(gw.store, s.user_id, status="suspended")
    suspended = chat_flow(s.api_key, allowed)
    decide(gw, suspended)
    assert suspended.response.status_code == 401
    update_user(gw.store, s.user_id, status="active")
    revoke_key(gw.store, s.key_id)
    revoked = chat_flow(s.api_key, allowed)
    decide(gw, revoked)
    assert revoked.response.status_code == 401


def test_a_rotation_without_grace_stops_the_old_key_and_the_new_one_counts_as_the_same(
        gateway):
    gw = gateway()
    s = seed(gw.store)
    before = chat_flow(s.api_key)
    decide(gw, before)  # the old key's account is now cached
    forward(gw, before, openai_response(prompt=100, completion=10))
    rotated = rotate_key(gw.store, s.key_id)
    old = chat_flow(s.api_key)
    decide(gw, old)
    assert old.response.status_code == 401
    assert json.loads(old.response.content)["error"]["code"] == "invalid_api_key"
    new = chat_flow(rotated["api_key"])
    decide(gw, new)
    assert new.response is None and new.metadata["aigw"]["key_id"] == s.key_id
    forward(gw, new, openai_response(prompt=100, completion=10))
    assert usage(gw, "key", s.key_id).requests == 2
    assert usage(gw, "key", s.key_id).used_nusd == 2 * (100 * 2.5 + 10 * 10) * 1000


def test_a_key_in_grace_is_refused_from_expires_at_on_while_its_records_are_cached(
        gateway, monkeypatch):
    gw = gateway()
    s = seed(gw.store)
    rotated = rotate_key(gw.store, s.key_id, grace_s=60)
    expires = datetime.fromisoformat(rotated["previous_key_expires_at"]).timestamp()
    clock = [expires - 0.001]
    monkeypatch.setattr(admission, "time", SimpleNamespace(time=lambda: clock[0]))
    for raw in (s.api_key, rotated["api_key"]):
        flow = chat_flow(raw)
        decide(gw, flow)
        assert flow.response is None, raw
        forward(gw, flow, openai_response(prompt=10, completion=10))
    generation = gw.store.records.generation()

    clock[0] = expires  # the records stay as they were: only the clock moved
    old = chat_flow(s.api_key)
    decide(gw, old)
    assert old.response.status_code == 401
    error = json.loads(old.response.content)["error"]
    assert error["code"] == "invalid_api_key" and "grace period has ended" in error["message"]
    new = chat_flow(rotated["api_key"])
    decide(gw, new)
    assert new.response is None
    forward(gw, new, openai_response(prompt=10, completion=10))
    assert gw.store.records.generation() == generation
    assert usage(gw, "key", s.key_id).requests == 3


def test_missing_org_fails_closed_with_503(gateway):
    gw = gateway()
    s = seed(gw.store, with_org=False)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response.status_code == 503
    assert "retry-after" in flow.response.headers


def test_store_fault_takes_the_orgs_failure_mode(gateway, monkeypatch):
    gw = gateway()
    closed = seed(gw.store, suffix="c", failure_mode="fail_closed")
    opened = seed(gw.store, suffix="o", failure_mode="fail-open", fallback_daily_limit=1.0)

    def broken(*args, **kwargs):
        raise StoreUnavailable("ledger write failed: disk full")

    monkeypatch.setattr(gw.store.ledger, "reserve", broken)
    flow = chat_flow(closed.api_key)
    decide(gw, flow)
    assert flow.response.status_code == 503

    flow = chat_flow(opened.api_key)
    decide(gw, flow)
    assert flow.response is None
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert flow.metadata["aigw"]["decision"] == "grace"
    forward(gw, flow, openai_response(prompt=1000, completion=200))
    grace = gw.store.ledger.grace_log()
    assert len(grace) == 1 and grace[0].cost_nusd > 0
    # The grace record names whom it was for, as a metered one does (aigw log --user finds it).
    assert (grace[0].key_id, grace[0].user_id) == (opened.key_id, opened.user_id)


def test_fail_open_caps_the_day_at_the_fallback_limit(gateway, monkeypatch):
    gw = gateway()
    s = seed(gw.store, failure_mode="fail_open", fallback_daily_limit=0.001)
    monkeypatch.setattr(gw.store.ledger, "reserve", lambda *a, **k: (_ for _ in ()).throw(
        StoreUnavailable("down")))
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    forward(gw, flow, openai_response(prompt=1000, completion=200))  # $0.0045 > $0.001
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response.status_code == 429
    assert json.loads(flow.response.content)["error"]["type"] == "fallback_daily_limit_exceeded"


def test_a_grace_request_admitted_before_midnight_is_charged_to_that_day(gateway, monkeypatch):
    """The day's fallback limit admitted it, so its cost is that day's, however late it ends
    (charged to the next day, it would escape the limit that let it through)."""
    gw = gateway()
    s = seed(gw.store, failure_mode="fail_open", fallback_daily_limit=1.0)
    monkeypatch.setattr(gw.store.ledger, "reserve", lambda *a, **k: (_ for _ in ()).throw(
        StoreUnavailable("down")))
    clock = [datetime(2026, 3, 31, 23, 59, 59, 900_000, tzinfo=UTC)]
    monkeypatch.setattr("addon.failure.utc_now", lambda: clock[0])
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.metadata["aigw"]["decision"] == "grace"
    clock[0] = datetime(2026, 4, 1, 0, 0, 0, 100_000, tzinfo=UTC)  # the response ends after
    forward(gw, flow, openai_response(prompt=1000, completion=200))
    who = f"user:{s.user_id}"
    (entry,) = gw.store.ledger.grace_log()
    assert gw.store.ledger.grace_used("2026-03-31", who)[0] == entry.cost_nusd > 0
    assert gw.store.ledger.grace_used("2026-04-01", who)[0] == 0


def test_unexpected_exception_never_forwards_silently(gateway, monkeypatch):
    gw = gateway()
    s = seed(gw.store)
    monkeypatch.setattr(gw.store.records, "resolve", lambda h: 1 / 0)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response is not None and flow.response.status_code == 503


def test_unexpected_exception_takes_the_fail_open_orgs_mode(gateway, monkeypatch):
    gw = gateway()
    s = seed(gw.store, failure_mode="fail_open")
    monkeypatch.setattr("addon.admission.decide_budgets", lambda *a: 1 / 0)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response is None and flow.metadata["aigw"]["decision"] == "grace"
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert gw.store.ledger.reservations() == []


def test_unknown_credentials_blocked_or_passed_through(gateway):
    blocking = gateway()
    flow = chat_flow("sk-someones-own-key")
    run(blocking.request(flow))
    assert flow.response.status_code == 401
    blocking.done()

    passing = gateway(unknown="passthrough")
    flow = chat_flow("sk-someones-own-key")
    run(passing.request(flow))
    assert flow.response is None
    assert flow.request.headers["authorization"] == "Bearer sk-someones-own-key"
    assert flow.metadata["aigw"]["decision"] == "passthrough"


def test_registered_provider_key_is_metered_and_forwarded_unchanged(gateway):
    gw = gateway()
    s = seed(gw.store, passthrough_key="sk-dev-own-key-fake")
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response is None
    assert flow.request.headers["authorization"] == "Bearer sk-dev-own-key-fake"
    forward(gw, flow, openai_response(prompt=100, completion=10))
    assert usage(gw, "user", s.user_id).requests == 1


def test_org_provider_key_wins_over_the_environment(gateway):
    gw = gateway()
    s = seed(gw.store, provider_keys={"openai": "sk-org-own-fake"})
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.request.headers["authorization"] == "Bearer sk-org-own-fake"


def test_gemini_query_key_is_moved_to_the_header(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(None, {"contents": []}, host="generativelanguage.googleapis.com",
                     path=f"/v1beta/models/gemini-2.5-flash:generateContent?key={s.api_key}")
    decide(gw, flow)
    assert flow.response is None
    assert "key" not in flow.request.query
    assert flow.request.headers["x-goog-api-key"] == "gemini-provider-fake"
    assert flow.metadata["aigw"]["model"] == "gemini-2.5-flash"


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", json.dumps({"messages": []}).encode()])
def test_bad_request_bodies_are_forwarded_for_the_provider_to_judge(gateway, body):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key, body)
    decide(gw, flow)
    assert flow.response is None
    error = tutils.tresp(status_code=400, content=b'{"error": {"message": "bad"}}')
    forward(gw, flow, error)
    counter = usage(gw, "key", s.key_id)
    assert counter.requests == 1 and counter.used_nusd == 0 and counter.reserved_nusd == 0


def test_streamed_response_passes_through_and_is_metered(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key, {"model": "claude-sonnet-4-5", "max_tokens": 50, "stream": True},
                     host="api.anthropic.com", path="/v1/messages",
                     headers={"x-api-key": s.api_key})
    decide(gw, flow)
    assert flow.request.headers["x-api-key"] == "sk-ant-provider-fake"
    flow.response = tutils.tresp(headers=http.Headers(content_type="text/event-stream"),
                                 content=None)
    gw.responseheaders(flow)
    assert callable(flow.response.stream)
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":'
        b'"claude-sonnet-4-5","usage":{"input_tokens":100,"cache_read_input_tokens":1000,'
        b'"cache_creation_input_tokens":50,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":'
        b'{"type":"text_delta","text":"hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":7}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":20}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    out = b"".join(flow.response.stream(events[i:i + 7]) for i in range(0, len(events), 7))
    out += flow.response.stream(b"")
    assert out == events
    run(gw.response(flow))
    expected = (100 * 3.0 + 1000 * 0.3 + 50 * 3.75 + 20 * 15.0) * 1000
    assert usage(gw, "key", s.key_id).used_nusd == expected


def test_broken_upstream_charges_an_estimate(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    flow.server_conn.timestamp_tcp_setup = 1.0
    flow.error = tflow.terr()
    run(gw.error(flow))
    counter = usage(gw, "key", s.key_id)
    assert counter.used_nusd > 0 and counter.reserved_nusd == 0
    assert flow.metadata["aigw"]["estimated"] is True


def test_unreachable_upstream_charges_nothing(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    flow.server_conn.timestamp_tcp_setup = None
    flow.error = tflow.terr()
    run(gw.error(flow))
    counter = usage(gw, "key", s.key_id)
    assert counter.used_nusd == 0 and counter.reserved_nusd == 0 and counter.requests == 1


def test_other_hosts_are_not_touched(gateway):
    gw = gateway()
    flow = chat_flow("whatever", host="example.com")
    decide(gw, flow)
    assert flow.response is None and "aigw" not in flow.metadata


def test_allow_hosts_is_derived_from_the_providers(gateway):
    gateway()
    from mitmproxy import ctx

    assert any("openai" in p for p in ctx.options.allow_hosts)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("providers: {x: {kind: nope, hosts: [a]}}", "providers.x.kind"),
        ("providers: {x: {kind: openai, hosts: ['(']}}", "providers.x.hosts[0]"),
        ("pricing: {models: {m: {input_per_1m: x, output_per_1m: 1}}}",
         "pricing.models.m.input_per_1m"),
        ("store: {hash: md5}", "store.hash"),
        ("bogus: 1", "bogus"),
        ("policy: {unknown_credentials: maybe}", "policy.unknown_credentials"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path, text, needle):
    good = tmp_path / "good.yaml"  # mitmproxy rolls a refused option back to the previous value
    good.write_text(f"store: {{path: {tmp_path / 'store'}}}\n")
    Store(tmp_path / "store").close()
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    gw = Gateway()
    with taddons.context(gw) as tctx:
        tctx.configure(gw, aigw_config=str(good))
        with pytest.raises(exceptions.OptionsError) as raised:
            tctx.configure(gw, aigw_config=str(config))
        gw.done()
    assert str(config) in str(raised.value) and needle in str(raised.value)


def test_crash_left_reservations_are_released(tmp_path):
    with Store(tmp_path / "s") as store:
        store.ledger.reserve("r1", [("user", "u")], "2026-11", 5 * USD, lambda counters: None,
                             owner={"pid": 2**22 + 12345, "host": __import__("socket").gethostname() + "/x"})
    gw = Gateway()
    config = tmp_path / "mitm.yaml"
    config.write_text(f"store: {{path: {tmp_path / 's'}}}\n")
    with taddons.context(gw) as tctx:
        tctx.configure(gw, aigw_config=str(config))
        assert gw.store.ledger.reservations() == []
        assert gw.store.ledger.counters([("user", "u")], "2026-11")[0].reserved_nusd == 0
        gw.done()


def test_huge_bodies_are_read_off_the_event_loop(gateway):
    gw = gateway()
    s = seed(gw.store)
    body = {"model": "gpt-4o", "max_tokens": 10,
            "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    flow = chat_flow(s.api_key, body)
    pending = gw.request(flow)
    assert asyncio.iscoroutine(pending)  # not parsed on the event loop
    run(pending)
    assert flow.response is None and flow.metadata["aigw"]["model"] == "gpt-4o"
    reply = json.loads(openai_response(prompt=500_000, completion=10).content)
    reply["choices"][0]["message"]["content"] = "y" * 1_000_000
    flow.response = tutils.tresp(content=json.dumps(reply).encode())
    gw.responseheaders(flow)
    settling = gw.response(flow)
    assert asyncio.iscoroutine(settling)
    run(settling)
    assert usage(gw, "key", s.key_id).used_nusd == (500_000 * 2.5 + 10 * 10.0) * 1000


def test_a_restarted_gateway_releases_its_crashed_predecessors_reservations(tmp_path):
    """Same host and even the same pid (a container restart), but another instance."""
    import os
    import socket

    with Store(tmp_path / "s") as store:
        store.ledger.reserve("r1", [("user", "u")], "2026-11", 5 * USD, lambda counters: None,
                             owner={"pid": os.getpid(), "host": f"{socket.gethostname()}/dead"})
    gw = Gateway()
    config = tmp_path / "mitm.yaml"
    config.write_text(f"store: {{path: {tmp_path / 's'}}}\n")
    with taddons.context(gw) as tctx:
        tctx.configure(gw, aigw_config=str(config))
        assert gw.store.ledger.reservations() == []
        gw.done()


def test_liveness_trusts_a_pid_only_in_our_own_pid_namespace():
    """Two containers sharing a host name and a volume both run mitmdump as pid 1: a pid
    proves nothing across pid namespaces, so only the heartbeat decides there."""
    import os
    import socket

    from addon.runtime import _PIDNS, is_live

    ours = {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _PIDNS}
    assert is_live("other/instance", {**ours, "pidns": "pid:[4026599999]"})
    assert is_live("elsewhere/x", {**ours, "host": "another-host"})
    # In our namespace, our own pid under another name is a predecessor that reused it.
    assert not is_live("old/instance", ours)
    assert not is_live("gone/instance", {**ours, "pid": 2**22 + 12345})


def test_denial_amounts_are_exact_with_at_least_cents():
    assert dollars(10 * USD) == "10.00"
    assert dollars(USD * 125 // 10) == "12.50"
    assert dollars(10_000) == "0.00001"
    assert dollars(5625) == "0.000005625"
    assert dollars(0) == "0.00"


def test_start_warns_of_providers_without_a_host_credential(gateway, monkeypatch, caplog):
    monkeypatch.delenv("AIGW_TEST_ANTHROPIC_KEY")
    with caplog.at_level("WARNING", logger="aigw"):
        gateway()
    warned = [r.getMessage() for r in caplog.records if "credential" in r.getMessage()]
    assert len(warned) == 1 and "AIGW_TEST_ANTHROPIC_KEY" in warned[0]
    assert "AIGW_TEST_OPENAI_KEY" not in warned[0]
    assert PROVIDER_KEY not in caplog.text  # names the variable, never a key


def test_a_provider_request_body_is_never_streamed_upstream_undecided(gateway):
    """mitmproxy streams a body over stream_large_bodies before the request hook runs: the
    gateway takes the stream back for provider hosts, so it decides on the whole body."""
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    flow.request.stream = True  # what stream_large_bodies does before requestheaders
    gw.requestheaders(flow)
    assert not flow.request.stream and flow.response is None
    other = chat_flow(s.api_key, host="example.com")
    other.request.stream = True
    gw.requestheaders(other)
    assert other.request.stream  # not a provider: not ours to touch


def test_stream_large_bodies_is_refused(gateway):
    """With it mitmproxy sends a large request body upstream before the request hook."""
    from mitmproxy.addons.proxyserver import Proxyserver

    gw = gateway()
    with taddons.context(Proxyserver()) as tctx:  # the addon that declares the option
        tctx.options.update(stream_large_bodies="1m")
        with pytest.raises(exceptions.OptionsError, match="stream_large_bodies"):
            gw.configure({"stream_large_bodies"})
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    assert flow.response.status_code == 503


def test_an_addon_loaded_after_the_gateway_cannot_stream_a_provider_body(gateway):
    """`scripts=` addons run after the gateway's requestheaders; the injector, last of all,
    takes a provider body's stream back before mitmproxy acts on it."""
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    gw.requestheaders(flow)
    flow.request.stream = True  # what a later addon did in its own requestheaders
    gw.injector.requestheaders(flow)
    assert not flow.request.stream
    other = chat_flow(s.api_key, host="example.com")
    other.request.stream = True
    gw.injector.requestheaders(other)
    assert other.request.stream


@pytest.mark.parametrize(("option", "value", "says"), [
    ("ssl_insecure", True, "ssl_insecure"),
    ("proxy_debug", True, "proxy_debug"),
    ("ignore_hosts", [r"api\.openai\.com"], "ignore_hosts matches provider host api.openai.com"),
    ("tcp_hosts", [r"openai"], "tcp_hosts matches provider host api.openai.com"),
    ("ignore_hosts", [r".*"], "ignore_hosts matches"),
    ("allow_hosts", [r"example\.com"], "allow_hosts leaves out provider host"),
])
def test_options_that_would_let_a_provider_request_through_undecided_are_refused(
        gateway, tmp_path, option, value, says):
    from mitmproxy.addons.proxyserver import Proxyserver

    gw = gateway()
    with taddons.context(Proxyserver(), gw) as tctx:
        tctx.configure(gw, aigw_config=str(tmp_path / "mitm.yaml"))
        with pytest.raises(exceptions.OptionsError, match=says.replace(".", r"\.")):
            tctx.options.update(**{option: value})
        # mitmproxy rolls a refused option back (mitmdump exits on one given at start): the
        # gateway goes on with the option it had, deciding every request.
        assert getattr(tctx.options, option) != value
        s = seed(gw.store)
        flow = chat_flow(s.api_key)
        decide(gw, flow)
        assert gw.runtime.not_ready is None and flow.response is None


def test_ignore_hosts_of_other_hosts_are_fine(gateway, tmp_path):
    from mitmproxy.addons.proxyserver import Proxyserver

    gw = gateway()
    with taddons.context(Proxyserver(), gw) as tctx:
        tctx.configure(gw, aigw_config=str(tmp_path / "mitm.yaml"))
        tctx.options.update(ignore_hosts=[r"^intranet\.example\.com:"])
        gw.configure({"ignore_hosts"})
        assert gw.runtime.not_ready is None


def test_a_refused_first_mitm_yaml_is_the_error_not_the_defaults_it_rolls_back_to(
        tmp_path, monkeypatch):
    """aigw proxy's worker sets aigw_config and aigw_store in one options update; refused,
    mitmproxy rolls them back to their defaults (./mitm.yaml) and configures again. Loading
    those would hide the refusal behind their own error, or open ./mitm.yaml's store."""
    monkeypatch.chdir(tmp_path)  # no ./mitm.yaml here
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG % {"store": tmp_path / "store", "unknown": "maybe"})
    gw = Gateway()
    with taddons.context(gw) as tctx:
        with pytest.raises(exceptions.OptionsError, match="unknown_credentials") as refused:
            tctx.options.update(aigw_config=str(bad), aigw_store=str(tmp_path / "store"))
        assert "mitm.yaml" not in str(refused.value)
        assert gw.runtime.config is None and gw.store is None
    gw.done()


def test_a_mitm_yaml_whose_new_provider_an_option_would_let_through_makes_it_not_ready(
        gateway, tmp_path):
    """mitm.yaml re-read on a change: a provider added on a host the operator's ignore_hosts
    covers would pass undecided; the gateway stops deciding (503) rather than let it."""
    from mitmproxy.addons.proxyserver import Proxyserver

    gw = gateway()
    config = tmp_path / "mitm.yaml"
    with taddons.context(Proxyserver(), gw) as tctx:
        tctx.configure(gw, aigw_config=str(config))
        tctx.options.update(ignore_hosts=[r"^llm\.example\.com:"])
        assert gw.runtime.not_ready is None
        config.write_text(config.read_text().replace("providers:\n", (
            "providers:\n  local: {kind: openai, hosts: [llm.example.com], "
            "api_key_env: AIGW_TEST_OPENAI_KEY}\n"), 1))
        assert gw._reload() is not None
        assert "ignore_hosts matches provider host llm.example.com" in gw.runtime.not_ready
        s = seed(gw.store)
        flow = chat_flow(s.api_key)
        decide(gw, flow)
        assert flow.response is not None and flow.response.status_code == 503


def test_an_upgrade_to_a_websocket_is_refused_not_forwarded_unmetered(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key, path="/v1/realtime?model=gpt-4o", headers={
        "upgrade": "websocket", "connection": "Upgrade"})
    decide(gw, flow)
    assert flow.response.status_code == 403
    assert json.loads(flow.response.content)["error"]["code"] == "upgrade_not_supported"
    assert gw.store.ledger.reservations() == []


def test_a_credential_that_is_not_ascii_is_401(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(None, host="generativelanguage.googleapis.com",
                     path=f"/v1beta/models/gemini-2.5-flash:generateContent?key={s.api_key}%A0")
    flow.request.query["key"] = s.api_key + "\udca0"  # as a %A0 reads: not encodable
    decide(gw, flow)
    assert flow.response.status_code == 401
    assert s.api_key not in flow.request.path


def test_keys_the_gateway_cannot_check_share_one_fail_open_cap(tmp_path, monkeypatch):
    """With the store down, any `gw_live_` key is forwarded in fail-open mode: inventing keys
    must not multiply the daily fallback limit."""
    monkeypatch.setenv("AIGW_TEST_OPENAI_KEY", PROVIDER_KEY)
    config = tmp_path / "mitm.yaml"
    config.write_text((CONFIG % {"store": tmp_path / "store", "unknown": "block"}).replace(
        "policy: {unknown_credentials: block}",
        "policy: {default_failure_mode: fail_open, fallback_daily_limit_usd: 0.001}"))
    Store(tmp_path / "store").close()
    gw = Gateway()
    with taddons.context(gw) as tctx:
        tctx.configure(gw, aigw_config=str(config))
        gw.store.close()
        gw.store = None  # the store became unreadable
        first = chat_flow("gw_live_" + "1" * 32)
        decide(gw, first)
        assert first.response is None and first.metadata["aigw"]["decision"] == "grace"
        assert first.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        forward(gw, first, openai_response(prompt=1000, completion=200))  # $0.0045 > $0.001
        second = chat_flow("gw_live_" + "2" * 32)  # another invented key
        decide(gw, second)
        assert second.response.status_code == 429
        gw.done()


def test_a_large_body_in_fail_open_mode_is_read_off_the_event_loop(gateway, monkeypatch):
    gw = gateway()
    s = seed(gw.store, failure_mode="fail_open")
    monkeypatch.setattr(gw.store.ledger, "reserve", lambda *a, **k: (_ for _ in ()).throw(
        StoreUnavailable("down")))
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 600_000}]}
    flow = chat_flow(s.api_key, body)
    pending = gw.request(flow)
    assert asyncio.iscoroutine(pending)
    run(pending)
    gw.injector.request(flow)
    assert flow.response is None and flow.metadata["aigw"]["decision"] == "grace"
    assert flow.request.headers["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_a_flow_admitted_before_a_reload_is_settled_after_it(gateway):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(s.api_key)
    decide(gw, flow)
    gw.done()  # mitmproxy reloads the script: a new instance takes over
    successor = gateway()
    forward(successor, flow, openai_response(prompt=1000, completion=200))
    assert usage(successor, "key", s.key_id).requests == 1


@pytest.mark.parametrize("host,path", [
    ("api.openai.com", "/v1/batches"),
    ("api.openai.com", "/v1/fine_tuning/jobs"),
    ("api.anthropic.com", "/v1/messages/batches"),
    ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:batchGenerateContent"),
])
def test_jobs_billed_after_the_request_are_refused(gateway, host, path):
    gw = gateway()
    s = seed(gw.store)
    flow = chat_flow(None, host=host, path=path,
                     headers={"authorization": f"Bearer {s.api_key}", "x-api-key": s.api_key,
                              "x-goog-api-key": s.api_key})
    decide(gw, flow)
    assert flow.response.status_code == 403
    assert b"batch or fine-tuning jobs" in flow.response.content  # each provider's own shape
    assert gw.store.ledger.reservations() == []
    files = chat_flow(s.api_key, path="/v1/batches/batch_abc")  # reading a batch is fine
    files.request.method = "GET"
    decide(gw, files)
    assert files.response is None


def test_a_read_only_request_is_counted_and_costs_nothing_a_bodied_one_an_estimate(gateway):
    """Providers bill no GET /v1/models; a POST the provider answers without usage (a file
    upload) is charged the estimate, never $0."""
    gw = gateway()
    s = seed(gw.store)
    models = chat_flow(s.api_key, path="/v1/models")
    models.request.method, models.request.content = "GET", b""
    decide(gw, models)
    assert models.response is None  # forwarded
    listing = json.dumps({"object": "list", "data": [{"id": "gpt-4o"}] * 50}).encode()
    forward(gw, models, http.Response.make(200, listing, {"content-type": "application/json"}))
    key = usage(gw, "key", s.key_id)
    assert key.requests == 1 and key.used_nusd == 0 and key.reserved_nusd == 0
    upload = chat_flow(s.api_key, b'{"purpose": "batch"}', path="/v1/files")
    decide(gw, upload)
    forward(gw, upload, http.Response.make(200, b'{"id": "file-1"}',
                                           {"content-type": "application/json"}))
    key = usage(gw, "key", s.key_id)
    assert key.requests == 2 and key.used_nusd > 0 and key.reserved_nusd == 0


def test_an_absurd_max_tokens_is_decided_on_the_budget_not_the_failure_mode(gateway):
    """max_tokens 2**63-1 priced as is overflows the ledger's 64-bit counters: the reservation is
    capped, so the request is decided like any other (here no level has a limit: allowed)."""
    gw = gateway()
    s = seed(gw.store, org_budget=None, user_limit=None)
    flow = chat_flow(s.api_key, {"model": "gpt-4o", "max_tokens": 2**63 - 1, "messages": []})
    decide(gw, flow)
    assert flow.response is None and flow.metadata["aigw"]["decision"] == "allowed"
    forward(gw, flow, openai_response(prompt=10, completion=5))
    assert usage(gw, "key", s.key_id).reserved_nusd == 0
