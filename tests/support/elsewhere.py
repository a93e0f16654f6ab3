"""Run a function in another process, as another program sharing the store would."""

import multiprocessing
from collections.abc import Callable
from typing import Any


def _call(fn: Callable[..., Any], args: tuple, results) -> None:
    results.put(fn(*args))


def in_another_process(fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """`fn(*args)` in a fresh (spawned) process; its result. `fn` must be importable."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=_call, args=(fn, args, results))
    process.start()
    process.join(timeout)
    return results.get(timeout=5)
