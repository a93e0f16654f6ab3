"""Section `proxy`: `aigw proxy` beside mitmdump, as ratios of rounds interleaved in one run
(each round of one kind over the mean of the other kind's rounds either side; the median of
those), CPU per request from /proc (for `aigw proxy`, the supervisor's and its workers'
together). Every proxy is pinned to the same CPU, the load generator to the other.

1. `mitmdump -q -s addon/gateway.py` over the floor addon (`mitmdump -q -s
   bench_floor_addon.py`): CPU per request, target <= 1.05x.
2. `aigw proxy --workers 1` (full enforcement: budgets and rate limits on every level, the
   request log to a file) over bare `mitmdump -q`, on keep-alive connections: requests per
   second >= 1.3x, CPU per request <= 0.77x.
3. `aigw proxy --workers 2` with a new connection per request: each worker serves >= 35% of the
   requests (counted in its own request log file); CPU per request <= 1.15x that of
   `--workers 1` on the same load (ledger contention); then 30 concurrent requests against a
   budget with room for 5 admit at most 6.

Internal mode `_burst`: N requests on N connections sent together; their statuses."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from aigw_bench import ROOT
from aigw_bench.fixtures import (
    BENCH_KEY,
    BENCH_RATES,
    CHAT_REQUEST,
    PROVIDER_ENV,
    PROVIDER_SECRET,
    THROUGHPUT_CONFIG,
    key_record,
    org_record,
    user_record,
)
from aigw_bench.runner import (
    PROXY_CPU,
    Processes,
    Report,
    Settings,
    bench_command,
    bench_env,
    cpu_seconds,
    free_port,
    median,
    pinned,
    round_figures,
    run_json,
    say,
    start_mitmdump,
    start_upstream,
    wait_listening,
)
from aigw_bench.throughput import run_loadgen

GATEWAY_OVER_FLOOR_CPU = 1.05
PROXY_OVER_BARE_RPS = 1.3
PROXY_OVER_BARE_CPU = 0.77
WORKER_SHARE = 0.35
TWO_OVER_ONE_CPU = 1.15
BURST, BURST_ROOM, BURST_ADMITS = 30, 5, 6
BURST_KEY = "gw_live_" + "c" * 32
BURST_MAX_TOKENS = 10_000  # the reservation is nearly all output: 10,000 x $0.60 per 1M
BURST_DELAY_MS = 1_000  # every request of the burst in flight together
_WORKERS = re.compile(r"workers listening on \S+ \([^)]*\): (.*)")


@dataclass
class Target:
    """One proxy under test: a mitmdump, or an `aigw proxy` supervisor and its workers."""

    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    workers: dict[str, int]  # aigw proxy: worker name -> pid

    def pids(self) -> list[int]:
        return [self.proc.pid, *self.workers.values()]

    def cpu(self) -> float | None:
        values = [cpu_seconds(pid) for pid in self.pids()]
        return None if any(v is None for v in values) else sum(values)  # type: ignore[misc]


def seed(path: Path) -> None:
    """The bench key with rate limits on every level (far above the load: the windows' work
    without a refusal), and a burst key whose org has room for BURST_ROOM reservations."""
    from store import Store
    from store.records import apikey_key, org_config_key, user_config_key

    def dump(value: dict) -> bytes:
        return json.dumps(value).encode()

    reservation_usd = BURST_MAX_TOKENS * 0.6 / 1e6
    store = Store(path)
    try:
        store.records.write({
            org_config_key("org_bench"): dump({**org_record("org_bench", 1e9), **BENCH_RATES}),
            user_config_key("user_bench"): dump(
                {**user_record("user_bench", "org_bench", 1e9), **BENCH_RATES}),
            apikey_key(store.hash(BENCH_KEY)): dump(
                {**key_record("key_bench", "user_bench", "org_bench", None), **BENCH_RATES}),
            # room for 5 reservations and half of one: the input estimate fits in the half
            org_config_key("org_burst"): dump(org_record("org_burst",
                                                         (BURST_ROOM + 0.5) * reservation_usd)),
            user_config_key("user_burst"): dump(user_record("user_burst", "org_burst", 1e9)),
            apikey_key(store.hash(BURST_KEY)): dump(
                key_record("key_burst", "user_burst", "org_burst", None)),
        })
    finally:
        store.close()


def start_aigw_proxy(procs: Processes, name: str, workers: int, tmp: Path, config: Path,
                     store: Path, mode: str | None = None) -> Target:
    """`aigw proxy --workers N` (in mitmproxy mode `mode`, regular by default) on a free
    loopback port, pinned to the proxies' CPU (its workers inherit the pinning), the request
    log of each worker in its own file."""
    port, log = free_port(), tmp / f"{name}.log"
    confdir = tmp / f"confdir-{name}"
    argv = [str(Path(sys.executable).parent / "aigw"), "--config", str(config), "--store",
            str(store), "proxy", "--workers", str(workers), "--listen-port", str(port),
            "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy",
            "--set", "termlog_verbosity=error",  # as mitmdump -q
            "--set", f"aigw_request_log_file={tmp / f'{name}-requests.log'}",
            *(["--mode", mode] if mode else [])]
    with log.open("wb") as out:
        proc = procs.start(name, argv, stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT,
                           env=bench_env({PROVIDER_ENV: PROVIDER_SECRET}),
                           preexec_fn=pinned(PROXY_CPU), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (match := _WORKERS.search(log.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"aigw proxy {name} did not start:\n"
                               f"{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    wait_listening(port, proc, f"aigw proxy {name}", log)
    pids = {n: int(p) for n, p in re.findall(r"(w\d+) pid (\d+)", match.group(1))}
    return Target(name, port, proc, log, pids)


def start_mitmdump_target(procs: Processes, name: str, tmp: Path, extra: list[str]) -> Target:
    port, log, confdir = free_port(), tmp / f"{name}.log", tmp / f"confdir-{name}"
    confdir.mkdir()
    env = {**os.environ, PROVIDER_ENV: PROVIDER_SECRET}
    proc = start_mitmdump(procs, f"mitmdump {name}", port, confdir, log, extra, env)
    wait_listening(port, proc, f"mitmdump {name}", log)
    return Target(name, port, proc, log, {})


def paired(sequence: list[tuple[str, float]], of: str, base: str) -> list[float]:
    """Each round of kind `of`: its figure over the mean of the nearest `base` rounds before
    and after it."""
    ratios = []
    for i, (kind, value) in enumerate(sequence):
        if kind != of:
            continue
        before = next((v for k, v in reversed(sequence[:i]) if k == base), None)
        after = next((v for k, v in sequence[i + 1:] if k == base), None)
        around = [v for v in (before, after) if v]
        if around and value:
            ratios.append(value / (sum(around) / len(around)))
    return ratios


def request_counts(tmp: Path, name: str) -> dict[str, int]:
    """Lines in each worker's request log file (PATH.wN)."""
    counts = {}
    for path in sorted(tmp.glob(f"{name}-requests.log.w*")):
        with path.open("rb") as f:
            counts[path.name.rsplit(".", 1)[1]] = sum(1 for _ in f)
    return counts


