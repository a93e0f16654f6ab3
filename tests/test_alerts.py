"""Budget alerts (issue 12 point 7): one JSON POST per threshold crossing per month, to a local
fake receiver; claimed in the ledger so a restart or a second process does not send it again."""

import calendar
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from addon.config import load_config
from addon.maintenance import MAINTENANCE_EVERY, Maintenance
from addon.runtime import Runtime
from store import Store, alerts
from store.alert_settings import AlertSettings, load_alert_settings
from store.alerts import Alerter, Crossing, SentAlerts, crossings, run_in_background
from store.money import USD
from store.records import user_quota_key
from store.settings import ConfigError
from tests.support.fake_webhook import FakeWebhook
from tests.support.seed import seed

ROOT = Path(__file__).resolve().parent.parent
DEC_2026 = float(calendar.timegm((2026, 12, 10, 12, 0, 0)))
JAN_2027 = float(calendar.timegm((2027, 1, 10, 12, 0, 0)))


def month(now: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(now))


@pytest.fixture(scope="module")
def webhook_server() -> Iterator[FakeWebhook]:
    with FakeWebhook() as fake:
        yield fake


@pytest.fixture
def webhook(webhook_server: FakeWebhook) -> FakeWebhook:
    webhook_server.reset()
    return webhook_server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "store") as opened:
        yield opened


def settings_for(hook: FakeWebhook, **overrides) -> AlertSettings:
    values = {"webhook_url": f"{hook.url}/hooks/aigw", "timeout_s": 2.0, "max_attempts": 3,
              "backoff_s": 0.01, "max_backoff_s": 0.02, **overrides}
    return AlertSettings(**values)


def spend(store: Store, usd: float, at: float = DEC_2026, suffix: str = "1") -> None:
    """Settle `usd` on key, user and org of the seeded account, in the month of `at`."""
    levels = [("key", f"key_{suffix}"), ("user", f"user_{suffix}"), ("org", f"org_{suffix}")]
    store.ledger.settle(None, levels, month(at), round(usd * USD))


def alerter(hook: FakeWebhook, now: float = DEC_2026, **overrides) -> tuple[Alerter, list]:
    sleeps: list[float] = []
    return Alerter(settings_for(hook, **overrides), "node-a", sleep=sleeps.append,
                   clock=lambda: now), sleeps


# --- what crosses ------------------------------------------------------------------------------


def test_nothing_below_the_threshold(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 15.0)  # user 75%, org 15%
    sender, _ = alerter(webhook)
    summary = sender.run_once(store)
    assert summary.sent == [] and webhook.attempts == []


def test_a_crossing_is_sent_once_with_the_documented_fields(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 17.0)  # user 85% of 20; org 17% of 100
    sender, _ = alerter(webhook)
    summary = sender.run_once(store)
    assert [(c.level, c.id, c.threshold) for c in summary.sent] == [("user", "user_1", 0.8)]
    (received,) = webhook.received
    assert received.path == "/hooks/aigw"
    assert received.headers["content-type"] == "application/json"
    body = received.body
    assert body == {
        "alert_id": body["alert_id"], "level": "user", "id": "user_1", "month": month(DEC_2026),
        "threshold": 0.8, "used_usd": 17.0, "limit_usd": 20.0, "node_id": "node-a",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(DEC_2026)),
    }
    assert received.headers["idempotency-key"] == body["alert_id"]
    # The next run, and the one after more spend below the next threshold: nothing more.
    assert sender.run_once(store).sent == []
    spend(store, 1.0)
    assert sender.run_once(store).sent == []
    assert len(webhook.attempts) == 1


def test_each_threshold_is_its_own_crossing(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 17.0)
    sender, _ = alerter(webhook)
    sender.run_once(store)
    spend(store, 90.0)  # user 535%, org 107%: user 1.0, org 0.8 and 1.0
    sent = sender.run_once(store).sent
    assert sorted((c.level, c.threshold) for c in sent) == [
        ("org", 0.8), ("org", 1.0), ("user", 1.0)]
    assert [(b["level"], b["threshold"]) for b in webhook.bodies()] == [
        ("user", 0.8), *[(c.level, c.threshold) for c in sent]]
    assert webhook.bodies()[-1]["used_usd"] == 107.0


def test_levels_without_a_limit_never_alert(store, webhook):
    seed(store, org_budget=None, user_limit=None, key_limit=1.0)
    spend(store, 50.0)  # keys are not alerted: orgs and users only
    sender, _ = alerter(webhook)
    assert sender.run_once(store).sent == [] and webhook.attempts == []


