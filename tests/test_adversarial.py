"""Issue 10, tried as an attacker and as an unlucky operator would, on a real mitmdump: every
request to an AI host is decided, no provider key leaks, no input or fault opens or crashes the
gateway. Each test names the issue's point it reproduces.

Gateways: `gateway` (module-scoped, the point 2/3/4/7/8 tests) has openai, anthropic, gemini and a
Groq-like provider on exact host names; `options_gateway` adds the new options (`plain_http`,
`max_request_body_bytes`, a `*.` wildcard); the bomb, secrets, reload and store-fault tests start
their own, since they change or measure the whole process.
"""

import gzip
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from store import Store
from tests.support.attack import (
    CHAT,
    RawResponse,
    brotli_bomb,
    deflate_from_gzip,
    error_kinds,
    gzip_bomb,
    h2_tunnel_request,
    http_request,
    peak_rss_bytes,
    plain_request,
    tunnel_request,
    wait_for_exit,
    zstd_bomb,
    zstd_compress,
)
from tests.support.gateway import (
    ANTHROPIC_KEY,
    GATEWAY_SCRIPT,
    GEMINI_KEY,
    OPENAI_KEY,
    PROVIDER_ENV,
    aigw,
    chat,
    settled,
    spent,
    start_gateway,
)
from tests.support.proxy import REPO_ROOT, Proxy, ProxyStartError
from tests.support.seed import seed

pytestmark = pytest.mark.e2e

GROQ_KEY = "gsk-fake-groq-provider-key"
AZURE_KEY = "fake-azure-provider-key"
SELFHOSTED_KEY = "fake-selfhosted-provider-key"
GEMINI_PATH = "/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_BODY = {"contents": [{"parts": [{"text": "hi"}]}]}
NOT_A_PROVIDER_IP = "198.51.100.7"  # TEST-NET-2: never routed; the redirect sends it to the fake

PROVIDERS = """\
providers:
  openai: {kind: openai, hosts: [api.openai.com], api_key_env: OPENAI_API_KEY}
  anthropic: {kind: anthropic, hosts: [api.anthropic.com], api_key_env: ANTHROPIC_API_KEY}
  gemini: {kind: gemini, hosts: [generativelanguage.googleapis.com], api_key_env: GEMINI_API_KEY}
"""
BASE_CONFIG = f"""\
policy:
  unknown_credentials: block
  default_failure_mode: fail_closed
{PROVIDERS}"""
MAIN_CONFIG = (BASE_CONFIG
               + "  groq: {kind: openai, hosts: [api.groq.com], api_key_env: GROQ_API_KEY}\n")
OPTIONS_CONFIG = f"""\
policy:
  max_request_body_bytes: 1000
{PROVIDERS}\
  azure: {{kind: azure_openai, hosts: ['*.openai.azure.com'], api_key_env: AZURE_OPENAI_API_KEY}}
  selfhosted:
    kind: openai
    hosts: [llm.internal.test]
    api_key_env: SELFHOSTED_API_KEY
    plain_http: true
"""
PROVIDER_HOSTS = ["api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"]
# Where the test redirect sends traffic to the fake provider: it stands for the whole network,
# so a key sent to a look-alike host is seen by the fake.
MAIN_REDIRECTS = PROVIDER_HOSTS + ["api.groq.com", "api.groq.com.evil.test",
                                   "apixgroqxcom.evil.test", NOT_A_PROVIDER_IP, "www.example.org"]
OPTIONS_REDIRECTS = PROVIDER_HOSTS + ["llm.internal.test", "*.openai.azure.com",
                                      "openai.azure.com.evil.test"]


def redirect_env(hosts: list[str]) -> dict[str, str]:
    return {"AIGW_TEST_REDIRECT_HOSTS": ",".join(hosts)}


def tail(proxy: Proxy, lines: int = 40) -> str:
    return "\n".join(proxy.log_text().splitlines()[-lines:])


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def openai_post(proxy: Proxy, key: str | None, body=CHAT,
                host: str = "api.openai.com") -> httpx.Response:
    """POST a chat completion over HTTPS through the proxy with plain httpx."""
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    return proxy.httpx_client(timeout=15).post(
        f"https://{host}/v1/chat/completions", json=body, headers=headers)


def assert_denied(resp: httpx.Response | RawResponse, status: int, kind: str | None,
                  proxy: Proxy) -> None:
    body = resp.body if isinstance(resp, RawResponse) else resp.content
    assert _status(resp) == status, (
        f"expected {status}, got {_status(resp)}: {body[:500]!r}\n{tail(proxy)}")
    if kind is not None:
        try:
            kinds = error_kinds(json.loads(body))
        except ValueError:
            kinds = set()
        assert kind in kinds, f"{kind} not in {kinds}: {body[:500]!r}"


def _status(resp: httpx.Response | RawResponse) -> int:
    return resp.status if isinstance(resp, RawResponse) else resp.status_code


def forwarded_nothing(fake, *secrets_: str) -> None:
    assert fake.requests == [], [(r.method, r.path, dict(r.headers)) for r in fake.requests]
    for secret in secrets_:
        assert not fake.saw_secret(secret)


