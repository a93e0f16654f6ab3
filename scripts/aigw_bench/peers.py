"""Section `peers` (`scripts/bench --peers`, or `--only peers`; optional, never by default, not
in CI): aigw beside LiteLLM's proxy, on the same load from the same load generator and the same
fake OpenAI upstream, in interleaved rounds, every proxy pinned to the proxies' CPU and the load
generator and upstream to the other one, as in the `proxy` section. No target: the figures to
report.

- LiteLLM `LITELLM_VERSION` in a venv of its own that the bench makes once and reuses
  (`LITELLM_VENV`, never the project's .venv), started as `litellm --config CFG --num_workers 1`
  with one model routed to the fake upstream, a master key and no database (so no virtual keys
  and no budgets), no telemetry, the local price table and offline mode (it would download the
  price table at start). It is a reverse proxy: clients call its base URL.
- `aigw proxy --workers 1` with full enforcement (budgets and rate limits on every level, the
  request log to a file), twice: as a forward proxy (its normal mode: absolute-form requests
  through the proxy) and with `--mode reverse:http://127.0.0.1:UPSTREAM`, called at its base URL
  as LiteLLM is.

Prints each round, the ratios aigw / LiteLLM of requests per second and of CPU per request (each
aigw round over the mean of the LiteLLM rounds either side; the median and the rounds' spread),
LiteLLM's CPU per request, its version and settings. If LiteLLM cannot be installed or started,
the section says why and fails (the run's exit status is not 0); it never prints a figure then."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from aigw_bench import ROOT
from aigw_bench.fixtures import BENCH_KEY, PROVIDER_ENV, PROVIDER_SECRET, THROUGHPUT_CONFIG
from aigw_bench.proxy import Target, paired, seed, start_aigw_proxy
from aigw_bench.runner import (
    PROXY_CPU,
    Processes,
    Report,
    Settings,
    cpu_seconds,
    free_port,
    median,
    pinned,
    round_figures,
    say,
    start_upstream,
    wait_listening,
)
from aigw_bench.throughput import run_loadgen

LITELLM_VERSION = "1.110.2"
LITELLM_VENV = ROOT / "var" / "bench" / "litellm-venv"
LITELLM_MASTER_KEY = "sk-bench-litellm-master"
# LiteLLM must reach nothing but the fake upstream: the price table bundled in the package
# (else it downloads it at start), offline mode (no catalog, check or tokenizer fetched on its
# own) and its telemetry vetoed (off by default in this version; `--telemetry` is a no-op).
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true",
               "LITELLM_TELEMETRY_DISABLED": "true"}
LITELLM_CONFIG = """\
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://127.0.0.1:%(port)d/v1
      api_key: %(secret)s
general_settings:
  master_key: %(master)s
"""
# litellm[proxy] pins three companion packages exactly. Where the index lacks those versions
# (this machine's has no litellm-proxy at all), the fallback installs litellm itself (the
# proxy's code is in its own wheel, litellm/proxy/), the proxy extra's other requirements, and
# the companions below unpinned, at the newest version the index has.
COMPANIONS_ABSENT = {"litellm-proxy"}
COMPANIONS_UNPINNED = {"litellm-proxy-extras", "litellm-enterprise"}
# Run in the LiteLLM venv: the proxy extra's requirements as [name, requirement] pairs.
PROXY_EXTRA_REQUIREMENTS = """\
import json
from importlib.metadata import requires
from packaging.requirements import Requirement
out = []
for line in requires("litellm") or []:
    req = Requirement(line)
    if req.marker is not None and req.marker.evaluate({"extra": "proxy"}) \\
            and not req.marker.evaluate({"extra": ""}):
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out.append([req.name, f"{req.name}{extras}{req.specifier}"])
print(json.dumps(out))
"""
VERSIONS = """\
import json
from importlib.metadata import PackageNotFoundError, version
out = {}
for name in ("litellm", "litellm-proxy", "litellm-proxy-extras", "litellm-enterprise",
             "uvicorn", "uvloop", "fastapi", "httpx", "aiohttp", "openai"):
    try:
        out[name] = version(name)
    except PackageNotFoundError:
        pass
