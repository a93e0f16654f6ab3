"""`aigw proxy --workers 2` end to end: a real supervisor and two mitmproxy workers on one port,
the official openai SDK through them, the fake provider behind."""

import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from store import Store
from tests.support.gateway import OPENAI_KEY, aigw, settled, spent
from tests.support.seed import seed
from tests.support.workers import AigwProxy, start_aigw_proxy

pytestmark = pytest.mark.e2e

USAGE = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
COST = 10 * 150 + 100 * 600  # gpt-4o-mini, nano-dollars


def fresh_client(proxy: AigwProxy, api_key: str) -> openai.OpenAI:
    """A client whose requests each open a new connection (the kernel spreads connections, not
    requests, across the workers)."""
    http_client = openai.DefaultHttpxClient(
        proxy=proxy.url, verify=proxy.ssl_context(),
        limits=httpx.Limits(max_keepalive_connections=0))
    proxy._clients.append(http_client)
    return openai.OpenAI(api_key=api_key, max_retries=0, http_client=http_client, timeout=30)


def chat(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], **kwargs)


def logged_requests(proxy: AigwProxy, count: int) -> dict[str, list[dict]]:
    """The request log's lines by worker, once there are `count` of them."""
    found: dict[str, list[dict]] = {}
    deadline = time.monotonic() + 15
    while sum(map(len, found.values())) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        found = proxy.requests_by_worker()
    assert sum(map(len, found.values())) == count, {k: len(v) for k, v in found.items()}
    return found


def refused(port: int) -> bool:
    """Whether a connection to the loopback `port` is refused (nothing listens)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def free_port_pair() -> int:
    """A loopback port P with P+1 free too (worker 2 serves its metrics on P+1)."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port < 65535 and second.connect_ex(("127.0.0.1", port + 1)) != 0:
                try:
                    second.close()
                    with socket.socket() as probe:
                        probe.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue


@pytest.fixture
def account_store(tmp_path):
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        acct = seed(store, suffix="px", org_budget=100.0, user_limit=None)
    return store_dir, acct


def test_two_workers_serve_the_openai_sdk_and_share_the_ledger(tmp_path, fake_provider,
                                                             account_store):
    store_dir, acct = account_store
    fake_provider.set(usage=USAGE)
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir)
    try:
        client = fresh_client(proxy, acct.api_key)
        answers = [chat(client) for _ in range(24)]
        assert all(a.choices[0].message.content for a in answers)
        assert len(aigw(proxy, "health")["gateways"]) == 2  # each worker registered
        by_worker = logged_requests(proxy, 24)
    finally:
        assert proxy.stop(timeout=30) == 0
    assert set(by_worker) == {"w1", "w2"}  # both served (2 x 0.5^24 that one takes them all)
    assert all(r["decision"] == "allowed" for rs in by_worker.values() for r in rs)
    with Store(store_dir) as store:
        key = spent(store, "key", acct.key_id)
        assert key.requests == 24 and key.used_nusd == 24 * COST and key.reserved_nusd == 0
        assert not store.ledger.reservations()
    assert len(fake_provider.requests) == 24
    assert not fake_provider.saw_secret(acct.api_key)  # the gateway key stays on the gateway


def test_a_killed_worker_is_restarted_and_serves_again(tmp_path, fake_provider, account_store):
    store_dir, acct = account_store
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir)
    try:
        before = proxy.worker_pids()
        os.kill(before["w2"], signal.SIGKILL)
        proxy.wait_for_log(rf"worker w2 \(pid {before['w2']}\) died \(signal SIGKILL\)",
                           timeout=10)
        proxy.wait_for_log(r"worker w2 \(pid \d+\) listening", timeout=30)
        after = proxy.worker_pids()
        assert after["w1"] == before["w1"] and after["w2"] != before["w2"]
        client = fresh_client(proxy, acct.api_key)
        for _ in range(24):
            chat(client)
        served = logged_requests(proxy, 24)
        assert set(served) == {"w1", "w2"}  # the new w2 takes connections
        with Store(store_dir) as store:
            assert settled(store, acct.key_id, 24).requests == 24
    finally:
        assert proxy.stop(timeout=30) == 0


