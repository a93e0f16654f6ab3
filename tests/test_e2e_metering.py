"""Exact metering of every API, streamed and not, through a real mitmdump with the official SDKs;
what the client receives is what the provider sent."""

import json

import httpx
import pytest

from store import USD
from tests.support.gateway import chat, per_1m, settled

pytestmark = pytest.mark.e2e

# List prices of the models used here, USD per 1M tokens, from mitm.yaml:
GPT_4O = {"input": 2.50, "cached": 1.25, "output": 10.0}
GPT_4O_MINI = {"input": 0.15, "cached": 0.075, "output": 0.60}
SONNET = {"input": 3.0, "cached": 0.30, "write": 3.75, "output": 15.0}
FLASH = {"input": 0.30, "cached": 0.03, "output": 2.50}


def openai_cost(u: dict, p: dict) -> float:
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return (per_1m(u["prompt_tokens"] - cached, p["input"]) + per_1m(cached, p["cached"])
            + per_1m(u["completion_tokens"], p["output"]))


def nusd(usd: float) -> int:
    return round(usd * USD)


def test_openai_stream_without_include_usage_is_metered_and_unchanged(gateway, fake_provider,
                                                                      account):
    acct = account()
    fake_provider.fixed_ids = True
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with gateway.httpx_client() as client:
        through = client.post("https://api.openai.com/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {acct.api_key}"}).content
    assert json.loads(fake_provider.last.body)["stream_options"] == {"include_usage": True}
    with httpx.Client() as direct:
        provider = direct.post(f"{fake_provider.url}/v1/chat/completions",
                               json={**body, "stream_options": {"include_usage": True}}).content
    events = provider.split(b"\n\n")
    usage_events = [e for e in events if b'"choices": []' in e or b'"choices":[]' in e]
    assert len(usage_events) == 1
    assert through == provider.replace(usage_events[0] + b"\n\n", b"")
    u = fake_provider.expected_usage("openai")
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(openai_cost(u, GPT_4O))


def test_openai_sdk_stream_sees_no_usage_it_did_not_ask_for(gateway, fake_provider, account):
    acct = account()
    chunks = list(chat(gateway.openai_client(acct.api_key), model="gpt-4o", stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    u = fake_provider.expected_usage("openai")
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(openai_cost(u, GPT_4O))


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd", None])
def test_stream_with_usage_asked_is_byte_identical(gateway, fake_provider, account, encoding):
    acct = account()
    fake_provider.fixed_ids = True
    if encoding:
        fake_provider.set(encoding=encoding)
    body = {"model": "gpt-4o-mini", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "x"}]}
    with gateway.httpx_client() as client:
        through = client.post("https://api.openai.com/v1/chat/completions", json=body,
                              headers={"authorization": f"Bearer {acct.api_key}"}).content
    with httpx.Client() as direct:
        provider = direct.post(f"{fake_provider.url}/v1/chat/completions", json=body).content
    assert through == provider
    u = fake_provider.expected_usage("openai")
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(openai_cost(u, GPT_4O_MINI))


