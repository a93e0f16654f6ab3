"""Section `sync`: a namespace in the Workers gateway layout served by the fake Cloudflare KV API
(tests/support/fake_kv.py, in its own process: internal mode `_fakekv`, below), replicated by a
full pass into a fresh store, then by an incremental pass after some records changed."""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aigw_bench import ROOT
from aigw_bench.fixtures import key_record, org_record, raw_key, user_record
from aigw_bench.runner import Processes, Report, Settings, bench_command, bench_env, say

SYNC_ORGS, SYNC_USERS = 100, 1_000
SYNC_CHANGED = 0.01


def sync_namespace(keys: int, orgs: int, users: int) -> tuple[list[dict], dict[str, int]]:
    """A namespace in the Workers gateway layout: `orgs` org configs, `users` user configs and
    the rest `apikey:{hash}` records. Nine records in ten as aigw writes them (its version stamp
    in the KV metadata), one in ten as the Workers gateway does (no metadata; keys of its
    three-level version)."""
    from store.cloudflare import STAMP, stamp_of
    from store.hashing import hash_key
    from store.records import apikey_key, org_config_key, user_config_key

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
                "fake KV", bench_command("_fakekv", "--keys", str(keys), "--orgs", str(SYNC_ORGS),
                                         "--users", str(SYNC_USERS)),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, text=True,
                env=bench_env())
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
        """Send one command; its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)


def run(s: Settings, report: Report) -> None:
    """The section: a full pass into a fresh store, then an incremental one."""
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
    from store.cloudflare import (
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


def pass_line(summary: Any, wall: float, cpu: float, stats: dict, keys: int) -> str:
    """One line of a pass's figures."""
    ops = ", ".join(f"{n:,} {op.replace('_', ' ')}" for op, n in sorted(
        stats["ops"].items(), key=lambda kv: -kv[1]))
    return (f"listed {summary.listed:,}, fetched {summary.fetched:,}, changed "
            f"{summary.changed:,}, deleted {summary.deleted:,} in {wall:.2f} s (the pass "
            f"{summary.duration_s:.2f} s + its LMDB transaction {wall - summary.duration_s:.2f} s; "
            f"sync CPU {cpu:.2f} s); {summary.requests:,} requests ({ops}) = "
            f"{keys / max(summary.requests, 1):.0f} keys per request")


# --- internal mode: the fake Cloudflare KV API ------------------------------------------------


def fakekv_main(argv: list[str]) -> None:
    """Serve the sync namespace from tests/support/fake_kv.py; print its coordinates as one JSON
    line, then answer commands on stdin, one JSON line each: `reset` (forget request counts),
    `stats`, `change FRACTION` (that share of the stamped records gets a new value and stamp)."""
    parser = argparse.ArgumentParser(prog="aigw_bench _fakekv")
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--orgs", type=int, default=SYNC_ORGS)
    parser.add_argument("--users", type=int, default=SYNC_USERS)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    from store.cloudflare import STAMP, stamp_of
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

