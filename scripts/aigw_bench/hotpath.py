"""Section `hotpath`: the request hook (auth, budget decision, reservation) and the response hook
(settle) in-process, on taddons/tflow flows against a populated store; `--floor` adds the
store-less floor addon's hooks on the same flows."""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aigw_bench.fixtures import HOT_CONFIG, PROVIDER_ENV, PROVIDER_SECRET, build_flows, populate
from aigw_bench.hookdriver import time_flows
from aigw_bench.runner import Report, Settings, distribution, format_distribution, say

HOT_P99_TARGET_US = 50.0


async def hot_path_run(s: Settings, tmp: Path, profile: bool, rated: bool = False) -> dict:
    """The gateway on a populated store in `tmp` (with rate limits on every level when
    `rated`), its hooks timed: the samples."""
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
        keys = populate(gw.store, s, rated)
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
        floor_flows = build_flows(active, s.requests, seed=17) if s.floor and not rated else None
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
        n = len(active)  # the first requests (each active key once) warm them, untimed
        await time_flows(gw, warm_flows[:n], warm_responses[:n], not_allowed)
        warm_ns, _ = await time_flows(gw, warm_flows[n:], warm_responses[n:], not_allowed)
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


def run(s: Settings, report: Report, profile: bool = False) -> None:
    """The section: both hooks timed, the figures and the summary rows."""
    say(f"== hot path: the request hook (auth + budget decision + reservation: one ledger "
        f"write transaction), {s.keys:,} keys ==")
    result, rated = asyncio.run(both_runs(s, profile))
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
    rated_report(rated, report, warm, settle)


async def both_runs(s: Settings, profile: bool) -> tuple[dict, dict]:
    """The hooks without rate limits, then with them on every level, on one event loop
    (mitmproxy's log handler keeps the loop it was made on)."""
    with tempfile.TemporaryDirectory(prefix="aigw-bench-hot-") as tmp:
        plain = await hot_path_run(s, Path(tmp), profile)
    with tempfile.TemporaryDirectory(prefix="aigw-bench-hot-rated-") as tmp:
        rated = await hot_path_run(s, Path(tmp), False, rated=True)
    return plain, rated


def rated_report(result: dict, report: Report, warm: dict, settle: dict) -> None:
    """The same hooks with rpm_limit, tpm_limit and max_parallel_requests on every level (key,
    user, org): the rate windows read, decided and written in the same transaction."""
    say("== hot path with rate limits on every level (rpm, tpm, max_parallel) ==")
    if result["not_allowed"] or result["in_flight"] or not result["request"]:
        report.invalid = True
        say(f"!! rated run: not allowed {dict(result['not_allowed'])}, "
            f"in flight {result['in_flight']}")
        return
    rreq, rwarm, rsettle = (distribution(result[name]) for name in ("request", "warm",
                                                                     "settle"))
    say(format_distribution("request hook, rate limits", rreq, len(result["request"])))
    say(format_distribution("request hook, warm, rate limits", rwarm, len(result["warm"])))
    say(format_distribution("settle, rate limits", rsettle, len(result["settle"])))
    report.lines.append(
        f"| hot path with rate limits on every level: request hook p50 / p99, warm p50 / p99, "
        f"settle p50 / p99 | {rreq['p50']:.1f} / {rreq['p99']:.1f}, {rwarm['p50']:.1f} / "
        f"{rwarm['p99']:.1f}, {rsettle['p50']:.1f} / {rsettle['p99']:.1f} us "
        f"(without: warm p50 {warm['p50']:.1f}, settle p50 {settle['p50']:.1f}) | - | |")



def print_profile(profiler: Any, hook: str, n: int, top: int = 25) -> None:
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

