"""The benchmark's fixtures: requests and answers, mitm.yaml, records, a populated store, flows.
Standard library only at module level, and the project's own modules imported where they are
used, so that `hookdriver` runs these on an older tree's code as well as on this one's."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

PROVIDER_ENV = "AIGW_BENCH_OPENAI_KEY"
PROVIDER_SECRET = "sk-bench-provider-fake"
BENCH_KEY = "gw_live_" + "b" * 32

CHAT_REQUEST = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello in one word."}],
    "max_tokens": 64,
}
CHAT_RESPONSE = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 14, "completion_tokens": 2, "total_tokens": 16,
              "prompt_tokens_details": {"cached_tokens": 0}},
}

HOT_CONFIG = """\
store: {path: '%(store)s'}
providers:
  openai: {kind: openai, hosts: [api.openai.com], api_key_env: %(env)s}
pricing:
  fallback: {input_per_1m: 1.0, output_per_1m: 2.0}
  models:
    gpt-4o-mini: {input_per_1m: 0.15, cached_input_per_1m: 0.075, output_per_1m: 0.6}
"""
# The local upstream speaks plain HTTP on loopback (and TLS in the HTTPS run): plain_http.
THROUGHPUT_CONFIG = """\
store: {path: '%(store)s'}
providers:
  bench: {kind: openai, hosts: ['127.0.0.1'], plain_http: true, api_key_env: %(env)s}
pricing:
  fallback: {input_per_1m: 1.0, output_per_1m: 2.0}
  models:
    gpt-4o-mini: {input_per_1m: 0.15, cached_input_per_1m: 0.075, output_per_1m: 0.6}
"""



def org_record(org_id: str, budget: float) -> dict:
    """An org config record as the Workers gateway stores it."""
    return {"org_id": org_id, "name": org_id, "monthly_budget_usd": budget,
            "failure_mode": "fail_closed", "fallback_daily_limit": 10.0, "provider_keys": {},
            "allowed_models": None}


def user_record(user_id: str, org_id: str, limit: float) -> dict:
    """A user config record."""
    return {"user_id": user_id, "email": f"{user_id}@bench.example", "monthly_limit_usd": limit,
            "org_id": org_id, "status": "active"}


def key_record(key_id: str, user_id: str, org_id: str, limit: float | None) -> dict:
    """An `apikey:{hash}` record."""
    return {"key_id": key_id, "user_id": user_id, "org_id": org_id, "name": "bench",
            "status": "active", "monthly_limit_usd": limit, "passthrough": False}


def raw_key(i: int) -> str:
    """The raw gateway key number `i`."""
    return f"gw_live_{i:032x}"


# Rate limits set on every level of `populate(..., rated=True)`: far above what a run sends,
# so every request is admitted and the cost is the windows' own work.
BENCH_RATES = {"rpm_limit": 10**12, "tpm_limit": 10**15, "max_parallel_requests": 10**6}


def populate(store: Any, s: Any, rated: bool = False) -> list[str]:
    """`s.orgs` orgs, `s.users` users spread over them and `s.keys` keys spread over the users
    (`s`: the settings, or any object with those three), each with `BENCH_RATES` when `rated`,
    written in a few large transactions. Returns the raw keys (index = key number)."""
    rates = BENCH_RATES if rated else {}
    from store.records import apikey_key, org_config_key, user_config_key

    def dump(value: dict) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    puts: dict[str, bytes] = {}
    for o in range(s.orgs):
        puts[org_config_key(f"org_{o}")] = dump({**org_record(f"org_{o}", 1e9), **rates})
    for u in range(s.users):
        puts[user_config_key(f"user_{u}")] = dump(
            {**user_record(f"user_{u}", f"org_{u % s.orgs}", 1e8), **rates})
    store.records.write(puts)
    keys = []
    chunk = 25_000
    for start in range(0, s.keys, chunk):
        puts = {}
        for i in range(start, min(start + chunk, s.keys)):
            raw = raw_key(i)
            keys.append(raw)
            u = i % s.users
            limit = None if i % 2 else 1e6  # half the keys carry a key-level limit
            puts[apikey_key(store.hash(raw))] = dump(
                {**key_record(f"key_{i}", f"user_{u}", f"org_{u % s.orgs}", limit), **rates})
        store.records.write(puts)
    return keys



def seed_throughput_store(path: Path) -> tuple[str, str, str]:
    """A store with one org, user and key (`BENCH_KEY`): their ids."""
    from store import Store
    from store.records import apikey_key, org_config_key, user_config_key

    store = Store(path)
    try:
        store.records.write({
            org_config_key("org_bench"): json.dumps(org_record("org_bench", 1e9)).encode(),
            user_config_key("user_bench"): json.dumps(
                user_record("user_bench", "org_bench", 1e9)).encode(),
            apikey_key(store.hash(BENCH_KEY)): json.dumps(
                key_record("key_bench", "user_bench", "org_bench", None)).encode(),
        })
    finally:
        store.close()
    return "org_bench", "user_bench", "key_bench"



def build_flows(keys: list[str], n: int, seed: int = 7,
                cover: bool = False) -> tuple[list[Any], list[Any]]:
    """`n` chat requests (and their responses), each with a random one of `keys`; `cover`: the
    first `len(keys)` use each key once, in order (a warm-up that sees every key)."""
    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    rng = random.Random(seed)
    body = json.dumps(CHAT_REQUEST).encode()
    answer = json.dumps(CHAT_RESPONSE).encode()
    flows, responses = [], []
    for i in range(n):
        key = keys[i] if cover and i < len(keys) else keys[rng.randrange(len(keys))]
        req = tutils.treq(
            host="api.openai.com", port=443, scheme=b"https", method=b"POST",
            path=b"/v1/chat/completions",
            headers=http.Headers(content_type="application/json",
                                 authorization=f"Bearer {key}"),
            content=body,
        )
        flow = tflow.tflow(req=req)
        # As a CONNECT to the provider delivers it: SNI and tunnel target name the same host.
        flow.client_conn.sni = "api.openai.com"
        flow.server_conn.address = ("api.openai.com", 443)
        flows.append(flow)
        responses.append(tutils.tresp(
            status_code=200, headers=http.Headers(content_type="application/json"),
            content=answer))
    return flows, responses