def expect_refusal(tmp: Path, upstream: str, **kwargs) -> tuple[int | None, str]:
    """Start a gateway that must refuse to start: its exit code (None: it kept running), log."""
    try:
        proxy = start_gateway(tmp, upstream, **kwargs)
    except ProxyStartError as exc:
        return exc.returncode, exc.log
    try:
        code = wait_for_exit(proxy.process, proxy.log_path)
    finally:
        proxy.stop()
    return code, proxy.log_text()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, fake_provider_server):
    """The shared gateway (overrides conftest's, so `account` seeds into it)."""
    proxy = start_gateway(
        tmp_path_factory.mktemp("adv"), fake_provider_server.address, config_text=MAIN_CONFIG,
        env={"GROQ_API_KEY": GROQ_KEY, **redirect_env(MAIN_REDIRECTS)})
    proxy.store = Store(proxy.store_dir)
    try:
        yield proxy
    finally:
        proxy.stop()
        proxy.store.close()


@pytest.fixture(scope="module")
def options_gateway(tmp_path_factory, fake_provider_server):
    """A gateway with the new options: plain_http, max_request_body_bytes, a `*.` wildcard."""
    tmp = tmp_path_factory.mktemp("adv-options")
    with Store(tmp / "store") as store:
        acct = seed(store, suffix="opt1")
    proxy = start_gateway(
        tmp, fake_provider_server.address, config_text=OPTIONS_CONFIG,
        env={"AZURE_OPENAI_API_KEY": AZURE_KEY, "SELFHOSTED_API_KEY": SELFHOSTED_KEY,
             **redirect_env(OPTIONS_REDIRECTS)})
    proxy.acct = acct
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def bomb(tmp_path_factory) -> bytes:
    """1 GiB of zeros, gzip-encoded (about 1 MiB): built once per session."""
    return gzip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.gz")


@pytest.fixture(scope="session")
def bombs(bomb) -> dict[str, tuple[str, bytes]]:
    """Content-Encoding and body of 1 GiB bombs in every encoding mitmproxy decodes, and as a
    later member (gzip) or frame (zstd) behind a small JSON-looking first one: a decoder that
    stops after the first member would see a small body, while the provider decodes all."""
    prefix = json.dumps(CHAT).encode()[:-1] + b', "pad": "'
    zstd_1g = zstd_bomb()
    return {
        "gzip": ("gzip", bomb),
        "deflate": ("deflate", deflate_from_gzip(bomb, 1 << 30)),
        "br": ("br", brotli_bomb()),
        "zstd": ("zstd", zstd_1g),
        "gzip-members": ("gzip", gzip.compress(prefix) + bomb),
        "zstd-frames": ("zstd", zstd_compress(prefix) + zstd_1g),
    }


# --------------------------------------------------------------------------- 1. reload


def test_1_a_reload_with_a_bad_mitm_yaml_forwards_nothing_and_answers_503(tmp_path,
                                                                          fake_provider):
    # The repository's file is never touched; the copy sits apart from the store's directory
    # (mitmproxy puts a script's folder on sys.path, where a folder named `store` would shadow
    # the package).
    script = tmp_path / "entry" / "gateway.py"
    script.parent.mkdir()
    shutil.copy(GATEWAY_SCRIPT, script)
    with Store(tmp_path / "store") as store:
        acct = seed(store, suffix="reload")
    proxy = start_gateway(tmp_path, fake_provider.address, config_text=BASE_CONFIG,
                          script=script)
    try:
        assert openai_post(proxy, acct.api_key).status_code == 200
        fake_provider.reset()
        proxy.config.write_text(BASE_CONFIG.replace("unknown_credentials: block",
                                                    "unknown_credentials: maybe"))
        later = time.time() + 5  # mitmproxy reloads a script when its mtime changes
        os.utime(script, (later, later))
        deadline = time.monotonic() + 10
        while proxy.log_text().count(f"Loading script {script}") < 2:
            assert time.monotonic() < deadline, f"no reload:\n{tail(proxy)}"
            time.sleep(0.05)
        # The log says why: the file and the key.
        proxy.wait_for_log(rf"{proxy.config}.*unknown_credentials|unknown_credentials.*"
                           rf"{proxy.config}", timeout=5)

        for key in (acct.api_key, "sk-" + secrets.token_hex(20), None):
            assert_denied(openai_post(proxy, key), 503, "quota_unavailable", proxy)
        resp = proxy.httpx_client(timeout=15).post(
            "https://api.anthropic.com/v1/messages", headers={"x-api-key": acct.api_key,
                                                             "anthropic-version": "2023-06-01"},
            json={"model": "claude-sonnet-4-6", "max_tokens": 5,
                  "messages": [{"role": "user", "content": "hi"}]})
        assert_denied(resp, 503, None, proxy)
        forwarded_nothing(fake_provider, acct.api_key)
        assert proxy.is_running()

        # Fixed and reloaded again: it decides again, without a restart.
        proxy.config.write_text(BASE_CONFIG)
        later += 5
        os.utime(script, (later, later))
        deadline = time.monotonic() + 10
        while (status := openai_post(proxy, acct.api_key).status_code) != 200:
            assert status == 503, status
            assert time.monotonic() < deadline, f"not deciding again:\n{tail(proxy)}"
            time.sleep(0.2)
        assert fake_provider.last.credential == OPENAI_KEY
    finally:
        proxy.stop()


