"""The end-to-end harness itself, without the gateway: official SDKs -> mitmdump (only the
test redirect addon) -> fake provider, and the fake provider on its own."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import httpx2
import openai
import pytest
from google.genai import errors as genai_errors

from tests.support.fake_provider import (
    DEFAULT_USAGE,
    FakeProvider,
    available_encodings,
    decode_body,
)
from tests.support.proxy import REDIRECT_SCRIPT, Proxy, start_mitmdump

pytestmark = pytest.mark.e2e

OPENAI_KEY = "sk-test-openai-0123456789"
ANTHROPIC_KEY = "sk-ant-test-0123456789"
GEMINI_KEY = "AIza-test-0123456789"
AZURE_KEY = "azure-test-0123456789"
TEXT = "Hello from the fake provider."


def _start(tmp: Path, fake: FakeProvider, **kwargs) -> Iterator[Proxy]:
    proxy = start_mitmdump(tmp, scripts=[REDIRECT_SCRIPT], upstream=fake.address, **kwargs)
    proxy.sdk_timeout = 10.0
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, fake_provider_server) -> Iterator[Proxy]:
    """mitmdump with default buffering (as the gateway would run it)."""
    yield from _start(tmp_path_factory.mktemp("proxy"), fake_provider_server)


@pytest.fixture(scope="module")
def streaming_proxy(tmp_path_factory, fake_provider_server) -> Iterator[Proxy]:
    """mitmdump that streams every response body (stream_large_bodies=1)."""
    yield from _start(
        tmp_path_factory.mktemp("sproxy"), fake_provider_server,
        sets={"stream_large_bodies": "1"},
    )


# --------------------------------------------------------------------------- OpenAI


def test_openai_chat(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.openai_client(OPENAI_KEY)
    out = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert out.choices[0].message.content == TEXT
    assert out.model == "gpt-4o-mini"
    assert out.usage is not None
    assert out.usage.model_dump(exclude_none=True) == DEFAULT_USAGE["openai"]

    req = fake_provider.last
    assert (req.method, req.path, req.api, req.model) == (
        "POST", "/v1/chat/completions", "openai", "gpt-4o-mini",
    )
    assert req.headers["Host"] == "api.openai.com"  # redirect keeps the Host header
    assert req.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert req.credentials == {"authorization": f"Bearer {OPENAI_KEY}"}
    assert req.credential == OPENAI_KEY
    assert fake_provider.saw_secret(OPENAI_KEY)
    assert req.json["messages"] == [{"role": "user", "content": "hi"}]
    assert "stream" not in req.json


def test_openai_chat_stream_with_usage(proxy: Proxy, fake_provider: FakeProvider) -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
             "prompt_tokens_details": {"cached_tokens": 60, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 10}}
    fake_provider.usage["openai"] = usage
    client = proxy.openai_client(OPENAI_KEY)
    chunks = list(client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "hi"}],
        stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TEXT
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == usage
    assert fake_provider.last.json["stream_options"] == {"include_usage": True}
    assert fake_provider.last.stream


def test_openai_chat_stream_sdk_sends_no_stream_options(
    proxy: Proxy, fake_provider: FakeProvider
) -> None:
    client = proxy.openai_client(OPENAI_KEY)
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
    ))
    # The SDK does not add stream_options by itself, so a plain stream carries no usage.
    assert "stream_options" not in fake_provider.last.json
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_per_request_usage_header(proxy: Proxy, fake_provider: FakeProvider) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    client = proxy.openai_client(OPENAI_KEY)
    out = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-usage": json.dumps(usage)},
    )
    assert out.usage is not None and out.usage.total_tokens == 11


def test_openai_responses(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.openai_client(OPENAI_KEY)
    out = client.responses.create(model="gpt-4.1", input="hi", max_output_tokens=50)
    assert out.output_text == TEXT
    assert out.usage is not None
    assert out.usage.model_dump(exclude_none=True) == DEFAULT_USAGE["responses"]
    assert fake_provider.last.path == "/v1/responses"
    assert fake_provider.last.json["max_output_tokens"] == 50

    events = list(client.responses.create(model="gpt-4.1", input="hi", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == TEXT
    final = events[-1].response
    assert final.usage is not None and final.usage.output_tokens == 9
    assert "stream_options" not in fake_provider.last.json


def test_azure_chat(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.azure_client(AZURE_KEY)
    out = client.chat.completions.create(
        model="my-deployment", messages=[{"role": "user", "content": "hi"}]
    )
    assert out.model == "gpt-4o-2024-08-06"
    assert out.choices[0].message.content == TEXT
    assert out.usage is not None and out.usage.prompt_tokens == 17
    req = fake_provider.last
    assert req.path == "/openai/deployments/my-deployment/chat/completions"
    assert req.query == {"api-version": "2024-10-21"}
    assert req.headers["Host"] == "myres.openai.azure.com"
    assert req.credentials == {"api-key": AZURE_KEY}
    assert (req.api, req.model) == ("azure", "my-deployment")

    chunks = list(client.chat.completions.create(
        model="my-deployment", messages=[{"role": "user", "content": "hi"}],
        stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices == [] and chunks[0].model == ""  # Azure's filter-results chunk
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 22


def test_openai_error_status(proxy: Proxy, fake_provider: FakeProvider) -> None:
    fake_provider.enqueue(status=429, headers={"x-should-retry": "false"})
    client = proxy.openai_client(OPENAI_KEY)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="gpt-4o", messages=[])
    assert exc.value.code == "insufficient_quota"
    # the queued override is used up
    client.chat.completions.create(model="gpt-4o", messages=[])
    assert len(fake_provider.requests) == 2


def test_models_list(proxy: Proxy, fake_provider: FakeProvider) -> None:
    ids = [m.id for m in proxy.openai_client(OPENAI_KEY).models.list()]
    assert ids == ["gpt-4o", "gpt-4o-mini"]
    ids = [m.id for m in proxy.anthropic_client(ANTHROPIC_KEY).models.list()]
    assert ids == ["claude-sonnet-4-6", "claude-haiku-4-5"]


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_messages(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.anthropic_client(ANTHROPIC_KEY)
    msg = client.messages.create(
        model="claude-sonnet-4-6", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].type == "text" and msg.content[0].text == TEXT
    assert msg.model == "claude-sonnet-4-6"
    u = msg.usage
    assert (u.input_tokens, u.output_tokens) == (21, 9)
    assert (u.cache_creation_input_tokens, u.cache_read_input_tokens) == (5, 8)
    req = fake_provider.last
    assert req.path == "/v1/messages"
    assert req.headers["Host"] == "api.anthropic.com"
    # anthropic 2.x sends api_key as "Authorization: Bearer ..." (older SDKs: x-api-key)
    assert req.credential == ANTHROPIC_KEY
    assert set(req.credentials) <= {"authorization", "x-api-key"}
    assert "anthropic-version" in req.headers


def test_anthropic_stream(proxy: Proxy, fake_provider: FakeProvider) -> None:
    fake_provider.usage["anthropic"] = {
        "input_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 50,
        "output_tokens": 25,
    }
    fake_provider.set(anthropic_extra_message_deltas=2)
    client = proxy.anthropic_client(ANTHROPIC_KEY)
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens == 25  # the last message_delta wins, not a sum
    assert final.usage.input_tokens == 3 and final.usage.cache_read_input_tokens == 50
    assert fake_provider.last.json["stream"] is True

    events = list(client.messages.create(
        model="claude-haiku-4-5", max_tokens=100, stream=True,
        messages=[{"role": "user", "content": "hi"}],
    ))
    types = [e.type for e in events]
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-2:] == ["message_delta", "message_stop"]
    assert events[0].message.usage.output_tokens == 1  # type: ignore[union-attr]


def test_anthropic_error_status(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.anthropic_client(ANTHROPIC_KEY)
    with pytest.raises(anthropic.PermissionDeniedError) as exc:
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=10, messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-fake-status": "403"},
        )
    assert exc.value.body["error"]["type"] == "permission_error"  # type: ignore[index]


# --------------------------------------------------------------------------- Gemini


def test_gemini_generate_content(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.genai_client(GEMINI_KEY)
    out = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert out.text == TEXT
    assert out.usage_metadata is not None
    assert out.usage_metadata.prompt_token_count == 15
    assert out.usage_metadata.candidates_token_count == 6
    assert out.usage_metadata.total_token_count == 21
    req = fake_provider.last
    assert req.path == "/v1/models/gemini-2.5-flash:generateContent"  # this SDK uses /v1/
    assert req.headers["Host"] == "generativelanguage.googleapis.com"
    assert req.credentials == {"x-goog-api-key": GEMINI_KEY}
    assert (req.api, req.model, req.stream) == ("gemini", "gemini-2.5-flash", False)


def test_gemini_stream(proxy: Proxy, fake_provider: FakeProvider) -> None:
    fake_provider.usage["gemini"] = {
        "promptTokenCount": 40, "cachedContentTokenCount": 30, "candidatesTokenCount": 12,
        "thoughtsTokenCount": 7, "totalTokenCount": 59,
    }
    client = proxy.genai_client(GEMINI_KEY)
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-pro", contents="hi"))
    assert "".join(c.text or "" for c in chunks) == TEXT
    last = chunks[-1].usage_metadata
    assert last is not None
    assert (last.prompt_token_count, last.cached_content_token_count) == (40, 30)
    assert (last.candidates_token_count, last.thoughts_token_count) == (12, 7)
    assert last.total_token_count == 59
    first = chunks[0].usage_metadata
    assert first is not None and first.candidates_token_count is None  # partial usage
    req = fake_provider.last
    assert req.path == "/v1/models/gemini-2.5-pro:streamGenerateContent"
    assert req.query == {"alt": "sse"}


@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
def test_gemini_async_stream_via_aiohttp(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.genai_client(GEMINI_KEY)

    async def run() -> list[str]:
        out = []
        stream = await client.aio.models.generate_content_stream(
            model="gemini-2.5-flash", contents="hi"
        )
        async for chunk in stream:
            out.append(chunk.text or "")
        await client.aio.aclose()
        return out

    assert "".join(asyncio.run(asyncio.wait_for(run(), 10))) == TEXT
    assert fake_provider.last.credentials == {"x-goog-api-key": GEMINI_KEY}


def test_gemini_error_and_json_array_stream(proxy: Proxy, fake_provider: FakeProvider) -> None:
    client = proxy.genai_client(GEMINI_KEY)
    fake_provider.enqueue(status=429)
    with pytest.raises(genai_errors.ClientError) as exc:
        client.models.generate_content(model="gemini-2.5-flash", contents="hi")
    assert exc.value.code == 429 and exc.value.status == "RESOURCE_EXHAUSTED"

    # without alt=sse: one JSON array, streamed element by element
    http = proxy.httpx_client()
    r = http.post(
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
        ":streamGenerateContent?key=" + GEMINI_KEY,
        json={"contents": [{"parts": [{"text": "hi"}]}]},
    )
    assert r.status_code == 200
    assert r.text.startswith("[{") and "\r\n,{" in r.text
    items = r.json()
    assert "".join(i["candidates"][0]["content"]["parts"][0]["text"] for i in items) == TEXT
    assert items[-1]["usageMetadata"] == DEFAULT_USAGE["gemini"]
    assert fake_provider.last.credentials == {"key": GEMINI_KEY}


# --------------------------------------------------------------------------- streaming, encodings


def _data_lines(lines: Iterator[str]) -> Iterator[str]:
    return (line for line in lines if line.startswith("data:"))


def test_stream_arrives_incrementally(
    proxy: Proxy, streaming_proxy: Proxy, fake_provider: FakeProvider
) -> None:
    """The first events reach the client while the provider still holds the rest of the stream
    (a synchronization point, not a stopwatch); default mitmdump delivers nothing before the
    provider ends the stream."""
    fake_provider.set(hold_after=2)  # 8 events: 2 sent, then the rest once released
    body = {"model": "gpt-4o", "stream": True, "messages": []}

    # the fake itself flushes event by event
    with httpx.Client(timeout=30) as direct, direct.stream(
        "POST", fake_provider.url + "/v1/chat/completions", json=body
    ) as r:
        lines = _data_lines(r.iter_lines())
        seen = [next(lines), next(lines)]
        fake_provider.wait_for_held(1)
        fake_provider.release()
        seen += lines
    assert len(seen) == 8

    # through mitmdump that streams bodies, the SDK sees the first chunks before the rest exists
    client = streaming_proxy.openai_client(OPENAI_KEY)
    chunks = iter(client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
    ))
    early = [next(chunks), next(chunks)]  # the role, the first delta
    fake_provider.wait_for_held(1)
    fake_provider.release()
    assert len(early + list(chunks)) == 7  # role, 5 content deltas, finish ([DONE] is not yielded)

    # default mitmdump (no addon setting flow.response.stream) buffers the whole stream: its
    # first line comes only after the provider was released (the pause gives a proxy that
    # streamed the time to show it; it cannot make a buffering one fail)
    released = threading.Event()

    def release_later() -> None:
        fake_provider.wait_for_held(1)
        time.sleep(0.5)
        released.set()
        fake_provider.release()

    releaser = threading.Thread(target=release_later, daemon=True)
    releaser.start()
    with proxy.httpx_client().stream(
        "POST", "https://api.openai.com/v1/chat/completions", json=body,
        headers={"authorization": "Bearer " + OPENAI_KEY},
    ) as r:
        lines = _data_lines(r.iter_lines())
        first = next(lines)
        assert released.is_set(), "a line arrived while the provider held the stream"
        seen = [first, *lines]
    releaser.join(30)
    assert len(seen) == 8


def test_fake_gzip_direct(fake_provider: FakeProvider) -> None:
    fake_provider.set(encoding="gzip")
    with httpx.Client(timeout=5) as http:
        r = http.post(fake_provider.url + "/v1/messages", json={"model": "claude-x"},
                      headers={"x-api-key": ANTHROPIC_KEY})
        assert r.headers["content-encoding"] == "gzip"
        assert r.json()["usage"] == DEFAULT_USAGE["anthropic"]

        raw = b""
        with http.stream("POST", fake_provider.url + "/v1/chat/completions",
                         json={"model": "m", "stream": True}) as s:
            assert s.headers["content-encoding"] == "gzip"
            parts = list(s.iter_raw())
            raw = b"".join(parts)
    text = gzip.decompress(raw).decode()
    assert text.count("data: ") == 8 and text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("encoding", [e for e in available_encodings() if e != "identity"])
def test_encoded_stream_through_proxy(
    proxy: Proxy, fake_provider: FakeProvider, encoding: str
) -> None:
    fake_provider.set(encoding=encoding)
    with proxy.httpx_client().stream(
        "POST", "https://api.anthropic.com/v1/messages",
        json={"model": "claude-x", "stream": True},
        headers={"x-api-key": ANTHROPIC_KEY, "accept-encoding": encoding},
    ) as r:
        assert r.headers["content-encoding"] == encoding
        raw = b"".join(r.iter_raw())
    text = decode_body(raw, encoding).decode()
    assert text.startswith("event: message_start\n")
    assert text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_broken_stream(
    fake_provider: FakeProvider, proxy: Proxy, streaming_proxy: Proxy
) -> None:
    fake_provider.set(break_after=3)
    with httpx.Client(timeout=5) as http, http.stream(
        "POST", fake_provider.url + "/v1/messages", json={"model": "c", "stream": True}
    ) as r:
        lines = []
        with pytest.raises(httpx.RemoteProtocolError):
            for line in r.iter_lines():
                lines.append(line)
    assert [ln for ln in lines if ln.startswith("event:")] == [
        "event: message_start", "event: content_block_start", "event: ping",
    ]

    # a streaming proxy passes the break on: the SDK raises the raw transport error mid-stream
    client = streaming_proxy.anthropic_client(ANTHROPIC_KEY)
    received = []
    with pytest.raises(httpx2.RemoteProtocolError):
        for event in client.messages.create(
            model="c", max_tokens=5, stream=True, messages=[{"role": "user", "content": "x"}]
        ):
            received.append(event.type)
    assert received == ["message_start", "content_block_start"]  # the SDK drops pings

    # a buffering proxy turns it into mitmproxy's own 502 (HTML body)
    with pytest.raises(anthropic.InternalServerError) as exc:
        list(proxy.anthropic_client(ANTHROPIC_KEY).messages.create(
            model="c", max_tokens=5, stream=True, messages=[{"role": "user", "content": "x"}]
        ))
    assert exc.value.status_code == 502


def test_stream_error_event(proxy: Proxy, fake_provider: FakeProvider) -> None:
    fake_provider.set(stream_error_after=4)
    client = proxy.anthropic_client(ANTHROPIC_KEY)
    with pytest.raises(anthropic.APIStatusError) as exc:
        list(client.messages.create(
            model="c", max_tokens=5, stream=True, messages=[{"role": "user", "content": "x"}]
        ))
    assert "overloaded_error" in str(exc.value.body)


def test_unknown_path_is_recorded(fake_provider: FakeProvider) -> None:
    with httpx.Client(timeout=5) as http:
        r = http.get(fake_provider.url + "/nope?key=abc", headers={"api-key": "k1"})
    assert r.status_code == 404 and "error" in r.json()
    assert fake_provider.credentials_seen() == [("api-key", "k1"), ("key", "abc")]
    assert fake_provider.wait_for_requests(1, timeout=1)[0].api is None


def test_proxy_factory_options_and_kill9(proxy_factory, fake_provider: FakeProvider) -> None:
    # upstream and host list as mitmproxy options instead of environment variables
    proxy = proxy_factory(
        scripts=[REDIRECT_SCRIPT],
        sets={"aigw_test_upstream": fake_provider.address,
              "aigw_test_redirect_hosts": "*.example.test"},
    )
    client = proxy.openai_client(OPENAI_KEY, base_url="https://api.example.test/v1")
    out = client.chat.completions.create(model="m", messages=[])
    assert out.choices[0].message.content == TEXT
    assert fake_provider.last.headers["Host"] == "api.example.test"
    proxy.wait_for_log(r"POST http://127\.0\.0\.1:\d+/v1/chat/completions")
    assert proxy.kill9() == -9
    assert not proxy.is_running()


def test_fake_scenario_header_and_validation(fake_provider: FakeProvider) -> None:
    scenario = {"text_chunks": ["a", "b"], "status": 200, "headers": {"x-extra": "1"}}
    with httpx.Client(timeout=5) as http:
        r = http.post(fake_provider.url + "/v1beta/models/gemini-2.5-flash:generateContent",
                      json={}, headers={"x-fake-scenario": json.dumps(scenario),
                                        "x-goog-api-key": GEMINI_KEY})
        assert r.headers["x-extra"] == "1"
        assert r.json()["candidates"][0]["content"]["parts"][0]["text"] == "ab"
        assert r.json()["modelVersion"] == "gemini-2.5-flash"
    with pytest.raises(ValueError):
        fake_provider.set(no_such_field=1)
    with pytest.raises(ValueError):
        fake_provider.enqueue(encoding="compress")
    assert fake_provider.expected_usage("gemini") == DEFAULT_USAGE["gemini"]
