"""Section `stream`: a long chat-completions SSE stream through bare mitmdump and mitmdump with
the addon in interleaved rounds (first byte, total time, CPU per MB), then a large stream through
the addon while its RSS is sampled; the stream client is internal mode `_streamclient` (below)."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

from aigw_bench.fixtures import BENCH_KEY
from aigw_bench.runner import (
    Processes,
    Report,
    RssSampler,
    Settings,
    bench_command,
    cpu_seconds,
    median,
    proc_status_mb,
    run_json,
    say,
    show_logs,
    start_proxies,
    start_upstream,
)
from aigw_bench.upstream import (
    STREAM_INPUT_NUSD,
    STREAM_OUTPUT_NUSD,
    STREAM_PROMPT_TOKENS,
    events_for_bytes,
    sse_digest,
)

STREAM_RATIO_TARGET = 0.95
TTFB_ADDED_TARGET_MS = 1.0
RSS_GROWTH_LIMIT_MB = 50.0
BIG_STREAM_CUT = 16_384  # the 100 MB stream comes in HTTP chunks of 16 KiB, events split anywhere


def run_stream_client(proxy_port: int, upstream_port: int, key: str, events: int, cut: int,
                      streams: int, warmup: int, timeout: float) -> dict:
    """Internal mode `_streamclient` in its own process: its figures."""
    argv = bench_command("_streamclient", "--proxy-port", str(proxy_port), "--upstream-port",
                         str(upstream_port), "--key", key, "--events", str(events), "--cut",
                         str(cut), "--streams", str(streams), "--warmup", str(warmup),
                         "--timeout", str(timeout))
    return run_json(argv, (streams + warmup) * timeout + 30, "stream client")


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


def run(s: Settings, report: Report) -> None:
    """The section: interleaved stream rounds, then the memory stream; the ledger checked."""
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
        ttfb, total = median(r["ttfb_ms"]), median(r["total_s"])
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
    rate_bare, rate_addon = median(b["rate"]), median(a["rate"])
    ratio = rate_addon / rate_bare if rate_bare else 0.0
    ttfb_bare, ttfb_addon = median(b["ttfb"]), median(a["ttfb"])
    added = ttfb_addon - ttfb_bare
    total_bare, total_addon = median(b["total"]), median(a["total"])
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
    cpu_bare, cpu_addon = median(b["cpu"]), median(a["cpu"])
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
    """Internal mode `_streamclient`: its figures as a JSON line."""
    parser = argparse.ArgumentParser(prog="aigw_bench _streamclient")
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--cut", type=int, default=0)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    print(json.dumps(asyncio.run(stream_client(parser.parse_args(argv)))), flush=True)

