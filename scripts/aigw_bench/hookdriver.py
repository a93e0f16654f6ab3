"""The request and response hooks of one tree's addon, timed in rounds on command: what
`--before REV` runs twice, once on that revision's code and once on the working tree's.

Run as `python -P -m aigw_bench.hookdriver ...` in the tree, with PYTHONPATH=TREE:SCRIPTS, so
that `addon` and `store` are that tree's (checked: the first answer names the files loaded).
It must work with every revision since the request hook was benchmarked: it uses only what
both the old and the new code have (`addon.gateway.Gateway` configured with `aigw_config`,
`gw.store` with `records`, `hash` and `ledger.release`), a mitm.yaml whose `hosts` entry is
both a host name (the new code) and a regular expression (the old one), a store created
before the gateway opens it (the new gateway never creates one), and flows that carry the
provider's SNI and CONNECT target, as a tunnelled request does.

Protocol: one JSON object a line on stdout, each line starting with `@@ `: first
`{"ready": ...}` once the store is populated and the flows are built and warmed up, then one
answer per command read from stdin: `round` (the next round's timings in ns) or `quit`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aigw_bench.fixtures import HOT_CONFIG, PROVIDER_ENV, PROVIDER_SECRET, build_flows, populate

PREFIX = "@@ "
ACTIVE_KEYS = 1_000


def answer(value: dict) -> None:
    """One line of the protocol on stdout."""
    sys.stdout.write(PREFIX + json.dumps(value) + "\n")
    sys.stdout.flush()


async def time_flows(gw: Any, flows: list, responses: list,
                     not_allowed: Counter[str]) -> tuple[list[int], list[int]]:
    """Each flow through the request hook and, when allowed, the response hook with its canned
    answer: ns per request hook and per response hook (settle)."""
    clock = time.perf_counter_ns
    request_ns: list[int] = []
    settle_ns: list[int] = []
    for flow, response in zip(flows, responses, strict=True):
        t0 = clock()
        pending = gw.request(flow)  # a coroutine only for large bodies, as mitmproxy awaits
        if pending is not None:
            await pending
        t1 = clock()
        decision = flow.metadata.get("aigw", {}).get("decision")
        if flow.response is not None or decision != "allowed":
            not_allowed[f"{decision} {flow.response and flow.response.status_code}"] += 1
            gw.store.ledger.release(flow.id)
            continue
        flow.response = response
        gw.responseheaders(flow)
        t2 = clock()
        pending = gw.response(flow)
        if pending is not None:
            await pending
        t3 = clock()
        request_ns.append(t1 - t0)
        settle_ns.append(t3 - t2)
    return request_ns, settle_ns


async def serve(args: argparse.Namespace) -> None:
    """Set up, then answer commands until `quit` or the end of stdin."""
    from mitmproxy.test import taddons

    import addon
    from addon.gateway import Gateway
    from store import Store

    tmp = Path(tempfile.mkdtemp(prefix="aigw-bench-driver-"))
    gw = None
    try:
        config = tmp / "mitm.yaml"
        config.write_text(HOT_CONFIG % {"store": tmp / "store", "env": PROVIDER_ENV})
        os.environ[PROVIDER_ENV] = PROVIDER_SECRET
        Store(tmp / "store").close()
        gw = Gateway()
        tctx = taddons.context(gw)  # inside the running loop: the master uses this loop
        tctx.configure(gw, aigw_config=str(config))
        if gw.store is None:
            raise RuntimeError("the gateway did not open its store")
        t = time.perf_counter()
        keys = populate(gw.store, args)
        populated = time.perf_counter() - t
        n = args.requests * args.rounds
        flows, responses = build_flows(keys, args.warmup + n)
        warm_flows, warm_responses = build_flows(keys[:ACTIVE_KEYS], ACTIVE_KEYS + n, seed=11,
                                                 cover=True)
        gc.collect()
        gc.freeze()  # the prebuilt flows are the harness's: out of the collector's full passes
        not_allowed: Counter[str] = Counter()
        await time_flows(gw, flows[:args.warmup], responses[:args.warmup], not_allowed)
        await time_flows(gw, warm_flows[:ACTIVE_KEYS], warm_responses[:ACTIVE_KEYS], not_allowed)
        answer({"ready": True, "addon": addon.__file__, "keys": len(keys),
                "populate_s": populated, "not_allowed": dict(not_allowed)})
        loop = asyncio.get_running_loop()
        r = 0
        while True:
            # Read off the loop, so the gateway's own tasks run between rounds as in mitmdump.
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line.strip() != "round" or r >= args.rounds:
                break
            not_allowed = Counter()
            a, b = args.warmup + r * args.requests, ACTIVE_KEYS + r * args.requests
            request_ns, settle_ns = await time_flows(
                gw, flows[a:a + args.requests], responses[a:a + args.requests], not_allowed)
            warm_ns, _ = await time_flows(
                gw, warm_flows[b:b + args.requests], warm_responses[b:b + args.requests],
                not_allowed)
            answer({"request": request_ns, "settle": settle_ns, "warm": warm_ns,
                    "not_allowed": dict(not_allowed),
                    "in_flight": len(gw.store.ledger.reservations())})
            r += 1
    finally:
        if gw is not None:
            gw.done()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> None:
    """Parse the sizes, then serve."""
    parser = argparse.ArgumentParser(prog="aigw_bench.hookdriver")
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--orgs", type=int, default=100)
    parser.add_argument("--users", type=int, default=1_000)
    parser.add_argument("--requests", type=int, required=True, help="timed a round, per kind")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    args.keys = max(args.keys, ACTIVE_KEYS)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main(sys.argv[1:])
