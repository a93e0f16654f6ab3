"""aigw benchmark (run it as `scripts/bench`; it is not a timed test).

1. Hot path: the addon's `request` hook (auth plus budget decision and reservation, the
   reservation always one ledger write transaction) in-process,
   driven with mitmproxy's taddons/tflow, against a store of 100,000 keys: p50/p99/p99.9/max in
   microseconds. Each request is then settled through the `response` hook with a canned OpenAI
   answer, timed separately. Target: request hook p99 <= 50 us.
2. Throughput: a local upstream on 127.0.0.1, then three bare mitmdump processes and three with
   the addon (each on a store of its own; identical processes differ by several percent here),
   each warmed up unmeasured. A load generator in its own process drives them in turn, bare and
   addon alternating, because this machine is noisy and drifts. Prints req/s per round, the
   medians and the ratio addon/bare: the median, over the addon rounds, of each one's req/s over
   the mean of the bare rounds just before and after it. Target: ratio >= 0.95. Afterwards the
   stores' ledgers must have metered every request the load generator sent through the addon.
   Then the same over HTTPS (`--only throughput-tls`): CONNECT, TLS intercepted with each
   mitmdump's CA, TLS to an upstream with a self-signed certificate made at start
   (`ssl_insecure`); handshakes during the warm-up.
3. Streams: a long OpenAI chat-completions SSE stream (N content events with `"usage": null`, then
   the usage event the client asked for with include_usage) from the same upstream through bare
   mitmdump (`--set stream_large_bodies=1`: bare mitmdump otherwise buffers the whole body) and
   mitmdump with the addon, in interleaved rounds: time to first body byte and total time, as the
   client sees them. Targets: throughput (bytes/s) addon/bare >= 0.95 and < 1 ms added to the
   median time to first byte. Then a 100 MB stream through the addon while mitmdump's RSS is
   sampled every 50 ms: target a peak increase < 50 MB (flat: a buffering proxy grows by 100+ MB).
   The ledger must hold every stream's usage event, to the token.
4. Sync: the fake Cloudflare KV API (tests/support/fake_kv.py, in its own process) serving a
   100,000-key namespace in the Workers gateway layout, nine records in ten version-stamped as aigw
   writes them: a full pass into a fresh store, then an incremental pass after 1% of the stamped
   records changed: requests, seconds, keys fetched (no target: figures to report).

5. Ledger durability (`--only ledger`): the request path's two ledger writes (reserve, then
   settle with its log entry) as one pair, on the store's own ledger settings (no writable map,
   each commit syncs its data: what LMDB documents as keeping the database intact on an OS
   crash) and on the settings before them (writable map, no sync: SIGBUS on a full disk, and LMDB
   says an OS crash can corrupt it), plus no sync without a writable map (intact on an OS crash
   only on a filesystem that keeps write order), in interleaved rounds on one machine: per-pair
   p50/p99 and the ratios to the old settings (no target: the figures to report).

Everything stays on loopback, is bounded in time and count, and cleans up its processes and
temporary directories. Exit status: 0 when every target is met, 1 when one is missed, 2 when a run
was invalid (non-200 answers, the ledger did not meter the addon's requests, a process failed).

Internal modes (used by the benchmark itself): `_upstream` (the fake provider), `_loadgen`,
`_streamclient` and `_fakekv`.
Only the standard library is imported at module level, so those processes start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOT_P99_TARGET_US = 50.0
RATIO_TARGET = 0.95
STREAM_RATIO_TARGET = 0.95
TTFB_ADDED_TARGET_MS = 1.0
RSS_GROWTH_LIMIT_MB = 50.0
BIG_STREAM_CUT = 16_384  # the 100 MB stream comes in HTTP chunks of 16 KiB, events split anywhere
SYNC_ORGS, SYNC_USERS = 100, 1_000
SYNC_CHANGED = 0.01
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


@dataclass
class Settings:
    keys: int = 100_000
    orgs: int = 100
    users: int = 1_000
    requests: int = 20_000
    warmup: int = 1_000
    concurrency: int = 16
    duration: float = 5.0
    round_warmup: float = 0.5
    rounds: int = 3
    pairs: int = 3  # bare and addon processes each, for throughput
    floor: bool = False  # throughput: also a store-less addon doing only the wire work
    stream_events: int = 10_000
    stream_rounds: int = 5
    streams_per_round: int = 5
    stream_mb: int = 100
    sync_keys: int = 100_000
    ledger_pairs: int = 500  # reserve+settle pairs per ledger setting per round
    ledger_rounds: int = 5


QUICK = Settings(keys=10_000, requests=2_000, warmup=200, duration=2.0, rounds=2, pairs=2,
                 stream_events=2_000, stream_rounds=2, stream_mb=20, sync_keys=10_000,
                 ledger_pairs=200, ledger_rounds=3)


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)  # summary table rows
    failed: bool = False  # a target was missed
    invalid: bool = False  # the run itself went wrong


def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def distribution(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(s / 1000 for s in samples_ns)
    return {"p50": percentile(ordered, 0.50), "p90": percentile(ordered, 0.90),
            "p99": percentile(ordered, 0.99), "p99.9": percentile(ordered, 0.999),
            "max": ordered[-1], "mean": sum(ordered) / len(ordered)}


def format_distribution(name: str, d: dict[str, float], n: int) -> str:
    return (f"{name:<26} n={n:<6} p50 {d['p50']:7.1f} us   p90 {d['p90']:7.1f} us   "
            f"p99 {d['p99']:7.1f} us   p99.9 {d['p99.9']:8.1f} us   max {d['max']:9.1f} us")


def machine() -> dict[str, str]:
    import lmdb
    import mitmproxy.version

    cpu = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "lmdb": lmdb.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }


def load_note(seconds: float = 1.0) -> str:
    """How busy the CPUs were just before a section: other work on 2 cores skews every figure."""
    one = os.getloadavg()[0]

    def ticks() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    before = ticks()
    time.sleep(seconds)
    after = ticks()
    if before is None or after is None or after[0] == before[0]:
        return f"load average {one:.2f}"
    busy = 1 - (after[1] - before[1]) / (after[0] - before[0])
    flag = "  << BUSY: other processes compete for the CPUs" if busy > 0.15 else ""
    return f"CPUs {busy:.0%} busy in the second before this section, load average {one:.2f}{flag}"


# --- records ---------------------------------------------------------------------------------


def org_record(org_id: str, budget: float) -> dict:
    return {"org_id": org_id, "name": org_id, "monthly_budget_usd": budget,
            "failure_mode": "fail_closed", "fallback_daily_limit": 10.0, "provider_keys": {},
            "allowed_models": None}


def user_record(user_id: str, org_id: str, limit: float) -> dict:
    return {"user_id": user_id, "email": f"{user_id}@bench.example", "monthly_limit_usd": limit,
            "org_id": org_id, "status": "active"}


def key_record(key_id: str, user_id: str, org_id: str, limit: float | None) -> dict:
    return {"key_id": key_id, "user_id": user_id, "org_id": org_id, "name": "bench",
            "status": "active", "monthly_limit_usd": limit, "passthrough": False}


def raw_key(i: int) -> str:
    return f"gw_live_{i:032x}"


def populate(store, s: Settings) -> list[str]:
    """`s.orgs` orgs, `s.users` users spread over them and `s.keys` keys spread over the users,
    written in a few large transactions. Returns the raw keys (index = key number)."""
    from store.records import apikey_key, org_config_key, user_config_key

    def dump(value: dict) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    puts: dict[str, bytes] = {}
    for o in range(s.orgs):
        puts[org_config_key(f"org_{o}")] = dump(org_record(f"org_{o}", 1e9))
    for u in range(s.users):
        puts[user_config_key(f"user_{u}")] = dump(user_record(f"user_{u}", f"org_{u % s.orgs}",
                                                              1e8))
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
                key_record(f"key_{i}", f"user_{u}", f"org_{u % s.orgs}", limit))
        store.records.write(puts)
    return keys


# --- 1. hot path -----------------------------------------------------------------------------


def build_flows(keys: list[str], n: int, seed: int = 7, cover: bool = False):
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


async def hot_path_run(s: Settings, tmp: Path, profile: bool) -> dict:
    from mitmproxy.test import taddons

    from addon.gateway import Gateway

    config = tmp / "mitm.yaml"
    config.write_text(HOT_CONFIG % {"store": tmp / "store", "env": PROVIDER_ENV})
    os.environ[PROVIDER_ENV] = PROVIDER_SECRET
    from store import Store

    Store(tmp / "store").close()  # the gateway opens a store, and creates none
    gw = Gateway()
    tctx = taddons.context(gw)  # inside the running loop: the master uses this loop
    tctx.configure(gw, aigw_config=str(config))
    if gw.store is None:
        raise RuntimeError("the gateway did not open its store")
    try:
        t = time.perf_counter()
        keys = populate(gw.store, s)
        counts = gw.store.records.count()
        say(f"store: {counts['orgs']:,} orgs, {counts['users']:,} users, "
            f"{counts['apikeys']:,} keys, written in {time.perf_counter() - t:.1f} s")
        profiled = min(s.requests, 5_000) if profile else 0
        t = time.perf_counter()
        flows, responses = build_flows(keys, s.warmup + s.requests + profiled)
        # Then the steady state of real traffic: the same 1,000 active keys again and again.
        active = keys[:1_000]
        warm_flows, warm_responses = build_flows(active, len(active) + s.requests, seed=11,
                                                 cover=True)
        floor_flows = build_flows(active, s.requests, seed=17) if s.floor else None
        # The prebuilt flows are the harness's, not the gateway's: keep them out of the
        # collector's full passes (the hooks' own garbage is still collected as usual).
        gc.collect()
        gc.freeze()
        say(f"flows: {len(flows):,} built in {time.perf_counter() - t:.1f} s (not timed; "
            f"then gc.freeze()); {s.warmup:,} warm-up requests, then {s.requests:,} timed")

        request_ns: list[int] = []
        settle_ns: list[int] = []
        not_allowed: Counter[str] = Counter()
        profilers = None
        clock = time.perf_counter_ns
        for i, (flow, response) in enumerate(zip(flows, responses, strict=True)):
            if i == s.warmup + s.requests:  # after the timed pass: a separate profiled pass
                import cProfile

                profilers = (cProfile.Profile(), cProfile.Profile())
            if profilers:
                profilers[0].enable()
            t0 = clock()
            pending = gw.request(flow)  # a coroutine only for large bodies, as mitmproxy awaits
            if pending is not None:
                await pending
            t1 = clock()
            if profilers:
                profilers[0].disable()
            decision = flow.metadata.get("aigw", {}).get("decision")
            if flow.response is not None or decision != "allowed":
                not_allowed[f"{decision} {flow.response and flow.response.status_code}"] += 1
                gw.store.ledger.release(flow.id)
                continue
            flow.response = response
            gw.responseheaders(flow)
            if profilers:
                profilers[1].enable()
            t2 = clock()
            pending = gw.response(flow)
            if pending is not None:
                await pending
            t3 = clock()
            if profilers:
                profilers[1].disable()
            if s.warmup <= i < s.warmup + s.requests:
                request_ns.append(t1 - t0)
                settle_ns.append(t3 - t2)
        async def warm_pass(flows: list, responses: list, label: str) -> list[int]:
            timed: list[int] = []
            for i, (flow, response) in enumerate(zip(flows, responses, strict=True)):
                t0 = clock()
                pending = gw.request(flow)
                if pending is not None:
                    await pending
                t1 = clock()
                if flow.response is not None:
                    not_allowed[f"{label} {flow.response.status_code}"] += 1
                    continue
                flow.response = response
                gw.responseheaders(flow)
                pending = gw.response(flow)
                if pending is not None:
                    await pending
                if i >= len(active):  # the first requests (each active key once) warm them
                    timed.append(t1 - t0)
            return timed

        warm_ns = await warm_pass(warm_flows, warm_responses, "warm")
        floor_ns = floor_pass(*floor_flows) if floor_flows else None
        gc.unfreeze()
        in_flight = len(gw.store.ledger.reservations())
        return {"request": request_ns, "settle": settle_ns, "not_allowed": not_allowed,
                "warm": warm_ns, "floor": floor_ns,
                "in_flight": in_flight, "keys": counts["apikeys"], "profilers": profilers,
                "profiled": profiled}
    finally:
        gw.done()


def floor_pass(flows: list, responses: list) -> tuple[list[int], list[int]]:
    """The floor addon's request and response hooks on the same flows, timed alike."""
    from bench_floor_addon import Floor

    floor, clock = Floor(), time.perf_counter_ns
    request_ns, response_ns = [], []
    for flow, response in zip(flows, responses, strict=True):
        t0 = clock()
        floor.request(flow)
        t1 = clock()
        flow.response = response
        floor.responseheaders(flow)
        t2 = clock()
        floor.response(flow)
        t3 = clock()
        request_ns.append(t1 - t0)
        response_ns.append(t3 - t2)
    return request_ns, response_ns


