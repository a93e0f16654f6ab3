"""One worker process of `aigw proxy` (started by addon/supervisor.py as `python -m
addon.worker`): a mitmproxy master with the gateway loaded as a module (no script reloading) and
only the mitmproxy addons a gateway needs, accepting on a port it shares with the other workers
(SO_REUSEPORT: the kernel spreads the connections).

The chain, in mitmdump's order for what it shares with it: core, block (block_global),
disable_h2c, proxyauth, proxyserver, the gateway, the scripts of `scripts=` (extra addons, after
the gateway), the drain, next_layer, tlsconfig, upstream_auth, update_alt_svc, errorcheck (a
startup error ends the worker). Log lines go to stderr, each prefixed with the worker's name.

SIGTERM or SIGINT drains: the worker stops accepting, lets the requests in flight finish within
the drain bound, then closes its connections (a stream cut there is settled on what was seen, as
any stream the client cuts) and runs the addons' `done`. A second signal shuts it down at once.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http, master, optmanager
from mitmproxy import log as mitmlog
from mitmproxy import options as mitmoptions
from mitmproxy.addons import (
    block,
    core,
    disable_h2c,
    errorcheck,
    next_layer,
    proxyauth,
    proxyserver,
    script,
    termlog,
    tlsconfig,
    update_alt_svc,
    upstream_auth,
)
from mitmproxy.proxy import mode_servers

log = logging.getLogger("aigw.proxy")

READY = "aigw-worker-ready"  # the line a worker prints on stdout once it listens
DRAIN_POLL_S = 0.05
CUT_GRACE_S = 3.0  # after the drain bound: for the cut flows' error hooks to settle them
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_plain_listen = mode_servers.AsyncioServerInstance.listen


async def _listen_shared(self, host: str, port: int):
    """mitmproxy's `listen`, with SO_REUSEPORT on its TCP socket, so every worker binds the
    same port. TCP alone: a mode that would also listen on UDP (reverse:https://..., for
    HTTP/3) serves TCP only, since one UDP port cannot be shared (clients fall back to TCP)."""
    if self.mode.transport_protocol == "udp" or port == 0:
        return await _plain_listen(self, host, port)
    return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]


class NamedFormatter(mitmlog.MitmFormatter):
    """mitmdump's log line, prefixed with the worker's name."""

    def __init__(self, name: str, colorize: bool) -> None:
        super().__init__(colorize)
        self.prefix = f"[{name}] "

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix + super().format(record)


class Drain:
    """Which HTTP flows are in flight, and the drain: stop accepting, wait for them within the
    bound, cut what is left, shut down. Also tells the supervisor when the worker listens."""

    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.in_flight: dict[str, http.HTTPFlow] = {}
        self.draining = False

    def running(self) -> None:
        addrs = ctx.master.addons.get("proxyserver").listen_addrs()
        print(f"{READY} {json.dumps({'pid': os.getpid(), 'listen': addrs})}", flush=True)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.in_flight[flow.id] = flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if self.draining and response is not None and response.http_version.startswith("HTTP/1"):
            response.headers["connection"] = "close"  # its next request goes to a live worker

    def response(self, flow: http.HTTPFlow) -> None:
        self.in_flight.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.in_flight.pop(flow.id, None)

    async def drain(self) -> None:
        """Stop accepting, wait for the requests in flight (bounded), then shut down."""
        if self.draining:
            return
        self.draining = True
        loop = asyncio.get_running_loop()
        log.info("aigw: draining: %d requests in flight, up to %g s", len(self.in_flight),
                 self.drain_s)
        ctx.options.update(server=False)  # closes the listening sockets
        deadline = loop.time() + self.drain_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.in_flight:
            log.warning("aigw: drain bound of %g s reached: cutting %d requests in flight",
                        self.drain_s, len(self.in_flight))
        self._close_connections()
        deadline = loop.time() + CUT_GRACE_S
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        ctx.master.shutdown()

    @staticmethod
    def _close_connections() -> None:
        """Close every client connection as mitmproxy's own idle timeout does: the flows on it
        get their error hooks (the gateway settles a cut stream on the usage it saw)."""
        server = ctx.master.addons.get("proxyserver")
        for handler in list(server.connections.values()):
            io = handler.transports.get(handler.client)
            if io is not None and io.handler is not None:
                io.handler.cancel("aigw proxy is shutting down")


def drop_legacy_log_events(proxy: master.Master) -> None:
    """Uninstall the master's `LegacyLogEvents` handler. It hands every log record (mitmproxy's
    debug lines too: half a dozen for each connection) to the event loop, to be dispatched to
    every addon as the `add_log` event, deprecated since mitmproxy 9 and implemented by none of
    the worker's addons (docs/performance.md). Addons use Python's logging instead."""
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, mitmlog.LegacyLogEvents) and handler.master is proxy:
            handler.uninstall()


def chain(drain: Drain) -> list:
    """The worker's addons in order (see the module's docstring)."""
    import addon.gateway  # its module-level instance is the gateway

    return [core.Core(), block.Block(), disable_h2c.DisableH2C(), proxyauth.ProxyAuth(),
            proxyserver.Proxyserver(), *addon.gateway.addons, script.ScriptLoader(), drain,
            next_layer.NextLayer(), tlsconfig.TlsConfig(), upstream_auth.UpstreamAuth(),
            update_alt_svc.UpdateAltSvc(), errorcheck.ErrorCheck()]


def die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor ends, however it ends (Linux), so no orphan
    holds the port."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before prctl took
        os.kill(os.getpid(), signal.SIGTERM)


async def serve(args: argparse.Namespace) -> int:
    """Run the worker until it is drained; the exit status."""
    opts = mitmoptions.Options()
    proxy = master.Master(opts)
    drop_legacy_log_events(proxy)
    terminal = termlog.TermLog(sys.stderr)
    terminal.logger.formatter = NamedFormatter(args.name, terminal.logger.has_vt_codes)
    drain = Drain(args.drain_s)
    try:
        proxy.addons.add(terminal, *chain(drain))
        opts.set(*args.set, defer=True)
        optmanager.load_paths(opts, os.path.join(opts.confdir, "config.yaml"),
                              os.path.join(opts.confdir, "config.yml"))
        # The gateway reads mitm.yaml when aigw_config or aigw_store is updated (mitmdump's
        # script loader updates every option once a script loads). Loaded as a module, it is
        # told only of the options set here: without --config, --store or a --set of either it
        # would wait, not ready, forever. Update aigw_config to its default (./mitm.yaml) then.
        unset = not (opts.has_changed("aigw_config") or opts.has_changed("aigw_store"))
        opts.update(listen_host=args.listen_host, listen_port=args.listen_port,
                    mode=args.mode or ["regular"],
                    **({"aigw_config": opts.aigw_config} if unset else {}))
        if opts.deferred:
            raise exceptions.OptionsError(
                f"unknown option: {', '.join(sorted(opts.deferred))} (`mitmdump --options` "
                f"lists mitmproxy's; aigw proxy loads only the addons a gateway needs)")
    except exceptions.OptionsError as exc:
        print(f"[{args.name}] aigw: error: {exc}", file=sys.stderr, flush=True)
        return 2
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if drain.draining:
            proxy.shutdown()  # a second signal: now
        else:
            loop.create_task(drain.drain())

    loop.add_signal_handler(signal.SIGTERM, on_signal)
    loop.add_signal_handler(signal.SIGINT, on_signal)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as mitmdump: a closed peer is not a crash
    try:
        await proxy.run()
    finally:
        terminal.uninstall()
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m addon.worker")
    parser.add_argument("--name", required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--listen-host", required=True)
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--mode", action="append", default=[])
    parser.add_argument("--drain-s", type=float, required=True)
    parser.add_argument("--set", action="append", default=[])
    return parser.parse_args(argv)


class WholeLines(io.TextIOBase):
    """A worker's stderr: every worker appends to the one file (or journal) the supervisor
    logs to, so each line must reach it in one write. Python's own stderr may hand a line's
    text and its newline over in two writes, and another worker's line then lands between
    them (two lines mangled into one)."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        self._pending = ""
        self._lock = threading.Lock()  # the request log's thread writes too

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def fileno(self) -> int:
        return self._fd

    def write(self, text: str) -> int:
        with self._lock:
            self._pending += text
            if "\n" in self._pending:
                whole, _, self._pending = self._pending.rpartition("\n")
                data = (whole + "\n").encode("utf-8", errors="replace")
                while data:  # a file or a pipe takes it in one call; loop should one not
                    data = data[os.write(self._fd, data):]
        return len(text)


def main(argv: Sequence[str] | None = None) -> int:
    sys.stderr = WholeLines(2)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_parent(args.parent)
    mode_servers.AsyncioServerInstance.listen = _listen_shared
    logging.getLogger().setLevel(logging.DEBUG)  # as mitmdump: termlog_verbosity filters
    for noisy in ("asyncio", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