def test_a_budget_holds_across_workers(tmp_path, fake_provider):
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        acct = seed(store, suffix="burst", org_budget=5 * COST / 1e9, user_limit=None)
    fake_provider.set(usage=USAGE, response_delay=0.5)  # all 30 are in flight together
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir)
    clients = 30
    try:
        start = threading.Barrier(clients)

        def one(_: int) -> str:
            client = fresh_client(proxy, acct.api_key)
            start.wait(timeout=30)
            try:
                chat(client, max_tokens=100)
                return "ok"
            except openai.RateLimitError:
                return "denied"

        with ThreadPoolExecutor(clients) as pool:
            outcomes = list(pool.map(one, range(clients)))
        decided = logged_requests(proxy, 30)
    finally:
        assert proxy.stop(timeout=30) == 0
    admitted = outcomes.count("ok")
    assert set(decided) == {"w1", "w2"}  # the burst was decided by both workers
    assert 1 <= admitted <= 5 and outcomes.count("denied") == clients - admitted
    assert len(fake_provider.requests) == admitted
    with Store(store_dir) as store:
        org = spent(store, "org", acct.org_id)
    assert org.used_nusd == admitted * COST <= 5 * COST and org.reserved_nusd == 0


def test_sigterm_drains_a_stream_in_flight(tmp_path, fake_provider, account_store):
    store_dir, acct = account_store
    fake_provider.set(delay=0.4, text_chunks=["one ", "two ", "three ", "four ", "five"])
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir)
    try:
        stream = chat(proxy.openai_client(acct.api_key), stream=True)
        pieces = [next(stream).choices]  # the stream is under way
        proxy.signal(signal.SIGTERM)
        proxy.wait_for_log(r"\[w1\] .*draining", timeout=10)
        proxy.wait_for_log(r"\[w2\] .*draining", timeout=10)
        # No worker accepts any more: a worker logs that it drains, then closes its listening
        # socket in a task of its event loop, so the probe waits for that (bounded).
        deadline = time.monotonic() + 10
        while not refused(proxy.port):
            assert time.monotonic() < deadline, "a worker still accepts connections"
            time.sleep(0.05)
        assert proxy.is_running()
        pieces += [chunk.choices for chunk in stream]
        text = "".join(c[0].delta.content or "" for c in pieces if c)
        assert text == "one two three four five"
        assert proxy.process.wait(20) == 0
    finally:
        proxy.stop()
    with Store(store_dir) as store:
        key = spent(store, "key", acct.key_id)
        assert key.requests == 1 and key.reserved_nusd == 0 and key.used_nusd > 0
        assert not store.ledger.reservations()
    assert "all workers stopped" in proxy.log_text()


def test_the_drain_bound_cuts_a_long_stream_and_charges_it(tmp_path, fake_provider,
                                                          account_store):
    store_dir, acct = account_store
    fake_provider.set(delay=1.0, text_chunks=[f"w{i} " for i in range(30)])  # 30 s
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir,
                             args=["--drain-s", "1"])
    try:
        stream = chat(proxy.openai_client(acct.api_key), stream=True)
        next(stream)
        proxy.signal(signal.SIGTERM)
        received = 1
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for _ in stream:
                received += 1
        assert proxy.process.wait(20) == 0
        # Cut after the 1 s of drain: a few of the 30 deltas (one a second), never the end of
        # the stream (the events the client got, not a stopwatch a loaded machine can stop).
        assert received < 30
    finally:
        proxy.stop()
    assert "drain bound of 1 s reached: cutting 1 requests in flight" in proxy.log_text()
    with Store(store_dir) as store:
        key = spent(store, "key", acct.key_id)
    assert key.requests == 1 and key.reserved_nusd == 0 and key.used_nusd > 0


def test_a_worker_that_cannot_start_ends_the_run_with_its_reason(tmp_path, fake_provider):
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, create_store=False,
                             wait=False)
    assert proxy.process.wait(60) == 1
    text = proxy.log_text()
    assert "[w1]" in text and "no store at" in text
    assert "[w2]" not in text  # the first worker alone was tried
    assert "worker w1 exited with exit status" in text


