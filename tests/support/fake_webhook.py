"""A fake webhook receiver on 127.0.0.1 for the budget alerts: it keeps every POST it gets
(headers and JSON body) and answers each with the next status of a script (200 once the script
is used up), so a test can make it fail, then accept."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from aiohttp import web

from tests.support.server import ThreadedServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict


class FakeWebhook(ThreadedServer):
    """`statuses`: the answers to the next requests, in order (e.g. [500, 500]: two failures,
    then 200); `received`: the POSTs that were answered 2xx; `attempts`: every request."""

    thread_name = "fake-webhook"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statuses: list[int] = []
        self.received: list[Received] = []
        self.attempts: list[Received] = []

    def fail_next(self, *statuses: int) -> None:
        with self._lock:
            self.statuses.extend(statuses)

    def reset(self) -> None:
        with self._lock:
            self.statuses.clear()
            self.received.clear()
            self.attempts.clear()

    def bodies(self) -> list[dict]:
        with self._lock:
            return [r.body for r in self.received]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_unparsed": raw.decode("utf-8", "replace")}
        entry = Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        with self._lock:
            self.attempts.append(entry)
            status = self.statuses.pop(0) if self.statuses else 200
            if request.method == "POST" and 200 <= status < 300:
                self.received.append(entry)
        return web.json_response({"ok": status < 300}, status=status)
