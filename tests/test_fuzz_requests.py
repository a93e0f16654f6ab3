"""Property tests of the request side at addon level (taddons/tflow, the real hooks and ledger):
any body a client sends to each provider's endpoints (any model, max_tokens, stream fields, bytes
that are no JSON, encodings that lie) gets a decided outcome. Either it is forwarded with a
reservation and the provider's credential, or it is refused in the provider's error shape with
nothing reserved; never an internal fault (which mitmproxy, without the guard, would forward
undecided). Gzip bombs and the model checks end to end are tests/test_adversarial.py's."""

import gzip
import json
from collections.abc import Iterator

import brotli
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from addon import gateway as gateway_module
from addon.gateway import Gateway
from tests.support.fuzz import PROVIDER_KEY, fuzz_gateway, run
from tests.support.fuzz import json_values as json_values_of
from tests.support.seed import seed

# (host, paths, credential header) per provider.
ENDPOINTS = {
    "openai": ("api.openai.com", ["/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                                  "/v1/completions?x=1"], "authorization"),
    "azure": ("fuzz.openai.azure.com",
              ["/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
               "/openai/v1/chat/completions", "/openai/deployments/%2F/x"], "api-key"),
    "anthropic": ("api.anthropic.com", ["/v1/messages", "/v1/messages/count_tokens"],
                  "x-api-key"),
    "gemini": ("generativelanguage.googleapis.com",
               ["/v1beta/models/gemini-2.5-flash:generateContent",
                "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                "/v1beta/models/%3A:generateContent", "/v1beta/models/x"], "x-goog-api-key"),
}
# Each shape's required fields: what an SDK reads from an error body.
SHAPES = {
    "openai": lambda b: isinstance(b["error"]["message"], str) and "type" in b["error"]
    and "code" in b["error"],
    "anthropic": lambda b: b["type"] == "error" and isinstance(b["error"]["type"], str)
    and isinstance(b["error"]["message"], str),
    "gemini": lambda b: isinstance(b["error"]["code"], int)
    and isinstance(b["error"]["status"], str) and isinstance(b["error"]["message"], str),
}
SHAPES["azure"] = SHAPES["openai"]
DENIAL_STATUSES = {400, 401, 403, 413, 429, 502}  # 503 is the failure mode: a healthy store here


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    with fuzz_gateway(tmp_path_factory.mktemp("fuzz_requests")) as gateway:
        gateway.accounts = [
            seed(gateway.store, suffix="1", org_budget=None, user_limit=None),
            seed(gateway.store, suffix="2",
                 allowed_models=["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-flash"]),
            seed(gateway.store, suffix="3", key_limit=0.0),  # a budget used up
        ]
        yield gateway


# --- strategies -----------------------------------------------------------------------------

json_values = json_values_of(max_leaves=10)
sizes = st.one_of(st.integers(min_value=-5, max_value=10**6),
                  st.sampled_from([0, 2**31, 2**53, 2**63 - 1, 2**63, 2**64 - 1]),
                  st.floats(allow_nan=False), json_values)
models = st.one_of(st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-flash", "",
                                    "unknown-model", "models/gpt-4o", "gpt-4o-2024-08-06"]),
                   st.text(max_size=12), json_values)


@st.composite
def request_documents(draw) -> dict:
    """A JSON object with any of the fields the adapters read, each of any type or size."""
    doc: dict = {}
    for name, values in (("model", models), ("max_tokens", sizes),
                         ("max_completion_tokens", sizes), ("max_output_tokens", sizes),
                         ("stream", st.one_of(st.booleans(), json_values)),
                         ("stream_options", st.one_of(
                             st.fixed_dictionaries({"include_usage": json_values}),
                             json_values)),
                         ("messages", json_values), ("contents", json_values),
                         ("generationConfig", st.one_of(
                             st.fixed_dictionaries({"maxOutputTokens": sizes}), json_values)),
                         ("generation_config", st.one_of(
                             st.fixed_dictionaries({"max_output_tokens": sizes}), json_values))):
        if draw(st.booleans()):
            doc[name] = draw(values)
    return doc


bodies = st.one_of(
    st.binary(max_size=120),
    json_values.map(lambda v: json.dumps(v).encode()),
    request_documents().map(lambda v: json.dumps(v).encode()),
    request_documents().map(lambda v: json.dumps(v).encode()[:-1]),  # cut short
    st.sampled_from([b"", b"[" * 1024 + b"]" * 1024, b'{"model": "\\ud800"}', b"\xff\xfe{}"]),
)


@st.composite
def encoded(draw, body: bytes) -> tuple[str | None, bytes]:
    choice = draw(st.sampled_from(["none", "gzip", "br", "lie", "unknown"]))
    if choice == "none":
        return None, body
    if choice == "gzip":
        return "gzip", gzip.compress(body)
    if choice == "br":
        return "br", brotli.compress(body)
    if choice == "lie":
        return "gzip", body
    return draw(st.sampled_from(["x-bogus", "gzip, identity", "compress"])), body


# --- the property ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), provider=st.sampled_from(sorted(ENDPOINTS)),
       method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]))
def test_any_request_body_gets_a_decided_outcome(gw, data, provider, method):
    host, paths, credential = ENDPOINTS[provider]
    path = data.draw(st.sampled_from(paths))
    account = data.draw(st.sampled_from(gw.accounts))
    body = data.draw(bodies)
    encoding, wire = data.draw(encoded(body))
    headers = [(b"content-type", b"application/json")]
    if encoding is not None:
        headers.append((b"content-encoding", encoding.encode()))
    value = f"Bearer {account.api_key}" if credential == "authorization" else account.api_key
    headers.append((credential.encode(), value.encode()))
    req = tutils.treq(host=host, port=443, scheme=b"https", method=method.encode(),
                      path=path.encode(), headers=http.Headers(headers), content=wire)
    flow = tflow.tflow(req=req)
    flow.client_conn.sni = host
    flow.server_conn.address = (host, 443)

    held = len(gw.store.ledger.reservations())
    faults: list[BaseException] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gateway_module, "log_fault", lambda what, exc: faults.append(exc))
        run(gw.request(flow))
        gw.injector.request(flow)
    assert faults == [], f"an internal fault decided the request: {faults!r}"
    assert account.api_key not in repr(flow.request.headers.fields) + flow.request.path

    event("allowed" if flow.response is None else
          f"denied {flow.response.status_code} {flow.metadata['aigw']['error']}")
    if flow.response is None:  # forwarded: with a reservation and the provider's key
        assert flow.metadata["aigw"]["decision"] == "allowed"
        assert flow.id in gw.flights
        assert len(gw.store.ledger.reservations()) == held + 1
        sent = flow.request.headers[credential]
        assert sent == (f"Bearer {PROVIDER_KEY}" if credential == "authorization"
                        else PROVIDER_KEY)
        if gw.flights[flow.id].injected_usage:  # the gateway rewrote it: still JSON
            assert json.loads(flow.request.get_content())["stream_options"]["include_usage"]
        flow.response = tutils.tresp(status_code=400, content=b'{"error": {}}')
        gw.responseheaders(flow)
        run(gw.response(flow))
        assert flow.id not in gw.flights
    else:  # refused: in the provider's own shape, nothing reserved
        assert flow.metadata["aigw"]["decision"] == "denied"
        assert flow.response.status_code in DENIAL_STATUSES, flow.response.content
        assert SHAPES[provider](json.loads(flow.response.content)), flow.response.content
    assert len(gw.store.ledger.reservations()) == held
