"""`aigw proxy` under test: the supervisor and its workers, with the test redirect to the fake
provider loaded after the gateway (`--set scripts=`), on an ephemeral port read from the
supervisor's log, the store and config beside it. `AigwProxy` is a `tests.support.proxy.Proxy`
(same SDK clients), plus what the workers told the log."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from store import Store
from tests.support.gateway import AIGW, PROVIDER_ENV
from tests.support.proxy import REDIRECT_SCRIPT, REPO_ROOT, Proxy, ProxyStartError, _port_open

# No main port when every mode listens on a port of its own (@PORT): then the first mode's.
_LISTENING = re.compile(r"\[supervisor\] aigw proxy: \d+ workers listening on "
                        r"(?:[^ ]+:(?P<port>\d+)|[^ ]+) \((?P<modes>[^)]*)\): (?P<pids>.*)")
_WORKER_PID = re.compile(r"(w\d+) pid (\d+)")
_REQUEST_LINE = re.compile(r"^\[(w\d+)\] \[[\d:.]+\] (\{.*\})$", re.M)


@dataclass
class AigwProxy(Proxy):
    store_dir: Path | None = None
    config: Path | None = None

    def worker_pids(self) -> dict[str, int]:
        """The workers' pids as the supervisor last reported them (restarts included)."""
        text = self.log_text()
        pids = {name: int(pid) for name, pid in
                _WORKER_PID.findall(_LISTENING.search(text)["pids"])}
        for name, pid in re.findall(r"worker (w\d+) \(pid (\d+)\) listening", text):
            pids[name] = int(pid)
        return pids

    def requests_by_worker(self) -> dict[str, list[dict]]:
        """The request log's lines (JSON, on stderr), by the worker that logged them."""
        found: dict[str, list[dict]] = {}
        for name, line in _REQUEST_LINE.findall(self.log_text()):
            record = json.loads(line)
            if "decision" in record:
                found.setdefault(name, []).append(record)
        return found

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)


def start_aigw_proxy(tmp: Path, upstream: str, *, workers: int = 2,
                     store_dir: Path | None = None, args: Sequence[str] = (),
                     env: Mapping[str, str] | None = None, timeout: float = 60.0,
                     create_store: bool = True, wait: bool = True,
                     global_flags: bool = True) -> AigwProxy:
    """`aigw --config ... --store ... proxy --workers N --listen-port 0` with the repository's
    mitm.yaml, waiting (bounded) until the supervisor says every worker listens; `wait=False`
    returns once the process started (to test a start that fails). `global_flags=False` gives
    neither --config nor --store: it runs in `tmp`, on ./mitm.yaml and its ./var/store."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "mitm.yaml"
    shutil.copy(REPO_ROOT / "mitm.yaml", config)
    if not global_flags:
        assert store_dir is None, "without --store the store is mitm.yaml's ./var/store"
        store_dir = tmp / "var" / "store"
    store_dir = store_dir or tmp / "store"
    if create_store and not Store.exists(store_dir):
        Store(store_dir).close()
    confdir = tmp / "confdir"
    log_path = tmp / "aigw-proxy.log"
    flags = ["--config", str(config), "--store", str(store_dir)] if global_flags else []
    cmd = [AIGW, *flags, "proxy",
           "--workers", str(workers), "--listen-port", "0",
           "--set", f"confdir={confdir}", "--set", "connection_strategy=lazy",
           "--set", f"scripts={REDIRECT_SCRIPT}", *args]
    child_env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    child_env.update({"PYTHONUNBUFFERED": "1", "AIGW_TEST_UPSTREAM": upstream, **PROVIDER_ENV,
                      **(env or {})})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=log_file, cwd=str(REPO_ROOT if global_flags else tmp),
                                   env=child_env)
    proxy = AigwProxy(process=process, port=0, confdir=confdir, log_path=log_path,
                      store_dir=store_dir, config=config)
    if not wait:
        return proxy
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise ProxyStartError(f"aigw proxy exited with {process.returncode}:\n"
                                      f"{proxy.log_text()}", process.returncode,
                                      proxy.log_text())
            m = _LISTENING.search(proxy.log_text())
            port = m and int(m["port"] or re.search(r"@(\d+)", m["modes"]).group(1))
            if port and _port_open(port):
                proxy.port = port
                return proxy
            if time.monotonic() > deadline:
                raise ProxyStartError(f"aigw proxy did not come up within {timeout}s:\n"
                                      f"{proxy.log_text()}")
            time.sleep(0.05)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        raise