def test_1_an_invalid_mitm_yaml_at_start_ends_mitmdump_naming_file_key_and_reason(
        tmp_path, fake_provider):
    code, log = expect_refusal(tmp_path, fake_provider.address, config_text=BASE_CONFIG.replace(
        "unknown_credentials: block", "unknown_credentials: maybe"))
    assert code not in (0, None), f"mitmdump did not exit with an error ({code}):\n{log}"
    assert str(tmp_path / "mitm.yaml") in log and "unknown_credentials" in log, log
    assert "block" in log or "maybe" in log, log  # the reason: the allowed or the bad value


@pytest.mark.parametrize(("option", "value"), [
    ("ssl_insecure", "true"), ("proxy_debug", "true"), ("ignore_hosts", r"api\.openai\.com"),
    ("tcp_hosts", "openai"), ("allow_hosts", r"example\.com")])
def test_mitmproxy_options_that_undo_the_gateway_stop_mitmdump(tmp_path, fake_provider, option,
                                                               value):
    """An option under which a provider request would pass undecided (or a credential be
    logged, or sent without checking the provider's certificate) is refused at start."""
    code, log = expect_refusal(tmp_path, fake_provider.address, config_text=BASE_CONFIG,
                               sets={option: value})
    assert code not in (0, None), f"mitmdump did not exit with an error ({code}):\n{log}"
    errors = [line for line in log.splitlines() if "OptionsError: " in line]
    # The refusal is the error mitmdump ends on, not one buried in a recursion of rollbacks.
    assert errors and f"aigw: {option}" in errors[-1], log
    assert log.count("OptionsError: ") <= 2 and "nested too deeply" not in log, log


# --------------------------------------------------------------------------- 2. plain HTTP


@pytest.mark.parametrize("where", ["openai", "gemini-header", "gemini-query"])
def test_2_plain_http_to_a_provider_is_refused_and_not_forwarded(gateway, fake_provider,
                                                                 account, where):
    acct = account()
    if where == "openai":
        request = http_request("POST", "http://api.openai.com/v1/chat/completions",
                               host="api.openai.com", headers=bearer(acct.api_key), body=CHAT)
    elif where == "gemini-header":
        request = http_request(
            "POST", f"http://generativelanguage.googleapis.com{GEMINI_PATH}",
            host="generativelanguage.googleapis.com",
            headers=[("x-goog-api-key", acct.api_key)], body=GEMINI_BODY)
    else:
        request = http_request(
            "POST", f"http://generativelanguage.googleapis.com{GEMINI_PATH}?key={acct.api_key}",
            host="generativelanguage.googleapis.com", body=GEMINI_BODY)
    resp = plain_request(gateway, request)
    assert resp.status == 403, f"{resp.status} {resp.body[:300]!r}\n{tail(gateway)}"
    assert "https_required" in json.dumps(resp.json()).lower(), resp.body
    assert "https" in resp.message().lower(), resp.body
    forwarded_nothing(fake_provider, acct.api_key, OPENAI_KEY, GEMINI_KEY)


@pytest.mark.parametrize("port", [80, 443])
def test_2_plain_http_inside_a_connect_tunnel_is_refused(gateway, fake_provider, account, port):
    acct = account()
    resp = tunnel_request(gateway, connect=f"api.openai.com:{port}", sni=None, tls=False,
                          request=http_request("POST", "/v1/chat/completions",
                                               host="api.openai.com",
                                               headers=bearer(acct.api_key), body=CHAT))
    assert resp.status == 403, f"{resp.status} {resp.body[:300]!r}\n{tail(gateway)}"
    assert "https_required" in resp.error_kinds(), resp.body
    forwarded_nothing(fake_provider, acct.api_key, OPENAI_KEY)


def test_2_a_plain_http_provider_opted_in_is_forwarded_with_its_credential(options_gateway,
                                                                          fake_provider):
    key = options_gateway.acct.api_key
    resp = plain_request(options_gateway, http_request(
        "POST", "http://llm.internal.test/v1/chat/completions", host="llm.internal.test",
        headers=bearer(key), body=CHAT))
    assert resp.status == 200, f"{resp.status} {resp.body[:300]!r}\n{tail(options_gateway)}"
    assert fake_provider.last.headers["authorization"] == f"Bearer {SELFHOSTED_KEY}"
    assert not fake_provider.saw_secret(key)


# --------------------------------------------------------------------------- 3. CONNECT/SNI/Host