@pytest.mark.parametrize("args, message", [
    (["--set", "listen_port=9"], "--set listen_port: use --listen-port instead"),
    (["--mode", "dns"], "--mode 'dns': aigw proxy serves TCP modes only"),
    (["--mode", "nonsense:x"], "--mode 'nonsense:x'"),
    (["--workers", "0"], "--workers: must be at least 1"),
])
def test_flags_that_cannot_work_are_usage_errors(tmp_path, fake_provider, args, message):
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, args=args, wait=False)
    assert proxy.process.wait(30) == 2
    assert message in proxy.log_text()


def test_a_port_in_use_is_refused(tmp_path, fake_provider):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, wait=False,
                                 args=["--listen-port", str(port)])
        assert proxy.process.wait(30) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proxy.log_text()


def test_an_unknown_option_is_an_error(tmp_path, fake_provider):
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, wait=False,
                             args=["--set", "no_such_option=1"])
    assert proxy.process.wait(60) == 1
    assert "unknown option: no_such_option" in proxy.log_text()


def test_ca_bundle_holds_the_system_roots_and_the_proxys_ca(tmp_path, fake_provider,
                                                          account_store):
    import json
    import ssl
    import subprocess

    from tests.support.gateway import AIGW

    confdir = tmp_path / "px" / "confdir"
    done = subprocess.run([AIGW, "ca", "bundle", "--confdir", str(confdir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    written = json.loads(done.stdout)
    bundle = confdir / "aigw-ca-bundle.pem"
    assert written["bundle"] == str(bundle)
    ca_pem = (confdir / "mitmproxy-ca-cert.pem").read_text().strip()
    assert ca_pem in bundle.read_text()
    context = ssl.create_default_context(cafile=str(bundle))
    assert context.cert_store_stats()["x509_ca"] > 10  # the system's roots too

    store_dir, acct = account_store
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir)
    try:  # the workers use the CA made before them: the bundle verifies them
        http_client = openai.DefaultHttpxClient(proxy=proxy.url, verify=context)
        client = openai.OpenAI(api_key=acct.api_key, max_retries=0, http_client=http_client)
        assert chat(client).choices[0].message.content
        http_client.close()
    finally:
        proxy.stop()


def test_reverse_mode_needs_no_ca_on_the_client(tmp_path, fake_provider, account_store):
    store_dir, acct = account_store
    fake_provider.set(usage=USAGE)
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir,
                             args=["--mode", "reverse:https://api.openai.com"])
    try:  # the SDK's base URL is the gateway: plain HTTP on loopback, no proxy, no CA
        http_client = httpx.Client(trust_env=False)
        client = openai.OpenAI(api_key=acct.api_key, base_url=f"{proxy.url}/v1",
                               max_retries=0, http_client=http_client)
        for _ in range(3):
            assert chat(client).choices[0].message.content
        http_client.close()
        with Store(store_dir) as store:
            assert settled(store, acct.key_id, 3).used_nusd == 3 * COST
        assert fake_provider.last.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    finally:
        proxy.stop()


def test_without_config_or_store_the_workers_read_the_working_directorys_mitm_yaml(
        tmp_path, fake_provider):
    # The README's `aigw proxy --mode reverse:...` gives neither flag: the workers once waited,
    # not ready, answering 503 to every request (the gateway loaded as a module was never told
    # of aigw_config).
    fake_provider.set(usage=USAGE)
    store_dir = tmp_path / "px" / "var" / "store"  # the shipped mitm.yaml's ./var/store
    with Store(store_dir) as store:
        acct = seed(store, suffix="px", org_budget=100.0, user_limit=None)
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, workers=1,
                             global_flags=False)
    try:
        assert chat(fresh_client(proxy, acct.api_key)).choices[0].message.content
        with Store(store_dir) as store:
            assert settled(store, acct.key_id, 1).used_nusd == COST
    finally:
        proxy.stop()


