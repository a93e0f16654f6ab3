"""The Workers KV REST API (v4) over httpx: a request budget that spreads a large sync out, and
one retry policy (tenacity) for every call: 429 and 5xx answers, timeouts, connection errors and
malformed or truncated answers are retried with exponential backoff, never sooner than the
answer's `retry-after`; anything else fails at once. The token is sent, never logged."""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import tenacity

from store.cloudflare.settings import CloudflareSettings, SyncSettings

log = logging.getLogger("aigw.sync")

LIST_PAGE = 1000
BULK_GET = 100
BULK_PUT = 10_000
MAX_RETRY_AFTER_S = 600.0  # a retry-after is honoured up to this (Cloudflare blocks for 300 s)
BACKOFF_FIRST_S = 0.5  # the first retry's wait; each next one doubles, up to max_backoff_s


class SyncError(Exception):
    """A pass could not complete; nothing of it was applied."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status of a refused request, if that was the cause


class KVError(Exception):
    """One attempt at a KV call failed; `retryable` says whether another may succeed."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retryable, self.retry_after, self.status = retryable, retry_after, status


class RequestBudget:
    """At most `limit` requests in any `window` seconds: a large sync is spread out instead of
    tripping Cloudflare's limit (which blocks every tool using the token for 5 minutes)."""

    def __init__(self, limit: int, window: float, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, *, wait: bool = True) -> None:
        self.limit, self.window = limit, window
        self._sleep, self._clock = sleep, clock
        self._wait = wait  # False: a full window is an error at once (a server answering people)
        self._lock = threading.Lock()
        self._sent: deque[float] = deque()
        self.used = 0

    def acquire(self) -> None:
        """Wait until one more request fits in the window, and count it."""
        while True:
            with self._lock:
                now = self._clock()
                while self._sent and now - self._sent[0] >= self.window:
                    self._sent.popleft()
                if len(self._sent) < self.limit:
                    self._sent.append(now)
                    self.used += 1
                    return
                wait = self.window - (now - self._sent[0]) + 0.01
            if not self._wait:
                raise SyncError(f"the Cloudflare request budget ({self.limit} requests a "
                                f"{self.window:.0f} s) is used up; try again in {wait:.0f} s")
            self._sleep(wait)


class _WaitHonouringRetryAfter(tenacity.wait.wait_base):
    """Exponential backoff, but never less than the failed answer's `retry-after`: retrying
    sooner only meets the limit again."""

    def __init__(self, backoff: tenacity.wait.wait_base, cap: float) -> None:
        self._backoff = backoff
        self._cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        delay = self._backoff(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, KVError) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self._cap))
        return delay


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, KVError) and exc.retryable


