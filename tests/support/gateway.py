"""The gateway under test: a real mitmdump with addon/gateway.py (and the test redirect to the
fake provider), its store opened alongside, and small helpers to read what it recorded."""

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from store import Store
from store.money import month_of, utc_now
from tests.support.proxy import REDIRECT_SCRIPT, REPO_ROOT, Proxy, start_mitmdump

OPENAI_KEY = "sk-fake-openai-provider-key"
ANTHROPIC_KEY = "sk-ant-fake-provider-key"
GEMINI_KEY = "fake-gemini-provider-key"
PROVIDER_ENV = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
                "GEMINI_API_KEY": GEMINI_KEY, "AZURE_OPENAI_API_KEY": OPENAI_KEY}
AIGW = str(Path(sys.executable).parent / "aigw")
GATEWAY_SCRIPT = REPO_ROOT / "addon" / "gateway.py"


def start_gateway(tmp: Path, upstream: str, *, store_dir: Path | None = None,
                  config_text: str | None = None, name: str = "mitmdump",
                  script: Path = GATEWAY_SCRIPT, sets: Mapping[str, str | int | bool] | None = None,
                  env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                  timeout: float = 20.0, create_store: bool = True) -> Proxy:
    """mitmdump with the gateway and the repository's mitm.yaml (or `config_text`). `script`
    replaces addon/gateway.py (e.g. a copy to touch for a reload); `sets`, `env` (added to
    PROVIDER_ENV) and `args` go to start_mitmdump. The store is created first (the gateway
    opens a store, never creates one) if there is none, unless `create_store` is false."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "mitm.yaml"
    if config_text is None:
        shutil.copy(REPO_ROOT / "mitm.yaml", config)
    else:
        config.write_text(config_text)
    store_dir = store_dir or tmp / "store"
    if create_store and not Store.exists(store_dir):
        Store(store_dir).close()
    proxy = start_mitmdump(
        tmp,
        scripts=[script, REDIRECT_SCRIPT],
        sets={"aigw_config": str(config), "aigw_store": str(store_dir), **(sets or {})},
        env={**PROVIDER_ENV, **(env or {})},
        upstream=upstream,
        args=args,
        timeout=timeout,
        name=name,
    )
    proxy.config = config
    proxy.store_dir = store_dir
    return proxy


def per_1m(tokens: int, usd_per_1m: float) -> float:
    return tokens * usd_per_1m / 1_000_000


def spent(store: Store, level: str, level_id: str):
    """The ledger counter of a level for this month."""
    return store.ledger.counters([(level, level_id)], month_of(utc_now()))[0]


def settled(store: Store, key_id: str, requests: int = 1, timeout: float = 10.0):
    """The key's counter once `requests` requests are settled and nothing is reserved: an SDK
    may finish reading a stream (at `[DONE]`) a moment before the gateway settles it."""
    deadline = time.monotonic() + timeout
    while True:
        counter = spent(store, "key", key_id)
        if counter.requests >= requests and counter.reserved_nusd == 0:
            return counter
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled within {timeout}s: {counter}")
        time.sleep(0.02)


def aigw(proxy: Proxy, *args: str) -> dict:
    """Run the admin CLI against the gateway's config and store; its JSON answer."""
    done = subprocess.run(
        [AIGW, "--config", str(proxy.config), "--store", str(proxy.store_dir), *args],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chat(client, **kwargs):
    return client.chat.completions.create(
        model=kwargs.pop("model", "gpt-4o-mini"),
        messages=[{"role": "user", "content": "hello"}],
        **kwargs,
    )
