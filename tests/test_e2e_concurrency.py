"""A burst against a nearly spent budget, across two mitmdump processes sharing one store."""

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from store import Store
from tests.support.gateway import aigw, spent, start_gateway
from tests.support.seed import seed

pytestmark = pytest.mark.e2e

CLIENTS = 24
USAGE = {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}
# gpt-4o-mini: 10 x $0.15 + 100 x $0.60 per 1M tokens, in nano-dollars
COST = 10 * 150 + 100 * 600


def test_burst_across_two_gateways_admits_only_what_fits(tmp_path, fake_provider):
    store_dir = tmp_path / "store"
    with Store(store_dir) as store:
        acct = seed(store, suffix="burst", org_budget=5 * COST / 1e9, user_limit=None)
    fake_provider.set(usage=USAGE, response_delay=0.5)  # every request is still in flight
    gateways = [start_gateway(tmp_path / f"gw{i}", fake_provider.address, store_dir=store_dir,
                              name=f"gw{i}") for i in range(2)]
    try:
        start = threading.Barrier(CLIENTS)

        def one(i: int) -> str:
            client = gateways[i % 2].openai_client(acct.api_key)
            start.wait(timeout=30)
            try:
                client.chat.completions.create(
                    model="gpt-4o-mini", max_tokens=100,
                    messages=[{"role": "user", "content": "hi"}])
                return "ok"
            except openai.RateLimitError:
                return "denied"

        with ThreadPoolExecutor(CLIENTS) as pool:
            outcomes = list(pool.map(one, range(CLIENTS)))
        # Both registered on the ledger, so neither held reservations in memory.
        assert len(aigw(gateways[0], "health")["gateways"]) == 2
    finally:
        for gw in gateways:
            gw.stop()
    assert aigw(gateways[0], "health")["gateways"] == []  # each left on its way out

    admitted = outcomes.count("ok")
    with Store(store_dir) as store:
        org = spent(store, "org", acct.org_id)
        entries = [e for e in store.ledger.log_entries() if e.org_id == acct.org_id]
    assert outcomes.count("denied") == CLIENTS - admitted
    assert len(fake_provider.requests) == admitted
    # Each request reserves more than it costs here, so nothing overshoots the budget at all;
    # without reservations every one of the burst would have been let through.
    assert 1 <= admitted <= 5
    assert org.used_nusd <= 5 * COST
    # No lost update: the ledger is exactly the sum of the settled costs.
    assert org.used_nusd == sum(e.cost_nusd for e in entries) == admitted * COST
    assert org.requests == admitted and org.reserved_nusd == 0
