"""The request log: one line per decided request (allowed, denied, grace, passthrough) on the
`aigw.requests` logger, as JSON or as `key=value` text.

The request path only puts a tuple of the figures on a queue; a thread of its own formats the
line and hands it to logging, so neither formatting nor a slow terminal or disk ever holds the
event loop. A line names keys, users and orgs by id and carries figures only: never a
credential, never prompt or completion text.

Where the line goes: by default to the `aigw.requests` logger, which propagates to mitmdump's
own log handler (printed at INFO as `[HH:MM:SS.mmm] {...}`; never formatted when no handler
would show it, as under `mitmdump -q`, and not sent as mitmproxy's deprecated `add_log` event);
with a file (the addon option
`aigw_request_log_file`) only to that file, one bare line each, reopened when logrotate moves
it. The writer wakes at most every BATCH_WAIT_S and writes what was queued in one go."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
from mitmproxy.log import LegacyLogEvents

from store.settings import ConfigText, show

LOGGER = "aigw.requests"
FORMATS = ("json", "text", "off")

# The fields of a line, in order (a record on the queue is a tuple in this order).
FIELDS = (
    "time", "flow_id", "provider", "model", "decision", "status", "error_type", "key_id",
    "user_id", "org_id", "cost_usd", "input_tokens", "cached_input_tokens", "cache_write_tokens",
    "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "estimated", "stream",
    "total_ms", "upstream_ms",
)

_STOP = object()
BATCH_WAIT_S = 0.05
log = logging.getLogger(LOGGER)


class LogFormat(ConfigText):
    """`policy.request_log`: json, text or off (in any case)."""

    EXPECTED: ClassVar[str] = "one of json, text, off"

    @classmethod
    def parse(cls, value: Any) -> ConfigText:
        """The format in lower case; ValueError for anything else."""
        if value is False:  # YAML 1.1 reads a bare `off` as false
            return cls("off")
        if isinstance(value, str) and value.lower() in FORMATS:
            return cls(value.lower())
        raise ValueError(f"must be {cls.EXPECTED}, not {show(value)}")


def iso_time(timestamp: float) -> str:
    """A Unix time as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def json_line(record: tuple) -> str:
    """A record as one JSON object."""
    fields = dict(zip(FIELDS, record, strict=True))
    fields["time"] = iso_time(fields["time"])
    return orjson.dumps(fields).decode()


def text_line(record: tuple) -> str:
    """A record as `aigw request key=value ...`; absent values are left out."""
    parts = ["aigw request"]
    for name, value in zip(FIELDS, record, strict=True):
        if value is None:
            continue
        if name == "time":
            value = iso_time(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        text = str(value)
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            text = orjson.dumps(text).decode()
        parts.append(f"{name}={text}")
    return " ".join(parts)


class LogFile:
    """A file the lines are appended to, reopened when it was moved or removed (logrotate)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")
        self._id = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def write(self, lines: list[str]) -> None:
        now = self._identity()
        if now is None or now != self._id:
            self._file.close()
            self._file = open(self.path, "a", encoding="utf-8")
            self._id = self._identity()
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RequestLog:
    """The writer: `write(record)` from the request path; a thread wakes at most every
    BATCH_WAIT_S and writes what was queued meanwhile, in one go."""

    def __init__(self) -> None:
        self.format = "off"
        self.file = ""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._out: LogFile | None = None
        self._lock = threading.Lock()  # the output, between the writer and `configure`

    def configure(self, fmt: str, file: str = "") -> None:
        """Set the format (json, text, off) and the file ('' for mitmdump's output); raises
        OSError when the file cannot be opened."""
        if file != self.file:
            out = LogFile(file) if file else None
            with self._lock:
                old, self._out, self.file = self._out, out, file
            if old is not None:
                old.close()
        self.format = fmt if fmt in FORMATS else "json"
        log.setLevel(logging.INFO)  # the lines are INFO records, whatever the root's level
        if self.format != "off":
            self.start()

    def write(self, record: tuple) -> None:
        """Queue one line (a tuple in FIELDS order); nothing when the log is off."""
        if self.format != "off":
            self._queue.put(record)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until what is queued now is written; False if the writer did not get there."""
        if self._thread is None or not self._thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="aigw-request-log",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, then end the thread (and close the file)."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout)
        with self._lock:
            out, self._out, self.file = self._out, None, ""
        if out is not None:
            out.close()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            time.sleep(BATCH_WAIT_S)  # a batch a wake-up: the event loop keeps the GIL longer
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._emit([r for r in batch if isinstance(r, tuple)])
            except Exception as exc:  # a bad record or a full disk must not end the writer
                logging.getLogger("aigw").error("aigw: could not write the request log: %s",
                                                type(exc).__name__)
            for item in batch:
                if isinstance(item, threading.Event):
                    item.set()
            if _STOP in batch:
                return

    def _emit(self, records: list[tuple]) -> None:
        if not records:
            return
        make = text_line if self.format == "text" else json_line
        with self._lock:
            if self._out is not None:
                self._out.write([make(r) for r in records])
                return
        handlers = receivers(log, logging.INFO) if log.isEnabledFor(logging.INFO) else []
        if not handlers:
            return  # nothing would show a line (mitmdump -q): not worth formatting
        for r in records:  # handled as logged, without looking up the caller's frame
            record = log.makeRecord(LOGGER, logging.INFO, __file__, 0, make(r), None, None)
            if log.filter(record):
                for handler in handlers:
                    handler.handle(record)


def receivers(logger: logging.Logger, level: int) -> list[logging.Handler]:
    """The handlers a `level` record of `logger` reaches, walked as `Logger.callHandlers` does,
    less mitmproxy's `LegacyLogEvents`: it hands every record to the event loop, to be sent to
    every addon as the deprecated `add_log` event, which cost more than the rest of the line's
    way together (docs/performance.md). For INFO records, logging's `lastResort` (WARNING) would
    print nothing either."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found += [h for h in current.handlers
                  if level >= h.level and not isinstance(h, LegacyLogEvents)]
        current = current.parent if current.propagate else None
    return found