def test_3_connect_to_an_ip_with_a_provider_sni_and_host_is_decided(gateway, fake_provider):
    own_key = "sk-proj-" + secrets.token_hex(24)  # a developer's own key: unknown, blocked
    resp = tunnel_request(gateway, connect=f"{NOT_A_PROVIDER_IP}:443", sni="api.openai.com",
                          request=http_request("POST", "/v1/chat/completions",
                                               host="api.openai.com", headers=bearer(own_key),
                                               body=CHAT))
    assert_denied(resp, 401, "invalid_api_key", gateway)
    forwarded_nothing(fake_provider, own_key)


@pytest.mark.parametrize("connect,sni,host", [
    ("api.openai.com:443", "api.openai.com", "api.anthropic.com"),
    ("api.openai.com:443", "api.anthropic.com", "api.openai.com"),
    (f"{NOT_A_PROVIDER_IP}:443", "api.openai.com", "www.example.org"),
    ("www.example.org:443", "api.openai.com", "www.example.org"),
])
def test_3_sni_host_and_connect_target_that_disagree_get_421(gateway, fake_provider, account,
                                                             connect, sni, host):
    acct = account()
    resp = tunnel_request(gateway, connect=connect, sni=sni, request=http_request(
        "POST", "/v1/chat/completions", host=host, headers=bearer(acct.api_key), body=CHAT))
    assert_denied(resp, 421, "misdirected_request", gateway)
    forwarded_nothing(fake_provider, acct.api_key, OPENAI_KEY, ANTHROPIC_KEY)


@pytest.mark.parametrize("authority,status", [("api.anthropic.com", 421),
                                              ("www.example.org", 421),
                                              ("api.openai.com", 200)])
def test_3_http2_authority_is_checked_like_a_host_header(gateway, fake_provider, account,
                                                         authority, status):
    acct = account()
    resp = h2_tunnel_request(gateway, connect="api.openai.com:443", sni="api.openai.com",
                             authority=authority, path="/v1/chat/completions",
                             headers=[("authorization", f"Bearer {acct.api_key}"),
                                      ("content-type", "application/json")],
                             body=json.dumps(CHAT).encode())
    if status == 200:
        assert resp.status == 200, f"{resp.status} {resp.body[:300]!r}\n{tail(gateway)}"
        assert fake_provider.last.credential == OPENAI_KEY
        assert not fake_provider.saw_secret(acct.api_key)
    else:
        assert_denied(resp, status, "misdirected_request", gateway)
        forwarded_nothing(fake_provider, acct.api_key, OPENAI_KEY)


@pytest.mark.parametrize("url,host", [
    ("http://www.example.org/v1/chat/completions", "api.openai.com"),
    ("http://api.openai.com/v1/chat/completions", "www.example.org"),
])
def test_3_plain_http_naming_a_provider_anywhere_is_refused(gateway, fake_provider, account,
                                                            url, host):
    acct = account()
    resp = plain_request(gateway, http_request("POST", url, host=host,
                                               headers=bearer(acct.api_key), body=CHAT))
    assert resp.status in (403, 421), f"{resp.status} {resp.body[:300]!r}\n{tail(gateway)}"
    forwarded_nothing(fake_provider, acct.api_key, OPENAI_KEY)


@pytest.mark.parametrize("connect,sni,host", [
    ("api.openai.com:443", "api.openai.com", "API.OPENAI.COM."),
    ("api.openai.com:443", "api.openai.com", "api.openai.com:443"),
    ("API.OPENAI.COM:443", "api.openai.com", "api.openai.com"),
    ("api.openai.com.:443", "api.openai.com", "Api.OpenAI.com"),
    ("api.openai.com:443", "API.OpenAI.COM", "api.openai.com"),
])
def test_3_host_names_are_normalised_before_matching(gateway, fake_provider, account, connect,
                                                     sni, host):
    acct = account()
    resp = tunnel_request(gateway, connect=connect, sni=sni, request=http_request(
        "POST", "/v1/chat/completions", host=host, headers=bearer(acct.api_key), body=CHAT))
    assert resp.status == 200, f"{resp.status} {resp.body[:300]!r}\n{tail(gateway)}"
    assert fake_provider.last.credential == OPENAI_KEY
    assert not fake_provider.saw_secret(acct.api_key)


# --------------------------------------------------------------------------- 4. host patterns


def test_4_a_host_that_only_contains_a_provider_name_never_gets_its_key(gateway, fake_provider,
                                                                        account):
    acct = account()
    for host in ("api.groq.com.evil.test", "apixgroqxcom.evil.test"):
        try:
            # Not a provider: tunnelled to a name that does not resolve (bounded if the
            # resolver is slow here).
            gateway.httpx_client(timeout=5).post(f"https://{host}/v1/chat/completions",
                                                 json=CHAT, headers=dict(bearer(acct.api_key)))
        except httpx.HTTPError:
            pass  # tunnelled untouched to a host that does not exist: fine
        assert not fake_provider.saw_secret(GROQ_KEY), host
    # The control: the real host does get the key through the same redirect.
    assert openai_post(gateway, acct.api_key, host="api.groq.com").status_code == 200
    assert fake_provider.last.credential == GROQ_KEY


