"""What the gateway shows of itself: the request log (addon/requestlog.py), the Prometheus
metrics (addon/metrics.py) and `GET /healthz`, both served by one HTTP listener in a thread of
its own when the addon option `aigw_metrics` is a listen address.

The hooks call `decided` (every decided request), `settled` (from the settler, with the usage
record) and `passthrough_done`; each only queues a line and increments counters. The listener
reads the store for the gauges and the health check in its own thread, in short read
transactions. Several gateway processes on one host each serve their own port (one
`--set aigw_metrics=HOST:PORT` per process): Prometheus scrapes each; sum the counters across
instances, and read the budget gauges of any one (they are the store's figures)."""

from __future__ import annotations

import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import orjson
from mitmproxy import http
from prometheus_client.exposition import choose_encoder

from addon.metrics import BudgetGauges, Metrics, process_metrics
from addon.requestlog import RequestLog
from addon.runtime import Runtime, fault_text
from store.ledger import UsageRecord
from store.money import month_of, to_usd, utc_now

if TYPE_CHECKING:
    from addon.admission import Attempt, Flight
    from addon.settlement import Settler

log = logging.getLogger("aigw")

OPTION = "aigw_metrics"
TELEMETRY_OPTIONS = {"aigw_metrics", "aigw_metrics_keys", "aigw_request_log_file"}
PROBE_HASH = "aigw-health-probe"  # no key has this hash: the probe reads, finds nothing


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) as (host, port); ValueError otherwise."""
    host, sep, port = value.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{OPTION} must be HOST:PORT (e.g. 127.0.0.1:9464), not {value!r}")
    return host, int(port)


class Telemetry:
    """The request log, the metrics and the health of one gateway instance."""

    def __init__(self, runtime: Runtime, settler: Settler) -> None:
        self.runtime = runtime
        self.settler = settler
        self.requests = RequestLog()
        self.metrics: Metrics | None = None  # None: metrics off (no listener)
        self.with_keys = False
        self._budgets = BudgetGauges()

    # --- configuration (addon options, mitm.yaml) -------------------------------------------

    @staticmethod
    def load(loader: Any) -> None:
        """Declare the addon options (TELEMETRY_OPTIONS)."""
        loader.add_option(
            "aigw_metrics", str, "",
            "HOST:PORT to serve Prometheus /metrics and /healthz on (empty: off).")
        loader.add_option(
            "aigw_metrics_keys", bool, False,
            "Also export the budget gauges per key (one series per key: mind the cardinality).")
        loader.add_option(
            "aigw_request_log_file", str, "",
            "Write the request log (policy.request_log) to this file instead of mitmdump's "
            "output.")

    def configure(self, options: Any) -> None:
        """Apply the addon options; ValueError (naming the option) when one cannot be used."""
        listen, log_file = options.aigw_metrics, options.aigw_request_log_file
        self.with_keys = options.aigw_metrics_keys
        fmt = self.runtime.config.policy.request_log if self.runtime.config else "json"
        try:
            self.requests.configure(fmt, log_file)
        except OSError as exc:
            raise ValueError(f"aigw_request_log_file: cannot open {log_file!r}: "
                             f"{exc.strerror or type(exc).__name__}") from None
        if listen:
            address = parse_listen(listen)
            self.metrics = process_metrics()
            SERVER.serve(address, self)
        else:
            self.metrics = None
            SERVER.release(self)

    def use_config(self) -> None:
        """mitm.yaml was (re)read: its policy.request_log."""
        config = self.runtime.config
        if config is not None:
            self.requests.configure(config.policy.request_log, self.requests_file())

    def requests_file(self) -> str:
        return self.requests.file

    def enable(self, log_format: str, metrics: bool) -> None:
        """Turn the log and the metrics on or off without a listener (the benchmark's switch)."""
        self.requests.configure(log_format, self.requests_file())
        self.metrics = process_metrics() if metrics else None

    def stop(self) -> None:
        """The instance ends: write what is queued, stop serving if it was this one's."""
        SERVER.release(self)
        self.requests.stop()

    # --- the hooks' calls ---------------------------------------------------------------------

    def decided(self, flow: http.HTTPFlow, attempt: Attempt) -> None:
        """A request was decided: time the decision; a denial's line is written now."""
        try:
            meta = flow.metadata.get("aigw")
            if meta is None or "decision_ms" in meta:
                return  # not an AI request, or counted already (a decision made in two steps)
            seconds = time.perf_counter() - attempt.started
            meta["decision_ms"] = round(seconds * 1000, 3)
            decision = meta.get("decision")
            provider = meta.get("provider") or (
                attempt.provider.name if attempt.provider is not None else "unknown")
            if decision == "passthrough":
                meta["provider"] = provider
            metrics = self.metrics
            if metrics is not None:
                metrics.decision.observe(seconds)
                if decision == "grace":
                    metrics.inc("aigw_grace_requests")
            if decision != "denied":
                return
            now = time.time()
            total = now - (flow.request.timestamp_start or now)
            org = attempt.org
            self.requests.write((
                flow.request.timestamp_start or now, flow.id, provider, attempt.model,
                "denied", meta.get("status"), meta.get("error"), attempt.key_id,
                attempt.user_id, org.org_id if org is not None else None, 0.0,
                0, 0, 0, 0, 0, 0, False, False, round(total * 1000, 3), None))
            if metrics is not None:
                metrics.finished(provider, "denied", meta.get("status"), total,
                                 meta.get("error"))
        except Exception as exc:  # telemetry never changes a decision
            log.error("aigw: request telemetry failed: %s", fault_text(exc))

    def settled(self, flow: http.HTTPFlow, flight: Flight, entry: UsageRecord,
                written: bool) -> None:
        """A forwarded request was charged (`written`: its ledger write succeeded)."""
        try:
            now = time.time()
            start = flow.request.timestamp_start or flight.started
            total = now - start
            decision = "grace" if entry.mode == "grace" else "allowed"
            self.requests.write((
                # The gateway's own type, never the text of the upstream error (in the record).
                start, flow.id, entry.provider, entry.model, decision, entry.status,
                "upstream_error" if entry.error else None,
                entry.key_id, entry.user_id, entry.org_id, to_usd(entry.cost_nusd),
                entry.input, entry.cached_input, entry.cache_write, entry.cache_write_1h,
                entry.output, entry.reasoning, entry.estimated, flight.tap is not None,
                round(total * 1000, 3), round((now - flight.started) * 1000, 3)))
            metrics = self.metrics
            if metrics is not None:
                metrics.finished(entry.provider, decision, entry.status, total)
                metrics.metered(entry.provider, entry.model, entry.cost_nusd, (
                    entry.input, entry.cached_input, entry.cache_write, entry.cache_write_1h,
                    entry.output, entry.reasoning))
                if not written:
                    metrics.inc("aigw_store_errors")
        except Exception as exc:
            log.error("aigw: request telemetry failed: %s", fault_text(exc))

    def passthrough_done(self, flow: http.HTTPFlow) -> None:
        """An unknown credential's request, forwarded unmetered, has ended."""
        try:
            meta = flow.metadata.get("aigw") or {}
            if meta.get("decision") != "passthrough" or meta.get("logged"):
                return
            meta["logged"] = True
            now = time.time()
            start = flow.request.timestamp_start or now
            status = flow.response.status_code if flow.response is not None else None
            error = flow.error.msg if flow.error is not None else None
            provider = meta.get("provider", "unknown")
            self.requests.write((
                start, flow.id, provider, None, "passthrough", status, error, None, None, None,
                None, 0, 0, 0, 0, 0, 0, False, bool(flow.response and flow.response.stream),
                round((now - start) * 1000, 3), None))
            if self.metrics is not None:
                self.metrics.finished(provider, "passthrough", status, now - start)
        except Exception as exc:
            log.error("aigw: request telemetry failed: %s", fault_text(exc))

    def store_error(self) -> None:
        if self.metrics is not None:
            self.metrics.inc("aigw_store_errors")

    # --- read by the listener's thread --------------------------------------------------------

    def health(self) -> tuple[int, dict]:
        """200 and a small body when the store is readable and the replica fresh (within
        policy.max_staleness_s when set); else 503 and the reason."""
        runtime = self.runtime
        config, store = runtime.config, runtime.store
        if runtime.not_ready or config is None:
            return 503, {"ok": False, "reason": runtime.not_ready or "not configured"}
        if store is None:
            return 503, {"ok": False, "reason": "store unavailable"}
        try:
            store.records.resolve(PROBE_HASH, month_of(utc_now()))
            last = store.records.meta("last_sync")
        except Exception as exc:
            return 503, {"ok": False, "reason": f"store unreadable: {type(exc).__name__}"}
        age = None if not last else round(time.time() - float(last.get("finished_at", 0)), 3)
        limit = config.policy.max_staleness_s
        body = {"ok": True, "store": "readable", "replica_age_s": age,
                "max_staleness_s": limit, "gateway": runtime.owner["host"]}
        if limit is not None and age is None:
            return 503, {**body, "ok": False,
                         "reason": "the store has never completed a sync pass"}
        if limit is not None and age is not None and age > limit:
            return 503, {**body, "ok": False, "reason": f"the replica is {age:.0f}s old "
                         f"(max_staleness_s {limit:g})"}
        return 200, body

    def state(self) -> dict | None:
        """The figures of the gauges read at scrape time."""
        store = self.runtime.store
        state: dict[str, Any] = {"unsettled": len(self.settler.unsettled)}
        if store is None:
            return state
        try:
            last = store.records.meta("last_sync")
            if last:
                state["replica_age_s"] = max(0.0, time.time() - float(last.get("finished_at", 0)))
            state["budgets"] = self._budgets.get(store, month_of(utc_now()), self.with_keys)
        except Exception as exc:
            log.warning("aigw: metrics could not read the store: %s", fault_text(exc))
        return state


# --- the listener ---------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "aigw"
    telemetry: Telemetry | None = None

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        source = SERVER.source
        if source is None:
            self._send(503, b'{"ok": false, "reason": "no gateway running"}',
                       "application/json")
        elif path == "/healthz":
            status, body = source.health()
            self._send(status, orjson.dumps(body), "application/json")
        elif path == "/metrics" and source.metrics is not None:
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(source.metrics.registry), content_type)
        else:
            self._send(404, b"not found: /metrics, /healthz\n", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a scrape every few seconds is not worth a line


class _Server:
    """The process's one listener: kept across script reloads, serving the current instance."""

    def __init__(self) -> None:
        self.source: Telemetry | None = None
        self.address: tuple[str, int] | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def serve(self, address: tuple[str, int], source: Telemetry) -> None:
        """Serve `source` on `address`; ValueError naming the option when it cannot listen."""
        with self._lock:
            if self._httpd is None or self.address != address:
                self._stop()
                try:
                    httpd = ThreadingHTTPServer(address, _Handler)
                except OSError as exc:
                    raise ValueError(f"{OPTION}: cannot listen on {address[0]}:{address[1]}: "
                                     f"{exc.strerror or type(exc).__name__}") from None
                httpd.daemon_threads = True
                threading.Thread(target=httpd.serve_forever, name="aigw-metrics",
                                 daemon=True).start()
                self._httpd, self.address = httpd, address
                log.info("aigw: metrics on http://%s:%d/metrics, health on /healthz",
                         address[0], httpd.server_address[1])
            self.source = source
            source.metrics = source.metrics or process_metrics()
            source.metrics.state.source = source.state

    def port(self) -> int | None:
        return self._httpd.server_address[1] if self._httpd is not None else None

    def release(self, source: Telemetry) -> None:
        """Stop serving if `source` is the instance served (a newer one may have taken over)."""
        with self._lock:
            if self.source is source:
                self._stop()

    def _stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self.source is not None and self.source.metrics is not None:
            self.source.metrics.state.source = None
        self._httpd, self.address, self.source = None, None, None


SERVER = _Server()
