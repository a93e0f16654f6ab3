"""Section `throughput` (and `throughput_tls`): mitmdump with the addon vs bare mitmdump (and
the floor addon with `--floor`), driven in interleaved rounds by a load generator in its own
process (internal mode `_loadgen`, below), on keep-alive connections over HTTP or HTTPS."""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

from aigw_bench.fixtures import BENCH_KEY, CHAT_REQUEST
from aigw_bench.runner import (
    Processes,
    Report,
    Settings,
    bench_command,
    cpu_seconds,
    median,
    paired_ratios,
    percentile,
    run_json,
    say,
    show_logs,
    start_proxies,
    start_upstream,
)

RATIO_TARGET = 0.95


def ledger_count(path: Path, key_id: str) -> tuple[str, int, int, int]:
    """The key's month, request count and cost in a store's ledger; reservations left."""
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
                ca: Path | None = None, fresh: bool = False, direct: bool = False) -> dict:
    """`ca`: HTTPS through the proxy (CONNECT, then TLS trusting that mitmproxy CA); `fresh`:
    a new connection per request; `direct`: `proxy_port` is a base URL (a reverse proxy: the
    requests name its path and its host, not the upstream's)."""
    argv = bench_command("_loadgen", "--proxy-port", str(proxy_port), "--upstream-port",
                         str(upstream_port), "--key", key, "--concurrency", str(s.concurrency),
                         "--duration", str(s.duration), "--warmup", str(s.round_warmup))
    if ca is not None:
        argv += ["--ca", str(ca)]
    if fresh:
        argv.append("--fresh")
    if direct:
        argv.append("--direct")
    return run_json(argv, s.duration + s.round_warmup + 60, "load generator")


def run(s: Settings, report: Report, tls: bool = False) -> None:
    """The section (and `throughput_tls`'s); `tls`: the HTTPS variant: CONNECT through the
    proxy, TLS intercepted with mitmproxy's CA, TLS from mitmproxy to an upstream with a
    self-signed certificate (trusted with `ssl_verify_upstream_trusted_ca`)."""
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


def _throughput(s: Settings, report: Report, procs: Processes, tmp: Path,
                tls: bool = False) -> None:
    up_port = start_upstream(procs, tls, cert_dir=tmp)
    # start_mitmdump already sets connection_strategy=lazy (mitmdump refuses it twice). The
    # gateway refuses ssl_insecure: both proxies trust the upstream's certificate instead.
    both = ["--set", f"ssl_verify_upstream_trusted_ca={tmp / 'upstream-cert.pem'}"] if tls else []
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
    bare_med, addon_med = median(by_kind["bare"]), median(by_kind["addon"])
    paired = paired_ratios(sequence)
    ratio = median(paired)
    ok = ratio >= RATIO_TARGET
    report.failed |= not ok
    per_process = ", ".join(f"{p.name} {median(rates[p.name]):.0f}" for p in proxies)
    say(f"{label}median req/s of each process: {per_process}")
    say(f"{label}median of all rounds: bare {bare_med:.1f} req/s, addon {addon_med:.1f} req/s "
        f"(ratio of medians {addon_med / bare_med if bare_med else 0:.3f})")
    quartiles = (f" (quartiles {percentile(sorted(paired), 0.25):.3f}-"
                 f"{percentile(sorted(paired), 0.75):.3f})" if paired else "")
    say(f"{label}ratio addon/bare, median of {len(paired)} addon rounds each over the mean of "
        f"the bare rounds either side: {ratio:.3f}{quartiles} (target >= {RATIO_TARGET}): "
        f"{'PASS' if ok else 'FAIL'}")
    cpu_bare, cpu_addon = median(cpu_per_request["bare"]), median(cpu_per_request["addon"])
    if cpu_bare and cpu_addon:
        say(f"{label}mitmdump CPU per request (less noisy than req/s): bare {cpu_bare:.0f} us, "
            f"addon {cpu_addon:.0f} us: the addon adds {cpu_addon - cpu_bare:.0f} us "
            f"({cpu_addon / cpu_bare - 1:+.1%}); bare CPU / addon CPU = {cpu_bare / cpu_addon:.3f}")
    cpu_floor = median(cpu_per_request["floor"])
    if s.floor:
        floor_paired = paired_ratios(sequence, "floor")
        floor_ratio = median(floor_paired)
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


# --- internal mode: the load generator --------------------------------------------------------


async def loadgen(args: argparse.Namespace) -> dict:
    """`concurrency` keep-alive connections sending chat requests as fast as answered."""
    body = json.dumps(CHAT_REQUEST).encode()
    target = f"127.0.0.1:{args.upstream_port}"
    ctx = None
    if args.ca:  # HTTPS: CONNECT, then TLS with the proxy's CA, then origin-form requests
        ctx = ssl.create_default_context(cafile=args.ca)
        ctx.set_alpn_protocols(["http/1.1"])
    url = "/v1/chat/completions" if ctx or args.direct else f"http://{target}/v1/chat/completions"
    host = f"{args.host}:{args.proxy_port}" if args.direct else target
    close = "Connection: close\r\n" if args.fresh else ""
    request = (f"POST {url} HTTP/1.1\r\nHost: {host}\r\n"
               f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
               f"{close}Content-Length: {len(body)}\r\n\r\n").encode() + body
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
                if args.fresh or b"\r\nconnection: close" in head:
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
    """Internal mode `_loadgen`: one round, its figures as a JSON line."""
    parser = argparse.ArgumentParser(prog="aigw_bench _loadgen")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--proxy-port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--ca", help="HTTPS: CONNECT, then TLS trusting this CA certificate")
    parser.add_argument("--fresh", action="store_true",
                        help="a new connection for every request (Connection: close)")
    parser.add_argument("--direct", action="store_true",
                        help="the port is a base URL (a reverse proxy), not a forward proxy: "
                        "origin-form requests with its own Host")
    print(json.dumps(asyncio.run(loadgen(parser.parse_args(argv)))), flush=True)