def hot_path(s: Settings, report: Report, profile: bool) -> None:
    say(f"== hot path: the request hook (auth + budget decision + reservation: one ledger "
        f"write transaction), {s.keys:,} keys ==")
    with tempfile.TemporaryDirectory(prefix="aigw-bench-hot-") as tmp:
        result = asyncio.run(hot_path_run(s, Path(tmp), profile))
    if result["not_allowed"]:
        report.invalid = True
        say(f"!! {sum(result['not_allowed'].values())} requests were not allowed: "
            f"{dict(result['not_allowed'])}")
    if result["in_flight"]:
        report.invalid = True
        say(f"!! {result['in_flight']} reservations left in flight after settling")
    if not result["request"]:
        report.invalid = True
        say("!! no request was timed")
        return
    req, settle = distribution(result["request"]), distribution(result["settle"])
    warm = distribution(result["warm"])
    say(format_distribution("request hook", req, len(result["request"])))
    say("   (each request a random key of all: its records read and parsed from LMDB)")
    say(format_distribution("request hook, warm", warm, len(result["warm"])))
    say("   (1,000 active keys, each seen before: its records cached until the store changes)")
    say(format_distribution("settle (response hook)", settle, len(result["settle"])))
    if result["floor"]:
        floor_request, floor_response = (distribution(ns) for ns in result["floor"])
        n = len(result["floor"][0])
        say(format_distribution("floor: request hook", floor_request, n))
        say(format_distribution("floor: response hook", floor_response, n))
        say("   (scripts/bench_floor_addon.py: only the wire work, no store, on the warm keys' "
            "flows)")
    ok = req["p99"] <= HOT_P99_TARGET_US
    report.failed |= not ok
    say(f"hot path p99 {req['p99']:.1f} us (target <= {HOT_P99_TARGET_US:.0f} us): "
        f"{'PASS' if ok else 'FAIL'}")
    report.lines.append(
        f"| hot path: request hook p50 / p99 ({result['keys']:,} keys) "
        f"| {req['p50']:.1f} / {req['p99']:.1f} us | p99 <= {HOT_P99_TARGET_US:.0f} us "
        f"| {'PASS' if ok else 'FAIL'} |")
    warm_ok = warm["p99"] <= HOT_P99_TARGET_US
    report.lines.append(
        f"| hot path, warm: request hook p50 / p99 (1,000 active keys of {result['keys']:,}) "
        f"| {warm['p50']:.1f} / {warm['p99']:.1f} us | p99 <= {HOT_P99_TARGET_US:.0f} us "
        f"| {'PASS' if warm_ok else 'FAIL'} |")
    report.lines.append(
        f"| settle: response hook p50 / p99 | {settle['p50']:.1f} / {settle['p99']:.1f} us "
        f"| - | |")
    if result["floor"]:
        report.lines.append(
            f"| floor (store-less addon): request / response hook p50 / p99 "
            f"| {floor_request['p50']:.1f} / {floor_request['p99']:.1f}, "
            f"{floor_response['p50']:.1f} / {floor_response['p99']:.1f} us | - | |")
    if result["profilers"]:
        for hook, profiler in zip(("request", "response"), result["profilers"], strict=True):
            print_profile(profiler, hook, result["profiled"])


# The ledger settings compared: name -> py-lmdb open flags. The first is the store's own.
LEDGER_SETTINGS = {
    "now (no sync, no writemap)": None,  # store.db.LEDGER_SYNC
    "old (writemap, no sync)": {"sync": False, "metasync": False, "writemap": True},
    "synced (data synced per commit, MDB_NOMETASYNC)": {"sync": True, "metasync": False},
}
LEDGER_SAFE, LEDGER_OLD, LEDGER_NOSYNC = LEDGER_SETTINGS