def test_other_nodes_and_the_workers_quota_record_count(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    this = month(DEC_2026)
    store.records.write({user_quota_key("user_1"): json.dumps(
        {"month_usage_usd": 15.0, "current_month": this, "request_count": 3}).encode()})
    store.records.replicate({}, [], {}, {(this, "org", "org_1"): (79 * USD, 7)},
                            {"node_id": "node-a"})
    spend(store, 2.0)  # user 2 + 15 = 17 (85%); org 2 + 79 = 81 (81%)
    found = crossings(store, this, (0.8, 1.0))
    assert sorted((c.level, c.used_nusd) for c in found) == [("org", 81 * USD),
                                                             ("user", 17 * USD)]
    sender, _ = alerter(webhook)
    assert len(sender.run_once(store).sent) == 2
    # A quota record of an older month counts for nothing.
    store.records.write({user_quota_key("user_1"): json.dumps(
        {"month_usage_usd": 15.0, "current_month": "2026-11", "request_count": 3}).encode()})
    assert [c.level for c in crossings(store, this, (0.8,))] == ["org"]


def test_every_month_alerts_again(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 17.0, at=DEC_2026)
    december, _ = alerter(webhook, now=DEC_2026)
    assert len(december.run_once(store).sent) == 1
    january, _ = alerter(webhook, now=JAN_2027)
    assert january.run_once(store).sent == []  # January has no usage yet
    spend(store, 18.0, at=JAN_2027)
    assert [(c.month, c.threshold) for c in january.run_once(store).sent] == [
        (month(JAN_2027), 0.8)]
    assert [b["month"] for b in webhook.bodies()] == [month(DEC_2026), month(JAN_2027)]
    assert december.run_once(store).sent == []  # December's stays sent


def test_old_months_entries_are_pruned(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 17.0, at=DEC_2026)
    alerter(webhook, now=DEC_2026)[0].run_once(store)
    (crossing,) = crossings(store, month(DEC_2026), (0.8,))
    sent = SentAlerts(store, "test")
    assert sent.state(crossing) == "sent"
    alerter(webhook, now=JAN_2027)[0].run_once(store)
    assert sent.state(crossing) == "sent"  # the previous month is kept
    assert alerter(webhook, now=JAN_2027 + 31 * 86400)[0].run_once(store).pruned == 1
    assert sent.state(crossing) is None


# --- restarts and other processes ---------------------------------------------------------------


def test_not_resent_after_a_restart(tmp_path, webhook):
    path = tmp_path / "store"
    with Store(path) as first:
        seed(first, org_budget=100.0, user_limit=20.0)
        spend(first, 17.0)
        assert len(alerter(webhook)[0].run_once(first).sent) == 1
    with Store(path) as again:
        assert alerter(webhook)[0].run_once(again).sent == []
    assert len(webhook.attempts) == 1


def test_a_crossing_claimed_by_another_process_is_left_to_it(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 17.0)
    (crossing,) = crossings(store, month(DEC_2026), (0.8, 1.0))
    other = SentAlerts(store, "other-process")
    assert other.claim(crossing)
    assert not SentAlerts(store, "this-process").claim(crossing)
    assert alerter(webhook)[0].run_once(store).sent == [] and webhook.attempts == []
    # A claim whose process died sending goes stale: then this one sends it.
    stale = json.dumps({"state": "claimed", "owner": "other-process",
                        "at": (time.time() - alerts.CLAIM_STALE_S - 1) * 1000}).encode()
    store.ledger._env.write(lambda txn: txn.put(SentAlerts.key(crossing), stale,
                                                db=store.ledger._meta))
    assert len(alerter(webhook)[0].run_once(store).sent) == 1


RUN_ONE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from store import Store
    from store.alert_settings import AlertSettings
    from store.alerts import Alerter
    with Store(sys.argv[2]) as store:
        while time.time() < float(sys.argv[4]):
            time.sleep(0.005)
        summary = Alerter(AlertSettings(sys.argv[3], backoff_s=0.01), sys.argv[5]).run_once(store)
        print(len(summary.sent))
""")


def test_two_processes_on_one_store_send_each_crossing_once(tmp_path, webhook):
    path = tmp_path / "store"
    with Store(path) as setup:
        for suffix in ("1", "2", "3"):
            seed(setup, suffix=suffix, org_budget=10.0, user_limit=10.0)
            spend(setup, 12.0, at=time.time(), suffix=suffix)  # 2 levels x 2 thresholds each
    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", RUN_ONE, str(ROOT), str(path),
                               f"{webhook.url}/h", start, node], stdout=subprocess.PIPE,
                              text=True) for node in ("node-a", "node-b")]
    counts = [int(p.communicate(timeout=60)[0].strip()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(counts) == 12
    ids = [b["alert_id"] for b in webhook.bodies()]
    assert len(ids) == 12 and len(set(ids)) == 12


# --- the webhook failing -----------------------------------------------------------------------


def test_retried_with_backoff_after_a_500(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 17.0)
    webhook.fail_next(500, 503)
    sender, sleeps = alerter(webhook)
    assert len(sender.run_once(store).sent) == 1
    assert len(webhook.attempts) == 3 and len(webhook.received) == 1
    assert len(sleeps) == 2 and sleeps[0] <= sleeps[1]
    assert len({a.body["alert_id"] for a in webhook.attempts}) == 1  # the same alert each time


def test_a_final_failure_releases_the_claim_and_a_later_run_sends(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 90.0)  # user 1.0 and 0.8, org 0.8: three crossings
    webhook.fail_next(500, 500, 500)
    sender, _ = alerter(webhook)
    summary = sender.run_once(store)
    assert summary.sent == [] and len(summary.failed) == 1
    assert summary.pending == 3  # the webhook is down: the others were not tried
    assert len(webhook.attempts) == 3  # bounded: max_attempts, one alert
    assert SentAlerts(store, "x").state(summary.failed[0]) is None  # released
    assert len(sender.run_once(store).sent) == 3
    assert len(webhook.received) == 3


def test_a_4xx_is_not_retried(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 17.0)
    webhook.fail_next(404)
    summary = alerter(webhook)[0].run_once(store)
    assert len(summary.failed) == 1 and len(webhook.attempts) == 1


def test_a_webhook_that_is_down_holds_nothing_up(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 90.0)
    closed = httpx.MockTransport(lambda request: (_ for _ in ()).throw(
        httpx.ConnectError("refused", request=request)))
    sleeps: list[float] = []
    sender = Alerter(settings_for(webhook, max_attempts=4), "node-a", transport=closed,
                     sleep=sleeps.append, clock=lambda: DEC_2026)
    started = time.monotonic()
    summary = sender.run_once(store)
    assert time.monotonic() - started < 2
    assert summary.sent == [] and len(summary.failed) == 1 and len(sleeps) == 3
    assert not any(SentAlerts(store, "x").state(c) for c in crossings(
        store, month(DEC_2026), (0.8, 1.0)))


def test_a_run_stops_sending_when_its_time_is_up(store, webhook):
    seed(store, org_budget=100.0, user_limit=20.0)
    spend(store, 90.0)
    sender, _ = alerter(webhook, run_budget_s=0.0)
    summary = sender.run_once(store)
    assert summary.sent == [] and summary.pending == 3 and webhook.attempts == []


# --- configuration and wiring ------------------------------------------------------------------


def test_no_alerts_unless_configured(tmp_path, webhook):
    assert load_alert_settings({}, "mitm.yaml") is None
    assert load_alert_settings({"alerts": {"thresholds": [0.5]}}, "mitm.yaml") is None
    shipped = yaml.safe_load((ROOT / "mitm.yaml").read_text())
    assert load_alert_settings(shipped, "mitm.yaml") is None
    with Store(tmp_path / "store") as store:
        seed(store, org_budget=100.0, user_limit=20.0)
        spend(store, 90.0, at=time.time())
        config = tmp_path / "mitm.yaml"
        config.write_text(yaml.safe_dump({"store": {"path": str(tmp_path / "store")}}))
        assert run_in_background(store, str(config)) is None
    assert webhook.attempts == []


def test_settings_defaults_and_errors(tmp_path):
    settings = load_alert_settings({"alerts": {"webhook_url": "https://hooks.example/T/secret"}},
                                   "m.yaml")
    assert settings is not None and settings.thresholds == (0.8, 1.0)
    assert "secret" not in repr(settings) and settings.destination == "https://hooks.example"
    assert load_alert_settings({"alerts": {"webhook_url": "http://h/x", "thresholds": [1.0, 0.5]}},
                               "m.yaml").thresholds == (0.5, 1.0)
    for section, key in (({"webhook_url": "ftp://h/T0KEN123"}, "alerts.webhook_url"),
                         ({"webhook_url": "http://h", "thresholds": []}, "alerts.thresholds"),
                         ({"webhook_url": "http://h", "thresholds": [0]}, "alerts.thresholds[0]"),
                         ({"webhook_url": "http://h", "thresholds": ["x"]},
                          "alerts.thresholds[0]"),
                         ({"webhook_url": "http://h", "timeout_s": 0}, "alerts.timeout_s"),
                         ({"webhook": "http://h"}, "alerts.webhook")):
        with pytest.raises(ConfigError) as raised:
            load_alert_settings({"alerts": section}, "m.yaml")
        assert raised.value.key == key and "T0KEN123" not in str(raised.value)
    # The gateway refuses a bad section when it loads mitm.yaml, like any other.
    path = tmp_path / "mitm.yaml"
    path.write_text(yaml.safe_dump({"alerts": {"webhook_url": "http://h", "thresholds": [-1]}}))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert raised.value.key == "alerts.thresholds[0]"
    path.write_text(yaml.safe_dump({"alerts": {"webhook_url": "http://h", "thresholds": 0.9}}))
    load_config(path)


class _NoSettler:
    def retry_unsettled(self) -> None:
        pass


def test_the_gateway_maintenance_sends_from_a_thread(tmp_path, webhook):
    store_path = tmp_path / "store"
    with Store(store_path) as setup:
        seed(setup, org_budget=100.0, user_limit=20.0)
        spend(setup, 17.0, at=time.time())
    config = tmp_path / "mitm.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"path": str(store_path)},
        "sync": {"node_id": "berlin-1"},
        "alerts": {"webhook_url": f"{webhook.url}/gw", "thresholds": [0.8, 1.0]},
    }))
    runtime = Runtime()
    assert runtime.load(str(config), None) is None
    try:
        maintenance = Maintenance(runtime, _NoSettler(), lambda: None)  # type: ignore[arg-type]
        caller = threading.current_thread()
        maintenance.tick(MAINTENANCE_EVERY)
        thread = alerts._BACKGROUND.thread
        assert thread is not None and thread is not caller
        thread.join(10)
        (body,) = webhook.bodies()
        assert (body["level"], body["id"], body["node_id"]) == ("user", "user_1", "berlin-1")
        maintenance.tick(2 * MAINTENANCE_EVERY)
        alerts._BACKGROUND.thread.join(10)
        assert len(webhook.attempts) == 1
    finally:
        runtime.close()


def test_a_sync_pass_sends_alerts_after_it_applies(tmp_path, webhook):
    from store.cloudflare import CloudflareSettings, KVClient, Replicator, SyncSettings
    from tests.support.fake_kv import FakeKV

    with FakeKV() as kv, Store(tmp_path / "store") as store:
        seed(store, org_budget=100.0, user_limit=20.0)
        spend(store, 17.0, at=time.time())
        sync_settings = SyncSettings(node_id="node-s", max_attempts=2, max_backoff_s=0.01)
        cf = CloudflareSettings(kv.account_id, kv.namespace_id, kv.token, kv.api_base)
        with KVClient(cf, sync_settings) as client:
            replicator = Replicator(store, client, sync_settings,
                                    alerts=settings_for(webhook))
            replicator.sync_once()
            replicator.sync_once()
    (body,) = webhook.bodies()
    assert (body["level"], body["node_id"]) == ("user", "node-s")


def test_crossing_ids_are_stable_and_distinct():
    a = Crossing("org", "o", "2026-12", 0.8, 1, 2)
    assert a.alert_id == Crossing("org", "o", "2026-12", 0.8, 5, 2).alert_id
    assert len({a.alert_id, a._replace(threshold=1.0).alert_id, a._replace(month="2027-01")
                .alert_id, a._replace(level="user").alert_id}) == 4
    long_id = Crossing("org", "o" * 600, "2026-12", 0.8, 1, 2)
    assert len(SentAlerts.key(long_id)) < 512


def test_the_commented_example_in_mitm_yaml_is_valid(tmp_path):
    lines = (ROOT / "mitm.yaml").read_text().splitlines()
    start = lines.index("# alerts:")
    block = [line[2:] for line in lines[start:] if line.startswith("# ")]
    settings = load_alert_settings(yaml.safe_load("\n".join(block)), "mitm.yaml")
    assert settings is not None and settings.thresholds == (0.8, 1.0)
    assert (settings.timeout_s, settings.max_attempts) == (5.0, 3)


def test_records_are_read_in_pages(store, monkeypatch):
    monkeypatch.setattr(alerts, "SCAN_PAGE", 3)
    for suffix in map(str, range(10)):
        seed(store, suffix=suffix, org_budget=1000.0, user_limit=10.0)
        spend(store, 9.0, suffix=suffix)
    alerts._LIMITS_CACHE.clear()
    found = crossings(store, month(DEC_2026), (0.8,))
    assert sorted(c.id for c in found) == sorted(f"user_{i}" for i in range(10))
