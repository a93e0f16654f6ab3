"""Section `ledger`: the request path's two ledger writes (reserve, then settle with its log
entry) as one pair, on the store's own ledger settings, on the settings before them and with
data synced per commit, in interleaved rounds on one machine."""

from __future__ import annotations

import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from aigw_bench.runner import (
    Report,
    Settings,
    distribution,
    format_distribution,
    median,
    rotated,
    say,
)

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


def ledger_pairs(ledger: Any, n: int, tag: str) -> list[int]:
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


def run(s: Settings, report: Report) -> None:
    """The section: every setting timed in interleaved rounds, the ratios to the old one."""
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
                order = rotated(names, r)
                for name in order:
                    timed = ledger_pairs(ledgers[name], s.ledger_pairs, f"r{r}")
                    samples[name] += timed
                    medians[name].append(median([float(t) for t in timed]))
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
        say(f"{name.split(' (')[0]} / old, per-round medians: {median(ratios):.1f}x "
            f"(range {min(ratios):.1f}-{max(ratios):.1f}x)")
        report.lines.append(
            f"| ledger: reserve+settle pair p50, {name} / old (writemap, no sync) "
            f"| {distribution(samples[name])['p50']:.1f} / "
            f"{distribution(samples[LEDGER_OLD])['p50']:.1f} us = {median(ratios):.1f}x "
            f"(rounds {min(ratios):.1f}-{max(ratios):.1f}x) | - | |")


