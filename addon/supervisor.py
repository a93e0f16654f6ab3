"""`aigw proxy`: N worker processes (addon/worker.py), each a mitmproxy master with the gateway,
all accepting on one port (SO_REUSEPORT), sharing one store and one CA directory, and the
supervisor that starts them, restarts one that dies, and drains them on SIGTERM.

The supervisor never opens the store and never forks a process that has: each worker is a fresh
interpreter (LMDB environments must not cross a fork). Before the first worker starts it
reserves the port (a socket bound with SO_REUSEPORT and never listening: it takes no
connections, and keeps the port ours while a worker restarts) and makes the CA, once.

Startup: the first worker alone (a configuration error is then told once), then the others.
A worker that ends before it listens at startup ends the run (exit 1); one that dies later is
restarted at once, or after a backoff growing to 30 s while it keeps dying within 30 s of
its start. SIGTERM or SIGINT: every worker drains (see addon/worker.py) within `drain_s`; one still
running `drain_s` + DONE_GRACE_S later is killed. A second signal shuts the workers down at once.
SIGHUP: the workers are replaced one at a time, each drained before its replacement starts and
reads mitm.yaml anew, while the others serve; a replacement that cannot start (the file made
invalid) stops the round, and the workers not yet replaced keep serving as they were.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from mitmproxy.proxy import mode_specs

from addon import ca

READY = "aigw-worker-ready"  # addon.worker.READY (not imported: it loads all of mitmproxy)
STARTUP_TIMEOUT_S = 60.0
DONE_GRACE_S = 10.0  # past the drain bound: the workers' done hooks (settle, close the store)
STABLE_AFTER_S = 30.0  # a worker that ran this long and died is restarted without backoff
MAX_BACKOFF_S = 30.0
# Options the supervisor sets itself, from its own flags.
OWN_OPTIONS = {"listen_host": "--listen-host", "listen_port": "--listen-port", "mode": "--mode",
               "server": None}


class SupervisorError(Exception):
    """The proxy cannot start as asked (a port in use, a worker that fails)."""


class BadFlag(SupervisorError):
    """A flag of `aigw proxy` that cannot work as given (a usage error)."""


@dataclass
class ProxySpec:
    """What `aigw proxy` was asked for."""

    workers: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    modes: list[str] = field(default_factory=list)
    sets: list[str] = field(default_factory=list)  # OPTION=VALUE, as mitmdump's --set
    drain_s: float = 10.0
    config: str | None = None  # the global --config / --store
    store: str | None = None


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def say(message: str) -> None:
    """A line on stderr; a closed stderr never stops the supervisor (restarts, the drain)."""
    line(f"[supervisor] aigw proxy: {message}")


def line(text: str) -> None:
    """One line on stderr in one write (the workers append to the same file: a line handed
    over in two writes could get another's in between); a closed stderr is ignored."""
    try:
        sys.stderr.write(f"{text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def option_value(sets: list[str], name: str) -> str | None:
    """The value `--set NAME=...` gave, if any."""
    value = None
    for item in sets:
        key, _, rest = item.partition("=")
        if key.strip() == name:
            value = rest
    return value


def check(spec: ProxySpec) -> list[mode_specs.ProxyMode]:
    """Refuse what cannot run as asked, naming the flag and the reason; the parsed modes."""
    if spec.workers < 1:
        raise BadFlag("--workers: must be at least 1")
    if spec.drain_s < 0:
        raise BadFlag("--drain-s: must not be negative")
    for item in spec.sets:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise BadFlag(f"--set {item!r}: expected OPTION=VALUE")
        if key.strip() in OWN_OPTIONS:
            flag = OWN_OPTIONS[key.strip()]
            raise BadFlag(f"--set {key.strip()}: use {flag} instead" if flag else
                                  f"--set {key.strip()}: aigw proxy runs the proxy server")
    modes = []
    for text in spec.modes or ["regular"]:
        try:
            mode = mode_specs.ProxyMode.parse(text)
        except ValueError as exc:
            raise BadFlag(f"--mode {text!r}: {exc}") from None
        if (mode.transport_protocol == "udp" or mode.type_name == "dns"
                or mode.listen_port(spec.listen_port) is None):
            raise BadFlag(f"--mode {text!r}: aigw proxy serves TCP modes only (regular, "
                                  f"reverse:URL, transparent, upstream:URL, socks5)")
        if mode.custom_listen_port == 0:
            raise BadFlag(f"--mode {text!r}: give the mode a port, or none")
        if mode.custom_listen_host is not None:
            raise BadFlag(f"--mode {text!r}: the address is --listen-host's, for every mode "
                          f"(give the mode a port only: @PORT)")
        modes.append(mode)
    if not spec.listen_host.strip():
        raise BadFlag("--listen-host: give an address (127.0.0.1, 0.0.0.0 or ::)")
    return modes


def reserve(host: str, port: int) -> socket.socket:
    """A socket bound to HOST:PORT with SO_REUSEPORT and never listening: the port stays ours
    (port 0 picks one). SupervisorError if another program has it."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise BadFlag(f"--listen-host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEPORT only: the workers (this user) may bind beside it, and nobody else. With
        # SO_REUSEADDR too, any user's socket could bind the port while no worker listens (a
        # worker restarting) and take the proxy's connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        bound = sock.getsockname()
        # SO_REUSEPORT lets another process of this user bind it too: one listening already
        # (another aigw proxy) answers a connection.
        probe_host = "127.0.0.1" if family == socket.AF_INET and bound[0] == "0.0.0.0" else (
            "::1" if family == socket.AF_INET6 and bound[0] == "::" else bound[0])
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((probe_host, bound[1], *bound[2:])) == 0:
                raise OSError(errno.EADDRINUSE, "another program listens there")
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"cannot listen on {host or '*'}:{port}: "
                              f"{exc.strerror or exc}") from None
    return sock


@dataclass
class Worker:
    """One worker slot: its process now, and its history."""

    name: str
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    quick_deaths: int = 0  # deaths in a row within STABLE_AFTER_S of the start
    restarts: int = 0
    replacing: bool = False  # drained on purpose (SIGHUP): its exit is no death


class Supervisor:
    def __init__(self, spec: ProxySpec, modes: list[mode_specs.ProxyMode],
                 port: int | None) -> None:
        self.spec = spec
        self.modes = modes
        self.port = port
        self.workers = [Worker(f"w{n}") for n in range(1, spec.workers + 1)]
        self.stopping = asyncio.Event()
        self.forced = False
        self.started = False  # every worker listened once
        self._tasks: list[asyncio.Task] = []
        self._replacing: asyncio.Task | None = None

    # --- processes ------------------------------------------------------------------------

    def argv(self, worker: Worker, index: int) -> list[str]:
        spec = self.spec
        # -P: the working directory is not on sys.path (./store, the data, would shadow the
        # store package).
        argv = [sys.executable, "-P", "-m", "addon.worker", "--name", worker.name,
                "--parent", str(os.getpid()), "--listen-host", spec.listen_host,
                "--listen-port", str(spec.listen_port if self.port is None else self.port),
                "--drain-s", str(spec.drain_s)]
        for mode in spec.modes:
            argv += ["--mode", mode]
        for item in worker_sets(spec, worker.name, index):
            argv += ["--set", item]
        return argv

    async def spawn(self, worker: Worker, index: int) -> None:
        worker.ready.clear()
        worker.started_at = time.monotonic()
        # A session of its own: Ctrl-C reaches the supervisor alone, which drains them.
        worker.proc = await asyncio.create_subprocess_exec(
            *self.argv(worker, index), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, start_new_session=True)
        self._tasks.append(asyncio.get_running_loop().create_task(self.forward(worker,
                                                                               worker.proc)))

    async def forward(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        """The worker's stdout: the ready line, and whatever an extra addon prints (named)."""
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over 64 KiB (asyncio drops it): keep the pipe drained
                raw = await proc.stdout.read(65536)
            if not raw:
                return
            text = raw.decode(errors="replace").rstrip("\n")
            if text.startswith(READY):
                worker.ready.set()
                if self.started:
                    say(f"worker {worker.name} (pid {proc.pid}) listening")
            else:
                line(f"[{worker.name}] {text}")

    async def start_first(self, worker: Worker, index: int) -> None:
        """Start a worker and wait until it listens; SupervisorError if it ends first."""
        await self.spawn(worker, index)
        assert worker.proc is not None
        exited = asyncio.ensure_future(worker.proc.wait())
        ready = asyncio.ensure_future(worker.ready.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        done, _ = await asyncio.wait({exited, ready, stop}, timeout=STARTUP_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        for future in (exited, ready, stop):
            future.cancel()
        if ready in done or stop in done:
            return
        if exited in done:
            raise SupervisorError(f"worker {worker.name} exited with {describe(worker.proc)} "
                                  f"before it listened (its lines above say why)")
        raise SupervisorError(f"worker {worker.name} did not listen within "
                              f"{STARTUP_TIMEOUT_S:.0f} s")

    async def keep(self, worker: Worker, index: int) -> None:
        """Restart the worker whenever it dies, until the supervisor stops."""
        while not self.stopping.is_set():
            assert worker.proc is not None
            stop = asyncio.ensure_future(self.stopping.wait())
            exited = asyncio.ensure_future(worker.proc.wait())
            await asyncio.wait({stop, exited}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not exited.done():
                exited.cancel()
                return
            if worker.replacing:
                worker.replacing = False
                await self.spawn(worker, index)
                continue
            ran = time.monotonic() - worker.started_at
            worker.quick_deaths = worker.quick_deaths + 1 if ran < STABLE_AFTER_S else 0
            backoff_s = restart_backoff(worker.quick_deaths)
            worker.restarts += 1
            later = f" in {backoff_s:g} s" if backoff_s else ""
            say(f"worker {worker.name} (pid {worker.proc.pid}) died ({describe(worker.proc)}) "
                f"after {ran:.1f} s; restarting it{later} (restart {worker.restarts})")
            if backoff_s:
                try:
                    await asyncio.wait_for(self.stopping.wait(), backoff_s)
                    return
                except TimeoutError:
                    pass
            await self.spawn(worker, index)
            assert worker.proc is not None
            say(f"worker {worker.name} restarted (pid {worker.proc.pid})")

    # --- the run --------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        if self.stopping.is_set():
            self.forced = True
            say(f"{signal.Signals(signum).name} again: stopping the workers now")
            self.signal_workers(signal.SIGTERM)  # a second one: a worker shuts down at once
            return
        say(f"{signal.Signals(signum).name}: draining {len(self.workers)} workers "
            f"(up to {self.spec.drain_s:g} s)")
        self.stopping.set()

    def on_reload(self) -> None:
        """SIGHUP: replace the workers one at a time (see the module's docstring)."""
        if self.stopping.is_set() or not self.started:
            say("SIGHUP: ignored (the workers are starting or stopping)")
        elif self._replacing is not None and not self._replacing.done():
            say("SIGHUP: ignored (a replacement round is under way)")
        else:
            self._replacing = asyncio.get_running_loop().create_task(self.replace_all())

    async def replace_all(self) -> None:
        say(f"SIGHUP: replacing {len(self.workers)} workers one at a time, each drained "
            f"(up to {self.spec.drain_s:g} s), to read mitm.yaml again")
        for worker in self.workers:
            if self.stopping.is_set():
                return
            old = worker.proc
            if old is None or old.returncode is not None:
                continue  # dead: keep() starts it again, reading the file anew anyway
            worker.replacing = True
            try:
                old.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            error = await self.replaced(worker, old)
            if error is not None:
                say(f"SIGHUP: worker {worker.name} {error}; the round stops here, the workers "
                    f"not replaced yet serve on as they were")
                return
        say("SIGHUP: every worker replaced")

    async def replaced(self, worker: Worker, old: asyncio.subprocess.Process) -> str | None:
        """Wait for `worker`'s replacement of `old` to listen; why it did not, or None."""
        deadline = time.monotonic() + self.spec.drain_s + DONE_GRACE_S + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline and not self.stopping.is_set():
            new = worker.proc
            if new is not old and new is not None:
                if worker.ready.is_set():
                    return None
                if new.returncode is not None:
                    return f"did not start ({describe(new)}: its lines above say why)"
            await asyncio.sleep(0.05)
        return None if self.stopping.is_set() else "was not replaced in time"

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                try:
                    worker.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.on_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.on_reload)
        code = 0
        try:
            await self.start_first(self.workers[0], 0)
            await asyncio.gather(*(self.start_first(w, i)
                                   for i, w in enumerate(self.workers) if i))
            if not self.stopping.is_set():
                self.started = True
                pids = ", ".join(f"{w.name} pid {w.proc.pid}" for w in self.workers if w.proc)
                where = self.spec.listen_host or "*"
                say(f"{len(self.workers)} workers listening on "
                    f"{where if self.port is None else f'{where}:{self.port}'} "
                    f"({', '.join(self.spec.modes or ['regular'])}): {pids}")
                keepers = [loop.create_task(self.keep(w, i)) for i, w in enumerate(self.workers)]
                await self.stopping.wait()
                await asyncio.gather(*keepers)
        except SupervisorError as exc:
            say(f"error: {exc}")
            code = 1
        await self.stop_workers()
        for task in self._tasks:
            task.cancel()
        if code == 0:
            say("all workers stopped")
        return code

    async def stop_workers(self) -> None:
        """SIGTERM every worker (a drain), then SIGKILL what is still running after the bound."""
        self.signal_workers(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        if not procs:
            return
        _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs],
                                        timeout=self.spec.drain_s + DONE_GRACE_S)
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                say(f"worker {worker.name} (pid {worker.proc.pid}) still running "
                    f"{self.spec.drain_s + DONE_GRACE_S:g} s after SIGTERM: killing it")
                worker.proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=5)


def restart_backoff(quick_deaths: int) -> float:
    """Seconds before a restart: none for the first quick death, then 1, 2, 4 ... 30."""
    return 0.0 if quick_deaths <= 1 else min(MAX_BACKOFF_S, 2.0 ** (quick_deaths - 2))


def option_name(item: str) -> str:
    return item.partition("=")[0].strip()


def worker_sets(spec: ProxySpec, name: str, index: int) -> list[str]:
    """The `--set`s of worker `name` (number `index` from 0): the global --config/--store
    (unless --set gave aigw_config/aigw_store), the user's, and what each worker needs of its
    own in place of the user's value: the metrics listener (worker N on PORT+N-1: a port is
    one process's) and the request log file (PATH.wN: appends of several processes to one
    file could interleave within a line)."""
    given = {option_name(item): item.partition("=")[2] for item in spec.sets}
    sets = []
    if spec.config is not None and "aigw_config" not in given:
        sets.append(f"aigw_config={spec.config}")
    if spec.store is not None and "aigw_store" not in given:
        sets.append(f"aigw_store={spec.store}")
    own = {}
    host, sep, port = given.get("aigw_metrics", "").rpartition(":")
    if sep and port.isdigit() and int(port) != 0:
        own["aigw_metrics"] = f"{host}:{int(port) + index}"
    if given.get("aigw_request_log_file"):
        own["aigw_request_log_file"] = f"{given['aigw_request_log_file']}.{name}"
    sets += [item for item in spec.sets if option_name(item) not in own]
    return sets + [f"{key}={value}" for key, value in own.items()]


def describe(proc: asyncio.subprocess.Process | None) -> str:
    code = None if proc is None else proc.returncode
    if code is None:
        return "no exit status yet"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def run(spec: ProxySpec) -> int:
    """Run `aigw proxy` until SIGTERM or SIGINT; the exit status (0 after a drain, 1 when it
    could not start). SupervisorError before anything started."""
    modes = check(spec)
    # The main port is held only when a mode listens on it: with every mode on a port of its
    # own (@PORT) no worker uses it, and a program there (scripts/run on 8080) is no conflict.
    placeholder = (reserve(spec.listen_host, spec.listen_port)
                   if any(mode.custom_listen_port is None for mode in modes) else None)
    port = placeholder.getsockname()[1] if placeholder is not None else None
    extra: list[socket.socket] = []
    try:
        # A mode's own port is held the same way, so no worker restart leaves it free either.
        extra += [reserve(spec.listen_host, mode.custom_listen_port) for mode in modes
                  if mode.custom_listen_port is not None and mode.custom_listen_port != port]
        confdir = option_value(spec.sets, "confdir")
        try:
            ca.ensure_ca(confdir)
        except OSError as exc:
            raise SupervisorError(f"cannot make the CA in {ca.confdir_path(confdir)}: "
                                  f"{exc.strerror or exc}") from None
        return asyncio.run(Supervisor(spec, modes, port).run())
    finally:
        if placeholder is not None:
            placeholder.close()
        for sock in extra:
            sock.close()

