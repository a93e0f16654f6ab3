"""What every section shares: settings, the report, statistics, processes started and stopped
by pid, CPU and memory from /proc, and the proxies under test. Standard library only."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigw_bench import ROOT, SCRIPTS
from aigw_bench.fixtures import (
    PROVIDER_ENV,
    PROVIDER_SECRET,
    THROUGHPUT_CONFIG,
    seed_throughput_store,
)


@dataclass
class Settings:
    """Sizes and counts of a run (`QUICK` for `--quick`), bounded by `cli.parse_args`."""

    keys: int = 100_000
    orgs: int = 100
    users: int = 1_000
    requests: int = 20_000
    warmup: int = 1_000
    concurrency: int = 16
    duration: float = 5.0
    round_warmup: float = 0.5
    rounds: int = 3
    pairs: int = 3  # bare and addon processes each, for throughput
    floor: bool = False  # throughput: also a store-less addon doing only the wire work
    stream_events: int = 10_000
    stream_rounds: int = 5
    streams_per_round: int = 5
    stream_mb: int = 100
    sync_keys: int = 100_000
    ledger_pairs: int = 500  # reserve+settle pairs per ledger setting per round
    ledger_rounds: int = 5
    before_rounds: int = 5  # --before: interleaved rounds of each tree's hooks


QUICK = Settings(keys=10_000, requests=2_000, warmup=200, duration=2.0, rounds=2, pairs=2,
                 stream_events=2_000, stream_rounds=2, stream_mb=20, sync_keys=10_000,
                 ledger_pairs=200, ledger_rounds=3, before_rounds=3)


@dataclass
class Report:
    """What a run found: the summary rows and whether it missed a target or went wrong."""

    lines: list[str] = field(default_factory=list)  # summary table rows
    failed: bool = False  # a target was missed
    invalid: bool = False  # the run itself went wrong


def say(text: str = "") -> None:
    """Print a line at once (the output is read while a long run goes on)."""
    print(text, flush=True)


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def distribution(samples_ns: list[int]) -> dict[str, float]:
    """p50, p90, p99, p99.9, max and mean in microseconds of samples in nanoseconds."""
    ordered = sorted(s / 1000 for s in samples_ns)
    return {"p50": percentile(ordered, 0.50), "p90": percentile(ordered, 0.90),
            "p99": percentile(ordered, 0.99), "p99.9": percentile(ordered, 0.999),
            "max": ordered[-1], "mean": sum(ordered) / len(ordered)}


def format_distribution(name: str, d: dict[str, float], n: int) -> str:
    """One line of a distribution, aligned with the others."""
    return (f"{name:<26} n={n:<6} p50 {d['p50']:7.1f} us   p90 {d['p90']:7.1f} us   "
            f"p99 {d['p99']:7.1f} us   p99.9 {d['p99.9']:8.1f} us   max {d['max']:9.1f} us")


def machine() -> dict[str, str]:
    """CPUs, CPU model, Python, mitmproxy, lmdb and OS of this run."""
    import lmdb
    import mitmproxy.version

    cpu = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                     else os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy.version.VERSION,
        "lmdb": lmdb.__version__,
        "os": f"{platform.system()} {platform.release()}",
    }


def load_note(seconds: float = 1.0) -> str:
    """How busy the CPUs were just before a section: other work on 2 cores skews every figure."""
    one = os.getloadavg()[0]

    def ticks() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    before = ticks()
    time.sleep(seconds)
    after = ticks()
    if before is None or after is None or after[0] == before[0]:
        return f"load average {one:.2f}"
    busy = 1 - (after[1] - before[1]) / (after[0] - before[0])
    flag = "  << BUSY: other processes compete for the CPUs" if busy > 0.15 else ""
    return f"CPUs {busy:.0%} busy in the second before this section, load average {one:.2f}{flag}"


def rotated(names: list[str], r: int) -> list[str]:
    """The order of round `r` in interleaved rounds: each name leads in turn, so a drift of the
    machine within a round favours none of them."""
    return names[r % len(names):] + names[:r % len(names)]


def paired_ratios(sequence: list[tuple[str, float]], of: str = "addon") -> list[float]:
    """Each round of kind `of`: its rate over the mean of the nearest bare rounds before and
    after it."""
    ratios = []
    for i, (kind, rate) in enumerate(sequence):
        if kind != of:
            continue
        before = next((r for k, r in reversed(sequence[:i]) if k == "bare"), None)
        after = next((r for k, r in sequence[i + 1:] if k == "bare"), None)
        around = [r for r in (before, after) if r]
        if around:
            ratios.append(rate / (sum(around) / len(around)))
    return ratios


def round_figures(result: dict, cpu_before: float | None, cpu_after: float | None
                  ) -> tuple[int, float]:
    """A load generator round's failed requests and CPU per answered request (us)."""
    answered = result["total_ok"] + sum(v for k, v in result["statuses"].items() if k != "200")
    bad = result["errors"] + answered - result["total_ok"]
    per_request = ((cpu_after - cpu_before) / answered * 1e6
                   if cpu_before is not None and cpu_after is not None and answered else 0.0)
    return bad, per_request


