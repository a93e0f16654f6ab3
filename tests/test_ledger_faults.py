"""Store faults: a full disk or map, a store that cannot be opened or does not exist. None may
crash the process or lose what was committed."""

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from store.db import Store, StoreMissing, StoreUnavailable, UsageRecord

LEVELS = [("key", "k"), ("user", "u"), ("org", "o")]
MONTH = "2026-11"
RECORD = UsageRecord(1.0, "openai", "gpt-4o", "k", "u", "o", "metered", 200, None, 3, False)
# Holds a read transaction on the ledger until its stdin closes: LMDB then cannot reuse pages
# freed after that snapshot, so every later commit needs new pages from the disk.
PIN_READER = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, max_dbs=16, max_readers=1024)
txn = env.begin()
print("pinned", flush=True)
sys.stdin.read()
"""


OPEN_AND_READ = """
import sys
from store.db import Store
with Store(sys.argv[1], create=False) as store:
    print(store.ledger.counters([("org", "o")], "2026-11")[0].requests)
"""


def never(counters: list) -> None:
    return None


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at the end whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], timeout=30)


def _fill(disk: Path) -> Path:
    """Fill the filesystem to the last block; the file that does it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    return filler


def _attempt(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except StoreUnavailable as exc:
        return f"unavailable: {exc}"
    return "ok"


def _full_disk_scenario(path: str, shrink_map: bool) -> dict:
    """In a child process: commit, pin a reader, fill the disk, try every ledger write, free
    the space, write again. `shrink_map`: also make the map exactly full when the disk is, so
    the failing write first grows the map."""
    store = Store(path, map_size=1 << 20)
    ledger = store.ledger
    pin = subprocess.Popen([sys.executable, "-c", PIN_READER, str(Path(path) / "ledger")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert pin.stdout is not None and pin.stdout.readline().strip() == "pinned"
        for i in range(30):  # use up the pages freed before the pinned snapshot
            ledger.reserve(f"r{i}", LEVELS, MONTH, 10, never)
            ledger.settle(f"r{i}", LEVELS, MONTH, 3, RECORD)
        ledger.grace_charge("2026-11-30", "k", 7, RECORD)
        before = ledger.counters(LEVELS, MONTH)
        filler = _fill(Path(path).parent)
        map_before = ledger._env.env.info()["map_size"]
        if shrink_map:
            with ledger._env.lock:
                ledger._env.resize(1)  # LMDB rounds it up to the pages in use
            map_before = ledger._env.env.info()["map_size"]
        failed = {
            "reserve": _attempt(lambda: ledger.reserve("full", LEVELS, MONTH, 10, never)),
            "settle": _attempt(lambda: ledger.settle(None, LEVELS, MONTH, 5, RECORD)),
            "grace_charge": _attempt(
                lambda: ledger.grace_charge("2026-11-30", "k", 5, RECORD)),
        }
        during = ledger.counters(LEVELS, MONTH)
        grew = ledger._env.env.info()["map_size"] > map_before
        reservations_during = len(ledger.reservations())
        # Another process (a gateway retrying, `aigw usage`) can still open it and read.
        opened_while_full = subprocess.run(
            [sys.executable, "-c", OPEN_AND_READ, path], capture_output=True, text=True,
            timeout=60)
        flush = _attempt(store.flush)
        filler.unlink()
        ledger.reserve("after", LEVELS, MONTH, 10, never)
        after = ledger.settle("after", LEVELS, MONTH, 4, RECORD)
        grace_after = ledger.grace_charge("2026-11-30", "k", 5, RECORD)
    finally:
        assert pin.stdin is not None
        pin.stdin.close()
        pin.wait(30)
        store.close()
    with Store(path) as reopened:
        reopened_counters = reopened.ledger.counters(LEVELS, MONTH)
        logged = len(reopened.ledger.log_entries())
        grace_log = len(reopened.ledger.grace_log())
    return {
        "before": before, "failed": failed, "during": during, "grew": grew,
        "reservations_during": reservations_during, "flush": flush, "after": after,
        "grace_after": grace_after, "reopened": reopened_counters, "logged": logged,
        "grace_log": grace_log,
        "opened_while_full": (opened_while_full.returncode, opened_while_full.stdout.strip(),
                              opened_while_full.stderr[-500:]),
    }


def _in_child(fn: Callable[..., Any], *args: Any) -> tuple[int | None, Any]:
    """`fn(*args)` in a spawned process: its exit code, and its result if it returned one."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    process = ctx.Process(target=_put_result, args=(fn, args, results))
    process.start()
    process.join(120)
    if process.is_alive():
        process.kill()
        process.join(10)
    try:
        return process.exitcode, results.get(timeout=5)
    except Exception:
        return process.exitcode, None


def _put_result(fn: Callable[..., Any], args: tuple, results: Any) -> None:
    results.put(fn(*args))


@pytest.mark.parametrize("shrink_map", [False, True], ids=["disk-full", "disk-and-map-full"])
def test_a_full_disk_is_unavailable_and_loses_nothing(small_disk: Path, shrink_map: bool):
    """On a full filesystem every ledger write is StoreUnavailable (not SIGBUS, as with a
    writable map), what was committed before stays, and once space is freed writes work."""
    exitcode, seen = _in_child(_full_disk_scenario, str(small_disk / "s"), shrink_map)
    assert exitcode == 0, f"the process died (exit code {exitcode})"
    assert seen is not None
    for op, outcome in seen["failed"].items():
        assert outcome.startswith("unavailable:") and "No space left" in outcome, (op, outcome)
    assert seen["flush"] == "ok"
    assert seen["opened_while_full"][:2] == (0, "30"), seen["opened_while_full"]
    assert seen["during"] == seen["before"]  # the failed writes changed nothing
    assert [c[:3] for c in seen["before"]] == [(90, 0, 30)] * 3
    assert seen["reservations_during"] == 0
    if shrink_map:
        assert seen["grew"]  # MapFull grew the map (no disk involved), then the disk said no
    assert [c[:3] for c in seen["after"]] == [(94, 0, 31)] * 3
    assert seen["grace_after"] == (12, 2)
    assert [c[:3] for c in seen["reopened"]] == [(94, 0, 31)] * 3
    assert seen["logged"] == 31 and seen["grace_log"] == 2


def _as_nobody(fn: Callable[[], Any]) -> Any:
    """`fn()` without the rights to read root's files: as root, in a forked child that drops
    to uid/gid 65534 (modules are imported already); otherwise here."""
    if os.geteuid() != 0:
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                result: Any = ("ok", fn())
            except BaseException as exc:
                result = ("raised", type(exc).__name__, str(exc))
            os.write(write, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def _open_store(path: Path, create: bool = True) -> Any:
    def attempt() -> tuple:
        try:
            with Store(path, create=create):
                return ("opened",)
        except StoreMissing as exc:
            return ("missing", str(exc))
        except StoreUnavailable as exc:
            return ("unavailable", str(exc))
    return attempt


def test_a_store_that_cannot_be_opened_is_unavailable_with_the_reason(tmp_path: Path):
    path = tmp_path / "s"
    with Store(path) as store:
        store.ledger.settle(None, LEVELS, MONTH, 5)
    path.chmod(0)
    try:
        # As the gateway opens it (create=False) and as aigw does: the reason, not "missing".
        outcomes = [_as_nobody(_open_store(path, create)) for create in (False, True)]
    finally:
        path.chmod(0o755)
    for outcome in outcomes:
        if os.geteuid() == 0:
            assert outcome[0] == "ok", outcome
            outcome = outcome[1]
        assert outcome[0] == "unavailable", outcome
        assert f"cannot open store at {path}" in outcome[1] and "Permission denied" in outcome[1]
    # Once the rights are back, opening again (the gateway retries) finds the ledger intact.
    with Store(path) as store:
        assert store.ledger.counters(LEVELS, MONTH)[0].used_nusd == 5


def test_a_missing_store_is_not_created_when_asked_not_to(tmp_path: Path):
    for path in (tmp_path / "none", tmp_path / "empty"):
        if path.name == "empty":
            path.mkdir()  # a directory without a store is no store either
        with pytest.raises(StoreMissing) as raised:
            Store(path, create=False)
        message = str(raised.value)
        assert f"no store at {path}" in message
        assert "aigw org create" in message and "aigw import" in message
        assert not Store.exists(path) and not (path / "config").exists()
    assert not (tmp_path / "none").exists()
    with Store(tmp_path / "new"):  # the default still creates one
        pass
    assert Store.exists(tmp_path / "new")
    with Store(tmp_path / "new", create=False) as store:
        assert store.ledger.counters(LEVELS, MONTH)[0].requests == 0


def test_the_map_is_resized_only_when_no_other_thread_is_in_a_transaction(tmp_path: Path):
    """A write that must grow the map waits for another thread's open transaction instead of
    remapping the pages under it."""
    with Store(tmp_path / "s", map_size=64 * 1024) as store:
        ledger = store.ledger
        big = RECORD._replace(error="x" * 20_000)
        writer_done = threading.Event()
        seen: dict[str, Any] = {}

        def writer() -> None:
            for _i in range(40):  # far past 64 KiB: grows the map several times
                ledger.settle(None, LEVELS, MONTH, 1, big)
            writer_done.set()

        def read_while_writer_waits(txn: Any) -> int:
            thread = threading.Thread(target=writer)
            thread.start()
            seen["thread"] = thread
            seen["waited"] = not writer_done.wait(0.3)  # it is blocked until we are done
            return ledger._env.env.info()["map_size"]

        size_in_txn = ledger._env.read(read_while_writer_waits)
        seen["thread"].join(60)
        assert seen["waited"] and size_in_txn == 64 * 1024
        assert writer_done.is_set()
        assert ledger._env.env.info()["map_size"] > 64 * 1024
        assert ledger.counters(LEVELS, MONTH)[0].requests == 40


def test_a_resize_inside_a_transaction_is_refused(tmp_path: Path):
    with Store(tmp_path / "s") as store:
        env = store.ledger._env

        def nested(txn: Any) -> None:
            env.resize(0)

        with pytest.raises(StoreUnavailable, match="outside a transaction"):
            env.read(nested)
        assert store.ledger.counters(LEVELS, MONTH)[0].requests == 0


def test_the_flusher_reports_a_failing_sync_once_and_keeps_running(caplog):
    """A full disk must not crash the sync thread or log a traceback every second."""
    import logging
    import time

    from store.db import Flusher

    class Failing:
        calls = 0

        def flush(self) -> None:
            Failing.calls += 1
            if Failing.calls <= 5:
                raise StoreUnavailable("store sync failed (x): No space left on device")

    flusher = Flusher(Failing(), 0.001)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="aigw.store"):
        flusher.start()
        deadline = time.monotonic() + 30
        while Failing.calls < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        flusher.stop()
    assert Failing.calls >= 8
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ledger sync failed" in m for m in messages) == 1, messages
    assert sum("works again" in m for m in messages) == 1


def test_close_waits_for_a_flush_in_progress(tmp_path: Path, monkeypatch):
    """The Flusher's fsync may outlast its stop() timeout on a stalled disk: closing the store
    must not free the environment under it."""
    store = Store(tmp_path / "s")
    env = store.ledger._env
    in_sync, release = threading.Event(), threading.Event()
    real_sync = env.sync

    def slow_sync() -> None:
        in_sync.set()
        release.wait(30)
        real_sync()

    monkeypatch.setattr(env, "sync", slow_sync)
    flushing = threading.Thread(target=store.flush)
    flushing.start()
    assert in_sync.wait(30)
    closing = threading.Thread(target=store.close)
    closing.start()
    closing.join(0.3)
    assert closing.is_alive()  # waits for the fsync
    release.set()
    flushing.join(30)
    closing.join(30)
    assert not closing.is_alive() and store._closed
    store.flush()  # a flush after close does nothing
