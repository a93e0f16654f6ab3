"""Shared pytest fixtures (nothing gateway-specific here).

Fixtures:
  fake_provider_server  session-scoped FakeProvider (one port for the whole run; use it from
                        module-scoped mitmdump fixtures, e.g. `upstream=fake_provider_server.address`)
  fake_provider         the same server, reset (requests, usage, scenario) before each test
  proxy_factory         start_mitmdump(...) bound to the test's tmp_path; stops every proxy it
                        started at teardown and prints their logs if the test failed

Autouse: a test never starts within MIDNIGHT_MARGIN_S of midnight UTC (see `_not_across_midnight`).

Marker: `e2e` for tests that start mitmdump / a fake provider (deselect with -m "not e2e").

Import the helpers as `tests.support.*` (this file puts the repository root on sys.path, since
tests/ has no __init__.py and the `pytest` script does not add the working directory).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.fake_provider import FakeProvider  # noqa: E402
from tests.support.proxy import Proxy, start_mitmdump  # noqa: E402

# Hypothesis: by default the same examples every run (derived from each test), so a run's
# verdict is the code's, not the draw's; AIGW_HYPOTHESIS=explore draws new ones (1,000 a test
# where it sets no count of its own) to find what the fixed draw misses, and replays its
# failures from .hypothesis/ in later explore runs.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("AIGW_HYPOTHESIS", "repeatable"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end test that starts mitmdump and/or a fake provider"
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    # Keep each phase's report on the item, so fixtures can tell whether the test failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    setup = getattr(request.node, "rep_setup", None)
    return bool((rep is not None and rep.failed) or (setup is not None and setup.failed))


MIDNIGHT_MARGIN_S = 90  # longer than any one test runs
DAY_S = 86_400  # POSIX time has no leap seconds: UTC midnights are its multiples of a day


@pytest.fixture(autouse=True)
def _not_across_midnight() -> None:
    """Tests read "this month" and "today" (usage counters, x-gateway-current-month, the daily
    fallback limit) with their own clock, beside a gateway that decided with its own a moment
    earlier: across midnight UTC (every month's end is one) the two are different days. A test
    about to start within MIDNIGHT_MARGIN_S of midnight waits until just past it instead (only
    a run at midnight waits, at most once). Tests of the boundaries themselves use a clock they
    control."""
    to_midnight = DAY_S - time.time() % DAY_S
    if to_midnight < MIDNIGHT_MARGIN_S:
        time.sleep(to_midnight + 1)


@pytest.fixture(scope="session")
def fake_provider_server() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def fake_provider(fake_provider_server: FakeProvider) -> Iterator[FakeProvider]:
    fake_provider_server.reset()
    yield fake_provider_server
    fake_provider_server.reset()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, fake_provider_server):
    """One gateway mitmdump per test module, with its store opened in the test process."""
    from store import Store
    from tests.support.gateway import start_gateway

    proxy = start_gateway(tmp_path_factory.mktemp("gw"), fake_provider_server.address)
    proxy.store = Store(proxy.store_dir)
    try:
        yield proxy
    finally:
        proxy.stop()
        proxy.store.close()


_suffixes = iter(range(1, 1_000_000))


@pytest.fixture
def account(gateway):
    """Seeds an org, user and key (options as tests.support.seed.seed) in the gateway's store."""
    from tests.support.seed import seed

    def make(**kwargs):
        return seed(gateway.store, suffix=f"e{next(_suffixes)}", **kwargs)

    return make


@pytest.fixture
def proxy_factory(tmp_path: Path, request: pytest.FixtureRequest):
    started: list[Proxy] = []

    def start(**kwargs) -> Proxy:
        sub = tmp_path / f"proxy{len(started)}"
        proxy = start_mitmdump(sub, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
    if _failed(request):
        for proxy in started:
            sys.stderr.write(f"\n----- {proxy.log_path} -----\n{proxy.log_text()}\n")