print(json.dumps(out))
"""
STAMP = ".aigw-bench-litellm.json"
INSTALL_TIMEOUT = 1_200


class PeerUnavailable(RuntimeError):
    """LiteLLM could not be installed or started: the section has no figure."""


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", *args],
                              capture_output=True, text=True, timeout=INSTALL_TIMEOUT, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise PeerUnavailable(f"pip install {' '.join(args)} took over {INSTALL_TIMEOUT} s") \
            from None


def _pip_error(done: subprocess.CompletedProcess) -> str:
    lines = [line if len(line) <= 300 else line[:300] + " ..."
             for line in (done.stdout + done.stderr).splitlines()
             if line.strip() and not line.startswith("WARNING: Location")]
    return "\n".join(lines[-6:])


def _venv_json(python: Path, code: str) -> object:
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    try:
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pass
    raise PeerUnavailable(f"the LiteLLM venv's python failed: {done.stderr[-1000:]}")


def ensure_litellm(venv: Path = LITELLM_VENV) -> tuple[Path, dict]:
    """The `litellm` command of a venv holding LiteLLM `LITELLM_VERSION` with its proxy, made
    (with pip, through the configured index) unless a finished one is there; and what it holds:
    {"versions": {package: version}, "how": how it was installed, "reused": bool}.
    PeerUnavailable when it cannot be made."""
    python, litellm, stamp = venv / "bin" / "python", venv / "bin" / "litellm", venv / STAMP
    try:
        made = json.loads(stamp.read_text())
    except (OSError, ValueError):
        made = None
    if (isinstance(made, dict) and isinstance(made.get("versions"), dict)
            and made["versions"].get("litellm") == LITELLM_VERSION and litellm.exists()):
        return litellm, {**made, "reused": True}
    say(f"installing LiteLLM {LITELLM_VERSION} with its proxy into {venv} (once; a few minutes)")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise PeerUnavailable(f"could not create the venv {venv}: {done.stderr[-1000:]}")
    done = _pip(python, f"litellm[proxy]=={LITELLM_VERSION}")
    if done.returncode == 0:
        how = f"pip install 'litellm[proxy]=={LITELLM_VERSION}'"
    else:
        first = _pip_error(done)
        done = _pip(python, f"litellm=={LITELLM_VERSION}")
        if done.returncode != 0:
            raise PeerUnavailable(f"pip could not install litellm=={LITELLM_VERSION}:\n"
                                  f"{_pip_error(done)}")
        requirements = _venv_json(python, PROXY_EXTRA_REQUIREMENTS)
        if not isinstance(requirements, list) or not requirements:
            raise PeerUnavailable(f"litellm=={LITELLM_VERSION} names no proxy extra: {first}")
        wanted = [name if name in COMPANIONS_UNPINNED else spec for name, spec in requirements
                  if name not in COMPANIONS_ABSENT]
        done = _pip(python, f"litellm=={LITELLM_VERSION}", *wanted)
        if done.returncode != 0:
            raise PeerUnavailable(
                f"pip could not install litellm[proxy]=={LITELLM_VERSION}:\n{first}\nnor its "
                f"proxy extra without {', '.join(sorted(COMPANIONS_ABSENT))}:\n{_pip_error(done)}")
        how = (f"litellm[proxy]=={LITELLM_VERSION} does not resolve on this index ("
               f"{first.splitlines()[-1] if first else 'pip failed'}): litellm=={LITELLM_VERSION} "
               f"and its proxy extra's requirements without {', '.join(sorted(COMPANIONS_ABSENT))}"
               f", {' and '.join(sorted(COMPANIONS_UNPINNED))} unpinned")
    versions = _venv_json(python, VERSIONS)
    if (not isinstance(versions, dict) or versions.get("litellm") != LITELLM_VERSION
            or not litellm.exists()):
        raise PeerUnavailable(f"the venv {venv} holds {versions}, not litellm "
                              f"{LITELLM_VERSION}, or no `litellm` command")
    made = {"versions": versions, "how": how}
    stamp.write_text(json.dumps(made))
    return litellm, {**made, "reused": False}


def start_litellm(procs: Processes, litellm: Path, tmp: Path, up_port: int) -> Target:
    """LiteLLM's proxy with one worker on a free loopback port, pinned to the proxies' CPU, in a
    directory of its own (it reads a .env from its working directory), its output in a file."""
    port, log, workdir = free_port(), tmp / "litellm.log", tmp / "litellm"
    workdir.mkdir()
    config = workdir / "config.yaml"
    config.write_text(LITELLM_CONFIG % {"port": up_port, "secret": PROVIDER_SECRET,
                                        "master": LITELLM_MASTER_KEY})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("LITELLM")}
    argv = [str(litellm), "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    with log.open("wb") as out:
        proc = procs.start("litellm", argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
                           env={**env, **LITELLM_ENV}, preexec_fn=pinned(PROXY_CPU),
                           stdin=subprocess.DEVNULL)
    try:
        wait_listening(port, proc, "LiteLLM", log, timeout=180)
    except RuntimeError as exc:
        raise PeerUnavailable(f"LiteLLM did not start: {exc}") from None
    return Target("litellm", port, proc, log, {})


def tree_cpu(pid: int) -> float | None:
    """User + system CPU time of a process and every live descendant (LiteLLM or uvicorn may
    fork helpers; an `aigw proxy` supervisor's workers are its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        value = cpu_seconds(current)
        if value is None:
            if current == pid:
                return None
            continue
        total += value
        todo.extend(children.get(current, []))
    return total


def run(s: Settings, report: Report) -> None:
    say(f"== peers: aigw proxy beside LiteLLM's proxy, one worker each, {s.concurrency} "
        f"keep-alive connections, {s.duration:g} s rounds (+{s.round_warmup:g} s warm-up), "
        f"{s.rounds} rounds of each kind, interleaved ==")
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="aigw-bench-peers-") as tmpdir:
            try:
                _run(s, report, procs, Path(tmpdir))
            finally:
                procs.stop_all()
    except PeerUnavailable as exc:
        report.lines.append(f"| req/s: aigw proxy / LiteLLM {LITELLM_VERSION} | not measured: "
                            f"LiteLLM unavailable (see the !! line) | - | FAILED |")
        raise PeerUnavailable(f"LiteLLM unavailable, no figure: {exc}") from None


