"""Section `telemetry`: what the request log and the metrics cost the request path. One gateway
in-process, its hooks timed on the same kind of flows with the log and the metrics off, then on
(`policy.request_log: json` written to a file by its thread, every counter and histogram fed),
in alternating blocks: the ratios on / off of the hooks' p50 (the event loop's view) and of the
process's CPU time a request, the writing of its line included (the writer thread's too)."""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aigw_bench.fixtures import HOT_CONFIG, PROVIDER_ENV, PROVIDER_SECRET, build_flows, populate
from aigw_bench.hookdriver import time_flows
from aigw_bench.runner import Report, Settings, distribution, format_distribution, say

ACTIVE_KEYS = 1_000
BLOCK = 500  # requests a block: a few of the writer's wake-ups (BATCH_WAIT_S) each
MODES = ("off", "on")


def _switch(gw: Any, mode: str) -> None:
    gw.telemetry.enable("json" if mode == "on" else "off", metrics=mode == "on")


def _drain(gw: Any, timeout: float = 30.0) -> None:
    """Wait until the writer has written what the last pass queued (not timed)."""
    if not gw.telemetry.requests.flush(timeout):
        raise RuntimeError("the request log's writer did not catch up")


async def telemetry_run(s: Settings, tmp: Path) -> dict:
    """Blocks of BLOCK requests, the modes alternating off/on then on/off: per mode, the hooks'
    samples, the process's CPU time of each block with the writing of its lines (the writer
    thread's included), and each pair's p50 ratio of request + settle."""
    from mitmproxy.test import taddons

    from addon.gateway import Gateway
    from store import Store

    config = tmp / "mitm.yaml"
    config.write_text(HOT_CONFIG % {"store": tmp / "store", "env": PROVIDER_ENV})
    os.environ[PROVIDER_ENV] = PROVIDER_SECRET
    Store(tmp / "store").close()
    gw = Gateway()
    tctx = taddons.context(gw)
    tctx.configure(gw, aigw_config=str(config),
                   aigw_request_log_file=str(tmp / "requests.log"))
    if gw.store is None:
        raise RuntimeError("the gateway did not open its store")
    try:
        keys = populate(gw.store, SimpleNamespace(keys=ACTIVE_KEYS, orgs=s.orgs, users=s.users))
        pairs = s.before_rounds * max(1, s.requests // BLOCK)
        flows, responses = build_flows(keys, ACTIVE_KEYS + 2 * pairs * BLOCK, seed=23,
                                       cover=True)
        gc.collect()
        gc.freeze()
        not_allowed: Counter[str] = Counter()
        _switch(gw, "on")
        await time_flows(gw, flows[:ACTIVE_KEYS], responses[:ACTIVE_KEYS], not_allowed)
        _drain(gw)
        out: dict[str, Any] = {m: {"request": [], "settle": [], "cpu_ns": 0, "n": 0}
                               for m in MODES}
        out["pairs"] = []
        at = ACTIVE_KEYS
        cpu = time.process_time_ns  # every thread's: the writer's share too, not its sleeps
        for i in range(pairs):
            p50s = {}
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                _switch(gw, mode)
                t0 = cpu()
                request_ns, settle_ns = await time_flows(
                    gw, flows[at:at + BLOCK], responses[at:at + BLOCK], not_allowed)
                _drain(gw)
                out[mode]["cpu_ns"] += cpu() - t0
                out[mode]["n"] += len(request_ns)
                at += BLOCK
                out[mode]["request"] += request_ns
                out[mode]["settle"] += settle_ns
                both = [a + b for a, b in zip(request_ns, settle_ns, strict=True)]
                p50s[mode] = distribution(both)["p50"] if both else 0.0
            if p50s["off"]:
                out["pairs"].append(p50s["on"] / p50s["off"])
        gc.unfreeze()
        out["not_allowed"] = not_allowed
        with open(tmp / "requests.log", encoding="utf-8") as lines:
            out["lines"] = sum(1 for _ in lines)
        return out
    finally:
        gw.done()


def run(s: Settings, report: Report) -> None:
    """The section: the distributions per mode, the ratios and the summary row."""
    pairs = s.before_rounds * max(1, s.requests // BLOCK)
    say(f"== telemetry: the request path with the request log and the metrics off, then on "
        f"({pairs} pairs of {BLOCK}-request blocks, alternating, {ACTIVE_KEYS:,} warm keys; "
        f"on: policy.request_log json to a file, every metric fed) ==")
    with tempfile.TemporaryDirectory(prefix="aigw-bench-telemetry-") as tmp:
        result = asyncio.run(telemetry_run(s, Path(tmp)))
    if result["not_allowed"]:
        report.invalid = True
        say(f"!! {sum(result['not_allowed'].values())} requests were not allowed: "
            f"{dict(result['not_allowed'])}")
    p50: dict[str, dict[str, float]] = {}
    cpu: dict[str, float] = {}
    for mode in MODES:
        req, settle = result[mode]["request"], result[mode]["settle"]
        if not req:
            report.invalid = True
            say(f"!! no request was timed with telemetry {mode}")
            return
        both = [a + b for a, b in zip(req, settle, strict=True)]
        p50[mode] = {name: distribution(ns)["p50"] for name, ns in
                     (("request", req), ("settle", settle), ("both", both))}
        cpu[mode] = result[mode]["cpu_ns"] / 1000 / result[mode]["n"]
        say(format_distribution(f"request hook, {mode}", distribution(req), len(req)))
        say(format_distribution(f"settle hook, {mode}", distribution(settle), len(settle)))
    expected = result["on"]["n"] + ACTIVE_KEYS
    say(f"   (log lines written with telemetry on: {result['lines']:,} of {expected:,})")
    if result["lines"] != expected:
        report.invalid = True
        say("!! the request log did not write one line per request")
    ratios = sorted(result["pairs"])
    ratio = {name: p50["on"][name] / p50["off"][name] for name in ("request", "settle", "both")}
    cpu_ratio = cpu["on"] / cpu["off"]
    say(f"on / off, p50: request hook {ratio['request']:.2f}x, settle {ratio['settle']:.2f}x, "
        f"request + settle {p50['on']['both']:.1f} / {p50['off']['both']:.1f} us = "
        f"{ratio['both']:.2f}x (pairs: median {ratios[len(ratios) // 2]:.2f}x, "
        f"{ratios[0]:.2f}-{ratios[-1]:.2f}x)")
    say(f"CPU time a request, every thread's (the writing of its line included): "
        f"{cpu['on']:.1f} / {cpu['off']:.1f} us = {cpu_ratio:.2f}x")
    report.lines.append(
        f"| telemetry: request + settle hooks p50, log and metrics on / off "
        f"| {p50['on']['both']:.1f} / {p50['off']['both']:.1f} us = {ratio['both']:.2f}x "
        f"(pairs median {ratios[len(ratios) // 2]:.2f}x) | - | |")
    report.lines.append(
        f"| telemetry: CPU time a request, its log line written, on / off "
        f"| {cpu['on']:.1f} / {cpu['off']:.1f} us = {cpu_ratio:.2f}x | - | |")
