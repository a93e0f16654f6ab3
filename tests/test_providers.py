"""Adapters and pricing: usage fields per API, credentials, native errors."""

import json

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from addon.pricing import Price, PriceTable
from addon.providers import ADAPTERS, Denial, Usage


def usage_of(kind: str, body: dict) -> Usage | None:
    meter = ADAPTERS[kind]().meter()
    meter.feed(None, body)
    return meter.usage()


def test_openai_chat_counts_cached_prompt_tokens_apart():
    u = usage_of("openai", {"model": "gpt-4o", "usage": {
        "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 128}}})
    assert u == Usage(input_tokens=86, cached_input_tokens=1920, output_tokens=300,
                      reasoning_tokens=128, model="gpt-4o")


def test_openai_responses_api_usage_and_completed_event():
    body = {"id": "resp_1", "object": "response", "model": "o4-mini", "usage": {
        "input_tokens": 500, "input_tokens_details": {"cached_tokens": 100},
        "output_tokens": 900, "output_tokens_details": {"reasoning_tokens": 700},
        "total_tokens": 1400}}
    expected = Usage(input_tokens=400, cached_input_tokens=100, output_tokens=900,
                     reasoning_tokens=700, model="o4-mini")
    assert usage_of("openai", body) == expected
    meter = ADAPTERS["openai"]().meter()
    meter.feed("response.created", {"type": "response.created", "response": {**body,
                                                                             "usage": None}})
    meter.feed("response.completed", {"type": "response.completed", "response": body})
    assert meter.usage() == expected


def test_openai_usage_null_means_absent():
    assert usage_of("openai", {"model": "gpt-4o", "usage": None}) is None


def test_anthropic_message_usage_excludes_cache_from_input():
    u = usage_of("anthropic", {"type": "message", "model": "claude-haiku-4-5", "usage": {
        "input_tokens": 12, "output_tokens": 80, "cache_creation_input_tokens": 2000,
        "cache_read_input_tokens": 30000}})
    assert u == Usage(input_tokens=12, cached_input_tokens=30000, cache_write_tokens=2000,
                      output_tokens=80, model="claude-haiku-4-5")


def test_anthropic_one_hour_cache_writes_are_priced_apart():
    u = usage_of("anthropic", {"type": "message", "usage": {
        "input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}}})
    assert (u.cache_write_tokens, u.cache_write_1h_tokens) == (100, 200)
    price = Price.from_usd_per_1m(3.0, 15.0, 0.3, 3.75)
    assert price.cost_nusd(u) == 10 * 3000 + 5 * 15000 + 100 * 3750 + 200 * 6000


def test_gemini_usage_bills_thoughts_as_output():
    u = usage_of("gemini", {"usageMetadata": {
        "promptTokenCount": 100, "cachedContentTokenCount": 60, "candidatesTokenCount": 20,
        "thoughtsTokenCount": 30, "toolUsePromptTokenCount": 5, "totalTokenCount": 155},
        "modelVersion": "gemini-2.5-pro"})
    assert u == Usage(input_tokens=45, cached_input_tokens=60, output_tokens=50,
                      reasoning_tokens=30, model="gemini-2.5-pro")


@pytest.mark.parametrize("garbage", [None, [], "x", {"usage": "lots"}, {"usage": {
    "prompt_tokens": -5, "completion_tokens": "7"}}])
def test_malformed_usage_never_raises(garbage):
    for kind in ADAPTERS:
        usage = usage_of(kind, garbage)
        assert usage is None or min(usage.input_tokens, usage.output_tokens) >= 0


def test_price_table_matches_snapshots_and_warns_on_unknown(caplog):
    table = PriceTable(
        {"gpt-4o": Price.from_usd_per_1m(2.5, 10.0, 1.25),
         "gpt-4o-mini": Price.from_usd_per_1m(0.15, 0.6, 0.075)},
        Price.from_usd_per_1m(1.0, 1.0),
    )
    assert table.lookup("gpt-4o-2024-08-06").input == 2_500_000
    assert table.lookup("gpt-4o-mini-2024-07-18").input == 150_000
    assert table.lookup("models/gpt-4o") is not None
    assert table.lookup("gpt-4o-0613") is not None
    assert table.lookup("gpt-4o-mini-tts") is None  # a variant is not its base model
    assert table.price("mystery-model") is table.fallback
    assert "mystery-model" in caplog.text
    assert table.price("mystery-model").cost_nusd(Usage(input_tokens=1000)) == 1_000_000


def test_cost_is_exact_in_nano_dollars():
    price = Price.from_usd_per_1m(3.0, 15.0, 0.3, 3.75)
    usage = Usage(input_tokens=1, cached_input_tokens=1, cache_write_tokens=1, output_tokens=1)
    assert price.cost_nusd(usage) == 3000 + 300 + 3750 + 15000
    assert Price.from_usd_per_1m(1.0, 1.0).cache_write == 1_250_000  # default 1.25x input


def request(**headers) -> http.Request:
    return tutils.treq(headers=http.Headers(**headers), path=b"/v1/x?key=gw_live_q&alt=sse")


def test_credentials_are_read_and_replaced_where_each_sdk_sends_them():
    openai, azure = ADAPTERS["openai"](), ADAPTERS["azure_openai"]()
    anthropic, gemini = ADAPTERS["anthropic"](), ADAPTERS["gemini"]()
    r = request(authorization="Bearer gw_live_a")
    assert openai.credential(r) == "gw_live_a"
    openai.set_credential(r, "sk-real")
    assert r.headers["authorization"] == "Bearer sk-real"

    r = request(api_key="gw_live_b")
    assert azure.credential(r) == "gw_live_b"
    azure.set_credential(r, "az-real")
    assert r.headers["api-key"] == "az-real" and "authorization" not in r.headers

    r = request(x_api_key="gw_live_c", authorization="Bearer gw_live_c")
    assert anthropic.credential(r) == "gw_live_c"
    anthropic.set_credential(r, "sk-ant-real")
    assert r.headers["x-api-key"] == "sk-ant-real" and "authorization" not in r.headers

    r = request()
    assert gemini.credential(r) == "gw_live_q"
    gemini.set_credential(r, "g-real")
    assert "key" not in r.query and r.query["alt"] == "sse"
    assert r.headers["x-goog-api-key"] == "g-real"


def test_azure_model_is_the_deployment():
    r = tutils.treq(path=b"/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21")
    assert ADAPTERS["azure_openai"]().model(r, {"model": "ignored"}) == "prod-gpt4o"


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_denials_use_each_providers_error_shape(kind):
    denial = Denial(429, "user_quota_exceeded", "user_quota_exceeded: used $2 of $1",
                    headers=(("x-should-retry", "false"),), details={"level": "user"})
    response = ADAPTERS[kind]().deny(denial)
    body = json.loads(response.content)
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["content-type"] == "application/json"
    if kind == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    elif kind == "gemini":
        assert body["error"]["status"] == "RESOURCE_EXHAUSTED" and body["error"]["code"] == 429
    else:
        assert body["error"]["type"] == "user_quota_exceeded"
        assert body["error"]["code"] == "insufficient_quota"
    assert "used $2 of $1" in json.dumps(body)
