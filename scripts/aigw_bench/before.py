"""`--before REV`: the request hook of an older revision beside the working tree's, in one run.

REV is exported (`git archive`, into a temporary directory: the repository and its working
tree are left alone) and `hookdriver` runs twice, each in a subprocess of its own with its
tree's code first on PYTHONPATH, both pinned to the same CPU, on stores of the same size and
the same flows. Rounds are interleaved, the order rotating, and each round's medians give a
ratio now / before: the drift of a shared machine cancels out of the ratios, not of the
absolute times."""

from __future__ import annotations

import io
import json
import os
import select
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from aigw_bench import ROOT, SCRIPTS
from aigw_bench.hookdriver import PREFIX
from aigw_bench.runner import (
    PROXY_CPU,
    Processes,
    Report,
    Settings,
    distribution,
    format_distribution,
    median,
    pinned,
    rotated,
    say,
)

SETUP_TIMEOUT_S = 600.0
ROUND_TIMEOUT_S = 300.0


def resolve(rev: str) -> str:
    """The commit REV names, in full; RuntimeError when it names none."""
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                           f"{rev}^{{commit}}"], capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"--before {rev!r}: no such commit in {ROOT}")
    return done.stdout.strip()


def export(commit: str, into: Path) -> Path:
    """The tree of `commit`, written under `into`."""
    done = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                          capture_output=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"git archive {commit} failed: {done.stderr.decode()[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(done.stdout)) as archive:
        archive.extractall(into, filter="data")
    if not (into / "addon" / "gateway.py").exists():
        raise RuntimeError(f"{commit[:12]} has no addon/gateway.py")
    return into


class Driver:
    """One `hookdriver` subprocess on one tree."""

    def __init__(self, procs: Processes, name: str, tree: Path, s: Settings, requests: int,
                 rounds: int, log: Path) -> None:
        self.name, self.tree, self.log = name, tree, log
        argv = [sys.executable, "-P", "-m", "aigw_bench.hookdriver", "--keys", str(s.keys),
                "--orgs", str(s.orgs), "--users", str(s.users), "--requests", str(requests),
                "--rounds", str(rounds), "--warmup", str(s.warmup)]
        # The tree first: its `addon` and `store` win over the project's editable install.
        env = {**_clean_env(), "PYTHONPATH": f"{tree}:{SCRIPTS}"}
        with log.open("wb") as err:
            self.proc = procs.start(f"hook driver {name}", argv, cwd=tree, env=env, text=True,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    preexec_fn=pinned(PROXY_CPU))

    def read(self, timeout: float) -> dict:
        """The driver's next answer (other output on its stdout is skipped)."""
        assert self.proc.stdout is not None
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline() if ready else ""
            if not line:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the hook driver for {self.name} did not answer (exit "
                                   f"{self.proc.poll()})\n{tail}")
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])

    def send(self, command: str) -> None:
        """One command line to the driver."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"the hook driver for {self.name} has exited "
                               f"({self.proc.poll()})") from None


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(s: Settings, report: Report, rev: str) -> None:
    """The section: both trees' hooks in interleaved rounds; the ratios now / before."""
    commit = resolve(rev)
    short = commit[:7]
    if not commit.startswith(rev):
        rev = f"{rev} ({short})"
    rounds = s.before_rounds
    requests = max(100, s.requests // rounds)
    say(f"== request hook before and after: {rev} vs the working tree, each in a "
        f"process of its own on its tree's code, {s.keys:,} keys, {rounds} interleaved rounds "
        f"of {requests:,} requests on random keys and {requests:,} on 1,000 warm keys ==")
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="aigw-bench-before-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            tree = export(commit, tmp / "tree")
            drivers = [Driver(procs, f"before ({short})", tree, s, requests, rounds,
                              tmp / "before.log"),
                       Driver(procs, "now (working tree)", ROOT, s, requests, rounds,
                              tmp / "now.log")]
            _compare(s, report, rev, drivers, rounds)
        finally:
            procs.stop_all()


def _compare(s: Settings, report: Report, rev: str, drivers: list[Driver],
             rounds: int) -> None:
    for driver in drivers:
        ready = driver.read(SETUP_TIMEOUT_S)
        loaded = Path(ready["addon"]).resolve()
        if not loaded.is_relative_to(driver.tree.resolve()):
            raise RuntimeError(f"the hook driver for {driver.name} loaded {loaded}, not the "
                               f"code of {driver.tree}")
        if ready["not_allowed"]:
            report.invalid = True
            say(f"!! {driver.name}: warm-up requests not allowed: {ready['not_allowed']}")
        say(f"{driver.name}: {loaded.parent}, {ready['keys']:,} keys written in "
            f"{ready['populate_s']:.1f} s")
    kinds = ("request", "warm", "settle")
    samples = {d.name: {k: [] for k in kinds} for d in drivers}
    medians = {d.name: {k: [] for k in kinds} for d in drivers}
    by_name = {d.name: d for d in drivers}
    names = list(by_name)
    for r in range(rounds):
        for name in rotated(names, r):
            driver = by_name[name]
            driver.send("round")
            got = driver.read(ROUND_TIMEOUT_S)
            if got["not_allowed"] or got["in_flight"]:
                report.invalid = True
                say(f"!! {name}, round {r + 1}: not allowed {got['not_allowed']}, "
                    f"{got['in_flight']} reservations left in flight")
            for kind in kinds:
                samples[name][kind] += got[kind]
                medians[name][kind].append(median([float(v) for v in got[kind]]))
        line = "; ".join(f"{name.split(' (')[0]} {medians[name]['request'][-1] / 1000:.1f} / "
                         f"{medians[name]['warm'][-1] / 1000:.1f} us" for name in names)
        say(f"   round {r + 1}: request hook medians, random / warm keys: {line}")
    for driver in drivers:
        driver.send("quit")
        driver.proc.wait(60)
    before, now = names
    if not all(samples[name][kind] for name in names for kind in kinds):
        report.invalid = True
        say("!! a round timed no request")
        return
    labels = {"request": "request hook", "warm": "request hook, warm", "settle": "settle"}
    for name in names:
        for kind in kinds:
            say(format_distribution(f"{labels[kind]}, {name.split(' (')[0]}",
                                    distribution(samples[name][kind]), len(samples[name][kind])))
    what = {"request": f"request hook p50 ({s.keys:,} keys, random)",
            "warm": "request hook p50 (1,000 warm keys)", "settle": "settle (response hook) p50"}
    for kind in kinds:
        ratios = [n / b for n, b in zip(medians[now][kind], medians[before][kind], strict=True)
                  if b]
        if not ratios:
            continue
        p50_before = distribution(samples[before][kind])["p50"]
        p50_now = distribution(samples[now][kind])["p50"]
        spread = f"rounds {min(ratios):.2f}-{max(ratios):.2f}x"
        say(f"{labels[kind]}: now / before {rev}, per-round medians: {median(ratios):.2f}x "
            f"({spread}); p50 {p50_before:.1f} us before, {p50_now:.1f} us now")
        report.lines.append(
            f"| before / after: {what[kind]}, {rev} / now | {p50_before:.1f} / "
            f"{p50_now:.1f} us; now / before {median(ratios):.2f}x ({spread}) | - | |")
