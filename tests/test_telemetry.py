"""The request log, the metrics and /healthz with mitmproxy's taddons/tflow: one line per
decided request with the metered figures, the metric names of issue 12, the listener's option
errors, and the health check's answers."""

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from mitmproxy import exceptions, http
from mitmproxy.log import LegacyLogEvents
from mitmproxy.test import taddons, tflow, tutils
from prometheus_client.parser import text_string_to_metric_families

from addon import metrics as metrics_module
from addon import requestlog
from addon.gateway import Gateway
from addon.metrics import Metrics
from addon.requestlog import FIELDS, json_line, receivers, text_line
from addon.telemetry import SERVER, parse_listen
from store import Store, StoreUnavailable
from store.money import to_usd
from tests.support.seed import seed

PROVIDER_KEY = "sk-provider-fake-telemetry"
CONFIG = """
store: {path: %(store)s}
policy: {unknown_credentials: %(unknown)s, request_log: %(fmt)s%(extra)s}
providers:
  openai: {kind: openai, hosts: [api.openai.com], api_key_env: AIGW_TEST_OPENAI_KEY}
pricing:
  fallback: {input_per_1m: 1.0, output_per_1m: 2.0}
  models:
    gpt-4o: {input_per_1m: 2.5, cached_input_per_1m: 1.25, output_per_1m: 10.0}
"""
# 800 uncached x $2.50 + 200 cached x $1.25 + 100 output x $10 per 1M tokens
COST = (800 * 2.5 + 200 * 1.25 + 100 * 10.0) / 1e6


def run(result):
    if asyncio.iscoroutine(result):
        return asyncio.run(result)
    return result


@pytest.fixture(autouse=True)
def fresh_metrics(monkeypatch):
    """Each test counts in a registry of its own."""
    monkeypatch.setattr(metrics_module, "_METRICS", [Metrics()])
    yield
    SERVER._stop()


@pytest.fixture
def gateway(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGW_TEST_OPENAI_KEY", PROVIDER_KEY)
    made: list[tuple[Gateway, taddons.context]] = []

    def make(fmt="json", unknown="block", extra="", **options):
        config = tmp_path / "mitm.yaml"
        config.write_text(CONFIG % {"store": tmp_path / "store", "unknown": unknown,
                                    "fmt": fmt, "extra": extra})
        if not Store.exists(tmp_path / "store"):
            Store(tmp_path / "store").close()
        gw = Gateway()
        tctx = taddons.context(gw)
        options.setdefault("aigw_request_log_file", str(tmp_path / "requests.log"))
        # mitmproxy rolls a refused option back with the others set beside it: the
        # configuration first, so a refused metrics address leaves it (not ./mitm.yaml) in place.
        tctx.configure(gw, aigw_config=str(config))
        tctx.configure(gw, **options)
        made.append((gw, tctx))
        return gw

    yield make
    for gw, _ in made:
        gw.done()


def chat_flow(key: str, model="gpt-4o") -> http.HTTPFlow:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "a secret "
                                                                     "prompt"}],
                       "max_tokens": 100}).encode()
    req = tutils.treq(host="api.openai.com", port=443, scheme=b"https", method=b"POST",
                      path=b"/v1/chat/completions",
                      headers=http.Headers(content_type="application/json",
                                           authorization=f"Bearer {key}"), content=body)
    flow = tflow.tflow(req=req)
    flow.client_conn.sni = "api.openai.com"
    flow.server_conn.address = ("api.openai.com", 443)
    return flow


def response(status=200) -> http.Response:
    body = json.dumps({
        "id": "c1", "object": "chat.completion", "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a secret answer"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                  "prompt_tokens_details": {"cached_tokens": 200},
                  "completion_tokens_details": {"reasoning_tokens": 40}},
    }).encode()
    return tutils.tresp(status_code=status, content=body,
                        headers=http.Headers(content_type="application/json"))


def through(gw: Gateway, flow: http.HTTPFlow, answer: http.Response | None = None) -> None:
    """The request hook, the injector and, when allowed, the response hooks."""
    run(gw.request(flow))
    gw.injector.request(flow)
    if flow.response is None and answer is not None:
        flow.response = answer
        gw.responseheaders(flow)
        run(gw.response(flow))
    elif flow.response is not None:
        run(gw.response(flow))


def lines(gw: Gateway, tmp_path) -> list[str]:
    gw.telemetry.requests.stop()  # writes what is queued
    path = tmp_path / "requests.log"
    return path.read_text().splitlines() if path.exists() else []


