"""aigw benchmark (run it as `scripts/bench`; it is not a timed test).

1. Hot path: the addon's `request` hook (auth plus budget decision and reservation) in-process,
   driven with mitmproxy's taddons/tflow, against a store of 100,000 keys: p50/p99/p99.9/max in
   microseconds. Each request is then settled through the `response` hook with a canned OpenAI
   answer, timed separately. Target: request hook p99 <= 50 us.
2. Throughput: a local upstream on 127.0.0.1, then bare mitmdump and mitmdump with the addon side
   by side; a load generator in its own process drives them in interleaved rounds (bare, addon,
   bare, addon, ...) because this machine is noisy. Prints req/s per round, the medians and the
   ratio addon/bare. Target: ratio >= 0.95. Afterwards the store's ledger must have metered every
   request the load generator sent through the addon.

Everything stays on loopback, is bounded in time and count, and cleans up its processes and
temporary directories. Exit status: 0 when every target is met, 1 when one is missed, 2 when a run
was invalid (non-200 answers, the ledger did not meter the addon's requests, a process failed).

Internal modes (used by the benchmark itself): `_upstream` (the fake provider) and `_loadgen`.
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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HOT_P99_TARGET_US = 50.0
RATIO_TARGET = 0.95
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
  openai: {kind: openai, hosts: ['^api\\.openai\\.com$'], api_key_env: %(env)s}
pricing:
  fallback: {input_per_1m: 1.0, output_per_1m: 2.0}
  models:
    gpt-4o-mini: {input_per_1m: 0.15, cached_input_per_1m: 0.075, output_per_1m: 0.6}
"""
THROUGHPUT_CONFIG = """\
store: {path: '%(store)s'}
providers:
  bench: {kind: openai, hosts: ['^127\\.0\\.0\\.1$'], api_key_env: %(env)s}
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
    rounds: int = 5


QUICK = Settings(keys=10_000, requests=2_000, warmup=200, duration=2.0, rounds=2)


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


def build_flows(keys: list[str], n: int, seed: int = 7):
    from mitmproxy import http
    from mitmproxy.test import tflow, tutils

    rng = random.Random(seed)
    body = json.dumps(CHAT_REQUEST).encode()
    answer = json.dumps(CHAT_RESPONSE).encode()
    flows, responses = [], []
    for _ in range(n):
        key = keys[rng.randrange(len(keys))]
        req = tutils.treq(
            host="api.openai.com", port=443, scheme=b"https", method=b"POST",
            path=b"/v1/chat/completions",
            headers=http.Headers(content_type="application/json",
                                 authorization=f"Bearer {key}"),
            content=body,
        )
        flows.append(tflow.tflow(req=req))
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
        gc.unfreeze()
        in_flight = len(gw.store.ledger.reservations())
        return {"request": request_ns, "settle": settle_ns, "not_allowed": not_allowed,
                "in_flight": in_flight, "keys": counts["apikeys"], "profilers": profilers,
                "profiled": profiled}
    finally:
        gw.done()


def hot_path(s: Settings, report: Report, profile: bool) -> None:
    say(f"== hot path: the request hook (auth + budget decision + reservation), "
        f"{s.keys:,} keys ==")
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
    say(format_distribution("request hook", req, len(result["request"])))
    say(format_distribution("settle (response hook)", settle, len(result["settle"])))
    ok = req["p99"] <= HOT_P99_TARGET_US
    report.failed |= not ok
    say(f"hot path p99 {req['p99']:.1f} us (target <= {HOT_P99_TARGET_US:.0f} us): "
        f"{'PASS' if ok else 'FAIL'}")
    report.lines.append(
        f"| hot path: request hook p50 / p99 ({result['keys']:,} keys) "
        f"| {req['p50']:.1f} / {req['p99']:.1f} us | p99 <= {HOT_P99_TARGET_US:.0f} us "
        f"| {'PASS' if ok else 'FAIL'} |")
    report.lines.append(
        f"| settle: response hook p50 / p99 | {settle['p50']:.1f} / {settle['p99']:.1f} us "
        f"| - | |")
    if result["profilers"]:
        for hook, profiler in zip(("request", "response"), result["profilers"], strict=True):
            print_profile(profiler, hook, result["profiled"])


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


def run_loadgen(proxy_port: int, upstream_port: int, key: str, s: Settings) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "_loadgen",
            "--proxy-port", str(proxy_port), "--upstream-port", str(upstream_port),
            "--key", key, "--concurrency", str(s.concurrency), "--duration", str(s.duration),
            "--warmup", str(s.round_warmup)]
    done = subprocess.run(argv, capture_output=True, text=True,
                          timeout=s.duration + s.round_warmup + 60, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def throughput(s: Settings, report: Report) -> None:
    say(f"== throughput: mitmdump with the addon vs bare mitmdump, {s.concurrency} keep-alive "
        f"connections, {s.duration:g} s rounds (+{s.round_warmup:g} s warm-up), "
        f"{s.rounds} rounds each, interleaved ==")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="aigw-bench-tp-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            _throughput(s, report, procs, tmp)
        finally:
            procs.stop_all()


def _throughput(s: Settings, report: Report, procs: Processes, tmp: Path) -> None:
    upstream = procs.start("upstream", [sys.executable, str(Path(__file__).resolve()),
                                        "_upstream"],
                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT, text=True)
    assert upstream.stdout is not None
    line = upstream.stdout.readline().strip()
    if not line.isdigit():
        raise RuntimeError(f"upstream did not start: {line!r}")
    up_port = int(line)

    store_path = tmp / "store"
    _org, _user, key_id = seed_throughput_store(store_path)
    config = tmp / "mitm.yaml"
    config.write_text(THROUGHPUT_CONFIG % {"store": store_path, "env": PROVIDER_ENV})
    env = {**os.environ, PROVIDER_ENV: PROVIDER_SECRET}
    bare_port, addon_port = free_port(), free_port()
    while addon_port == bare_port:
        addon_port = free_port()
    bare_log, addon_log = tmp / "bare.log", tmp / "addon.log"
    (tmp / "confdir-bare").mkdir()
    (tmp / "confdir-addon").mkdir()
    bare = start_mitmdump(procs, "bare mitmdump", bare_port, tmp / "confdir-bare", bare_log, [],
                          env)
    addon = start_mitmdump(procs, "mitmdump with the addon", addon_port, tmp / "confdir-addon",
                           addon_log,
                           ["-s", str(ROOT / "addon" / "gateway.py"),
                            "--set", f"aigw_config={config}"], env)
    wait_listening(bare_port, bare, "bare mitmdump", bare_log)
    wait_listening(addon_port, addon, "mitmdump with the addon", addon_log)
    say(f"upstream 127.0.0.1:{up_port}; bare mitmdump :{bare_port}; "
        f"mitmdump -s addon/gateway.py :{addon_port}")

    rates: dict[str, list[float]] = {"bare": [], "addon": []}
    cpu_per_request: dict[str, list[float]] = {"bare": [], "addon": []}
    sent_through_addon = 0
    errors = 0
    plan = [("bare", bare_port, bare), ("addon", addon_port, addon)] * s.rounds
    for n, (kind, port, proc) in enumerate(plan, start=1):
        # The bare proxy gets a key too, so both see the same bytes.
        key = BENCH_KEY if kind == "addon" else "sk-bench-client-fake"
        cpu_before = cpu_seconds(proc.pid)
        r = run_loadgen(port, up_port, key, s)
        cpu_after = cpu_seconds(proc.pid)
        rates[kind].append(r["rps"])
        answered = r["total_ok"] + sum(v for k, v in r["statuses"].items() if k != "200")
        cpu_note = ""
        if cpu_before is not None and cpu_after is not None and answered:
            per_request = (cpu_after - cpu_before) / answered * 1e6
            cpu_per_request[kind].append(per_request)
            cpu_note = f"  mitmdump CPU {per_request:6.0f} us/req"
        bad = r["errors"] + sum(v for k, v in r["statuses"].items() if k != "200")
        errors += bad
        if kind == "addon":
            sent_through_addon += r["total_ok"]
        note = f"{r['window_ok']:,} ok in the window, {r['total_ok']:,} ok in all"
        if kind == "addon":
            note += f", {r['gateway_headers']:,} with x-gateway-* headers"
        say(f"round {n:2d}  {kind:<5} {r['rps']:8.1f} req/s{cpu_note}   ({note})")
        if bad:
            say(f"!! round {n} ({kind}): {bad} failed requests: statuses {r['statuses']}, "
                f"exceptions {r['exceptions']}")
        if kind == "addon" and r["gateway_headers"] != r["total_ok"]:
            report.invalid = True
            say(f"!! round {n}: {r['total_ok'] - r['gateway_headers']} addon responses had no "
                f"x-gateway-* headers: they did not go through the gateway")
    procs.stop(addon)
    procs.stop(bare)
    for name, log in (("bare", bare_log), ("addon", addon_log)):
        text = log.read_text(errors="replace").strip()
        if text:
            say(f"-- {name} mitmdump log (last lines) --")
            for row in text.splitlines()[-10:]:
                say(f"   {row}")

    bare_med, addon_med = _median(rates["bare"]), _median(rates["addon"])
    ratio = addon_med / bare_med if bare_med else 0.0
    ok = ratio >= RATIO_TARGET
    report.failed |= not ok
    spread = "; ".join(f"{k} {min(v):.0f}-{max(v):.0f}" for k, v in rates.items() if v)
    say(f"median: bare {bare_med:.1f} req/s, addon {addon_med:.1f} req/s (range {spread})")
    say(f"ratio addon/bare {ratio:.3f} (target >= {RATIO_TARGET}): {'PASS' if ok else 'FAIL'}")
    cpu_bare, cpu_addon = _median(cpu_per_request["bare"]), _median(cpu_per_request["addon"])
    if cpu_bare and cpu_addon:
        say(f"mitmdump CPU per request (less noisy than req/s): bare {cpu_bare:.0f} us, "
            f"addon {cpu_addon:.0f} us: the addon adds {cpu_addon - cpu_bare:.0f} us "
            f"({cpu_addon / cpu_bare - 1:+.1%}); bare CPU / addon CPU = {cpu_bare / cpu_addon:.3f}")
    if errors:
        report.invalid = True
        say(f"!! {errors} requests failed across the rounds: the figures are not valid")

    month, metered, used_nusd, in_flight = ledger_count(store_path, key_id)
    match = metered == sent_through_addon and in_flight == 0
    say(f"ledger: key {key_id} metered {metered:,} requests in {month} "
        f"(${used_nusd / 1e9:.6f}); the load generator got {sent_through_addon:,} answers "
        f"through the addon; reservations left: {in_flight}: {'OK' if match else 'MISMATCH'}")
    if not match:
        report.invalid = True
    report.lines.append(
        f"| throughput: addon / bare, median of {s.rounds} interleaved rounds "
        f"({s.concurrency} conns) | {addon_med:.0f} / {bare_med:.0f} req/s = {ratio:.3f} "
        f"| >= {RATIO_TARGET} | {'PASS' if ok else 'FAIL'} |")
    if cpu_bare and cpu_addon:
        report.lines.append(
            f"| mitmdump CPU per request: addon / bare | {cpu_addon:.0f} / {cpu_bare:.0f} us "
            f"(+{cpu_addon - cpu_bare:.0f} us) | - | |")


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# --- internal mode: the upstream (a fake OpenAI answering chat completions) -------------------


def upstream_main() -> None:
    body = json.dumps(CHAT_RESPONSE, separators=(",", ":")).encode()
    ok = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
          b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    missing = (b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
               b"content-length: 2\r\n\r\n{}")

    class Upstream(asyncio.Protocol):
        """HTTP/1.1 keep-alive; requests carry a content-length (mitmproxy sends one here)."""

        def connection_made(self, transport) -> None:
            self.transport = transport
            self.buffer = bytearray()

        def data_received(self, data: bytes) -> None:
            self.buffer += data
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
                self.transport.write(ok if head.startswith(b"post /v1/chat/completions ")
                                     else missing)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Upstream, "127.0.0.1", 0, backlog=256)
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
    request = (f"POST http://{target}/v1/chat/completions HTTP/1.1\r\nHost: {target}\r\n"
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
    print(json.dumps(asyncio.run(loadgen(parser.parse_args(argv)))), flush=True)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark aigw: the in-process hot path and throughput through mitmdump.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 10k keys, 2k requests, 2 s rounds, 2 rounds each")
    parser.add_argument("--only", choices=("hotpath", "throughput"),
                        help="run one of the two benchmarks")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed pass, cProfile both hooks on up to 5k more "
                        "requests and print the top functions")
    parser.add_argument("--keys", type=int, help="keys in the hot path's store")
    parser.add_argument("--requests", type=int, help="timed requests on the hot path")
    parser.add_argument("--rounds", type=int, help="throughput rounds per proxy")
    parser.add_argument("--duration", type=float, help="seconds per throughput round")
    parser.add_argument("--concurrency", type=int, help="load generator connections")
    args = parser.parse_args(argv)
    s = replace(QUICK) if args.quick else Settings()
    for name in ("keys", "requests", "rounds", "duration", "concurrency"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                parser.error(f"--{name} must be positive")
            setattr(s, name, value)
    s.keys = min(s.keys, 10_000_000)
    s.requests = min(s.requests, 1_000_000)
    s.rounds = min(s.rounds, 20)
    s.duration = min(s.duration, 60.0)
    s.concurrency = min(s.concurrency, 256)
    return args, s


def main(argv: list[str]) -> int:
    if argv[:1] == ["_upstream"]:
        upstream_main()
        return 0
    if argv[:1] == ["_loadgen"]:
        loadgen_main(argv[1:])
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
    if args.only in (None, "hotpath"):
        say()
        say(load_note())
        hot_path(s, report, args.profile)
    if args.only in (None, "throughput"):
        say()
        say(load_note())
        try:
            throughput(s, report)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            report.invalid = True
            say(f"!! throughput run failed: {exc}")
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
