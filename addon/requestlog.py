"""The request log: one line per decided request (allowed, denied, grace, passthrough) on the
`aigw.requests` logger, as JSON or as `key=value` text.

The request path only puts a tuple of the figures on a queue; a thread of its own formats the
line and hands it to logging, so neither formatting nor a slow terminal or disk ever holds the
event loop. A line names keys, users and orgs by id and carries figures only: never a
credential, never prompt or completion text.

Where the line goes: by default to the `aigw.requests` logger, which propagates to mitmdump's
own log handler (printed at INFO as `[HH:MM:SS.mmm] {...}`); with a file (the addon option
`aigw_request_log_file`) only to that file, one bare line each, reopened when logrotate moves
it."""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson

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


class RequestLog:
    """The writer: `write(record)` from the request path, lines written by a thread."""

    def __init__(self) -> None:
        self.format = "off"
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._file_handler: logging.Handler | None = None
        self.file = ""

    def configure(self, fmt: str, file: str = "") -> None:
        """Set the format (json, text, off) and the file ('' for mitmdump's output); raises
        OSError when the file cannot be opened."""
        if file != self.file:
            self._use_file(file)
        self.format = fmt if fmt in FORMATS else "json"
        if self.format != "off":
            self.start()

    def _use_file(self, file: str) -> None:
        handler = None
        if file:
            handler = logging.handlers.WatchedFileHandler(file, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
        if self._file_handler is not None:
            log.removeHandler(self._file_handler)
            self._file_handler.close()
        self._file_handler, self.file = handler, file
        if handler is not None:
            log.addHandler(handler)
        # With a file of its own, the lines do not also fill mitmdump's output.
        log.propagate = handler is None
        log.setLevel(logging.INFO)

    def write(self, record: tuple) -> None:
        """Queue one line (a tuple in FIELDS order); nothing when the log is off."""
        if self.format != "off":
            self._queue.put(record)

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
        if self._file_handler is not None:
            self._use_file("")

    def _run(self) -> None:
        while True:
            record = self._queue.get()
            if record is _STOP:
                return
            try:
                line = json_line(record) if self.format != "text" else text_line(record)
                log.info(line)
            except Exception as exc:  # a bad record must not end the writer
                logging.getLogger("aigw").error("aigw: could not write a request log line: %s",
                                                type(exc).__name__)
