"""Rate and concurrency limits through a real mitmdump and the official openai SDK: rpm with a
short window (policy.rate_window_s), a TPM limit exact to the token, and two gateway
processes on one store holding the limits together."""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from store import Store
from tests.support.gateway import REPO_ROOT, start_gateway
from tests.support.seed import seed

pytestmark = pytest.mark.e2e

USAGE = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
TOKENS = 110  # what each request meters


def config_with_window(window_s: int) -> str:
    text = re.sub(r"(?m)^  rate_window_s: .*\n", "", (REPO_ROOT / "mitm.yaml").read_text())
    return text.replace("policy:\n", f"policy:\n  rate_window_s: {window_s}\n", 1)


def chat(client) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "hi"}])


def test_the_fourth_request_in_the_window_is_429_and_admitted_once_it_passed(
        tmp_path, fake_provider):
    window = 6
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        acct = seed(store, suffix="rpm", rates={"key": {"rpm_limit": 3}})
    fake_provider.set(usage=USAGE)
    gw = start_gateway(tmp_path / "gw", fake_provider.address, store_dir=store_dir,
                       config_text=config_with_window(window))
    try:
        client = gw.openai_client(acct.api_key)
        first = time.time()
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == "2"
        first_done = time.time()  # the gateway admitted it between `first` and now
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        chat(client)
        chat(client)
        fourth_sent = time.time()
        with pytest.raises(openai.RateLimitError) as denied:
            chat(client)
        refused_at = time.time()
        assert refused_at - first < window, "the machine is too slow for this window"
        error = denied.value.body
        assert denied.value.code == "rate_limit_exceeded"
        assert "rpm_limit 3" in error["message"] and f"{window}s" in error["message"]
        retry_after = int(denied.value.response.headers["retry-after"])
        # The first request leaves the window `window` whole seconds after the second it was
        # admitted in began; that second and the refusal's instant are known only within bounds.
        earliest = int(first) + window - refused_at
        latest = int(first_done) + window - fourth_sent + 1
        assert earliest <= retry_after <= latest and 1 <= retry_after <= window
        assert denied.value.response.headers["x-should-retry"] == "true"
        assert len(fake_provider.requests) == 3  # refused: never forwarded
        time.sleep(retry_after)
        chat(client)  # admitted once it has passed
        # The SDK's own retries (x-should-retry, retry-after) get a burst through on their own.
        patient = client.with_options(max_retries=5)
        for _ in range(3):
            chat(patient)
        assert len(fake_provider.requests) == 7
    finally:
        gw.stop()


def test_two_gateways_on_one_store_hold_rpm_tpm_and_parallel_limits_together(
        tmp_path, fake_provider):
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        tpm = seed(store, suffix="tpm", rates={"user": {"tpm_limit": 3 * TOKENS}})
        tpm_plus = seed(store, suffix="tpm1", rates={"user": {"tpm_limit": 3 * TOKENS + 1}})
        rpm = seed(store, suffix="rpm2", rates={"org": {"rpm_limit": 5}})
        par = seed(store, suffix="par", rates={"key": {"max_parallel_requests": 2}})
    fake_provider.set(usage=USAGE)
    gateways = [start_gateway(tmp_path / f"gw{i}", fake_provider.address, store_dir=store_dir,
                              name=f"gw{i}") for i in range(2)]
    try:
        def outcomes(api_key: str, n: int) -> list[str]:
            out = []
            for i in range(n):
                try:
                    chat(gateways[i % 2].openai_client(api_key))
                    out.append("ok")
                except openai.RateLimitError as exc:
                    assert exc.code == "rate_limit_exceeded"
                    out.append("denied")
            return out

        # Exact to the token: 0, 110, 220 < 330 admitted; 330 is not below 330, but below 331.
        assert outcomes(tpm.api_key, 5) == ["ok", "ok", "ok", "denied", "denied"]
        assert outcomes(tpm_plus.api_key, 5) == ["ok", "ok", "ok", "ok", "denied"]
        assert outcomes(rpm.api_key, 8) == ["ok"] * 5 + ["denied"] * 3

        # The provider holds its answers until the whole burst is decided: every admitted
        # request is still in flight when the others arrive, however slow the machine is.
        fake_provider.set(usage=USAGE, hold_response=True)
        clients = 6
        start = threading.Barrier(clients)
        finished = threading.Semaphore(0)

        def one(i: int) -> str:
            client = gateways[i % 2].openai_client(par.api_key)
            start.wait(timeout=30)
            try:
                chat(client)
                return "ok"
            except openai.RateLimitError as exc:
                assert exc.response.headers["retry-after"] == "1"
                return "denied"
            finally:
                finished.release()

        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(one, i) for i in range(clients)]
            try:
                # The admitted wait at the provider, so the first to finish are the refused:
                # 4 of them (a third admitted request would wait there too; 20 s is within
                # the SDK's timeout of 30).
                refused_first = sum(finished.acquire(timeout=20) for _ in range(clients - 2))
                fake_provider.wait_for_held(2)
                in_flight = fake_provider.held
            finally:
                fake_provider.release()
            burst = [f.result() for f in futures]
        assert refused_first == clients - 2 and in_flight == 2
        assert burst.count("ok") == 2 and burst.count("denied") == 4
        fake_provider.set(usage=USAGE, hold_response=False)
        assert outcomes(par.api_key, 2) == ["ok", "ok"]  # in flight again 0 once settled
    finally:
        for gw in gateways:
            gw.stop()
    with Store(store_dir) as store:
        (window,) = store.ledger.rate_windows([("user", tpm.user_id)])
        assert window is not None and window.tokens == 3 * TOKENS and window.in_flight == 0
        (window,) = store.ledger.rate_windows([("key", par.key_id)])
        assert window.in_flight == 0