def _run(s: Settings, report: Report, procs: Processes, tmp: Path) -> None:
    litellm, made = ensure_litellm()
    versions = made["versions"]
    say(f"LiteLLM {versions['litellm']} ({'reused' if made['reused'] else 'installed now'}: "
        f"{LITELLM_VENV.relative_to(ROOT)}; {made['how']}); "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "litellm"))
    up_port = start_upstream(procs)
    stores = {}
    for name in ("fwd", "rev"):
        stores[name] = tmp / f"store-{name}"
        seed(stores[name])
        (tmp / f"mitm-{name}.yaml").write_text(
            THROUGHPUT_CONFIG % {"store": stores[name], "env": PROVIDER_ENV})
    targets = {
        "litellm": start_litellm(procs, litellm, tmp, up_port),
        "aigw": start_aigw_proxy(procs, "fwd", 1, tmp, tmp / "mitm-fwd.yaml", stores["fwd"]),
        "aigw-reverse": start_aigw_proxy(procs, "rev", 1, tmp, tmp / "mitm-rev.yaml",
                                         stores["rev"], mode=f"reverse:http://127.0.0.1:{up_port}"),
    }
    say(f"LiteLLM settings: `litellm --config CFG --host 127.0.0.1 --port {targets['litellm'].port}"
        f" --num_workers 1` (uvicorn, uvloop), one model gpt-4o-mini -> openai/gpt-4o-mini at "
        f"http://127.0.0.1:{up_port}/v1 with the fake provider key; auth: its master key only, "
        f"no database (no virtual keys, no budgets, no spend written); "
        + " ".join(f"{k}={v}" for k, v in LITELLM_ENV.items())
        + "; its log (uvicorn's access log included) to a file")
    say(f"upstream 127.0.0.1:{up_port}; LiteLLM :{targets['litellm'].port} (pid "
        f"{targets['litellm'].proc.pid}); aigw proxy --workers 1 :{targets['aigw'].port} "
        f"(pids {targets['aigw'].pids()}); aigw proxy --workers 1 --mode reverse "
        f":{targets['aigw-reverse'].port} (pids {targets['aigw-reverse'].pids()})")
    # kind -> (key, called at its base URL)
    kinds = {"litellm": (LITELLM_MASTER_KEY, True), "aigw": (BENCH_KEY, False),
             "aigw-reverse": (BENCH_KEY, True)}

    def load(kind: str, settings: Settings) -> dict:
        key, direct = kinds[kind]
        return run_loadgen(targets[kind].port, up_port, key, settings, direct=direct)

    for kind in kinds:  # a fresh process is slower in its first seconds
        load(kind, replace(s, duration=1.0))

    rps: list[tuple[str, float]] = []
    cpu: list[tuple[str, float]] = []
    failed = 0
    # litellm, aigw, aigw-reverse, ..., litellm: each aigw round has a LiteLLM round either side
    plan = [k for _ in range(s.rounds) for k in kinds] + ["litellm"]
    for n, kind in enumerate(plan, start=1):
        root = targets[kind].proc.pid
        before = tree_cpu(root)
        r = load(kind, s)
        after = tree_cpu(root)
        bad, per_request = round_figures(r, before, after)
        failed += bad
        if kind != "litellm" and r["gateway_headers"] != r["total_ok"]:
            report.invalid = True
            say(f"!! round {n}: {r['total_ok'] - r['gateway_headers']} aigw answers had no "
                f"x-gateway-* headers: they did not go through the gateway")
        rps.append((kind, r["rps"]))
        cpu.append((kind, per_request))
        say(f"round {n:2d}  {kind:<13} {r['rps']:8.1f} req/s  CPU {per_request:6.0f} us/req"
            + (f"   !! {bad} failed: {r['statuses']} {r['exceptions']}" if bad else ""))
    for name, target in targets.items():
        if target.proc.poll() is not None:
            report.invalid = True
            say(f"!! {name} exited during the run ({target.proc.returncode})")
    if failed:
        report.invalid = True
        say(f"!! {failed} requests failed across the rounds: the figures are not valid")

    def cpu_median(kind: str) -> float:
        return median([v for k, v in cpu if k == kind])

    say(f"CPU per request (medians): LiteLLM {cpu_median('litellm'):.0f} us, aigw proxy "
        f"--workers 1 {cpu_median('aigw'):.0f} us, reverse mode {cpu_median('aigw-reverse'):.0f}"
        f" us; req/s (medians): LiteLLM {median([v for k, v in rps if k == 'litellm']):.0f}, "
        f"aigw {median([v for k, v in rps if k == 'aigw']):.0f}, reverse mode "
        f"{median([v for k, v in rps if k == 'aigw-reverse']):.0f}")
    for what, series, of in (
        ("req/s: aigw proxy --workers 1 / LiteLLM, 1 worker each", rps, "aigw"),
        ("req/s: aigw proxy --workers 1 --mode reverse / LiteLLM", rps, "aigw-reverse"),
        ("CPU per request: aigw proxy --workers 1 / LiteLLM", cpu, "aigw"),
        ("CPU per request: aigw proxy --mode reverse / LiteLLM", cpu, "aigw-reverse"),
    ):
        values = sorted(paired(series, of, "litellm"))
        spread = f"rounds {values[0]:.2f}-{values[-1]:.2f}" if values else "no rounds"
        say(f"{what}: {median(values):.3f} ({spread}), no target")
        report.lines.append(f"| {what} (LiteLLM {versions['litellm']}) | {median(values):.2f}x "
                            f"({spread}) | - | |")
    report.lines.append(f"| CPU per request: LiteLLM {versions['litellm']}, 1 worker | "
                        f"{cpu_median('litellm'):.0f} us | - | |")
