"""End to end: a real mitmdump with the gateway, the official SDKs over HTTPS through it with the
generated CA, a local fake provider upstream, and the ledger read back from the store."""

import anthropic
import openai
import pytest

from store import USD, Store
from store.money import month_of, utc_now
from tests.support.gateway import (
    ANTHROPIC_KEY,
    GEMINI_KEY,
    OPENAI_KEY,
    aigw,
    chat,
    per_1m,
    settled,
    spent,
    start_gateway,
)
from tests.support.seed import seed

pytestmark = pytest.mark.e2e

def test_openai_completion_is_forwarded_with_the_org_key_and_metered(gateway, fake_provider):
    org = aigw(gateway, "org", "create", "--name", "Acme", "--budget", "50")
    user = aigw(gateway, "user", "create", "--org", org["org_id"], "--email", "dev@acme.test",
                "--limit", "10")
    key = aigw(gateway, "key", "create", "--user", user["user_id"], "--name", "laptop")

    client = gateway.openai_client(key["api_key"])
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.prompt_tokens == 11

    # The upstream saw the provider key, never the gateway key.
    assert fake_provider.last.credential == OPENAI_KEY
    assert not fake_provider.saw_secret(key["api_key"])
    # The client never sees the provider key, and gets the gateway's usage headers.
    assert OPENAI_KEY not in str(raw.headers) and OPENAI_KEY not in raw.text
    # gpt-4o-mini: 8 uncached x $0.15 + 3 cached x $0.075 + 7 output x $0.60 per 1M tokens
    cost = per_1m(8, 0.15) + per_1m(3, 0.075) + per_1m(7, 0.60)
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(cost, abs=1e-9)
    assert raw.headers["x-gateway-current-month"] == month_of(utc_now())

    usage = aigw(gateway, "usage", "key", key["key_id"])
    assert usage["request_count"] == 1
    assert usage["current_usage_usd"] == pytest.approx(cost, abs=1e-9)
    for level, level_id in (("user", user["user_id"]), ("org", org["org_id"])):
        assert aigw(gateway, "usage", level, level_id)["current_usage_usd"] == pytest.approx(
            cost, abs=1e-9)
    assert gateway.store.ledger.reservations() == []


def test_streamed_completion_passes_through_and_is_metered(gateway, fake_provider, account):
    acct = account()
    client = gateway.openai_client(acct.api_key)
    stream = chat(client, model="gpt-4o", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fake_provider.scenario.text
    assert chunks[-1].usage.completion_tokens == 7
    cost = per_1m(8, 2.50) + per_1m(3, 1.25) + per_1m(7, 10.0)
    assert settled(gateway.store, acct.key_id).used_nusd == round(cost * USD)


def test_unknown_key_is_401_for_the_sdk(gateway, fake_provider):
    client = gateway.openai_client("gw_live_" + "0" * 32)
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(client)
    assert raised.value.status_code == 401
    assert raised.value.body["code"] == "invalid_api_key"
    assert fake_provider.requests == []


def test_revoked_key_is_401(gateway, fake_provider, account):
    acct = account()
    client = gateway.openai_client(acct.api_key)
    chat(client)
    aigw(gateway, "key", "revoke", acct.key_id)
    with pytest.raises(openai.AuthenticationError):
        chat(client)
    assert len(fake_provider.requests) == 1


@pytest.mark.parametrize(
    "limits,error_type",
    [
        ({"key_limit": 0.000001}, "key_quota_exceeded"),
        ({"user_limit": 0.000001}, "user_quota_exceeded"),
        ({"org_budget": 0.000001}, "organization_quota_exceeded"),
    ],
)
def test_exhausted_budget_is_429_and_the_sdk_does_not_retry(gateway, fake_provider, account, limits,
                                                              error_type):
    acct = account(**limits)
    client = gateway.openai_client(acct.api_key).with_options(max_retries=2)
    chat(client)  # the first request fits; its cost exhausts the limit
    with pytest.raises(openai.RateLimitError) as raised:
        chat(client)
    error = raised.value.body
    assert error["type"] == error_type and error["code"] == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert len(fake_provider.requests) == 1  # neither the denial nor a retry reached the provider


def test_model_not_allowed_is_403(gateway, fake_provider, account):
    acct = account(allowed_models=["gpt-4o-mini"])
    with pytest.raises(openai.PermissionDeniedError):
        chat(gateway.openai_client(acct.api_key), model="gpt-4o")
    assert fake_provider.requests == []


def test_anthropic_messages_streamed_and_not(gateway, fake_provider, account):
    acct = account()
    client = gateway.anthropic_client(acct.api_key)
    message = client.messages.create(model="claude-sonnet-4-6", max_tokens=100,
                                     messages=[{"role": "user", "content": "hi"}])
    assert message.usage.output_tokens == fake_provider.expected_usage("anthropic")["output_tokens"]
    assert fake_provider.last.credentials.get("x-api-key") == ANTHROPIC_KEY
    assert not fake_provider.saw_secret(acct.api_key)
    with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    u = fake_provider.expected_usage("anthropic")
    one = (per_1m(u["input_tokens"], 3.0) + per_1m(u["output_tokens"], 15.0)
           + per_1m(u.get("cache_read_input_tokens") or 0, 0.30)
           + per_1m(u.get("cache_creation_input_tokens") or 0, 3.75))
    assert final.usage.output_tokens == u["output_tokens"]
    assert settled(gateway.store, acct.key_id, 2).used_nusd == pytest.approx(2 * one * USD, abs=2)


def test_anthropic_denial_is_native(gateway, fake_provider):
    client = gateway.anthropic_client("gw_live_" + "1" * 32)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        client.messages.create(model="claude-sonnet-4-6", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["error"]["type"] == "authentication_error"


def test_gemini_generate_content(gateway, fake_provider, account):
    acct = account()
    client = gateway.genai_client(acct.api_key)
    response = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert response.text
    assert fake_provider.last.credential == GEMINI_KEY
    u = fake_provider.expected_usage("gemini")
    cached = u.get("cachedContentTokenCount") or 0
    cost = (per_1m(u["promptTokenCount"] - cached, 0.30) + per_1m(cached, 0.03)
            + per_1m(u["candidatesTokenCount"] + (u.get("thoughtsTokenCount") or 0), 2.50))
    assert settled(gateway.store, acct.key_id).used_nusd == round(cost * USD)


def test_kill_9_loses_no_committed_usage(tmp_path, fake_provider):
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        acct = seed(store, suffix="k9")
    proxy = start_gateway(tmp_path, fake_provider.address, store_dir=store_dir)
    try:
        client = proxy.openai_client(acct.api_key)
        for _ in range(5):
            chat(client)
    finally:
        proxy.kill9()
    with Store(store_dir) as store:
        counter = spent(store, "key", acct.key_id)
    assert counter.requests == 5 and counter.used_nusd > 0