def median(values: list[float]) -> float:
    """The median (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2



# --- processes -------------------------------------------------------------------------------


def bench_command(mode: str, *args: str) -> list[str]:
    """The argv of one of the benchmark's internal modes (`_upstream`, `_loadgen`, ...)."""
    return [sys.executable, "-m", "aigw_bench", mode, *args]


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the benchmark's own subprocesses: this package and the project on
    PYTHONPATH, whatever the caller's was."""
    paths = [str(SCRIPTS), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    return {**os.environ, "PYTHONPATH": ":".join(dict.fromkeys(paths)), **(extra or {})}


def run_json(argv: list[str], timeout: float, what: str) -> dict:
    """Run one of the benchmark's clients on the load generator's CPU: its last stdout line,
    a JSON object."""
    done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pinned(LOAD_CPU),
                          timeout=timeout, cwd=ROOT, env=bench_env())
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pinned(cpu: int) -> Callable[[], None] | None:
    """A preexec_fn that pins a child process to one CPU: the proxy under test gets a core of its
    own and the load generator and fake upstream share another, so they do not take turns with
    it (both proxies are pinned alike). None where affinity cannot be set."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    if len(cpus) < 2:
        return None
    target = sorted(cpus)[cpu % len(cpus)]
    return lambda: os.sched_setaffinity(0, {target})


PROXY_CPU, LOAD_CPU = 0, 1


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    """A loopback port free at this moment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, name: str, log: Path | None,
                   timeout: float = 30.0) -> None:
    """Wait until a started process listens on 127.0.0.1:`port`; RuntimeError if it exits
    first or takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening\n{tail}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class Processes:
    """The subprocesses this run started; stopped (by pid) on exit, whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start a process in a session of its own, remembered for `stop_all`."""
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGINT, then SIGKILL after `grace` seconds."""
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # mitmdump runs its addons' `done` on SIGINT
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def stop_all(self) -> None:
        """Stop every process started, the last first."""
        for _name, proc in reversed(self.procs):
            with suppress(Exception):
                self.stop(proc)


def start_mitmdump(procs: Processes, name: str, port: int, confdir: Path, log: Path,
                   extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A mitmdump on 127.0.0.1:`port`, pinned to the proxies' CPU, its output in `log`."""
    mitmdump = Path(sys.executable).parent / "mitmdump"
    argv = [str(mitmdump), "-q", "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy", *extra]
    with log.open("wb") as out:
        return procs.start(name, argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                           preexec_fn=pinned(PROXY_CPU),
                           stdin=subprocess.DEVNULL)



def proc_status_mb(pid: int, field_name: str) -> float | None:
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM) in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """VmRSS of a process every `interval` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            value = proc_status_mb(self.pid, "VmRSS")
            if value is not None:
                self.samples.append(value)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- the proxies under test ---------------------------------------------------------------


def start_upstream(procs: Processes, tls: bool = False, cert_dir: Path | None = None) -> int:
    """The fake provider (`_upstream`) on an ephemeral loopback port; `tls`: HTTPS with a
    self-signed certificate for 127.0.0.1, kept as `cert_dir`/upstream-cert.pem if given."""
    extra = ["--tls"] if tls else []
    if tls and cert_dir is not None:
        extra += ["--cert-dir", str(cert_dir)]
    upstream = procs.start("upstream", bench_command("_upstream", *extra),
                           preexec_fn=pinned(LOAD_CPU),
                           stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT, text=True,
                           env=bench_env())
    assert upstream.stdout is not None
    line = upstream.stdout.readline().strip()
    if not line.isdigit():
        raise RuntimeError(f"upstream did not start: {line!r}")
    return int(line)




@dataclass
class Proxy:
    """One mitmdump under test."""

    name: str
    kind: str  # "bare" | "floor" | "addon"
    port: int
    proc: subprocess.Popen
    log: Path
    confdir: Path
    store: Path | None  # the addon's store


def start_proxies(procs: Processes, tmp: Path, bare_extra: list[str],
                  both_extra: tuple[str, ...] | list[str] = (), pairs: int = 1,
                  floor: bool = False) -> list[tuple[Proxy, ...]]:
    """`pairs` of bare mitmdump (with `bare_extra` options) and mitmdump with the addon, all
    listening on loopback with the `both_extra` options; `floor`: a mitmdump with the floor
    addon (`bench_floor_addon.py`) between them in each group. Each addon has a store of its
    own, seeded with the bench key (several on one store would share their ledger, a different
    mode): `Proxy.store`."""
    env = {**os.environ, PROVIDER_ENV: PROVIDER_SECRET}
    started = []
    for n in range(1, pairs + 1):
        store_path = tmp / f"store{n}"
        seed_throughput_store(store_path)
        config = tmp / f"mitm{n}.yaml"
        config.write_text(THROUGHPUT_CONFIG % {"store": store_path, "env": PROVIDER_ENV})
        pair = []
        for kind, extra in (
            ("bare", [*both_extra, *bare_extra]),
            *([("floor", [*both_extra, "-s", str(ROOT / "scripts" / "bench_floor_addon.py")])]
              if floor else []),
            ("addon", [*both_extra, "-s", str(ROOT / "addon" / "gateway.py"),
                       "--set", f"aigw_config={config}"]),
        ):
            name = f"{kind}{n}" if pairs > 1 else kind
            port, log, confdir = free_port(), tmp / f"{name}.log", tmp / f"confdir-{name}"
            confdir.mkdir()
            proc = start_mitmdump(procs, f"mitmdump {name}", port, confdir, log, extra, env)
            pair.append(Proxy(name, kind, port, proc, log, confdir,
                              store_path if kind == "addon" else None))
        started.append(tuple(pair))
    for pair in started:
        for proxy in pair:
            wait_listening(proxy.port, proxy.proc, f"mitmdump {proxy.name}", proxy.log)
    return started


def show_logs(*proxies: Proxy) -> None:
    """The last lines each proxy logged, if any."""
    for proxy in proxies:
        text = proxy.log.read_text(errors="replace").strip()
        if text:
            say(f"-- {proxy.name} mitmdump log (last lines) --")
            for row in text.splitlines()[-10:]:
                say(f"   {row}")