class KVClient:
    """The namespace's operations (list, bulk get, get, bulk put, bulk delete), each one call
    with bounded retries; a call that cannot succeed raises SyncError."""

    def __init__(self, cf: CloudflareSettings, settings: SyncSettings,
                 budget: RequestBudget | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._base = (f"{cf.api_base}/accounts/{cf.account_id}/storage/kv/namespaces/"
                      f"{cf.namespace_id}")
        self._http = httpx.Client(
            headers={"authorization": f"Bearer {cf.api_token}"},
            timeout=settings.timeout_s,
        )
        self._settings = settings
        self._sleep = sleep
        self.budget = budget or RequestBudget(settings.request_budget, settings.budget_window_s,
                                              wait=settings.wait_for_budget)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._http.close()

    def __enter__(self) -> "KVClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- operations ------------------------------------------------------------------------

    def list_page(self, cursor: str | None, prefix: str = "") -> tuple[list[dict], str | None]:
        """One page of key names (with metadata) and the cursor of the next, None at the end."""
        params: dict[str, Any] = {"limit": LIST_PAGE}
        if cursor:
            params["cursor"] = cursor
        if prefix:
            params["prefix"] = prefix
        body = self._json("GET", "/keys", check=_check_page, params=params)
        return body["result"], (body["result_info"].get("cursor") or None)

    def list_all(self, prefix: str = "", progress: Callable[[int], None] | None = None
                 ) -> list[dict]:
        """Every key, following the cursor through empty pages until it ends."""
        keys: list[dict] = []
        cursor: str | None = None
        while True:
            page, cursor = self.list_page(cursor, prefix)
            keys.extend(page)
            if progress:
                progress(len(keys))
            if not cursor:
                return keys

    def bulk_get(self, names: list[str]) -> dict[str, Any]:
        """{name: {"value": text, "metadata": ...} | None} for up to 100 names."""
        body = self._json("POST", "/bulk/get", check=_check_values,
                          json={"keys": names, "type": "text", "withMetadata": True})
        return body["result"]["values"]

    def get(self, name: str) -> bytes | None:
        """One value as stored, None if there is no such key."""
        response = self._call(self._send, "GET", f"/values/{quote(name, safe='')}",
                              allow_404=True)
        return None if response is None else response.content

    def bulk_put(self, items: list[dict]) -> list[str]:
        """Write up to 10,000 pairs; returns the keys Cloudflare did not write."""
        body = self._json("PUT", "/bulk", check=_check_written, json=items)
        return list((body.get("result") or {}).get("unsuccessful_keys") or [])

    def bulk_delete(self, names: list[str]) -> list[str]:
        """Delete up to 10,000 keys; returns the keys Cloudflare did not delete."""
        body = self._json("POST", "/bulk/delete", check=_check_written, json=names)
        return list((body.get("result") or {}).get("unsuccessful_keys") or [])

    # --- transport -------------------------------------------------------------------------

    def _json(self, method: str, path: str, check: Callable[[dict], str | None] | None = None,
              **kwargs: Any) -> dict:
        """The envelope of a successful answer; `check` names what is missing from a malformed
        one (retried like any other fault)."""
        return self._call(self._envelope, method, path, check, **kwargs)

    def _call[R](self, attempt: Callable[..., R], method: str, path: str, *args: Any,
                 **kwargs: Any) -> R:
        """`attempt(method, path, ...)` under the retry policy; SyncError once it gives up."""
        settings = self._settings
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(settings.max_attempts),
            wait=_WaitHonouringRetryAfter(tenacity.wait_exponential(
                multiplier=BACKOFF_FIRST_S, max=settings.max_backoff_s),
                settings.max_retry_after_s),
            retry=tenacity.retry_if_exception(_retryable),
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(attempt, method, path, *args, **kwargs)
        except KVError as exc:
            if exc.retryable:
                tries = retrying.statistics.get("attempt_number", settings.max_attempts)
                raise SyncError(f"{exc} (gave up after {tries} attempts)", exc.status) from None
            raise SyncError(str(exc), exc.status) from None

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning("%s; retrying in %.1fs (attempt %d of %d)", exc, delay,
                    retry_state.attempt_number + 1, self._settings.max_attempts)

    def _envelope(self, method: str, path: str, check: Callable[[dict], str | None] | None,
                  **kwargs: Any) -> dict:
        response = self._send(method, path, **kwargs)
        assert response is not None
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise KVError(f"{method} {path}: malformed JSON", retryable=True) from None
        if not isinstance(body, dict) or body.get("success") is not True:
            raise KVError(f"{method} {path}: {_errors(body)}", retryable=True)
        problem = check(body) if check is not None else None
        if problem:
            raise KVError(f"{method} {path}: malformed answer: {problem}", retryable=True)
        return body

    def _send(self, method: str, path: str, allow_404: bool = False, **kwargs: Any
              ) -> httpx.Response | None:
        """One request within the budget; KVError for any answer but a success (or a 404 when
        `allow_404`: None)."""
        self.budget.acquire()
        try:
            response = self._http.request(method, self._base + path, **kwargs)
            response.read()
        except httpx.TimeoutException:
            raise KVError(f"{method} {path}: timed out", retryable=True) from None
        except httpx.HTTPError as error:
            raise KVError(f"{method} {path}: {type(error).__name__}", retryable=True) from None
        if response.status_code == 404 and allow_404:
            return None
        if response.status_code < 400:
            return response
        raise KVError(
            f"{method} {path}: HTTP {response.status_code}: {_errors(_body(response))}",
            retryable=response.status_code == 429 or response.status_code >= 500,
            retry_after=_retry_after(response),
            status=response.status_code,
        )


def _check_page(body: dict) -> str | None:
    """A listing page must say whether more follow: taking a page without `result_info` (or
    with a cursor that is no string) for the last one would delete every key after it.
    Likewise an entry without a name: the key it stands for would look deleted."""
    result, info = body.get("result"), body.get("result_info")
    if not isinstance(result, list):
        return "no result list"
    if not isinstance(info, dict):
        return "no result_info"
    if not isinstance(info.get("cursor"), str | None):  # `0`, `false` or `[]` is no end either
        return "a cursor that is no string"
    if not all(isinstance(item, dict) and isinstance(item.get("name"), str) for item in result):
        return "a key without a name"
    return None


def _check_values(body: dict) -> str | None:
    result = body.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("values"), dict):
        return "no result.values"
    return None


def _check_written(body: dict) -> str | None:
    """A bulk write's answer: which keys it did not write, if any, as a list of names (any
    other shape would be read as some keys written, or raise)."""
    result = body.get("result")
    if result is None:
        return None
    if not isinstance(result, dict):
        return "a result that is no object"
    failed = result.get("unsuccessful_keys")
    if failed is not None and not (isinstance(failed, list)
                                   and all(isinstance(k, str) for k in failed)):
        return "unsuccessful_keys that are no list of names"
    return None


def _body(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


def _errors(body: Any) -> str:
    """The envelope's errors as text; any other shape (`"errors": 5`) reads as unsuccessful."""
    errors = body.get("errors") if isinstance(body, dict) else None
    text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors
                     if isinstance(e, dict)) if isinstance(errors, list) else ""
    return text or "unsuccessful response"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