def test_4_a_wildcard_matches_exactly_one_label(options_gateway, fake_provider):
    key = options_gateway.acct.api_key
    client = options_gateway.httpx_client(timeout=15)
    path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    for host in ("a.b.openai.azure.com", "openai.azure.com.evil.test"):
        try:
            client.post(f"https://{host}{path}", json=CHAT, headers={"api-key": key},
                        timeout=5)
        except httpx.HTTPError:
            pass
        assert not fake_provider.saw_secret(AZURE_KEY), host
    resp = client.post(f"https://myres.openai.azure.com{path}", json=CHAT,
                       headers={"api-key": key})
    assert resp.status_code == 200, resp.text
    assert fake_provider.last.headers["api-key"] == AZURE_KEY


def test_4_regular_expressions_in_hosts_are_refused_at_start(tmp_path, fake_provider):
    config = BASE_CONFIG.replace("hosts: [api.openai.com]", r"hosts: ['^api\.openai\.com$']")
    code, log = expect_refusal(tmp_path, fake_provider.address, config_text=config)
    assert code not in (0, None), f"mitmdump did not exit with an error ({code}):\n{log}"
    assert "hosts" in log and str(tmp_path / "mitm.yaml") in log, log


# --------------------------------------------------------------------------- 5. gzip bomb


@pytest.fixture(scope="module")
def bomb_gateway(tmp_path_factory, fake_provider_server):
    tmp = tmp_path_factory.mktemp("adv-bomb")
    proxy = start_gateway(tmp, fake_provider_server.address, config_text=BASE_CONFIG)
    proxy.store = Store(proxy.store_dir)
    try:
        yield proxy
    finally:
        proxy.stop()
        proxy.store.close()


def send_bomb(proxy: Proxy, bomb: bytes, headers: list[tuple[str, str]],
              encoding: str = "gzip") -> RawResponse:
    return tunnel_request(proxy, connect="api.openai.com:443", sni="api.openai.com",
                          request=http_request("POST", "/v1/chat/completions",
                                               host="api.openai.com", body=bomb,
                                               headers=[("Content-Encoding", encoding),
                                                        *headers]))


@pytest.mark.parametrize("key", [None, "gw_live_" + "7" * 32, "sk-" + "8" * 40])
def test_5_a_gzip_bomb_without_a_valid_key_is_401_without_decoding(bomb_gateway, fake_provider,
                                                                   bomb, key):
    started = time.monotonic()
    resp = send_bomb(bomb_gateway, bomb, bearer(key) if key else [])
    assert_denied(resp, 401, "invalid_api_key", bomb_gateway)
    assert time.monotonic() - started < 10
    forwarded_nothing(fake_provider)
    assert peak_rss_bytes(bomb_gateway.pid) < 600 * 2**20


@pytest.mark.parametrize("variant", ["gzip", "deflate", "br", "zstd", "gzip-members",
                                     "zstd-frames"])
def test_5_a_bomb_with_a_valid_key_is_413_and_nothing_is_reserved(bomb_gateway, fake_provider,
                                                                  bombs, variant):
    acct = seed(bomb_gateway.store, suffix=f"bomb-{variant}")
    encoding, body = bombs[variant]
    started = time.monotonic()
    resp = send_bomb(bomb_gateway, body, bearer(acct.api_key), encoding)
    assert_denied(resp, 413, "request_too_large", bomb_gateway)
    assert time.monotonic() - started < 15
    forwarded_nothing(fake_provider, acct.api_key)
    assert peak_rss_bytes(bomb_gateway.pid) < 600 * 2**20
    # The gateway still answers a small request at once, and the bomb cost nothing.
    assert openai_post(bomb_gateway, acct.api_key).status_code == 200
    counter = settled(bomb_gateway.store, acct.key_id, 1)
    assert counter.requests == 1 and counter.reserved_nusd == 0
    assert counter.used_nusd == spent(bomb_gateway.store, "key", acct.key_id).used_nusd
    assert counter.used_nusd < 10_000  # nano-dollars: one small request, not a bomb's estimate


def test_5_max_request_body_bytes_bounds_a_plain_body(options_gateway, fake_provider):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    resp = openai_post(options_gateway, options_gateway.acct.api_key, body=body)
    assert_denied(resp, 413, "request_too_large", options_gateway)
    forwarded_nothing(fake_provider)


# --------------------------------------------------------------------------- 6. secrets in output