def run(s: Settings, report: Report) -> None:
    say(f"== proxy: aigw proxy beside mitmdump, {s.concurrency} connections, {s.duration:g} s "
        f"rounds (+{s.round_warmup:g} s warm-up), {s.rounds} rounds of each kind, interleaved ==")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="aigw-bench-proxy-") as tmpdir:
        try:
            _run(s, report, procs, Path(tmpdir))
        finally:
            procs.stop_all()


def _run(s: Settings, report: Report, procs: Processes, tmp: Path) -> None:
    up_port = start_upstream(procs)
    stores = {}
    for name in ("gw", "px1", "px2"):
        stores[name] = tmp / f"store-{name}"
        seed(stores[name])
        (tmp / f"mitm-{name}.yaml").write_text(
            THROUGHPUT_CONFIG % {"store": stores[name], "env": PROVIDER_ENV})
    floor_addon = str(ROOT / "scripts" / "bench_floor_addon.py")
    targets = {
        "bare": start_mitmdump_target(procs, "bare", tmp, []),
        "floor": start_mitmdump_target(procs, "floor", tmp, ["-s", floor_addon]),
        "gw": start_mitmdump_target(procs, "gw", tmp, [
            "-s", str(ROOT / "addon" / "gateway.py"),
            "--set", f"aigw_config={tmp / 'mitm-gw.yaml'}"]),
        "px1": start_aigw_proxy(procs, "px1", 1, tmp, tmp / "mitm-px1.yaml", stores["px1"]),
        "px2": start_aigw_proxy(procs, "px2", 2, tmp, tmp / "mitm-px2.yaml", stores["px2"]),
    }
    say(f"upstream 127.0.0.1:{up_port}; " + ", ".join(
        f"{t.name} :{t.port}" + (f" (pids {t.pids()})" if t.workers else "")
        for t in targets.values()))
    # (kind, target, fresh connections): px1 serves both shapes of load
    kinds = [("bare", "bare", False), ("floor", "floor", False), ("gw", "gw", False),
             ("px1", "px1", False), ("px1-fresh", "px1", True), ("px2-fresh", "px2", True)]

    def key_of(target: str) -> str:
        return "sk-bench-client-fake" if target in ("bare", "floor") else BENCH_KEY

    warm = replace(s, duration=1.0)
    for _kind, target, fresh in kinds:  # a fresh process is slower in its first seconds
        run_loadgen(targets[target].port, up_port, key_of(target), warm, fresh=fresh)

    rps: list[tuple[str, float]] = []
    cpu: list[tuple[str, float]] = []
    failed = 0
    counts_before = request_counts(tmp, "px2")
    plan = [k for _ in range(s.rounds) for k in kinds] + [kinds[0]]
    for n, (kind, target, fresh) in enumerate(plan, start=1):
        proxy = targets[target]
        before = proxy.cpu()
        r = run_loadgen(proxy.port, up_port, key_of(target), s, fresh=fresh)
        after = proxy.cpu()
        bad, per_request = round_figures(r, before, after)
        failed += bad
        rps.append((kind, r["rps"]))
        cpu.append((kind, per_request))
        say(f"round {n:2d}  {kind:<10} {r['rps']:8.1f} req/s  CPU {per_request:6.0f} us/req"
            + (f"   !! {bad} failed: {r['statuses']} {r['exceptions']}" if bad else ""))
    counts_after = request_counts(tmp, "px2")
    served = {w: counts_after.get(w, 0) - counts_before.get(w, 0) for w in counts_after}
    for target in targets.values():
        if target.proc.poll() is not None:
            report.invalid = True
            say(f"!! {target.name} exited during the run ({target.proc.returncode})")
    if failed:
        report.invalid = True
        say(f"!! {failed} requests failed across the rounds: the figures are not valid")

    def ratio(series: list[tuple[str, float]], of: str, base: str) -> tuple[float, str]:
        values = sorted(paired(series, of, base))
        spread = (f"rounds {values[0]:.2f}-{values[-1]:.2f}" if values else "no rounds")
        return median(values), spread

    def row(what: str, value: float, spread: str, target: str, ok: bool) -> None:
        report.failed |= not ok
        verdict = "PASS" if ok else "FAIL"
        say(f"{what}: {value:.3f} ({spread}), target {target}: {verdict}")
        report.lines.append(f"| {what} | {value:.2f}x ({spread}) | {target} | {verdict} |")

    def cpu_median(kind: str) -> float:
        return median([v for k, v in cpu if k == kind])

    say(f"CPU per request (medians): bare {cpu_median('bare'):.0f} us, floor "
        f"{cpu_median('floor'):.0f} us, mitmdump+gateway {cpu_median('gw'):.0f} us, aigw proxy "
        f"--workers 1 {cpu_median('px1'):.0f} us (new connections: {cpu_median('px1-fresh'):.0f}"
        f" us), --workers 2 new connections {cpu_median('px2-fresh'):.0f} us")
    value, spread = ratio(cpu, "gw", "floor")
    row("CPU per request: mitmdump -s addon/gateway.py / floor addon", value, spread,
        f"<= {GATEWAY_OVER_FLOOR_CPU}", value <= GATEWAY_OVER_FLOOR_CPU)
    value, spread = ratio(rps, "px1", "bare")
    row("req/s: aigw proxy --workers 1 / mitmdump -q", value, spread,
        f">= {PROXY_OVER_BARE_RPS}", value >= PROXY_OVER_BARE_RPS)
    value, spread = ratio(cpu, "px1", "bare")
    row("CPU per request: aigw proxy --workers 1 / mitmdump -q", value, spread,
        f"<= {PROXY_OVER_BARE_CPU}", value <= PROXY_OVER_BARE_CPU)
    value, spread = ratio(cpu, "px2-fresh", "px1-fresh")
    row("CPU per request, new connection each: --workers 2 / --workers 1", value, spread,
        f"<= {TWO_OVER_ONE_CPU}", value <= TWO_OVER_ONE_CPU)
    total = sum(served.values())
    share = min(served.values()) / total if total and len(served) == 2 else 0.0
    shares = ", ".join(f"{w} {c:,}" for w, c in sorted(served.items()))
    ok = share >= WORKER_SHARE
    report.failed |= not ok
    say(f"--workers 2, requests each worker served (its request log): {shares}; the smaller "
        f"share {share:.1%}, target >= {WORKER_SHARE:.0%}: {'PASS' if ok else 'FAIL'}")
    report.lines.append(f"| --workers 2, new connection each: the smaller worker's share | "
                        f"{share:.1%} ({shares}) | >= {WORKER_SHARE:.0%} | "
                        f"{'PASS' if ok else 'FAIL'} |")
    burst(report, targets["px2"], up_port)


