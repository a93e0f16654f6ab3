"""End to end: the request log, the Prometheus metrics and /healthz of a real mitmdump with the
gateway, after known requests from the official SDKs: the log lines and the metrics (parsed
with prometheus-client's parser) hold exactly the metered figures of the ledger's usage
records; /healthz answers 200, then 503 once the replica is older than max_staleness_s."""

import json
import re
import time
import urllib.error
import urllib.request

import anthropic
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from store import Store
from store.money import month_of, to_usd, utc_now
from tests.support.gateway import chat, settled, start_gateway
from tests.support.proxy import REPO_ROOT, ProxyStartError
from tests.support.seed import seed

pytestmark = pytest.mark.e2e

LINE = re.compile(r"^\[[0-9:.]+\] (\{.*\"flow_id\".*\})$", re.M)


def metrics_port(proxy) -> int:
    """The port the gateway's metrics listener got (`aigw_metrics` 127.0.0.1:0: the kernel
    picks a free one as it binds; a port picked here first could be taken before the gateway
    binds it)."""
    return int(proxy.wait_for_log(r"aigw: metrics on http://127\.0\.0\.1:(\d+)/metrics",
                                  timeout=10).group(1))


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def log_lines(proxy, count: int, timeout: float = 10.0) -> list[dict]:
    """The request log's lines (its file: mitmdump's own output interleaves other lines), once
    there are `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        text = proxy.request_log.read_text() if proxy.request_log.exists() else ""
        found = [json.loads(line) for line in text.splitlines() if line.endswith("}")]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture(scope="module")
def observed(tmp_path_factory, fake_provider_server):
    tmp = tmp_path_factory.mktemp("gwtel")
    proxy = start_gateway(tmp, fake_provider_server.address,
                          sets={"aigw_metrics": "127.0.0.1:0",
                                "aigw_request_log_file": str(tmp / "requests.log")})
    proxy.request_log = tmp / "requests.log"
    proxy.store = Store(proxy.store_dir)
    proxy.metrics_port = metrics_port(proxy)
    try:
        yield proxy
    finally:
        proxy.stop()
        proxy.store.close()


def test_log_lines_and_metrics_hold_the_metered_figures(observed, fake_provider):
    acct = seed(observed.store, suffix="tel1", user_limit=25.0, org_budget=150.0)
    client = observed.openai_client(acct.api_key)
    chat(client)
    list(chat(client, model="gpt-4o", stream=True, stream_options={"include_usage": True}))
    observed.anthropic_client(acct.api_key).messages.create(
        model="claude-sonnet-4-6", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    observed.genai_client(acct.api_key).models.generate_content(model="gemini-2.5-flash",
                                                                contents="hi")
    with pytest.raises(openai.AuthenticationError):
        chat(observed.openai_client("gw_live_" + "7" * 32))
    with pytest.raises(anthropic.AuthenticationError):
        observed.anthropic_client("gw_live_" + "6" * 32).messages.create(
            model="claude-sonnet-4-6", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    settled(observed.store, acct.key_id, 4)

    lines = log_lines(observed, 6)
    allowed = [line for line in lines if line["decision"] == "allowed"]
    denied = [line for line in lines if line["decision"] == "denied"]
    assert len(allowed) == 4 and len(denied) == 2
    records = [r for r in observed.store.ledger.log_entries() if r.key_id == acct.key_id]
    assert len(records) == 4
    by_provider = {r.provider: r for r in records if r.provider != "openai"}
    openai_records = sorted((r for r in records if r.provider == "openai"), key=lambda r: r.at)
    for line in allowed:
        if line["provider"] == "openai":
            record = openai_records[0 if not line["stream"] else 1]
        else:
            record = by_provider[line["provider"]]
        assert (line["key_id"], line["user_id"], line["org_id"]) == (
            acct.key_id, acct.user_id, acct.org_id)
        assert line["model"] == record.model and line["status"] == record.status == 200
        assert line["cost_usd"] == to_usd(record.cost_nusd) > 0
        assert (line["input_tokens"], line["cached_input_tokens"], line["cache_write_tokens"],
                line["cache_write_1h_tokens"], line["output_tokens"],
                line["reasoning_tokens"]) == (
            record.input, record.cached_input, record.cache_write, record.cache_write_1h,
            record.output, record.reasoning)
        assert line["estimated"] is record.estimated is False
        assert line["total_ms"] >= line["upstream_ms"] >= 0
    assert sorted(line["stream"] for line in allowed) == [False, False, False, True]
    # The gateway's own error type, whatever native shape the SDK received.
    assert {(d["provider"], d["status"], d["error_type"]) for d in denied} == {
        ("openai", 401, "invalid_api_key"), ("anthropic", 401, "invalid_api_key")}
    assert acct.api_key not in observed.log_text()

    status, body = get(observed.metrics_port, "/metrics")
    assert status == 200
    got = samples(body.decode())
    for record in records:
        spend = got[("aigw_spend_usd_total", (("model", record.model),
                                              ("provider", record.provider)))]
        same = [r for r in records if (r.provider, r.model) == (record.provider, record.model)]
        assert spend == pytest.approx(sum(to_usd(r.cost_nusd) for r in same), abs=1e-12)
        for kind, count in (("input", record.input), ("output", record.output)):
            assert got[("aigw_tokens_total", (("kind", kind), ("model", record.model),
                                              ("provider", record.provider)))] == sum(
                getattr(r, kind) for r in same) == count * len(same)
    assert got[("aigw_requests_total", (("decision", "allowed"), ("provider", "openai"),
                                        ("status_class", "2xx")))] == 2
    assert got[("aigw_requests_total", (("decision", "denied"), ("provider", "anthropic"),
                                        ("status_class", "4xx")))] == 1
    assert got[("aigw_denials_total", (("provider", "openai"),
                                       ("reason", "invalid_api_key")))] == 1
    assert got[("aigw_decision_seconds_count", ())] == 6
    assert got[("aigw_request_duration_seconds_count", ())] == 6
    (user_counter, org_counter) = observed.store.ledger.counters(
        [("user", acct.user_id), ("org", acct.org_id)], month_of(utc_now()))
    assert got[("aigw_budget_used_usd", (("id", acct.user_id), ("level", "user")))] == (
        to_usd(user_counter.used_nusd))
    assert got[("aigw_budget_limit_usd", (("id", acct.user_id), ("level", "user")))] == 25.0
    assert got[("aigw_budget_used_usd", (("id", acct.org_id), ("level", "org")))] == (
        to_usd(org_counter.used_nusd))
    assert got[("aigw_budget_limit_usd", (("id", acct.org_id), ("level", "org")))] == 150.0
    assert got[("aigw_unsettled_writes", ())] == 0
    assert got[("aigw_store_errors_total", ())] == 0


def test_request_log_in_a_file_and_as_text(tmp_path, fake_provider):
    log_file = tmp_path / "requests.log"
    text = (REPO_ROOT / "mitm.yaml").read_text().replace(
        "  request_log: json", "  request_log: text", 1)
    proxy = start_gateway(tmp_path, fake_provider.address, config_text=text,
                          sets={"aigw_request_log_file": str(log_file)})
    try:
        with Store(proxy.store_dir) as store:
            acct = seed(store, suffix="tel2")
        chat(proxy.openai_client(acct.api_key))
        deadline = time.monotonic() + 10
        while not log_file.exists() or not log_file.read_text():
            assert time.monotonic() < deadline, proxy.log_text()
            time.sleep(0.05)
    finally:
        proxy.stop()
    (line,) = log_file.read_text().splitlines()
    assert line.startswith("aigw request time=") and f" key_id={acct.key_id} " in line
    assert " decision=allowed " in line and " status=200 " in line
    assert "aigw request" not in proxy.log_text()  # the file only


def test_healthz_is_200_then_503_when_the_replica_is_stale(tmp_path, fake_provider):
    text = (REPO_ROOT / "mitm.yaml").read_text().replace(
        "policy:\n", "policy:\n  max_staleness_s: 60\n", 1)
    store_dir = tmp_path / "store"
    proxy = start_gateway(tmp_path, fake_provider.address, config_text=text,
                          store_dir=store_dir, sets={"aigw_metrics": "127.0.0.1:0"})
    port = metrics_port(proxy)
    # The replica's age is set, not waited for: a pass that finished just now, then one that
    # finished 61 s ago (a start slower than max_staleness_s cannot make the first 503).
    with Store(store_dir) as store:
        try:
            store.records.set_meta("last_sync", {"finished_at": time.time()})
            status, body = get(port, "/healthz")
            assert status == 200, body
            answer = json.loads(body)
            assert answer["ok"] is True and answer["max_staleness_s"] == 60
            store.records.set_meta("last_sync", {"finished_at": time.time() - 61})
            status, body = get(port, "/healthz")
            assert status == 503
            assert "max_staleness_s 60" in json.loads(body)["reason"]
        finally:
            proxy.stop()


def test_a_second_gateway_on_the_same_port_does_not_start(tmp_path, fake_provider):
    """Several gateways on one host each serve their own port: a clash is a start error."""
    first = start_gateway(tmp_path / "a", fake_provider.address,
                          sets={"aigw_metrics": "127.0.0.1:0"})
    try:
        port = metrics_port(first)
        try:  # mitmdump may be listening already when it logs the error, then exits
            clash = start_gateway(tmp_path / "b", fake_provider.address,
                                  store_dir=first.store_dir,
                                  sets={"aigw_metrics": f"127.0.0.1:{port}"}, timeout=10)
            clash.process.wait(10)
            log = clash.log_text()
            assert clash.process.returncode != 0
        except ProxyStartError as exc:
            log = exc.log
        assert f"aigw_metrics: cannot listen on 127.0.0.1:{port}" in log
        second = start_gateway(tmp_path / "c", fake_provider.address, store_dir=first.store_dir,
                               sets={"aigw_metrics": "127.0.0.1:0"})
        second.stop()
        assert get(port, "/healthz")[0] == 200
    finally:
        first.stop()


def test_request_log_lines_appear_in_mitmdumps_output_by_default(tmp_path, fake_provider):
    proxy = start_gateway(tmp_path, fake_provider.address)
    try:
        with Store(proxy.store_dir) as store:
            acct = seed(store, suffix="tel3")
        chat(proxy.openai_client(acct.api_key))
        deadline = time.monotonic() + 10
        while True:
            lines = [json.loads(m) for m in LINE.findall(proxy.log_text())]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        proxy.stop()
    assert [(line["key_id"], line["decision"], line["status"]) for line in lines] == [
        (acct.key_id, "allowed", 200)]