def test_injected_usage_is_dropped_from_a_compressed_stream(gateway, fake_provider, account):
    acct = account()
    fake_provider.set(encoding="gzip")  # a provider that compresses whatever we ask
    chunks = list(chat(gateway.openai_client(acct.api_key), model="gpt-4o", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == fake_provider.scenario.text
    assert all(c.usage is None for c in chunks)
    u = fake_provider.expected_usage("openai")
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(openai_cost(u, GPT_4O))


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api(gateway, fake_provider, account, stream):
    acct = account()
    client = gateway.openai_client(acct.api_key)
    if stream:
        with client.responses.stream(model="gpt-4o", input="hi") as events:
            final = events.get_final_response()
    else:
        final = client.responses.create(model="gpt-4o", input="hi")
    assert "stream_options" not in (fake_provider.last.json or {})
    u = fake_provider.expected_usage("responses")
    cached = u["input_tokens_details"]["cached_tokens"]
    cost = (per_1m(u["input_tokens"] - cached, GPT_4O["input"])
            + per_1m(cached, GPT_4O["cached"]) + per_1m(u["output_tokens"], GPT_4O["output"]))
    assert final.usage.output_tokens == u["output_tokens"]
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(cost)


@pytest.mark.parametrize("stream", [False, True])
def test_azure_is_priced_by_the_model_behind_the_deployment(gateway, fake_provider, account,
                                                           stream):
    acct = account()
    client = gateway.azure_client(acct.api_key)
    result = chat(client, model="my-deployment", stream=stream)
    if stream:
        list(result)
    assert fake_provider.last.credentials.get("api-key") == "sk-fake-openai-provider-key"
    u = fake_provider.expected_usage("azure")
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(openai_cost(u, GPT_4O))


def anthropic_cost(u: dict) -> float:
    return (per_1m(u["input_tokens"], SONNET["input"])
            + per_1m(u.get("cache_read_input_tokens") or 0, SONNET["cached"])
            + per_1m(u.get("cache_creation_input_tokens") or 0, SONNET["write"])
            + per_1m(u["output_tokens"], SONNET["output"]))


@pytest.mark.parametrize("extra_deltas", [0, 3])
def test_anthropic_stream_takes_the_latest_cumulative_output(gateway, fake_provider, account,
                                                             extra_deltas):
    acct = account()
    fake_provider.set(anthropic_extra_message_deltas=extra_deltas)
    client = gateway.anthropic_client(acct.api_key)
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    u = fake_provider.expected_usage("anthropic")
    assert final.usage.output_tokens == u["output_tokens"]
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(anthropic_cost(u))


def gemini_cost(u: dict) -> float:
    cached = u.get("cachedContentTokenCount") or 0
    output = u["candidatesTokenCount"] + (u.get("thoughtsTokenCount") or 0)
    return (per_1m(u["promptTokenCount"] - cached, FLASH["input"])
            + per_1m(cached, FLASH["cached"]) + per_1m(output, FLASH["output"]))


def test_gemini_sdk_stream(gateway, fake_provider, account):
    acct = account()
    client = gateway.genai_client(acct.api_key)
    text = "".join(c.text or "" for c in client.models.generate_content_stream(
        model="gemini-2.5-flash", contents="hi"))
    assert text == fake_provider.scenario.text
    assert "alt=sse" in fake_provider.last.query_string
    u = fake_provider.expected_usage("gemini")
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(gemini_cost(u))


def test_gemini_streamed_json_array(gateway, fake_provider, account):
    acct = account()
    with gateway.httpx_client() as client:
        response = client.post(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
            ":streamGenerateContent",
            json={"contents": [{"parts": [{"text": "hi"}]}]},
            headers={"x-goog-api-key": acct.api_key},
        )
    assert response.status_code == 200 and response.json()[-1]["usageMetadata"]
    u = fake_provider.expected_usage("gemini")
    assert settled(gateway.store, acct.key_id).used_nusd == nusd(gemini_cost(u))


def test_upstream_breaking_a_stream_is_charged_what_was_seen(gateway, fake_provider, account):
    acct = account()
    fake_provider.set(break_after=2)
    client = gateway.anthropic_client(acct.api_key)
    with pytest.raises(Exception):  # noqa: B017 - the SDK's own transport error
        with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            stream.get_final_message()
    # message_start (input and cache counts) arrived before the break: charged those.
    u = fake_provider.expected_usage("anthropic")
    seen = {**u, "output_tokens": 1}
    counter = settled(gateway.store, acct.key_id)
    assert counter.used_nusd == nusd(anthropic_cost(seen))
    assert counter.reserved_nusd == 0


def test_client_disconnect_mid_stream_is_charged_an_estimate(gateway, fake_provider, account):
    acct = account()
    fake_provider.set(delay=0.2, text_chunks=["word "] * 20)
    client = gateway.openai_client(acct.api_key)
    stream = chat(client, model="gpt-4o", stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            stream.close()
            break
    counter = settled(gateway.store, acct.key_id)
    entry = [e for e in gateway.store.ledger.log_entries() if e.key_id == acct.key_id][-1]
    assert entry.estimated is True
    assert entry.output >= 1 and entry.input >= 1
    assert counter.used_nusd == entry.cost_nusd > 0


def test_openai_compatible_self_hosted_provider(tmp_path, fake_provider):
    """`kind: openai` on any host: a self-hosted vLLM behind its own name, its own key."""
    import os

    from store import Store
    from tests.support.gateway import start_gateway
    from tests.support.seed import seed

    config = """
store: {path: %s}
providers:
  vllm: {kind: openai, hosts: [vllm.internal.test], api_key_env: VLLM_API_KEY}
pricing:
  fallback: {input_per_1m: 1.0, output_per_1m: 1.0}
  models:
    llama-4-70b: {input_per_1m: 0.5, output_per_1m: 1.5}
""" % (tmp_path / "store")
    os.environ["VLLM_API_KEY"] = "vllm-fake-key"
    os.environ["AIGW_TEST_REDIRECT_HOSTS"] = "vllm.internal.test"
    try:
        proxy = start_gateway(tmp_path / "gw", fake_provider.address, config_text=config,
                              store_dir=tmp_path / "store")
    finally:
        del os.environ["VLLM_API_KEY"], os.environ["AIGW_TEST_REDIRECT_HOSTS"]
    try:
        with Store(tmp_path / "store") as store:
            acct = seed(store)
            client = proxy.openai_client(acct.api_key, base_url="https://vllm.internal.test/v1")
            assert list(chat(client, model="llama-4-70b", stream=True))
            assert fake_provider.last.credential == "vllm-fake-key"
            u = fake_provider.expected_usage("openai")
            cost = per_1m(u["prompt_tokens"], 0.5) + per_1m(u["completion_tokens"], 1.5)
            assert settled(store, acct.key_id).used_nusd == nusd(cost)
    finally:
        proxy.stop()