def test_6_no_secret_in_verbose_output_or_saved_flows(tmp_path, fake_provider):
    saved = tmp_path / "flows.mitm"
    with Store(tmp_path / "store") as store:
        acct = seed(store, suffix="secrets")
    proxy = start_gateway(tmp_path, fake_provider.address, config_text=BASE_CONFIG,
                          sets={"flow_detail": 4, "termlog_verbosity": "debug"},
                          args=["-w", str(saved)])
    random_key = "sk-random" + secrets.token_hex(20)
    bogus_gateway_key = "gw_live_" + "0" * 32
    gemini_secret = "AIzaSy" + secrets.token_hex(16)
    odd_key = "gw_live_" + secrets.token_hex(16)
    try:
        client = proxy.openai_client(acct.api_key)
        chat(client)
        assert "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True)
                       if c.choices)
        proxy.anthropic_client(acct.api_key).messages.create(
            model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "hi"}])
        assert proxy.genai_client(acct.api_key).models.generate_content(
            model="gemini-2.5-flash", contents="hi").text
        http = proxy.httpx_client(timeout=15)
        gemini_url = f"https://generativelanguage.googleapis.com{GEMINI_PATH}"
        assert http.post(f"{gemini_url}?key={acct.api_key}", json=GEMINI_BODY).status_code == 200
        for key in (random_key, bogus_gateway_key):
            with pytest.raises(openai.AuthenticationError):
                chat(proxy.openai_client(key))
        assert http.post(f"{gemini_url}?key={gemini_secret}", json=GEMINI_BODY).status_code == 401
        # Credentials with bytes a str cannot encode or a strip() would eat: an exception's
        # text quotes them, so they must not reach the log that way either.
        for odd in (b"\xa0", "\u00e9\u2603".encode()):
            resp = tunnel_request(proxy, connect="api.openai.com:443", sni="api.openai.com",
                                  request=http_request(
                                      "POST", "/v1/chat/completions", host="api.openai.com",
                                      body=CHAT, headers=[("Authorization", b"Bearer "
                                                           + odd_key.encode() + odd)]))
            assert resp.status in (400, 401), resp
        assert len(fake_provider.requests) == 5
    finally:
        proxy.stop()

    output = proxy.log_path.read_bytes()
    flows = saved.read_bytes()
    assert b"/v1/chat/completions" in output and b"/v1/chat/completions" in flows
    everything = {**PROVIDER_ENV, "gateway key": acct.api_key, "random provider key": random_key,
                  "bogus gateway key": bogus_gateway_key, "gemini ?key=": gemini_secret,
                  "key with an odd byte": odd_key}
    for name, secret in everything.items():
        assert secret.encode() not in output, f"{name} in mitmdump's output"
        assert secret.encode() not in flows, f"{name} in the -w file"

    from mitmproxy import io as mitmio

    with saved.open("rb") as f:
        read = [flow for flow in mitmio.FlowReader(f).stream() if hasattr(flow, "request")]
    allowed = [f for f in read if f.request.path == "/v1/chat/completions"
               and f.response is not None and f.response.status_code == 200]
    assert allowed, [f.request.path for f in read]
    for flow in allowed:
        assert "<redacted>" in flow.request.headers.get("authorization", ""), flow.request.headers