def test_with_every_mode_on_its_own_port_the_listen_port_is_not_held(tmp_path, fake_provider,
                                                                       account_store):
    store_dir, acct = account_store
    fake_provider.set(usage=USAGE)
    mode_port = free_port_pair()
    with socket.socket() as other:  # e.g. scripts/run on 8080, the default --listen-port
        other.bind(("127.0.0.1", 0))
        other.listen()
        proxy = start_aigw_proxy(
            tmp_path / "px", fake_provider.address, workers=1, store_dir=store_dir,
            args=["--listen-port", str(other.getsockname()[1]),
                  "--mode", f"reverse:https://api.openai.com@{mode_port}"])
    try:
        assert (f"listening on 127.0.0.1 (reverse:https://api.openai.com@{mode_port})"
                in proxy.log_text())
        http_client = httpx.Client(trust_env=False)
        client = openai.OpenAI(api_key=acct.api_key, base_url=f"http://127.0.0.1:{mode_port}/v1",
                               max_retries=0, http_client=http_client)
        assert chat(client).choices[0].message.content
        http_client.close()
    finally:
        proxy.stop()


def test_each_worker_has_its_own_request_log_file_and_metrics_port(tmp_path, fake_provider,
                                                                   account_store):
    store_dir, acct = account_store
    log_file = tmp_path / "requests.jsonl"
    metrics_port = free_port_pair()
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir,
                             args=["--set", f"aigw_request_log_file={log_file}",
                                   "--set", f"aigw_metrics=127.0.0.1:{metrics_port}"])
    try:
        client = fresh_client(proxy, acct.api_key)
        for _ in range(24):
            chat(client)
        for port in (metrics_port, metrics_port + 1):  # w1, w2
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5,
                             trust_env=False).status_code == 200
    finally:
        assert proxy.stop(timeout=30) == 0
    lines = {name: (tmp_path / f"requests.jsonl.{name}").read_text().splitlines()
             for name in ("w1", "w2")}
    assert not log_file.exists()
    assert all(lines.values()) and sum(map(len, lines.values())) == 24
    assert proxy.requests_by_worker() == {}  # to the files, not to stderr


GPT_4O_MINI = "gpt-4o-mini:       {input_per_1m: 0.15, cached_input_per_1m: 0.075, output_per_1m: 0.60}"


def test_sighup_replaces_the_workers_one_at_a_time_and_they_read_mitm_yaml_again(
        tmp_path, fake_provider, account_store):
    store_dir, acct = account_store
    fake_provider.set(usage=USAGE)
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir)
    try:
        client = fresh_client(proxy, acct.api_key)
        chat(client)
        before = proxy.worker_pids()
        text = proxy.config.read_text()
        assert GPT_4O_MINI in text
        proxy.config.write_text(text.replace(GPT_4O_MINI, GPT_4O_MINI.replace("0.60", "1.20")))
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"SIGHUP: every worker replaced", timeout=60)
        after = proxy.worker_pids()
        assert set(after) == {"w1", "w2"} and not set(after.values()) & set(before.values())
        for _ in range(10):
            chat(client)
        log = proxy.log_text()
        assert "died" not in log  # a worker drained on purpose is replaced, not a death
    finally:
        assert proxy.stop(timeout=30) == 0
    with Store(store_dir) as store:
        key = spent(store, "key", acct.key_id)
        assert key.requests == 11
        assert key.used_nusd == COST + 10 * (10 * 150 + 100 * 1200)  # the new output price


def test_a_sighup_onto_an_invalid_mitm_yaml_keeps_the_others_serving_as_they_were(
        tmp_path, fake_provider, account_store):
    store_dir, acct = account_store
    fake_provider.set(usage=USAGE)
    proxy = start_aigw_proxy(tmp_path / "px", fake_provider.address, store_dir=store_dir)
    try:
        before = proxy.worker_pids()
        good = proxy.config.read_text()
        proxy.config.write_text(good.replace("policy:\n", "policy:\n  no_such_setting: 1\n", 1))
        proxy.signal(signal.SIGHUP)
        proxy.wait_for_log(r"SIGHUP: worker w1 did not start \(exit status 2", timeout=60)
        assert "no_such_setting" in proxy.log_text()
        assert proxy.worker_pids()["w2"] == before["w2"]  # never drained
        client = fresh_client(proxy, acct.api_key)
        for _ in range(5):
            assert chat(client).choices[0].message.content  # w2 serves, as it was
        proxy.config.write_text(good)  # fixed: the w1 slot's restarts read it
        proxy.wait_for_log(r"worker w1 \(pid \d+\) listening", timeout=60)
    finally:
        assert proxy.stop(timeout=30) == 0
    with Store(store_dir) as store:
        assert settled(store, acct.key_id, 5).used_nusd == 5 * COST