def get(path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{SERVER.port()}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# --- the request log ------------------------------------------------------------------------


def test_an_allowed_and_a_denied_request_each_write_one_line(gateway, tmp_path):
    gw = gateway()
    acct = seed(gw.store, suffix="t1")
    allowed = chat_flow(acct.api_key)
    through(gw, allowed, response())
    denied = chat_flow("gw_live_" + "9" * 32)
    through(gw, denied)
    first, second = (json.loads(line) for line in lines(gw, tmp_path))
    assert list(first) == list(FIELDS)
    assert first["flow_id"] == allowed.id and first["decision"] == "allowed"
    assert (first["provider"], first["model"], first["status"]) == ("openai", "gpt-4o-2024-08-06",
                                                                    200)
    assert (first["key_id"], first["user_id"], first["org_id"]) == (acct.key_id, acct.user_id,
                                                                    acct.org_id)
    assert first["cost_usd"] == pytest.approx(COST, abs=1e-9)
    assert first["cost_usd"] == to_usd(gw.store.ledger.log_entries()[-1].cost_nusd)
    assert (first["input_tokens"], first["cached_input_tokens"], first["output_tokens"],
            first["reasoning_tokens"]) == (800, 200, 100, 40)
    assert first["estimated"] is False and first["stream"] is False
    assert first["total_ms"] >= first["upstream_ms"] >= 0
    assert first["time"].endswith("Z")
    assert second["decision"] == "denied" and second["status"] == 401
    assert second["error_type"] == "invalid_api_key" and second["cost_usd"] == 0.0
    assert second["upstream_ms"] is None


def test_a_line_never_carries_a_credential_or_the_text(gateway, tmp_path):
    gw = gateway()
    acct = seed(gw.store, suffix="t2")
    through(gw, chat_flow(acct.api_key), response())
    through(gw, chat_flow(acct.api_key, model=None), response())
    text = "\n".join(lines(gw, tmp_path))
    for secret in (acct.api_key, PROVIDER_KEY, "a secret prompt", "a secret answer"):
        assert secret not in text


def test_denial_lines_name_the_key_user_org_and_model_when_known(gateway, tmp_path):
    gw = gateway()
    acct = seed(gw.store, suffix="t3", key_limit=0.0)
    through(gw, chat_flow(acct.api_key))
    (line,) = (json.loads(x) for x in lines(gw, tmp_path))
    assert (line["decision"], line["status"], line["error_type"]) == (
        "denied", 429, "key_quota_exceeded")
    assert (line["key_id"], line["user_id"], line["org_id"], line["model"]) == (
        acct.key_id, acct.user_id, acct.org_id, "gpt-4o")


def test_text_format_and_off(gateway, tmp_path):
    gw = gateway(fmt="text")
    acct = seed(gw.store, suffix="t4")
    through(gw, chat_flow(acct.api_key), response())
    (line,) = lines(gw, tmp_path)
    assert line.startswith("aigw request time=") and " decision=allowed " in line
    assert f" key_id={acct.key_id} " in line and " upstream_ms=" in line
    (tmp_path / "requests.log").unlink()
    gw = gateway(fmt="off")
    through(gw, chat_flow(acct.api_key), response())
    assert lines(gw, tmp_path) == []


def test_passthrough_is_logged_when_it_ends(gateway, tmp_path):
    gw = gateway(unknown="passthrough")
    flow = chat_flow("sk-someones-own-provider-key")
    through(gw, flow, response())
    (line,) = (json.loads(x) for x in lines(gw, tmp_path))
    assert (line["decision"], line["provider"], line["status"]) == ("passthrough", "openai", 200)
    assert line["key_id"] is None and line["cost_usd"] is None
    assert "sk-someones-own-provider-key" not in json.dumps(line)


def test_grace_is_logged_when_settled(gateway, tmp_path, monkeypatch):
    gw = gateway(extra=", default_failure_mode: fail_open")
    acct = seed(gw.store, suffix="t6")

    def down(*args, **kwargs):
        raise StoreUnavailable("disk on fire")

    monkeypatch.setattr(gw.store.records, "resolve", down)
    through(gw, chat_flow(acct.api_key), response())
    (line,) = (json.loads(x) for x in lines(gw, tmp_path))
    assert line["decision"] == "grace" and line["cost_usd"] == pytest.approx(COST, abs=1e-9)
    registry = metrics_module.process_metrics().registry
    assert registry.get_sample_value("aigw_grace_requests_total") == 0  # metrics off


def test_line_formats():
    record = (0.0, "f1", "openai", None, "denied", 401, "invalid_api_key", None, None, None,
              0.0, 0, 0, 0, 0, 0, 0, False, False, 1.5, None)
    assert json.loads(json_line(record))["time"] == "1970-01-01T00:00:00.000Z"
    assert text_line(record) == (
        "aigw request time=1970-01-01T00:00:00.000Z flow_id=f1 provider=openai "
        "decision=denied status=401 error_type=invalid_api_key cost_usd=0.0 input_tokens=0 "
        "cached_input_tokens=0 cache_write_tokens=0 cache_write_1h_tokens=0 output_tokens=0 "
        "reasoning_tokens=0 estimated=false stream=false total_ms=1.5")
    assert 'model="a b"' in text_line((0.0, "f", "p", "a b") + record[4:])


class Lines(logging.Handler):
    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class LoopOfRecords:
    """A master for a `LegacyLogEvents`: what it would hand the event loop, kept."""

    def __init__(self) -> None:
        self.handed: list = []
        self.event_loop = SimpleNamespace(call_soon_threadsafe=self.handed.append)


def test_lines_go_to_the_handlers_that_show_them_never_to_add_log():
    parent, child = logging.Logger("top"), logging.Logger("top.requests")
    child.parent = parent
    shown, quiet, above = Lines(logging.INFO), Lines(logging.ERROR), Lines()
    parent.handlers = [shown, quiet, LegacyLogEvents(LoopOfRecords())]
    child.handlers = [above]
    assert receivers(child, logging.INFO) == [above, shown]
    child.propagate = False
    assert receivers(child, logging.INFO) == [above]


def test_lines_nobody_would_show_are_not_formatted(monkeypatch):
    formatted: list[tuple] = []
    monkeypatch.setattr(requestlog, "json_line", lambda r: formatted.append(r) or "line")
    log = requestlog.RequestLog()
    log.configure("json")
    try:
        handler = Lines()
        monkeypatch.setattr(requestlog, "receivers", lambda logger, level: [])
        log._emit([("a",)])
        assert formatted == [] and handler.lines == []
        monkeypatch.setattr(requestlog, "receivers", lambda logger, level: [handler])
        log._emit([("a",), ("b",)])
        assert formatted == [("a",), ("b",)] and handler.lines == ["line", "line"]
    finally:
        log.stop()


# --- the metrics ----------------------------------------------------------------------------


def test_listen_addresses():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "localhost", "host:port", ":9464", "h:70000", ""):
        with pytest.raises(ValueError, match="aigw_metrics"):
            parse_listen(bad)