def test_6_no_provider_key_in_the_output_when_the_upstream_cannot_be_reached(tmp_path):
    """The credential was injected but never sent: the error flow must not hold it either."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    saved = tmp_path / "flows.mitm"
    with Store(tmp_path / "store") as store:
        acct = seed(store, suffix="dead")
    proxy = start_gateway(tmp_path, dead, config_text=BASE_CONFIG,
                          sets={"flow_detail": 4, "termlog_verbosity": "debug"},
                          args=["-w", str(saved)])
    try:
        assert openai_post(proxy, acct.api_key).status_code == 502
        resp = proxy.httpx_client(timeout=15).post(
            "https://api.anthropic.com/v1/messages", headers={"x-api-key": acct.api_key,
                                                             "anthropic-version": "2023-06-01"},
            json={"model": "claude-sonnet-4-6", "max_tokens": 5,
                  "messages": [{"role": "user", "content": "hi"}]})
        assert resp.status_code == 502
    finally:
        proxy.stop()
    output, flows = proxy.log_path.read_bytes(), saved.read_bytes()
    assert b"/v1/messages" in flows
    for name, secret in {**PROVIDER_ENV, "gateway key": acct.api_key}.items():
        assert secret.encode() not in output, f"{name} in mitmdump's output"
        assert secret.encode() not in flows, f"{name} in the -w file"


# --------------------------------------------------------------------------- 7. other headers


ALL_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini", "azure"])
def test_7_the_gateway_key_in_other_credential_headers_never_reaches_the_provider(
        request, fake_provider, kind):
    """Every header (and Gemini's ?key=) any provider kind reads a credential from holds the
    gateway key: the provider gets its own key in its own place, and nothing else."""
    if kind == "azure":
        proxy = request.getfixturevalue("options_gateway")
        key = proxy.acct.api_key
    else:
        proxy = request.getfixturevalue("gateway")
        key = request.getfixturevalue("account")().api_key
    headers = {name: key for name in ALL_CREDENTIAL_HEADERS}
    headers["authorization"] = f"Bearer {key}"
    client = proxy.httpx_client(timeout=15)
    if kind == "openai":
        resp = client.post(f"https://api.openai.com/v1/chat/completions?key={key}", json=CHAT,
                           headers=headers)
        expected = {"authorization": f"Bearer {OPENAI_KEY}"}
    elif kind == "anthropic":
        resp = client.post(f"https://api.anthropic.com/v1/messages?key={key}", headers={
            **headers, "anthropic-version": "2023-06-01"}, json={
            "model": "claude-sonnet-4-6", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]})
        expected = {"x-api-key": ANTHROPIC_KEY}
    elif kind == "gemini":
        resp = client.post(f"https://generativelanguage.googleapis.com{GEMINI_PATH}?key={key}",
                           json=GEMINI_BODY, headers=headers)
        expected = {"x-goog-api-key": GEMINI_KEY}
    else:
        resp = client.post("https://myres.openai.azure.com/openai/deployments/gpt-4o/chat/"
                           f"completions?api-version=2024-10-21&key={key}", json=CHAT,
                           headers=headers)
        expected = {"api-key": AZURE_KEY}
    assert resp.status_code == 200, f"{resp.text}\n{tail(proxy)}"
    got = fake_provider.last
    assert got.credentials == expected
    assert [v for k, v in got.header_pairs if k.lower() in ALL_CREDENTIAL_HEADERS] == list(
        expected.values())  # no second header of the same name either
    assert not fake_provider.saw_secret(key)


@pytest.mark.parametrize("where", ["openai-bearer", "anthropic-x-api-key", "gemini-query",
                                   "gemini-query-latin1"])
def test_7_a_key_followed_by_a_non_breaking_space_is_not_accepted(gateway, fake_provider,
                                                                   account, where):
    acct = account()
    key = acct.api_key.encode()
    if where == "openai-bearer":
        host, path, body = "api.openai.com", "/v1/chat/completions", CHAT
        headers = [("Authorization", b"Bearer " + key + b"\xa0")]
        kind = "invalid_api_key"
    elif where == "anthropic-x-api-key":
        host, path = "api.anthropic.com", "/v1/messages"
        body = {"model": "claude-sonnet-4-6", "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}]}
        headers = [("x-api-key", key + b"\xa0"), ("anthropic-version", "2023-06-01")]
        kind = "authentication_error"
    else:
        host, body, headers = "generativelanguage.googleapis.com", GEMINI_BODY, []
        path = f"{GEMINI_PATH}?key={acct.api_key}" + (
            "%C2%A0" if where == "gemini-query" else "%A0")
        kind = "unauthenticated"
    resp = tunnel_request(gateway, connect=f"{host}:443", sni=host, request=http_request(
        "POST", path, host=host, body=body, headers=headers))
    assert_denied(resp, 401, kind, gateway)
    forwarded_nothing(fake_provider, acct.api_key)


# --------------------------------------------------------------------------- 8. model list


@pytest.mark.parametrize("model", [["o1"], 5, {"name": "o1"}])
def test_8_a_model_that_is_not_a_string_is_400_when_the_org_restricts_models(
        gateway, fake_provider, model):
    org = aigw(gateway, "org", "create", "--name", "Restricted", "--budget", "50")
    aigw(gateway, "org", "update", org["org_id"], "--allowed-models", "gpt-4o-mini")
    user = aigw(gateway, "user", "create", "--org", org["org_id"], "--email", "r@acme.test",
                "--limit", "10")
    key = aigw(gateway, "key", "create", "--user", user["user_id"])["api_key"]
    resp = openai_post(gateway, key, body={**CHAT, "model": model})
    assert_denied(resp, 400, "invalid_model", gateway)
    forwarded_nothing(fake_provider, key)


# --------------------------------------------------------------------------- 9. store faults


def test_9_a_store_that_cannot_be_opened_fails_closed_and_recovers_without_a_restart(
        tmp_path, fake_provider):
    # chmod 000 does not stop root: the store's records file is made unreadable to LMDB
    # instead (the store exists, opening it fails).
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        acct = seed(store, suffix="fault")
    records = store_dir / "config" / "data.mdb"
    saved = tmp_path / "data.mdb.saved"
    records.rename(saved)
    records.write_bytes(b"not an LMDB file " * 600)
    proxy = start_gateway(tmp_path / "gw", fake_provider.address, store_dir=store_dir,
                          config_text=BASE_CONFIG)
    try:
        assert_denied(openai_post(proxy, acct.api_key), 503, "quota_unavailable", proxy)
        forwarded_nothing(fake_provider, acct.api_key)
        saved.replace(records)  # the operator repairs the fault
        deadline = time.monotonic() + 18
        while (status := openai_post(proxy, acct.api_key).status_code) != 200:
            assert status == 503, status
            assert time.monotonic() < deadline, f"not serving again:\n{tail(proxy)}"
            time.sleep(0.5)
        assert fake_provider.last.credential == OPENAI_KEY
        assert proxy.is_running()
    finally:
        proxy.stop()


def test_9_a_store_path_that_does_not_exist_is_refused_at_start(tmp_path, fake_provider):
    missing = tmp_path / "no-such-store"
    code, log = expect_refusal(tmp_path, fake_provider.address, store_dir=missing,
                               config_text=BASE_CONFIG, create_store=False)
    assert code not in (0, None), f"mitmdump did not exit with an error ({code}):\n{log}"
    assert str(missing) in log, log
    assert "aigw " in log, f"the log does not say how to create a store:\n{log}"
    assert not missing.exists()


def _run_aigw(config: Path, store_dir: Path, *args: str) -> dict:
    return aigw(SimpleNamespace(config=config, store_dir=store_dir), *args)


def _account_by_cli(config: Path, store_dir: Path, name: str, *org_args: str) -> tuple[str, str]:
    org = _run_aigw(config, store_dir, "org", "create", "--name", name, "--budget", "50",
                    *org_args)
    user = _run_aigw(config, store_dir, "user", "create", "--org", org["org_id"], "--email",
                     f"{name}@acme.test", "--limit", "20")
    key = _run_aigw(config, store_dir, "key", "create", "--user", user["user_id"])
    return key["key_id"], key["api_key"]


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(bytes(65536))
                f.flush()
        except OSError:
            pass
    return filler


def test_9_a_full_filesystem_under_the_ledger_takes_the_failure_mode(tmp_path, fake_provider):
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mount = tmp_path / "store"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    proxy = None
    try:
        config = tmp_path / "mitm.yaml"
        config.write_text(BASE_CONFIG)
        closed_id, closed_key = _account_by_cli(config, mount, "closed")
        _, open_key = _account_by_cli(config, mount, "open", "--failure-mode",
                                      "fail_open", "--fallback-daily-limit", "10")
        proxy = start_gateway(tmp_path, fake_provider.address, store_dir=mount,
                              config_text=BASE_CONFIG)
        for key in (closed_key, open_key):
            assert openai_post(proxy, key).status_code == 200
        filler = _fill(mount)

        statuses = []
        for _ in range(100):  # ledger writes that need no new page may still succeed
            resp = openai_post(proxy, closed_key)
            statuses.append(resp.status_code)
            if resp.status_code == 503:
                assert "quota_unavailable" in error_kinds(resp.json()), resp.text
                break
            assert resp.status_code == 200, resp.text
        assert statuses[-1] == 503, f"never refused on a full disk: {statuses}\n{tail(proxy)}"
        assert proxy.is_running(), tail(proxy)
        for _ in range(5):
            assert openai_post(proxy, open_key).status_code == 200
        assert proxy.is_running(), tail(proxy)

        before = _run_aigw(config, mount, "usage", "key", closed_id)["request_count"]
        filler.unlink()
        deadline = time.monotonic() + 15
        while True:
            status = openai_post(proxy, closed_key).status_code
            count = _run_aigw(config, mount, "usage", "key", closed_id)["request_count"]
            if status == 200 and count > before:
                break
            assert time.monotonic() < deadline, f"not metered again: {status}, {count}"
            time.sleep(0.3)
        assert proxy.is_running()
    finally:
        if proxy is not None:
            proxy.stop()
        subprocess.run(["umount", str(mount)], capture_output=True)
        if os.path.ismount(mount):
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# --------------------------------------------------------------------------- 11. scripts/run


def _stub(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


def _scripts_run_mitmdump_args(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The mitmdump command line scripts/run would exec, from a copy of the two scripts in a
    scratch root whose .venv holds stubs: no store is seeded, nothing is installed, nothing
    listens."""
    root = tmp_path / "root"
    (root / "scripts").mkdir(parents=True)
    for name in ("run", "_venv.sh"):
        shutil.copy2(REPO_ROOT / "scripts" / name, root / "scripts" / name)
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(REPO_ROOT / "constraints.txt", root / "constraints.txt")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    # pip is never run for real (it would repoint the editable install at the scratch root).
    _stub(bin_dir / "python", f'case "$*" in *"-m pip"*) exit 0;; esac\nexec "{sys.executable}" '
                              '"$@"\n')
    _stub(bin_dir / "aigw", "echo '{}'\n")
    args_file = tmp_path / "mitmdump-args"
    _stub(bin_dir / "mitmdump", f'for a in "$@"; do printf "%s\\n" "$a"; done > "{args_file}"\n')
    want = hashlib.sha256((root / "pyproject.toml").read_bytes()
                          + (root / "constraints.txt").read_bytes()).hexdigest()[:16]
    (root / ".venv" / ".aigw-installed").write_text(f"{want}-\n")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("AIGW_")}
    done = subprocess.run(["bash", str(root / "scripts" / "run")], env={**child_env, **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return args_file.read_text().splitlines()


def _listen_host(args: list[str]) -> str:
    """The listen address mitmdump gets from its arguments ("" is mitmproxy's default: all)."""
    host = ""
    for i, arg in enumerate(args):
        if arg == "--listen-host" and i + 1 < len(args):
            host = args[i + 1]
        elif arg.startswith("--listen-host="):
            host = arg.partition("=")[2]
        elif arg == "--set" and i + 1 < len(args) and args[i + 1].startswith("listen_host="):
            host = args[i + 1].partition("=")[2]
    return host


def test_11_scripts_run_listens_on_loopback_unless_told_otherwise(tmp_path):
    args = _scripts_run_mitmdump_args(tmp_path / "default", {"AIGW_PORT": "18999"})
    assert "18999" in args, args  # the stub saw the real command line
    assert _listen_host(args) == "127.0.0.1", args
    opened = _scripts_run_mitmdump_args(tmp_path / "open",
                                        {"AIGW_PORT": "18999", "AIGW_LISTEN_HOST": "0.0.0.0"})
    assert _listen_host(opened) == "0.0.0.0", opened
