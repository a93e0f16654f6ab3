"""What the Hypothesis tests of outside input share: JSON values of any shape, and a gateway at
addon level (taddons, the real hooks and ledger) on every provider kind."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import strategies as st
from mitmproxy.test import taddons

from addon.gateway import Gateway
from store import Store

PROVIDER_KEY = "sk-provider-fuzz"
CONFIG = """
store: {path: %(store)s}
providers:
  openai: {kind: openai, hosts: [api.openai.com], api_key_env: AIGW_FUZZ_KEY}
  azure: {kind: azure_openai, hosts: [fuzz.openai.azure.com], api_key_env: AIGW_FUZZ_KEY}
  anthropic: {kind: anthropic, hosts: [api.anthropic.com], api_key_env: AIGW_FUZZ_KEY}
  gemini: {kind: gemini, hosts: [generativelanguage.googleapis.com], api_key_env: AIGW_FUZZ_KEY}
pricing:
  fallback: {input_per_1m: 1.0, output_per_1m: 2.0}
  models:
    gpt-4o: {input_per_1m: 2.5, cached_input_per_1m: 1.25, output_per_1m: 10.0}
    claude-sonnet-4-5: {input_per_1m: 3.0, cached_input_per_1m: 0.3, output_per_1m: 15.0}
    expensive: {input_per_1m: 1000.0, output_per_1m: 5000.0}
"""


def json_values(max_leaves: int) -> st.SearchStrategy:
    """Any JSON value: scalars (integers past int64 included), lists and objects of them."""
    leaf = st.one_of(st.none(), st.booleans(),
                     st.integers(min_value=-(2**63), max_value=2**64 - 1),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=max_leaves)


@contextmanager
def fuzz_gateway(tmp: Path) -> Iterator[Gateway]:
    """A configured gateway on a fresh store under `tmp`, done on exit."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIGW_FUZZ_KEY", PROVIDER_KEY)
        config = tmp / "mitm.yaml"
        config.write_text(CONFIG % {"store": tmp / "store"})
        Store(tmp / "store").close()
        gateway = Gateway()
        with taddons.context(gateway) as tctx:
            tctx.configure(gateway, aigw_config=str(config))
            yield gateway
            gateway.done()


def run(result) -> None:
    """Run a hook's result: mitmproxy awaits it when the hook returned a coroutine."""
    if asyncio.iscoroutine(result):
        asyncio.run(result)