def test_an_invalid_or_busy_address_is_an_options_error(gateway):
    with pytest.raises(exceptions.OptionsError, match="aigw_metrics"):
        gateway(aigw_metrics="not-an-address")
    gw = gateway(aigw_metrics="127.0.0.1:0")
    busy = f"127.0.0.1:{SERVER.port()}"
    SERVER.source = None  # as if another process held the port
    SERVER._httpd, kept = None, SERVER._httpd
    try:
        with pytest.raises(exceptions.OptionsError, match=f"aigw_metrics: cannot listen on {busy}"):
            gateway(aigw_metrics=busy)
    finally:
        kept.shutdown()
        kept.server_close()
        gw.telemetry.metrics = None


def test_metrics_hold_the_metered_figures(gateway):
    gw = gateway(aigw_metrics="127.0.0.1:0")
    acct = seed(gw.store, suffix="t8", user_limit=20.0, org_budget=100.0)
    through(gw, chat_flow(acct.api_key), response())
    through(gw, chat_flow("gw_live_" + "8" * 32))
    status, body = get("/metrics")
    assert status == 200
    got = samples(body.decode())
    assert got[("aigw_requests_total", (("decision", "allowed"), ("provider", "openai"),
                                        ("status_class", "2xx")))] == 1
    assert got[("aigw_requests_total", (("decision", "denied"), ("provider", "openai"),
                                        ("status_class", "4xx")))] == 1
    assert got[("aigw_denials_total", (("provider", "openai"), ("reason", "invalid_api_key")))] == 1
    model = (("model", "gpt-4o-2024-08-06"), ("provider", "openai"))
    assert got[("aigw_spend_usd_total", model)] == pytest.approx(COST, abs=1e-12)
    for kind, count in (("input", 800), ("cached_input", 200), ("output", 100),
                        ("reasoning", 40)):
        assert got[("aigw_tokens_total", (("kind", kind), *model))] == count
    assert got[("aigw_decision_seconds_count", ())] == 2
    assert got[("aigw_request_duration_seconds_count", ())] == 2
    assert got[("aigw_unsettled_writes", ())] == 0
    assert got[("aigw_budget_used_usd", (("id", acct.user_id), ("level", "user")))] == (
        pytest.approx(COST, abs=1e-12))
    assert got[("aigw_budget_limit_usd", (("id", acct.user_id), ("level", "user")))] == 20.0
    assert got[("aigw_budget_used_usd", (("id", acct.org_id), ("level", "org")))] == (
        pytest.approx(COST, abs=1e-12))
    assert got[("aigw_budget_limit_usd", (("id", acct.org_id), ("level", "org")))] == 100.0
    assert not any(name == "aigw_budget_used_usd" and ("level", "key") in labels
                   for name, labels in got)
    assert ("aigw_replica_age_seconds", ()) not in got  # never synced
    assert get("/nope")[0] == 404