def filesystem_of(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/mounts ("?" elsewhere)."""
    best, kind = "", "?"
    with suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def ledger_pairs(ledger, n: int, tag: str) -> list[int]:
    """`n` reserve+settle pairs as the request path does them: ns per pair."""
    from store.db import UsageRecord

    levels = (("key", f"k-{tag}"), ("user", "u"), ("org", "o"))
    record = UsageRecord(time.time(), "openai", "gpt-4o-mini", f"k-{tag}", "u", "o", "metered",
                         200, None, 1_234, False, input=14, output=2)
    clock, timed = time.perf_counter_ns, []
    for i in range(n):
        rid = f"{tag}-{i}"
        t0 = clock()
        ledger.reserve(rid, levels, "2026-11", 5_000, lambda counters: None,
                       owner={"host": "bench", "pid": 1})
        ledger.settle(rid, levels, "2026-11", 1_234, record)
        timed.append(clock() - t0)
    return timed


def ledger_bench(s: Settings, report: Report) -> None:
    from store.db import GIB, LEDGER_DBS, LEDGER_SYNC, Ledger, _Env

    with tempfile.TemporaryDirectory(prefix="aigw-bench-ledger-") as tmp:
        say(f"== ledger durability: reserve + settle pairs (the request path's two ledger "
            f"writes), {s.ledger_pairs:,} pairs x {s.ledger_rounds} interleaved rounds per "
            f"setting, on {filesystem_of(Path(tmp))} ({tmp}) ==")
        envs = {}
        try:
            for name, flags in LEDGER_SETTINGS.items():
                envs[name] = _Env(Path(tmp) / str(len(envs)), LEDGER_DBS, map_size=GIB,
                                  **(LEDGER_SYNC if flags is None else flags))
            ledgers = {name: Ledger(env) for name, env in envs.items()}
            for name, ledger in ledgers.items():  # warm-up, unmeasured
                ledger_pairs(ledger, 20, f"warm-{len(name)}")
            samples: dict[str, list[int]] = {name: [] for name in ledgers}
            medians: dict[str, list[float]] = {name: [] for name in ledgers}
            names = list(ledgers)
            for r in range(s.ledger_rounds):
                order = names[r % len(names):] + names[:r % len(names)]  # rotate the order
                for name in order:
                    timed = ledger_pairs(ledgers[name], s.ledger_pairs, f"r{r}")
                    samples[name] += timed
                    medians[name].append(_median([float(t) for t in timed]))
                line = ", ".join(f"{name.split(' (')[0]} {medians[name][-1] / 1000:.1f} us"
                                 for name in names)
                say(f"   round {r + 1}: pair medians: {line}")
        finally:
            for env in envs.values():
                env.close()
    for name in names:
        say(format_distribution(f"pair, {name}", distribution(samples[name]),
                                len(samples[name])))
    for name in (LEDGER_SAFE, LEDGER_NOSYNC):
        ratios = [new / old for new, old in zip(medians[name], medians[LEDGER_OLD], strict=True)]
        say(f"{name.split(' (')[0]} / old, per-round medians: {_median(ratios):.1f}x "
            f"(range {min(ratios):.1f}-{max(ratios):.1f}x)")
        report.lines.append(
            f"| ledger: reserve+settle pair p50, {name} / old (writemap, no sync) "
            f"| {distribution(samples[name])['p50']:.1f} / "
            f"{distribution(samples[LEDGER_OLD])['p50']:.1f} us = {_median(ratios):.1f}x "
            f"(rounds {min(ratios):.1f}-{max(ratios):.1f}x) | - | |")



def print_profile(profiler, hook: str, n: int, top: int = 25) -> None:
    """The top functions of a profiled pass, by own time and by cumulative time, with their
    share of the hook's total (cProfile inflates call-heavy code: compare shares, not times)."""
    import pstats

    stats = {  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
        where: row for where, row in pstats.Stats(profiler).stats.items()
        if "_lsprof.Profiler" not in where[2]  # the profiler's own enable/disable
    }
    total = sum(tt for _cc, _nc, tt, _ct, _callers in stats.values()) or 1e-9
    say()
    say(f"-- cProfile: the {hook} hook, {n:,} requests after the timed pass; total "
        f"{total * 1e6 / max(n, 1):.1f} us per request under the profiler --")
    for order, column in (("own time", 2), ("cumulative time", 3)):
        say(f"   top {top} by {order}:  share  us/req   calls/req  function")
        ranked = sorted(stats.items(), key=lambda kv: kv[1][column], reverse=True)
        for (file, line, name), row in ranked[:top]:
            where = f"{Path(file).name}:{line}({name})" if line else name
            say(f"   {'':>{len(order) + 10}} {row[column] / total:6.1%} "
                f"{row[column] * 1e6 / max(n, 1):7.1f}  {row[1] / max(n, 1):9.1f}  {where}")


# --- 2. throughput: processes ----------------------------------------------------------------


def pinned(cpu: int):
    """A preexec_fn that pins a child process to one CPU: the proxy under test gets a core of its
    own and the load generator and fake upstream share another, so they do not take turns with
    it (both proxies are pinned alike). None where affinity cannot be set."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if len(cpus) < 2:
        return None
    target = sorted(cpus)[cpu % len(cpus)]
    return lambda: os.sched_setaffinity(0, {target})


PROXY_CPU, LOAD_CPU = 0, 1


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, name: str, log: Path | None,
                   timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening\n{tail}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class Processes:
    """The subprocesses this run started; stopped (by pid) on exit, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # mitmdump runs its addons' `done` on SIGINT
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            with suppress(Exception):
                self.stop(proc)


def start_mitmdump(procs: Processes, name: str, port: int, confdir: Path, log: Path,
                   extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    mitmdump = Path(sys.executable).parent / "mitmdump"
    argv = [str(mitmdump), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy", *extra]
    with log.open("wb") as out:
        return procs.start(name, argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                           preexec_fn=pinned(PROXY_CPU),
                           stdin=subprocess.DEVNULL)


def seed_throughput_store(path: Path) -> tuple[str, str, str]:
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


def ledger_count(path: Path, key_id: str) -> tuple[str, int, int, int]:
    from store import Store
    from store.money import month_of, utc_now

    store = Store(path)
    try:
        month = month_of(utc_now())
        (counter,) = store.ledger.counters([("key", key_id)], month)
        return month, counter.requests, counter.used_nusd, len(store.ledger.reservations())
    finally:
        store.close()


def run_loadgen(proxy_port: int, upstream_port: int, key: str, s: Settings,
                ca: Path | None = None) -> dict:
    """`ca`: HTTPS through the proxy (CONNECT, then TLS trusting that mitmproxy CA)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "_loadgen",
            "--proxy-port", str(proxy_port), "--upstream-port", str(upstream_port),
            "--key", key, "--concurrency", str(s.concurrency), "--duration", str(s.duration),
            "--warmup", str(s.round_warmup)]
    if ca is not None:
        argv += ["--ca", str(ca)]
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pinned(LOAD_CPU),
                          timeout=s.duration + s.round_warmup + 60, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(s: Settings, report: Report, tls: bool = False) -> None:
    """`tls`: the HTTPS variant: CONNECT through the proxy, TLS intercepted with mitmproxy's CA,
    TLS from mitmproxy to an upstream with a self-signed certificate (`ssl_insecure`)."""
    what = " over HTTPS (CONNECT, TLS on both sides)" if tls else ""
    say(f"== throughput{what}: mitmdump with the addon vs bare mitmdump, {s.concurrency} "
        f"keep-alive connections, {s.duration:g} s rounds (+{s.round_warmup:g} s warm-up), "
        f"{s.rounds} rounds each, interleaved ==")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="aigw-bench-tp-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            _throughput(s, report, procs, tmp, tls)
        finally:
            procs.stop_all()


def start_upstream(procs: Processes, tls: bool = False) -> int:
    """The fake provider (`_upstream`) on an ephemeral loopback port; `tls`: HTTPS with a
    self-signed certificate for 127.0.0.1."""
    upstream = procs.start("upstream", [sys.executable, str(Path(__file__).resolve()),
                                        "_upstream", *(["--tls"] if tls else [])],
                           preexec_fn=pinned(LOAD_CPU),
                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT, text=True)
    assert upstream.stdout is not None
    line = upstream.stdout.readline().strip()
    if not line.isdigit():
        raise RuntimeError(f"upstream did not start: {line!r}")
    return int(line)


@dataclass
class Proxy:
    name: str
    kind: str  # "bare" | "floor" | "addon"
    port: int
    proc: subprocess.Popen
    log: Path
    confdir: Path
    store: Path | None  # the addon's store


def start_proxies(procs: Processes, tmp: Path, bare_extra: list[str],
                  both_extra: tuple[str, ...] | list[str] = (), pairs: int = 1,
                  floor: bool = False) -> list[tuple[Proxy, ...]]:
    """`pairs` of bare mitmdump (with `bare_extra` options) and mitmdump with the addon, all
    listening on loopback with the `both_extra` options; `floor`: a mitmdump with the floor
    addon (`bench_floor_addon.py`) between them in each group. Each addon has a store of its
    own, seeded with the bench key (several on one store would share their ledger, a different
    mode): `Proxy.store`."""
    env = {**os.environ, PROVIDER_ENV: PROVIDER_SECRET}
    started = []
    for n in range(1, pairs + 1):
        store_path = tmp / f"store{n}"
        seed_throughput_store(store_path)
        config = tmp / f"mitm{n}.yaml"
        config.write_text(THROUGHPUT_CONFIG % {"store": store_path, "env": PROVIDER_ENV})
        pair = []
        for kind, extra in (
            ("bare", [*both_extra, *bare_extra]),
            *([("floor", [*both_extra, "-s", str(ROOT / "scripts" / "bench_floor_addon.py")])]
              if floor else []),
            ("addon", [*both_extra, "-s", str(ROOT / "addon" / "gateway.py"),
                       "--set", f"aigw_config={config}"]),
        ):
            name = f"{kind}{n}" if pairs > 1 else kind
            port, log, confdir = free_port(), tmp / f"{name}.log", tmp / f"confdir-{name}"
            confdir.mkdir()
            proc = start_mitmdump(procs, f"mitmdump {name}", port, confdir, log, extra, env)
            pair.append(Proxy(name, kind, port, proc, log, confdir,
                              store_path if kind == "addon" else None))
        started.append(tuple(pair))
    for pair in started:
        for proxy in pair:
            wait_listening(proxy.port, proxy.proc, f"mitmdump {proxy.name}", proxy.log)
    return started


def show_logs(*proxies: Proxy) -> None:
    for proxy in proxies:
        text = proxy.log.read_text(errors="replace").strip()
        if text:
            say(f"-- {proxy.name} mitmdump log (last lines) --")
            for row in text.splitlines()[-10:]:
                say(f"   {row}")


def _throughput(s: Settings, report: Report, procs: Processes, tmp: Path,
                tls: bool = False) -> None:
    up_port = start_upstream(procs, tls)
    # start_mitmdump already sets connection_strategy=lazy (mitmdump refuses it twice).
    both = ["--set", "ssl_insecure=true"] if tls else []
    pairs = start_proxies(procs, tmp, [], both, pairs=s.pairs, floor=s.floor)
    proxies = [proxy for pair in pairs for proxy in pair]
    for proxy in proxies:
        if tls and not (proxy.confdir / "mitmproxy-ca-cert.pem").exists():
            raise RuntimeError(f"mitmdump {proxy.name} wrote no CA certificate in {proxy.confdir}")
    label = "https " if tls else ""
    say(f"{label}upstream 127.0.0.1:{up_port}; " + ", ".join(
        f"{p.name} :{p.port}" for p in proxies))

    # A fresh mitmdump is slower in its first seconds: one unmeasured round each first.
    warm = replace(s, duration=1.0)
    sent_through_addon = 0
    for proxy in proxies:
        r = run_loadgen(proxy.port, up_port, BENCH_KEY if proxy.kind != "bare"
                        else "sk-bench-client-fake", warm,
                        proxy.confdir / "mitmproxy-ca-cert.pem" if tls else None)
        if proxy.kind == "addon":
            sent_through_addon += r["total_ok"]

    rates: dict[str, list[float]] = {p.name: [] for p in proxies}
    cpu_per_request: dict[str, list[float]] = {"bare": [], "floor": [], "addon": []}
    sequence: list[tuple[str, float]] = []  # (kind, req/s) in the order measured
    errors = 0
    # bare, (floor,) addon, bare, (floor,) addon, ..., bare: each addon round is compared with
    # the bare rounds either side of it, so the machine's drift between rounds cancels out.
    plan = proxies * s.rounds + [proxies[0]]
    for n, proxy in enumerate(plan, start=1):
        # The bare proxy gets a key too, so both see the same bytes.
        key = BENCH_KEY if proxy.kind != "bare" else "sk-bench-client-fake"
        ca = proxy.confdir / "mitmproxy-ca-cert.pem" if tls else None
        cpu_before = cpu_seconds(proxy.proc.pid)
        r = run_loadgen(proxy.port, up_port, key, s, ca)
        cpu_after = cpu_seconds(proxy.proc.pid)
        rates[proxy.name].append(r["rps"])
        sequence.append((proxy.kind, r["rps"]))
        answered = r["total_ok"] + sum(v for k, v in r["statuses"].items() if k != "200")
        cpu_note = ""
        if cpu_before is not None and cpu_after is not None and answered:
            per_request = (cpu_after - cpu_before) / answered * 1e6
            cpu_per_request[proxy.kind].append(per_request)
            cpu_note = f"  mitmdump CPU {per_request:6.0f} us/req"
        bad = r["errors"] + sum(v for k, v in r["statuses"].items() if k != "200")
        errors += bad
        if proxy.kind == "addon":
            sent_through_addon += r["total_ok"]
        note = f"{r['window_ok']:,} ok in the window, {r['total_ok']:,} ok in all"
        if proxy.kind == "addon":
            note += f", {r['gateway_headers']:,} with x-gateway-* headers"
        say(f"{label}round {n:2d}  {proxy.name:<6} {r['rps']:8.1f} req/s{cpu_note}   ({note})")
        if bad:
            say(f"!! round {n} ({proxy.name}): {bad} failed requests: statuses {r['statuses']}, "
                f"exceptions {r['exceptions']}")
        if proxy.kind == "addon" and r["gateway_headers"] != r["total_ok"]:
            report.invalid = True
            say(f"!! round {n}: {r['total_ok'] - r['gateway_headers']} addon responses had no "
                f"x-gateway-* headers: they did not go through the gateway")
    for proxy in proxies:
        procs.stop(proxy.proc)
    show_logs(*proxies)

    by_kind = {kind: [x for p in proxies if p.kind == kind for x in rates[p.name]]
               for kind in ("bare", "addon")}
    bare_med, addon_med = _median(by_kind["bare"]), _median(by_kind["addon"])
    paired = paired_ratios(sequence)
    ratio = _median(paired)
    ok = ratio >= RATIO_TARGET
    report.failed |= not ok
    per_process = ", ".join(f"{p.name} {_median(rates[p.name]):.0f}" for p in proxies)
    say(f"{label}median req/s of each process: {per_process}")
    say(f"{label}median of all rounds: bare {bare_med:.1f} req/s, addon {addon_med:.1f} req/s "
        f"(ratio of medians {addon_med / bare_med if bare_med else 0:.3f})")
    quartiles = (f" (quartiles {percentile(sorted(paired), 0.25):.3f}-"
                 f"{percentile(sorted(paired), 0.75):.3f})" if paired else "")
    say(f"{label}ratio addon/bare, median of {len(paired)} addon rounds each over the mean of "
        f"the bare rounds either side: {ratio:.3f}{quartiles} (target >= {RATIO_TARGET}): "
        f"{'PASS' if ok else 'FAIL'}")
    cpu_bare, cpu_addon = _median(cpu_per_request["bare"]), _median(cpu_per_request["addon"])
    if cpu_bare and cpu_addon:
        say(f"{label}mitmdump CPU per request (less noisy than req/s): bare {cpu_bare:.0f} us, "
            f"addon {cpu_addon:.0f} us: the addon adds {cpu_addon - cpu_bare:.0f} us "
            f"({cpu_addon / cpu_bare - 1:+.1%}); bare CPU / addon CPU = {cpu_bare / cpu_addon:.3f}")
    cpu_floor = _median(cpu_per_request["floor"])
    if s.floor:
        floor_paired = paired_ratios(sequence, "floor")
        floor_ratio = _median(floor_paired)
        say(f"{label}floor (a store-less addon doing only the wire work): paired ratio "
            f"floor/bare {floor_ratio:.3f}; CPU per request {cpu_floor:.0f} us "
            f"({cpu_floor - cpu_bare:+.0f} us over bare); the gateway adds "
            f"{cpu_addon - cpu_floor:+.0f} us over the floor")
    if errors:
        report.invalid = True
        say(f"!! {errors} requests failed across the rounds: the figures are not valid")

    metered = used_nusd = in_flight = 0
    month = ""
    for proxy in proxies:
        if proxy.store is not None:
            month, count, used, left = ledger_count(proxy.store, "key_bench")
            metered, used_nusd, in_flight = metered + count, used_nusd + used, in_flight + left
    match = metered == sent_through_addon and in_flight == 0
    say(f"{label}ledgers: key key_bench metered {metered:,} requests in {month} "
        f"(${used_nusd / 1e9:.6f}); the load generator got {sent_through_addon:,} answers "
        f"through the addon; reservations left: {in_flight}: {'OK' if match else 'MISMATCH'}")
    if not match:
        report.invalid = True
    over = " over HTTPS" if tls else ""
    report.lines.append(
        f"| throughput{over}: addon / bare, median of paired rounds ({s.rounds} rounds of "
        f"{s.pairs} processes each, {s.concurrency} conns) | {addon_med:.0f} / {bare_med:.0f} "
        f"req/s; paired {ratio:.3f} | >= {RATIO_TARGET} | {'PASS' if ok else 'FAIL'} |")
    if cpu_bare and cpu_addon:
        report.lines.append(
            f"| mitmdump CPU per request{over}: addon / bare | {cpu_addon:.0f} / {cpu_bare:.0f} us "
            f"({cpu_addon - cpu_bare:+.0f} us) | - | |")
    if s.floor and cpu_floor:
        report.lines.append(
            f"| floor{over} (store-less addon, wire work only): paired ratio / CPU per request "
            f"| {floor_ratio:.3f} / {cpu_floor:.0f} us ({cpu_floor - cpu_bare:+.0f} us) | - | |")


def paired_ratios(sequence: list[tuple[str, float]], of: str = "addon") -> list[float]:
    """Each round of kind `of`: its rate over the mean of the nearest bare rounds before and
    after it."""
    ratios = []
    for i, (kind, rate) in enumerate(sequence):
        if kind != of:
            continue
        before = next((r for k, r in reversed(sequence[:i]) if k == "bare"), None)
        after = next((r for k, r in sequence[i + 1:] if k == "bare"), None)
        around = [r for r in (before, after) if r]
        if around:
            ratios.append(rate / (sum(around) / len(around)))
    return ratios


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# --- 3. streams ------------------------------------------------------------------------------

STREAM_PROMPT_TOKENS = 14
STREAM_WORDS = (" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog",
                ".", " Stream", "ing", " token", " by", " token", ",")
STREAM_CHUNK = {"id": "chatcmpl-bench-stream", "object": "chat.completion.chunk",
                "created": 1700000000, "model": "gpt-4o-mini-2024-07-18",
                "service_tier": "default", "system_fingerprint": "fp_bench"}
# gpt-4o-mini in THROUGHPUT_CONFIG: $0.15 and $0.60 per 1M tokens, in nano-dollars a token
STREAM_INPUT_NUSD, STREAM_OUTPUT_NUSD = 150, 600


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _sse_chunk(delta: dict, finish: str | None = None) -> bytes:
    return _sse({**STREAM_CHUNK, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}], "usage": None})


def sse_events(n: int) -> Iterator[bytes]:
    """An OpenAI chat-completions stream as the API sends it when the client asked for
    `stream_options.include_usage`: a role event, `n` content events (each with `"usage": null`),
    the finish event, the usage event (`choices: []`), then `[DONE]`."""
    yield _sse_chunk({"role": "assistant", "content": "", "refusal": None})
    words = [_sse_chunk({"content": word}) for word in STREAM_WORDS]
    for i in range(n):
        yield words[i % len(words)]
    yield _sse_chunk({}, "stop")
    yield _sse({**STREAM_CHUNK, "choices": [], "usage": {
        "prompt_tokens": STREAM_PROMPT_TOKENS, "completion_tokens": n,
        "total_tokens": STREAM_PROMPT_TOKENS + n,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0,
                                      "rejected_prediction_tokens": 0}}})
    yield b"data: [DONE]\n\n"


def sse_digest(n: int) -> tuple[int, int]:
    """(length, crc32) of the stream's body."""
    length = crc = 0
    for event in sse_events(n):
        length += len(event)
        crc = zlib.crc32(event, crc)
    return length, crc


def events_for_bytes(target: int) -> int:
    sizes = [len(_sse_chunk({"content": word})) for word in STREAM_WORDS]
    return max(1, math.ceil(target * len(sizes) / sum(sizes)))


def http_chunks(n: int, cut: int) -> Iterator[bytes]:
    """The stream in HTTP/1.1 chunked framing: one chunk an event (cut <= 0, as providers flush
    token by token), or chunks of `cut` bytes that split events anywhere."""
    if cut <= 0:
        for event in sse_events(n):
            yield b"%x\r\n" % len(event) + event + b"\r\n"
    else:
        pending = bytearray()
        for event in sse_events(n):
            pending += event
            while len(pending) >= cut:
                yield b"%x\r\n" % cut + bytes(pending[:cut]) + b"\r\n"
                del pending[:cut]
        if pending:
            yield b"%x\r\n" % len(pending) + bytes(pending) + b"\r\n"
    yield b"0\r\n\r\n"


def proc_status_mb(pid: int, field_name: str) -> float | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM) in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """VmRSS of a process every `interval` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            value = proc_status_mb(self.pid, "VmRSS")
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run_stream_client(proxy_port: int, upstream_port: int, key: str, events: int, cut: int,
                      streams: int, warmup: int, timeout: float) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "_streamclient",
            "--proxy-port", str(proxy_port), "--upstream-port", str(upstream_port),
            "--key", key, "--events", str(events), "--cut", str(cut), "--streams", str(streams),
            "--warmup", str(warmup), "--timeout", str(timeout)]
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pinned(LOAD_CPU),
                          timeout=(streams + warmup) * timeout + 30, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"stream client failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stream_ledger(path: Path, key_id: str) -> tuple[list, int, int, int]:
    """The key's usage records, its month's cost and request count, reservations left."""
    from store import Store
    from store.money import month_of, utc_now

    store = Store(path)
    try:
        entries = [e for e in store.ledger.log_entries() if e.key_id == key_id]
        (counter,) = store.ledger.counters([("key", key_id)], month_of(utc_now()))
        return entries, counter.used_nusd, counter.requests, len(store.ledger.reservations())
    finally:
        store.close()


def streams(s: Settings, report: Report) -> None:
    size = sse_digest(s.stream_events)[0]
    say(f"== streams: a chat-completions SSE stream of {s.stream_events:,} content events "
        f"({size / 1e6:.2f} MB, one event an HTTP chunk, the client asking include_usage) through "
        f"bare mitmdump and mitmdump with the addon; {s.streams_per_round} streams a round on "
        f"one keep-alive connection (after one warm-up stream), {s.stream_rounds} rounds each, "
        f"interleaved; then {s.stream_mb} MB through the addon, its RSS sampled every 50 ms ==")
    say("note: bare mitmdump buffers a whole response before sending it on (a client would see "
        "an SSE stream's first byte only at its end), so it runs with --set "
        "stream_large_bodies=1 here; the addon streams SSE itself, without that option")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="aigw-bench-stream-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            _streams(s, report, procs, tmp, size)
        finally:
            procs.stop_all()


def _streams(s: Settings, report: Report, procs: Processes, tmp: Path, size: int) -> None:
    up_port = start_upstream(procs)
    ((bare, addon),) = start_proxies(procs, tmp, ["--set", "stream_large_bodies=1"])
    store_path, key_id = addon.store, "key_bench"
    assert store_path is not None
    say(f"upstream 127.0.0.1:{up_port}; bare mitmdump --set stream_large_bodies=1 :{bare.port}; "
        f"mitmdump -s addon/gateway.py :{addon.port}")
    timeout = 60.0
    figures: dict[str, dict[str, list[float]]] = {
        kind: {"ttfb": [], "total": [], "rate": [], "cpu": [], "round_ttfb": []}
        for kind in ("bare", "addon")}
    metered: list[int] = []  # content events of each stream answered through the addon
    for n, proxy in enumerate([bare, addon] * s.stream_rounds, start=1):
        key = BENCH_KEY if proxy is addon else "sk-bench-client-fake"
        cpu_before = cpu_seconds(proxy.proc.pid)
        r = run_stream_client(proxy.port, up_port, key, s.stream_events, 0, s.streams_per_round,
                              1, timeout)
        cpu_after = cpu_seconds(proxy.proc.pid)
        if proxy is addon:
            metered += [s.stream_events] * r["answered"]
        if r["errors"]:
            report.invalid = True
            say(f"!! round {n} ({proxy.name}): {r['errors']}")
        if not r["total_s"]:
            continue
        ttfb, total = _median(r["ttfb_ms"]), _median(r["total_s"])
        rate = size / total
        f = figures[proxy.name]
        f["ttfb"] += r["ttfb_ms"]
        f["round_ttfb"].append(ttfb)
        f["total"] += r["total_s"]
        f["rate"].append(rate)
        cpu_note = ""
        if cpu_before is not None and cpu_after is not None and r["bytes"]:
            f["cpu"].append((cpu_after - cpu_before) / (r["bytes"] / 1e6) * 1e3)
            cpu_note = f"  mitmdump CPU {f['cpu'][-1]:5.0f} ms/MB"
        note = ""
        if proxy is addon:
            note = f"  ({r['gateway_headers']} of {r['answered']} with x-gateway-* headers)"
            if r["gateway_headers"] != r["answered"]:
                report.invalid = True
                say(f"!! round {n}: {r['answered'] - r['gateway_headers']} addon streams had no "
                    f"x-gateway-* headers: they did not go through the gateway")
        say(f"round {n:2d}  {proxy.name:<5} first byte p50 {ttfb:6.2f} ms   total p50 "
            f"{total * 1e3:7.1f} ms   {rate / 1e6:6.2f} MB/s{cpu_note}{note}")

    b, a = figures["bare"], figures["addon"]
    rate_bare, rate_addon = _median(b["rate"]), _median(a["rate"])
    ratio = rate_addon / rate_bare if rate_bare else 0.0
    ttfb_bare, ttfb_addon = _median(b["ttfb"]), _median(a["ttfb"])
    added = ttfb_addon - ttfb_bare
    total_bare, total_addon = _median(b["total"]), _median(a["total"])
    ratio_ok = ratio >= STREAM_RATIO_TARGET
    ttfb_ok = bool(b["ttfb"] and a["ttfb"]) and added < TTFB_ADDED_TARGET_MS
    report.failed |= not (ratio_ok and ttfb_ok)
    spread = "; ".join(f"{k} {min(v['rate']) / 1e6:.2f}-{max(v['rate']) / 1e6:.2f}"
                       for k, v in figures.items() if v["rate"])
    say(f"median: bare {rate_bare / 1e6:.2f} MB/s, addon {rate_addon / 1e6:.2f} MB/s (range "
        f"{spread}); total time p50 bare {total_bare * 1e3:.1f} ms, addon "
        f"{total_addon * 1e3:.1f} ms")
    say(f"throughput ratio addon/bare {ratio:.3f} (target >= {STREAM_RATIO_TARGET}): "
        f"{'PASS' if ratio_ok else 'FAIL'}")
    say(f"first byte p50 over {len(b['ttfb'])} + {len(a['ttfb'])} streams: bare "
        f"{ttfb_bare:.2f} ms, addon {ttfb_addon:.2f} ms: {added:+.2f} ms "
        f"(target < {TTFB_ADDED_TARGET_MS:g} ms added): {'PASS' if ttfb_ok else 'FAIL'}")
    if b["round_ttfb"] and a["round_ttfb"]:
        noise = max(max(v) - min(v) for v in (b["round_ttfb"], a["round_ttfb"]))
        say(f"   (per-round first-byte p50: bare {min(b['round_ttfb']):.2f}-"
            f"{max(b['round_ttfb']):.2f} ms, addon {min(a['round_ttfb']):.2f}-"
            f"{max(a['round_ttfb']):.2f} ms: rounds of one proxy differ by up to {noise:.2f} ms "
            f"here, so read a difference below that as noise)")
    cpu_bare, cpu_addon = _median(b["cpu"]), _median(a["cpu"])
    if cpu_bare and cpu_addon:
        say(f"mitmdump CPU per MB streamed (less noisy than MB/s): bare {cpu_bare:.0f} ms, addon "
            f"{cpu_addon:.0f} ms ({cpu_addon / cpu_bare - 1:+.1%}); "
            f"bare CPU / addon CPU = {cpu_bare / cpu_addon:.3f}")

    # The 100 MB stream: mitmdump's resident memory must stay flat.
    big_events = events_for_bytes(s.stream_mb * 1_000_000)
    big_size = sse_digest(big_events)[0]
    pid = addon.proc.pid
    time.sleep(0.5)
    before = proc_status_mb(pid, "VmRSS")
    hwm_before = proc_status_mb(pid, "VmHWM")
    with RssSampler(pid) as sampler:
        r = run_stream_client(addon.port, up_port, BENCH_KEY, big_events, BIG_STREAM_CUT, 1, 0,
                              600.0)
    after = proc_status_mb(pid, "VmRSS")
    hwm_after = proc_status_mb(pid, "VmHWM")
    metered += [big_events] * r["answered"]
    big_ok = False
    growth = 0.0
    if r["errors"] or not r["total_s"]:
        report.invalid = True
        say(f"!! {s.stream_mb} MB stream: {r['errors'] or 'not completed'}")
    elif before is None or not sampler.samples:
        report.invalid = True
        say(f"!! could not read /proc/{pid}/status: no RSS figures")
    else:
        peak = max(sampler.samples)
        growth = peak - before
        big_ok = growth < RSS_GROWTH_LIMIT_MB
        total = r["total_s"][0]
        say(f"{big_size / 1e6:.1f} MB stream through the addon ({big_events:,} content events in "
            f"{BIG_STREAM_CUT // 1024} KiB HTTP chunks, events split anywhere): {total:.1f} s, "
            f"{big_size / total / 1e6:.1f} MB/s, first byte {r['ttfb_ms'][0]:.2f} ms")
        hwm = (f"; kernel high-water mark VmHWM {hwm_before:.1f} -> {hwm_after:.1f} MB"
               if hwm_before is not None and hwm_after is not None else "")
        say(f"mitmdump RSS: before {before:.1f} MB, peak {peak:.1f} MB over "
            f"{len(sampler.samples)} samples, after {after or 0:.1f} MB{hwm}")
        say(f"peak RSS increase {growth:+.1f} MB (target < {RSS_GROWTH_LIMIT_MB:.0f} MB; a proxy "
            f"buffering the body would grow by {big_size / 1e6:.0f}+ MB): "
            f"{'PASS' if big_ok else 'FAIL'}")
    report.failed |= not big_ok

    procs.stop(addon.proc)
    procs.stop(bare.proc)
    show_logs(bare, addon)
    entries, used_nusd, requests, in_flight = stream_ledger(store_path, key_id)
    want = Counter((n, STREAM_PROMPT_TOKENS, False) for n in metered)
    got = Counter((e.output, e.input, e.estimated) for e in entries)
    want_nusd = sum(STREAM_PROMPT_TOKENS * STREAM_INPUT_NUSD + n * STREAM_OUTPUT_NUSD
                    for n in metered)
    match = got == want and used_nusd == want_nusd and requests == len(metered) and not in_flight
    say(f"ledger: key {key_id} has {len(entries)} usage records, {requests} requests, "
        f"${used_nusd / 1e9:.6f}; the client got {len(metered)} streams through the addon "
        f"({STREAM_PROMPT_TOKENS} input + the streamed content events as output tokens each, "
        f"none estimated: ${want_nusd / 1e9:.6f}); reservations left: {in_flight}: "
        f"{'OK' if match else 'MISMATCH'}")
    if not match:
        report.invalid = True
        say(f"!! ledger (output, input, estimated) counts {dict(got)}, expected {dict(want)}")

    report.lines.append(
        f"| stream: throughput addon / bare, median of {s.stream_rounds} interleaved rounds "
        f"({s.stream_events:,} events, {size / 1e6:.1f} MB) | {rate_addon / 1e6:.2f} / "
        f"{rate_bare / 1e6:.2f} MB/s = {ratio:.3f} | >= {STREAM_RATIO_TARGET} "
        f"| {'PASS' if ratio_ok else 'FAIL'} |")
    report.lines.append(
        f"| stream: time to first byte p50 addon / bare | {ttfb_addon:.2f} / {ttfb_bare:.2f} ms "
        f"({added:+.2f} ms) | < {TTFB_ADDED_TARGET_MS:g} ms added "
        f"| {'PASS' if ttfb_ok else 'FAIL'} |")
    report.lines.append(
        f"| stream: total time p50 addon / bare | {total_addon * 1e3:.1f} / "
        f"{total_bare * 1e3:.1f} ms | - | |")
    if cpu_bare and cpu_addon:
        report.lines.append(
            f"| stream: mitmdump CPU per MB addon / bare | {cpu_addon:.0f} / {cpu_bare:.0f} ms "
            f"| - | |")
    if before is not None and sampler.samples:
        report.lines.append(
            f"| stream: mitmdump RSS on a {s.stream_mb} MB stream, before / peak | "
            f"{before:.1f} / {max(sampler.samples):.1f} MB ({growth:+.1f} MB) "
            f"| < {RSS_GROWTH_LIMIT_MB:.0f} MB increase | {'PASS' if big_ok else 'FAIL'} |")


# --- 4. sync ---------------------------------------------------------------------------------


def sync_namespace(keys: int, orgs: int, users: int) -> tuple[list[dict], dict[str, int]]:
    """A namespace in the Workers gateway layout: `orgs` org configs, `users` user configs and
    the rest `apikey:{hash}` records. Nine records in ten as aigw writes them (its version stamp
    in the KV metadata), one in ten as the Workers gateway does (no metadata; keys of its
    three-level version)."""
    from store.hashing import hash_key
    from store.records import apikey_key, org_config_key, user_config_key
    from store.replication import STAMP, stamp_of

    created = "2025-01-02T00:00:00Z"
    items: list[dict] = []

    def add(key: str, record: dict, stamped: bool) -> None:
        text = json.dumps(record, separators=(",", ":"))
        item: dict = {"key": key, "value": text}
        if stamped:
            item["metadata"] = {STAMP: stamp_of(text.encode())}
        items.append(item)

    for o in range(orgs):
        add(org_config_key(f"org_{o}"), {**org_record(f"org_{o}", 1e6), "created_at": created},
            len(items) % 10 != 0)
    for u in range(users):
        add(user_config_key(f"user_{u}"),
            {**user_record(f"user_{u}", f"org_{u % orgs}", 1e5), "created_at": created},
            len(items) % 10 != 0)
    for i in range(keys - orgs - users):
        user, org = f"user_{i % users}", f"org_{i % users % orgs}"
        key_hash = hash_key(raw_key(i))
        stamped = len(items) % 10 != 0
        if stamped:
            record = {**key_record(f"key_{i}", user, org, 100.0), "created_at": created}
        else:
            record = {"key_id": f"key_{i}", "key_hash": key_hash, "org_id": org,
                      "user": {"user_id": user, "email": f"{user}@bench.example"},
                      "name": "ci", "monthly_limit_usd": 100, "status": "active",
                      "created_at": created}
        add(apikey_key(key_hash), record, stamped)
    kinds = {"orgs": orgs, "users": users, "apikeys": keys - orgs - users,
             "stamped": sum(1 for item in items if "metadata" in item)}
    return items, kinds


class FakeKVProcess:
    """The `_fakekv` subprocess: one JSON line per command on its stdin."""

    def __init__(self, procs: Processes, keys: int, log: Path) -> None:
        with log.open("wb") as err:
            self.proc = procs.start(
                "fake KV", [sys.executable, str(Path(__file__).resolve()), "_fakekv",
                            "--keys", str(keys), "--orgs", str(SYNC_ORGS),
                            "--users", str(SYNC_USERS)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, text=True)
        self.log = log
        self.info = self._answer(120.0)

    def _answer(self, timeout: float) -> dict:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the fake KV process did not answer (exit {self.proc.poll()})"
                               f"\n{tail}")
        return json.loads(line)

    def call(self, command: str, timeout: float = 60.0) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)


def sync_bench(s: Settings, report: Report) -> None:
    say(f"== sync: a {s.sync_keys:,}-key namespace in the Workers gateway layout from the fake "
        f"Cloudflare KV API (tests/support/fake_kv.py, in its own process, on loopback): a full "
        f"pass into a fresh store, then an incremental pass after {SYNC_CHANGED:.0%} of the "
        f"stamped records changed ==")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="aigw-bench-sync-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            _sync(s, report, procs, tmp)
        finally:
            procs.stop_all()


def _sync(s: Settings, report: Report, procs: Processes, tmp: Path) -> None:
    from store import Store
    from store.replication import (
        CloudflareSettings,
        KVClient,
        Replicator,
        RequestBudget,
        SyncSettings,
        stamp_of,
    )

    fake = FakeKVProcess(procs, s.sync_keys, tmp / "fakekv.log")
    info = fake.info
    kinds = info["kinds"]
    keys = info["keys"]
    say(f"fake KV: {keys:,} keys ({kinds['orgs']:,} orgs, {kinds['users']:,} users, "
        f"{kinds['apikeys']:,} apikey records; {kinds['stamped']:,} version-stamped as aigw "
        f"writes them, {keys - kinds['stamped']:,} without a stamp as the Workers gateway "
        f"writes them), built and loaded in {info['load_s']:.1f} s")
    default_budget = SyncSettings().request_budget
    unthrottled = 1_000_000
    settings = SyncSettings(node_id="bench-node", request_budget=unthrottled)
    cf = CloudflareSettings(info["account_id"], info["namespace_id"], info["token"],
                            info["api_base"])
    budget = RequestBudget(unthrottled, settings.budget_window_s)
    store = Store(tmp / "store")
    try:
        with KVClient(cf, settings, budget=budget) as client:
            replicator = Replicator(store, client, settings)

            def timed_pass(full: bool):
                fake.call("reset")
                wall, cpu = time.perf_counter(), time.process_time()
                summary = replicator.sync_once(full=full)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                return summary, wall, cpu, fake.call("stats")

            full, full_wall, full_cpu, full_stats = timed_pass(True)
            counts = store.records.count()
            stamps = store.records.stamps()
            full_ok = (full.listed == keys and full.fetched == keys and full.changed == keys
                       and counts["orgs"] == kinds["orgs"] and counts["users"] == kinds["users"]
                       and counts["apikeys"] == kinds["apikeys"] and len(stamps) == keys
                       and sum(1 for v in stamps.values() if v) == kinds["stamped"]
                       and full.requests == full_stats["requests"])
            say(f"full pass:        {pass_line(full, full_wall, full_cpu, full_stats, keys)}")
            say(f"                  store: {counts['orgs']:,} orgs, {counts['users']:,} users, "
                f"{counts['apikeys']:,} keys, {len(stamps):,} stamps: "
                f"{'OK' if full_ok else 'MISMATCH'}")
            if not full_ok:
                report.invalid = True
                say(f"!! full pass: {full.line()}; store {counts}; fake saw "
                    f"{full_stats['requests']} requests")

            changed = fake.call(f"change {SYNC_CHANGED}")["changed"]
            inc, inc_wall, inc_cpu, inc_stats = timed_pass(False)
            stamps = store.records.stamps()
            wrong = [name for name, value in changed.items()
                     if store.records.get(name) != value.encode()
                     or stamps.get(name) != stamp_of(value.encode())]
            inc_ok = (not wrong and inc.fetched == len(changed) and inc.changed == len(changed)
                      and inc.deleted == 0 and inc.requests == inc_stats["requests"])
            say(f"{len(changed):,} stamped records changed in the fake ({len(changed) / keys:.2%} "
                f"of the keys, {len(changed) / kinds['stamped']:.1%} of the stamped ones), new "
                f"values and new stamps")
            say(f"incremental pass: {pass_line(inc, inc_wall, inc_cpu, inc_stats, keys)}")
            say(f"                  fetched {inc.fetched:,} = {inc.fetched / keys:.2%} of the "
                f"keys; every changed value and stamp in the store: "
                f"{'OK' if not wrong else f'{len(wrong)} WRONG'}")
            if not inc_ok:
                report.invalid = True
                say(f"!! incremental pass: {inc.line()}; {len(wrong)} changed records not "
                    f"replicated; fake saw {inc_stats['requests']} requests")
    finally:
        store.close()

    window = settings.budget_window_s
    spread = (full.requests - 1) // default_budget * window
    say(f"request budget: this run allowed {unthrottled:,} requests per {window:.0f} s, so "
        f"nothing was throttled; at the default {default_budget} per {window / 60:.0f} minutes "
        f"the full pass's {full.requests:,} requests "
        + (f"would be spread over >= {spread:.0f} s (the budget waits out the window)" if spread
           else "fit in one window (no wait)"))
    default_interval = SyncSettings().interval_s
    per_window = window / default_interval * inc.requests
    say(f"an incremental pass every {default_interval:.0f} s (the default interval) would "
        f"use {per_window:,.0f} requests per {window / 60:.0f} minutes against the default "
        f"budget of {default_budget}: "
        + ("within it" if per_window <= default_budget else
           f"over it: the budget would hold the passes back to one every "
           f"{window * inc.requests / default_budget:.0f} s on average"))
    report.lines.append(
        f"| sync: full pass, {keys:,} keys | {full_wall:.1f} s, {full.requests:,} requests "
        f"({keys / max(full.requests, 1):.0f} keys/request) | - | |")
    report.lines.append(
        f"| sync: incremental pass, {len(changed):,} stamped records changed | {inc_wall:.2f} s, "
        f"{inc.requests:,} requests, {inc.fetched:,} fetched ({inc.fetched / keys:.2%} of keys) "
        f"| - | |")


def pass_line(summary, wall: float, cpu: float, stats: dict, keys: int) -> str:
    ops = ", ".join(f"{n:,} {op.replace('_', ' ')}" for op, n in sorted(
        stats["ops"].items(), key=lambda kv: -kv[1]))
    return (f"listed {summary.listed:,}, fetched {summary.fetched:,}, changed "
            f"{summary.changed:,}, deleted {summary.deleted:,} in {wall:.2f} s (the pass "
            f"{summary.duration_s:.2f} s + its LMDB transaction {wall - summary.duration_s:.2f} s; "
            f"sync CPU {cpu:.2f} s); {summary.requests:,} requests ({ops}) = "
            f"{keys / max(summary.requests, 1):.0f} keys per request")



# --- internal mode: the upstream (a fake OpenAI answering chat completions) -------------------


def self_signed_context(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1 (IP SAN)."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "upstream-cert.pem", directory / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def upstream_main(argv: list[str]) -> None:
    tls = "--tls" in argv
    body = json.dumps(CHAT_RESPONSE, separators=(",", ":")).encode()
    ok = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
          b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    missing = (b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
               b"content-length: 2\r\n\r\n{}")
    sse_head = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")

    class Upstream(asyncio.Protocol):
        """HTTP/1.1 keep-alive; requests carry a content-length (mitmproxy sends one here).
        A request with `x-bench-stream: EVENTS CUT` is answered with an SSE stream
        (`http_chunks`), written as fast as the connection takes it (flow control honoured)."""

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.buffer = bytearray()
            self.writable = asyncio.Event()
            self.writable.set()
            self.closed = False
            self.streaming: asyncio.Task | None = None

        def pause_writing(self) -> None:
            self.writable.clear()

        def resume_writing(self) -> None:
            self.writable.set()

        def connection_lost(self, exc) -> None:
            self.closed = True
            self.writable.set()

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if self.streaming is None:
                self.serve()

        async def stream(self, events: int, cut: int) -> None:
            try:
                pieces = http_chunks(events, cut)
                self.transport.write(sse_head + next(pieces))  # the first event at once
                batch: list[bytes] = []
                size = 0
                for piece in pieces:
                    batch.append(piece)
                    size += len(piece)
                    if size >= 65_536:
                        self.transport.write(b"".join(batch))
                        batch.clear()
                        size = 0
                        await self.writable.wait()
                        await asyncio.sleep(0)
                        if self.closed:
                            return
                self.transport.write(b"".join(batch))
            finally:
                self.streaming = None
            if not self.closed:
                self.serve()

        def serve(self) -> None:
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buffer[:end]).lower()
                length = 0
                at = head.find(b"\r\ncontent-length:")
                if at >= 0:
                    stop = head.find(b"\r\n", at + 2)
                    length = int(head[at + 17: stop if stop >= 0 else None])
                if len(self.buffer) < end + 4 + length:
                    return
                del self.buffer[: end + 4 + length]
                at = head.find(b"\r\nx-bench-stream:")
                if at >= 0 and head.startswith(b"post /v1/chat/completions "):
                    stop = head.find(b"\r\n", at + 2)
                    events, cut = (int(v) for v in
                                   head[at + 17: stop if stop >= 0 else None].split())
                    self.streaming = asyncio.get_running_loop().create_task(
                        self.stream(events, cut))
                    return
                self.transport.write(ok if head.startswith(b"post /v1/chat/completions ")
                                     else missing)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        ctx = None
        if tls:
            with tempfile.TemporaryDirectory(prefix="aigw-bench-upstream-") as tmpdir:
                ctx = self_signed_context(Path(tmpdir))
        server = await loop.create_server(Upstream, "127.0.0.1", 0, backlog=256, ssl=ctx)
        print(server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    asyncio.run(serve())


# --- internal mode: the load generator --------------------------------------------------------


async def loadgen(args: argparse.Namespace) -> dict:
    body = json.dumps(CHAT_REQUEST).encode()
    target = f"127.0.0.1:{args.upstream_port}"
    ctx = None
    if args.ca:  # HTTPS: CONNECT, then TLS with the proxy's CA, then origin-form requests
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.set_alpn_protocols(["http/1.1"])
    url = "/v1/chat/completions" if ctx else f"http://{target}/v1/chat/completions"
    request = (f"POST {url} HTTP/1.1\r\nHost: {target}\r\n"
               f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start = start + args.warmup
    window_end = window_start + args.duration
    statuses: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    counts = {"window_ok": 0, "total_ok": 0, "gateway_headers": 0, "errors": 0}

    async def read_body(reader: asyncio.StreamReader, head: bytes) -> None:
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            await reader.readexactly(int(head[at + 17: stop if stop >= 0 else None]))
        elif b"\r\ntransfer-encoding: chunked" in head:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)  # data + CRLF, or the final CRLF
                if size == 0:
                    break
        else:
            raise ValueError("response without a length")

    async def worker() -> None:
        reader = writer = None
        while loop.time() < window_end:
            try:
                async with asyncio.timeout(10):
                    if writer is None:
                        reader, writer = await asyncio.open_connection(args.host,
                                                                       args.proxy_port)
                        if ctx is not None:
                            writer.write(f"CONNECT {target} HTTP/1.1\r\n"
                                         f"Host: {target}\r\n\r\n".encode())
                            answer = await reader.readuntil(b"\r\n\r\n")
                            if answer[9:12] != b"200":
                                raise ValueError(f"CONNECT answered {answer[:40]!r}")
                            await writer.start_tls(ctx, server_hostname="127.0.0.1")
                    writer.write(request)
                    head = (await reader.readuntil(b"\r\n\r\n")).lower()
                    status = head[9:12].decode()
                    await read_body(reader, head)
                now = loop.time()
                statuses[status] += 1
                if status == "200":
                    counts["total_ok"] += 1
                    if window_start <= now < window_end:
                        counts["window_ok"] += 1
                    if b"\r\nx-gateway-request-count:" in head:
                        counts["gateway_headers"] += 1
                if b"\r\nconnection: close" in head:
                    writer.close()
                    writer = None
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:
                counts["errors"] += 1
                exceptions[type(exc).__name__] += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.05)
        if writer is not None:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(args.concurrency))),
                           args.warmup + args.duration + 30)
    return {**counts, "rps": counts["window_ok"] / args.duration,
            "statuses": dict(statuses), "exceptions": dict(exceptions)}


def loadgen_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py _loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--ca", help="HTTPS: CONNECT, then TLS trusting this CA certificate")
    print(json.dumps(asyncio.run(loadgen(parser.parse_args(argv)))), flush=True)


# --- internal mode: the stream client --------------------------------------------------------


async def stream_client(args: argparse.Namespace) -> dict:
    """`warmup` + `streams` streams, one after the other on one keep-alive connection; for each
    measured one the time to the first body byte and to the last, from the request's write."""
    body = json.dumps({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": args.events, "stream": True, "stream_options": {"include_usage": True},
    }).encode()
    target = f"127.0.0.1:{args.upstream_port}"
    request = (f"POST http://{target}/v1/chat/completions HTTP/1.1\r\nHost: {target}\r\n"
               f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
               f"Accept: text/event-stream\r\nx-bench-stream: {args.events} {args.cut}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    want_length, want_crc = sse_digest(args.events)
    out: dict = {"ttfb_ms": [], "total_s": [], "bytes": 0, "answered": 0, "gateway_headers": 0,
                 "errors": []}
    clock = time.perf_counter
    reader, writer = await asyncio.open_connection("127.0.0.1", args.proxy_port, limit=1 << 20)
    try:
        for i in range(args.warmup + args.streams):
            try:
                async with asyncio.timeout(args.timeout):
                    t0 = clock()
                    writer.write(request)
                    head = (await reader.readuntil(b"\r\n\r\n")).lower()
                    status = head[9:12].decode()
                    if status == "200":
                        out["answered"] += 1
                    if b"\r\nx-gateway-request-count:" in head:
                        out["gateway_headers"] += 1
                    first = None
                    length = crc = 0
                    at = head.find(b"\r\ncontent-length:")
                    if b"\r\ntransfer-encoding: chunked" in head:
                        while True:
                            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                            if size == 0:
                                await reader.readuntil(b"\r\n")
                                break
                            data = await reader.readexactly(size)
                            if first is None:
                                first = clock()
                            await reader.readexactly(2)
                            length += size
                            crc = zlib.crc32(data, crc)
                    elif at >= 0:  # a buffered answer (or an error)
                        stop = head.find(b"\r\n", at + 2)
                        left = int(head[at + 17: stop if stop >= 0 else None])
                        while left:
                            data = await reader.read(min(left, 1 << 16))
                            if not data:
                                raise asyncio.IncompleteReadError(b"", left)
                            if first is None:
                                first = clock()
                            left -= len(data)
                            length += len(data)
                            crc = zlib.crc32(data, crc)
                    else:
                        raise ValueError("response without a length")
                    done = clock()
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as exc:
                out["errors"].append(f"stream {i + 1}: {type(exc).__name__} {exc}")
                break
            out["bytes"] += length
            if status != "200" or length != want_length or crc != want_crc:
                out["errors"].append(
                    f"stream {i + 1}: status {status}, {length} bytes (crc {crc:08x}); the "
                    f"upstream sent {want_length} bytes (crc {want_crc:08x})")
                if status != "200":
                    break
            elif i >= args.warmup and first is not None:
                out["ttfb_ms"].append((first - t0) * 1e3)
                out["total_s"].append(done - t0)
    finally:
        writer.close()
    return out


def stream_client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.py _streamclient")
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--cut", type=int, default=0)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    print(json.dumps(asyncio.run(stream_client(parser.parse_args(argv)))), flush=True)


# --- internal mode: the fake Cloudflare KV API ------------------------------------------------


def fakekv_main(argv: list[str]) -> None:
    """Serve the sync namespace from tests/support/fake_kv.py; print its coordinates as one JSON
    line, then answer commands on stdin, one JSON line each: `reset` (forget request counts),
    `stats`, `change FRACTION` (that share of the stamped records gets a new value and stamp)."""
    parser = argparse.ArgumentParser(prog="bench.py _fakekv")
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--orgs", type=int, default=SYNC_ORGS)
    parser.add_argument("--users", type=int, default=SYNC_USERS)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    from store.replication import STAMP, stamp_of
    from tests.support.fake_kv import FakeKV

    started = time.perf_counter()
    items, kinds = sync_namespace(args.keys, args.orgs, args.users)
    fake = FakeKV().start()
    try:
        fake.load_bulk(items)
        values = {item["key"]: item["value"] for item in items}
        stamped = [item["key"] for item in items if "metadata" in item]
        del items
        print(json.dumps({"api_base": fake.api_base, "token": fake.token,
                          "account_id": fake.account_id, "namespace_id": fake.namespace_id,
                          "keys": len(values), "kinds": kinds,
                          "load_s": time.perf_counter() - started}), flush=True)
        rng = random.Random(args.seed)
        for line in sys.stdin:
            words = line.split()
            answer: dict = {}
            if words[:1] == ["reset"]:
                fake.reset_counters()
            elif words[:1] == ["stats"]:
                answer = {"requests": fake.request_count, "ops": dict(fake.op_counts)}
            elif words[:1] == ["change"] and len(words) == 2:
                changed = {}
                for name in rng.sample(stamped, max(1, round(len(stamped) * float(words[1])))):
                    record = json.loads(values[name])
                    limit = "monthly_budget_usd" if name.startswith("org:") else "monthly_limit_usd"
                    record[limit] = (record.get(limit) or 0) + 1.0
                    record["updated_at"] = "2025-06-01T00:00:00Z"
                    text = json.dumps(record, separators=(",", ":"))
                    fake.put(name, text, {STAMP: stamp_of(text.encode())})
                    values[name] = changed[name] = text
                answer = {"changed": changed}
            else:
                answer = {"error": f"unknown command {line.strip()!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        fake.stop()


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark aigw: the in-process hot path; throughput and streams through "
        "mitmdump; a sync from the fake Cloudflare KV API.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 10k keys, 2k requests, 2 s rounds, 2 rounds of 2 "
                        "processes each, 2k-event streams, a 20 MB stream, a 10k-key sync")
    parser.add_argument("--only",
                        choices=("hotpath", "throughput", "throughput-tls", "stream", "sync",
                                 "ledger"),
                        help="run one of the benchmarks (throughput-tls: the throughput one "
                        "over HTTPS; ledger: the cost of the ledger's durable settings)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed pass, cProfile both hooks on up to 5k more "
                        "requests and print the top functions")
    parser.add_argument("--keys", type=int, help="keys in the hot path's store")
    parser.add_argument("--requests", type=int, help="timed requests on the hot path")
    parser.add_argument("--rounds", type=int, help="throughput rounds per proxy")
    parser.add_argument("--pairs", type=int,
                        help="throughput: bare and addon mitmdump processes each (default 3)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure a store-less addon doing only the wire work of a "
                        "metering gateway (scripts/bench_floor_addon.py): its hooks on the hot "
                        "path, and a mitmdump with it in the throughput rounds")
    parser.add_argument("--duration", type=float, help="seconds per throughput round")
    parser.add_argument("--concurrency", type=int, help="load generator connections")
    parser.add_argument("--stream-events", type=int, help="content events of the timed streams")
    parser.add_argument("--stream-rounds", type=int, help="stream rounds per proxy")
    parser.add_argument("--stream-mb", type=int, help="size of the memory stream in MB")
    parser.add_argument("--ledger-pairs", type=int,
                        help="ledger: reserve+settle pairs per setting per round")
    parser.add_argument("--ledger-rounds", type=int, help="ledger: interleaved rounds")
    parser.add_argument("--sync-keys", type=int,
                        help=f"keys in the sync namespace (> {SYNC_ORGS + SYNC_USERS:,})")
    args = parser.parse_args(argv)
    s = replace(QUICK) if args.quick else Settings()
    s.floor = args.floor
    for name in ("keys", "requests", "rounds", "pairs", "duration", "concurrency", "stream_events",
                 "stream_rounds", "stream_mb", "sync_keys", "ledger_pairs", "ledger_rounds"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                parser.error(f"--{name.replace('_', '-')} must be positive")
            setattr(s, name, value)
    s.keys = min(s.keys, 10_000_000)
    s.requests = min(s.requests, 1_000_000)
    s.rounds = min(s.rounds, 20)
    s.pairs = min(s.pairs, 6)
    s.duration = min(s.duration, 60.0)
    s.concurrency = min(s.concurrency, 256)
    s.stream_events = min(s.stream_events, 1_000_000)
    s.stream_rounds = min(s.stream_rounds, 20)
    s.stream_mb = min(s.stream_mb, 1_000)
    s.sync_keys = min(s.sync_keys, 1_000_000)
    s.ledger_pairs = min(s.ledger_pairs, 10_000)
    s.ledger_rounds = min(s.ledger_rounds, 20)
    if s.sync_keys <= SYNC_ORGS + SYNC_USERS:
        parser.error(f"--sync-keys must be more than {SYNC_ORGS + SYNC_USERS:,}")
    return args, s


def main(argv: list[str]) -> int:
    if argv[:1] == ["_upstream"]:
        upstream_main(argv[1:])
        return 0
    if argv[:1] == ["_loadgen"]:
        loadgen_main(argv[1:])
        return 0
    if argv[:1] == ["_streamclient"]:
        stream_client_main(argv[1:])
        return 0
    if argv[:1] == ["_fakekv"]:
        fakekv_main(argv[1:])
        return 0
    args, s = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the subprocesses.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    info = machine()
    started = time.monotonic()
    say(f"aigw bench{' --quick' if args.quick else ''}: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['os']}, Python {info['python']}, mitmproxy {info['mitmproxy']}, "
        f"lmdb {info['lmdb']}")
    report = Report()
    failures = (RuntimeError, subprocess.TimeoutExpired)
    sections = [  # --only name, what a failure is called, the run, what counts as its failure
        ("hotpath", "", lambda: hot_path(s, report, args.profile), ()),
        ("throughput", "throughput run", lambda: throughput(s, report), failures),
        ("throughput-tls", "HTTPS throughput run", lambda: throughput(s, report, tls=True),
         failures),
        ("stream", "stream run", lambda: streams(s, report), failures),
        # a failed pass (SyncError), the fake's process, ...
        ("sync", "sync run", lambda: sync_bench(s, report), (Exception,)),
        ("ledger", "ledger run", lambda: ledger_bench(s, report), (Exception,)),
    ]
    for name, what, run, caught in sections:
        if args.only not in (None, name):
            continue
        say()
        say(load_note())
        try:
            run()
        except caught as exc:
            report.invalid = True
            generic = name in ("sync", "ledger")
            detail = f"{type(exc).__name__}: {exc}" if generic else str(exc)
            say(f"!! {what} failed: {detail}")
    say()
    say(f"== summary ({time.monotonic() - started:.0f} s) ==")
    say("| measure | result | target | |")
    say("|---|---|---|---|")
    for row in report.lines:
        say(row)
    say(f"\nMachine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"mitmproxy {info['mitmproxy']}, lmdb {info['lmdb']}; "
        f"`scripts/bench{' --quick' if args.quick else ''}`, "
        f"{datetime.now(UTC).strftime('%Y-%m-%d')}.")
    if report.invalid:
        say("RESULT: INVALID RUN (see the !! lines)")
        return 2
    say(f"RESULT: {'targets missed' if report.failed else 'all targets met'}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