def burst(report: Report, proxy: Target, up_port: int) -> None:
    """BURST requests together through `--workers 2` against a budget with room for
    BURST_ROOM: how many were admitted."""
    r = run_json(bench_command("_burst", "--proxy-port", str(proxy.port), "--upstream-port",
                               str(up_port), "--key", BURST_KEY, "--requests", str(BURST)),
                 120, "burst")
    admitted, denied = r["statuses"].get("200", 0), r["statuses"].get("429", 0)
    ok = admitted <= BURST_ADMITS and admitted >= 1 and admitted + denied == BURST
    if admitted + denied != BURST:
        report.invalid = True
    report.failed |= not ok
    say(f"burst: {BURST} requests together through --workers 2 against a budget with room for "
        f"{BURST_ROOM}: {admitted} admitted, {denied} refused (429), statuses {r['statuses']}, "
        f"target <= {BURST_ADMITS} admitted: {'PASS' if ok else 'FAIL'}")
    report.lines.append(f"| --workers 2: {BURST} concurrent requests, budget with room for "
                        f"{BURST_ROOM} | {admitted} admitted | <= {BURST_ADMITS} | "
                        f"{'PASS' if ok else 'FAIL'} |")


# --- internal mode: the burst ---------------------------------------------------------------


async def send_burst(args: argparse.Namespace) -> dict:
    """`requests` connections opened first, then one request on each, all written at once."""
    body = json.dumps({**CHAT_REQUEST, "max_tokens": BURST_MAX_TOKENS}).encode()
    target = f"127.0.0.1:{args.upstream_port}"
    request = (f"POST http://{target}/v1/chat/completions HTTP/1.1\r\nHost: {target}\r\n"
               f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
               f"x-bench-delay-ms: {BURST_DELAY_MS}\r\nConnection: close\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    connections = [await asyncio.open_connection("127.0.0.1", args.proxy_port)
                   for _ in range(args.requests)]
    for _, writer in connections:
        writer.write(request)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            return head[9:12].decode()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            return type(exc).__name__
        finally:
            writer.close()

    statuses = Counter(await asyncio.gather(*(answer(r, w) for r, w in connections)))
    return {"statuses": dict(statuses)}


def burst_main(argv: list[str]) -> None:
    """Internal mode `_burst`: the statuses as a JSON line."""
    parser = argparse.ArgumentParser(prog="aigw_bench _burst")
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--requests", type=int, default=BURST)
    print(json.dumps(asyncio.run(send_burst(parser.parse_args(argv)))), flush=True)