def test_budget_gauges_per_key_when_asked(gateway):
    gw = gateway(aigw_metrics="127.0.0.1:0", aigw_metrics_keys=True)
    acct = seed(gw.store, suffix="t9", key_limit=3.0)
    through(gw, chat_flow(acct.api_key), response())
    got = samples(get("/metrics")[1].decode())
    assert got[("aigw_budget_used_usd", (("id", acct.key_id), ("level", "key")))] == (
        pytest.approx(COST, abs=1e-12))
    assert got[("aigw_budget_limit_usd", (("id", acct.key_id), ("level", "key")))] == 3.0


def test_store_errors_and_grace_are_counted(gateway, monkeypatch):
    gw = gateway(aigw_metrics="127.0.0.1:0", extra=", default_failure_mode: fail_open")
    acct = seed(gw.store, suffix="t10")

    def down(*args, **kwargs):
        raise StoreUnavailable("disk on fire")

    monkeypatch.setattr(gw.store.records, "resolve", down)
    through(gw, chat_flow(acct.api_key), response())
    registry = metrics_module.process_metrics().registry
    assert registry.get_sample_value("aigw_store_errors_total") == 1
    assert registry.get_sample_value("aigw_grace_requests_total") == 1
    assert registry.get_sample_value("aigw_requests_total", {
        "provider": "openai", "decision": "grace", "status_class": "2xx"}) == 1


def test_the_hooks_do_not_count_when_metrics_are_off(gateway):
    gw = gateway()
    acct = seed(gw.store, suffix="t11")
    through(gw, chat_flow(acct.api_key), response())
    registry = metrics_module.process_metrics().registry
    assert registry.get_sample_value("aigw_requests_total", {
        "provider": "openai", "decision": "allowed", "status_class": "2xx"}) is None


# --- /healthz -------------------------------------------------------------------------------


def test_healthz_ready_and_not(gateway):
    gw = gateway(aigw_metrics="127.0.0.1:0")
    status, body = get("/healthz")
    assert status == 200
    answer = json.loads(body)
    assert answer["ok"] is True and answer["store"] == "readable"
    assert answer["replica_age_s"] is None and answer["max_staleness_s"] is None
    gw.runtime.not_ready = "invalid configuration: mitm.yaml: bad"
    status, body = get("/healthz")
    assert status == 503 and json.loads(body)["reason"].startswith("invalid configuration")


def test_healthz_follows_the_replica_age(gateway):
    gw = gateway(aigw_metrics="127.0.0.1:0", extra=", max_staleness_s: 60")
    status, body = get("/healthz")
    assert status == 503 and "never completed a sync pass" in json.loads(body)["reason"]
    gw.store.records.set_meta("last_sync", {"finished_at": time.time() - 5})
    status, body = get("/healthz")
    assert status == 200 and 4 <= json.loads(body)["replica_age_s"] < 60
    assert samples(get("/metrics")[1].decode())[("aigw_replica_age_seconds", ())] >= 4
    gw.store.records.set_meta("last_sync", {"finished_at": time.time() - 120})
    status, body = get("/healthz")
    assert status == 503 and "old (max_staleness_s 60)" in json.loads(body)["reason"]


def test_healthz_when_the_store_cannot_be_read(gateway, monkeypatch):
    gw = gateway(aigw_metrics="127.0.0.1:0")

    def down(*args, **kwargs):
        raise StoreUnavailable("disk on fire")

    monkeypatch.setattr(gw.store.records, "resolve", down)
    status, body = get("/healthz")
    assert status == 503
    assert json.loads(body) == {"ok": False, "reason": "store unreadable: StoreUnavailable"}


def test_a_new_instance_serves_the_same_port_and_keeps_the_counts(gateway):
    """As after a script reload: the old instance ends, the new one serves on, counting on."""
    gw = gateway(aigw_metrics="127.0.0.1:0")
    port = SERVER.port()
    acct = seed(gw.store, suffix="t12")
    through(gw, chat_flow(acct.api_key), response())
    gw.done()
    assert SERVER.port() is None
    gw = gateway(aigw_metrics=f"127.0.0.1:{port}")
    through(gw, chat_flow(acct.api_key), response())
    assert SERVER.port() == port
    got = samples(get("/metrics")[1].decode())
    assert got[("aigw_requests_total", (("decision", "allowed"), ("provider", "openai"),
                                        ("status_class", "2xx")))] == 2
