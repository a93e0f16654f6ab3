"""`scripts/bench`: the options, the sections in order, the summary table and the exit status;
and the dispatch of the internal modes to their modules."""

from __future__ import annotations

import argparse
import signal
import subprocess
import time
from dataclasses import replace
from datetime import UTC, datetime

from aigw_bench import (
    before,
    hotpath,
    ledger,
    peers,
    proxy,
    stream,
    sync,
    telemetry,
    throughput,
    throughput_tls,
    upstream,
)
from aigw_bench.runner import QUICK, Report, Settings, load_note, machine, say
from aigw_bench.sync import SYNC_ORGS, SYNC_USERS


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Settings]:
    """The options, and the settings they make (bounded, so every run stays short)."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark aigw: the in-process hot path; throughput and streams through "
        "mitmdump; a sync from the fake Cloudflare KV API.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 10k keys, 2k requests, 2 s rounds, 2 rounds of 2 "
                        "processes each, 2k-event streams, a 20 MB stream, a 10k-key sync")
    parser.add_argument("--only",
                        choices=("hotpath", "telemetry", "throughput", "throughput-tls", "proxy",
                                 "stream", "sync", "ledger", "peers"),
                        help="run one of the benchmarks (throughput-tls: the throughput one "
                        "over HTTPS; ledger: the cost of the ledger's durable settings; "
                        "telemetry: the request path with the request log and metrics on / off; "
                        "proxy: aigw proxy beside mitmdump, as ratios; peers: as --peers)")
    parser.add_argument("--peers", action="store_true",
                        help="also run aigw proxy beside LiteLLM's proxy (installed once into "
                        "a venv of its own under var/bench/), one worker each, on the same load "
                        "and fake upstream: the ratios of req/s and CPU per request")
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
    parser.add_argument("--before", metavar="REV",
                        help="with the hot path: also time the request and response hooks of "
                        "git revision REV beside the working tree's, each in a process on its "
                        "own tree's code, in interleaved rounds, and print the ratios "
                        "(e.g. --before 292c410, the last commit with the alone mode)")
    parser.add_argument("--before-rounds", type=int, help="--before: interleaved rounds")
    parser.add_argument("--sync-keys", type=int,
                        help=f"keys in the sync namespace (> {SYNC_ORGS + SYNC_USERS:,})")
    args = parser.parse_args(argv)
    s = replace(QUICK) if args.quick else Settings()
    s.floor = args.floor
    for name in ("keys", "requests", "rounds", "pairs", "duration", "concurrency", "stream_events",
                 "stream_rounds", "stream_mb", "sync_keys", "ledger_pairs", "ledger_rounds",
                 "before_rounds"):
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
    s.before_rounds = min(s.before_rounds, 20)
    if args.before is not None and args.only not in (None, "hotpath"):
        parser.error("--before times the hot path: use it without --only or with --only hotpath")
    if s.sync_keys <= SYNC_ORGS + SYNC_USERS:
        parser.error(f"--sync-keys must be more than {SYNC_ORGS + SYNC_USERS:,}")
    return args, s


INTERNAL_MODES = {
    "_upstream": upstream.main,
    "_loadgen": throughput.loadgen_main,
    "_streamclient": stream.stream_client_main,
    "_fakekv": sync.fakekv_main,
    "_burst": proxy.burst_main,
}


def main(argv: list[str]) -> int:
    """`scripts/bench` (or one of the internal modes): the exit status."""
    if argv[:1] and argv[0] in INTERNAL_MODES:
        INTERNAL_MODES[argv[0]](argv[1:])
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
        ("hotpath", "", lambda: hotpath.run(s, report, args.profile), ()),
        ("hotpath", "before/after run", lambda: before.run(s, report, args.before), failures),
        ("telemetry", "telemetry run", lambda: telemetry.run(s, report), (Exception,)),
        ("throughput", "throughput run", lambda: throughput.run(s, report), failures),
        ("throughput-tls", "HTTPS throughput run", lambda: throughput_tls.run(s, report),
         failures),
        ("proxy", "proxy run", lambda: proxy.run(s, report), failures),
        ("stream", "stream run", lambda: stream.run(s, report), failures),
        # a failed pass (SyncError), the fake's process, ...
        ("sync", "sync run", lambda: sync.run(s, report), (Exception,)),
        ("ledger", "ledger run", lambda: ledger.run(s, report), (Exception,)),
        ("peers", "peers run", lambda: peers.run(s, report), failures),
    ]
    for name, what, run, caught in sections:
        if (args.only not in (None, name) or (what == "before/after run" and not args.before)
                or (name == "peers" and not (args.peers or args.only == "peers"))):
            continue
        say()
        say(load_note())
        try:
            run()
        except caught as exc:
            report.invalid = True
            generic = name in ("sync", "ledger", "telemetry")
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
