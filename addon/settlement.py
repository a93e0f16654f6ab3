"""Settlement: meter the provider's usage (a whole body, or a stream tapped as it passes) and
turn the request's reservation into its real cost in the ledger (or the grace ledger). Never
raises: a fault charges the reserved estimate, a failed ledger write is kept and retried."""

import asyncio
import functools
import logging
from collections.abc import Callable

from mitmproxy import http

from addon.admission import READ_ONLY_METHODS, Flight
from addon.failure import FailureMode
from addon.metering import StreamTap, estimate_tokens, usage_from_body
from addon.policy import LevelUsage, binding_level
from addon.providers import Usage
from addon.runtime import Runtime, log_fault
from store.db import UsageRecord
from store.money import to_usd, usd_text

log = logging.getLogger("aigw")

LARGE_BODY = 256 * 1024  # response bodies above this are parsed off the event loop


class Settler:
    def __init__(self, runtime: Runtime, failure: FailureMode) -> None:
        self.runtime = runtime
        self.failure = failure
        self.unsettled: list[tuple] = []  # ledger writes that failed, retried by maintenance
        # Told of every charged request (flow, flight, usage record, whether the ledger took
        # it): the request log and the metrics. It must not raise.
        self.observer: Callable[[http.HTTPFlow, Flight, UsageRecord, bool], None] | None = None

    def tap(self, flow: http.HTTPFlow, flight: Flight) -> None:
        """Meter a stream as it passes (also any body mitmproxy was told to stream, which would
        otherwise never be seen whole); a fault leaves it to be charged an estimate."""
        response = flow.response
        assert response is not None
        try:
            adapter = flight.provider.adapter
            if adapter.is_stream(flow.request, response):
                framing = adapter.stream_framing(flow.request, response)
            elif response.stream:
                framing = "json_body"
            else:
                return
            drop = adapter.is_usage_only_event if flight.injected_usage else None
            tap = StreamTap(adapter.meter(), response.headers.get("content-encoding"), framing,
                            drop if framing == "sse" else None)
            if tap.decodes_output:
                response.headers.pop("content-encoding", None)
                response.headers.pop("content-length", None)
            flight.tap = tap
            response.stream = tap
            if flight.account is not None and flight.counters is not None:
                usage_headers(response, binding_level(flight.account.budgets, flight.counters),
                              flight.month)
            if flight.rate_headers:
                response.headers.fields = response.headers.fields + flight.rate_headers
        except Exception as exc:
            log_fault("could not tap the stream; it will be charged an estimate", exc)

    def settle(self, flow: http.HTTPFlow, flight: Flight):
        """Charge a request that ended; a large body is read off the event loop (a coroutine
        is returned then)."""
        response = flow.response
        if flight.tap is None and response is not None and len(response.raw_content or b"") > (
                LARGE_BODY):
            return self._settle_large(flow, flight)
        self._settle(flow, flight, None)
        return None

    async def _settle_large(self, flow: http.HTTPFlow, flight: Flight) -> None:
        assert flow.response is not None
        try:
            usage = await asyncio.to_thread(usage_from_body, flight.provider.adapter,
                                            flow.response)
        except Exception as exc:
            log_fault("reading usage failed; charging an estimate", exc)
            usage = None
        self._settle(flow, flight, usage or False)

    def _settle(self, flow: http.HTTPFlow, flight: Flight, usage: Usage | None | bool) -> None:
        response = flow.response
        try:
            if usage is None:
                if flight.tap is not None:
                    usage = flight.tap.usage()
                elif response is not None and response.raw_content is not None:
                    usage = usage_from_body(flight.provider.adapter, response)
            estimated = not usage
            if not usage:
                usage = _estimate_usage(flow, flight)
            config = self.runtime.config
            assert config is not None and isinstance(usage, Usage)
            cost = config.pricing.price(usage.model or flight.model).cost_nusd(usage)
        except Exception as exc:
            log_fault("metering failed; charging the reserved estimate", exc)
            usage, cost, estimated = None, flight.estimate_nusd, True
        after = self._record(flow, flight, cost, estimated, usage)
        if response is not None and flight.tap is None:
            if after is not None:
                usage_headers(response, after, flight.month, cost)
            if flight.rate_headers:
                response.headers.fields = response.headers.fields + flight.rate_headers

    def _record(self, flow: http.HTTPFlow, flight: Flight, cost: int, estimated: bool,
                usage: Usage | None) -> LevelUsage | None:
        """Write the request's cost to the ledger (or the grace ledger). Returns the binding
        level after the write, for the response headers."""
        key = flight.account.identity.key if flight.account else None
        u = usage or Usage()
        entry = UsageRecord(
            round(flight.started, 3), flight.provider.name, u.model or flight.model,
            key.key_id if key else flight.key_id, key.user_id if key else flight.user_id,
            flight.org_id,
            flight.mode, flow.response.status_code if flow.response else None,
            str(flow.error) if flow.error else None, cost, estimated, u.input_tokens,
            u.cached_input_tokens, u.cache_write_tokens, u.cache_write_1h_tokens,
            u.output_tokens, u.reasoning_tokens, flight.grace_who,
        )
        flow.metadata.setdefault("aigw", {}).update(
            {"cost_usd": to_usd(cost), "estimated": estimated})
        if flight.mode == "grace" or flight.account is None:
            self.failure.charge(flight, cost, entry)
            self._observe(flow, flight, entry, True)
            return None
        levels = flight.account.levels
        try:
            store = self.runtime.store
            assert store is not None
            counters = store.ledger.settle(flow.id, levels, flight.month, cost, entry)
        except Exception as exc:
            log.error("aigw: ledger write failed (%s); will retry: %s", _kind(exc), entry)
            self.unsettled.append((flow.id, levels, flight.month, cost, entry))
            self._observe(flow, flight, entry, False)
            return None
        self._observe(flow, flight, entry, True)
        return binding_level(flight.account.budgets, counters)

    def _observe(self, flow: http.HTTPFlow, flight: Flight, entry: UsageRecord,
                 written: bool) -> None:
        if self.observer is not None:
            self.observer(flow, flight, entry, written)

    def retry_unsettled(self) -> None:
        pending, self.unsettled = self.unsettled, []
        for reservation_id, levels, month, cost, entry in pending:
            try:
                store = self.runtime.store
                assert store is not None
                store.ledger.settle(reservation_id, levels, month, cost, entry)
            except Exception:
                self.unsettled.append((reservation_id, levels, month, cost, entry))


def _kind(exc: BaseException) -> str:
    return type(exc).__name__


def _estimate_usage(flow: http.HTTPFlow, flight: Flight) -> Usage:
    """No usage reported: nothing if the provider never answered, refused the request or was
    only read from (a bodiless GET, HEAD, OPTIONS or DELETE), else input from the request and
    output from what was delivered."""
    response = flow.response
    if response is None and not flow.server_conn.timestamp_tcp_setup:
        return Usage(model=flight.model)  # never reached the provider
    if response is not None and response.status_code >= 400:
        return Usage(model=flight.model)  # providers do not bill refused requests
    if flow.request.method in READ_ONLY_METHODS and not flow.request.raw_content:
        return Usage(model=flight.model)  # nor reading or deleting (a model list, a file)
    if flight.tap is not None:
        output = estimate_tokens(flight.tap.text_chars)
    elif response is not None and response.raw_content:
        output = estimate_tokens(len(response.raw_content))
    else:
        output = 0
    return Usage(input_tokens=flight.input_tokens_estimate, output_tokens=output,
                 model=flight.model)


@functools.lru_cache(maxsize=4096)
def _limit_text(nusd: int) -> bytes:
    """A limit as header text: the same few values again and again."""
    return usd_text(nusd).encode()


def usage_headers(response: http.Response, level: LevelUsage | None, month: str,
                  cost: int | None = None) -> None:
    """The Workers gateway's x-gateway-* headers, for the level with the least room left."""
    if level is None:
        return
    added = (
        (b"x-gateway-usage-usd", usd_text(level.used_nusd).encode()),
        (b"x-gateway-limit-level", level.level.encode()),
        (b"x-gateway-request-count", str(level.requests).encode()),
        (b"x-gateway-current-month", month.encode()),
    )
    if level.limit_nusd is not None:
        remaining = level.limit_nusd - level.used_nusd - level.reserved_nusd
        added += (
            (b"x-gateway-limit-usd", _limit_text(level.limit_nusd)),
            (b"x-gateway-remaining-usd", usd_text(remaining if remaining > 0 else 0).encode()),
        )
    if cost is not None:
        added += ((b"x-gateway-cost-usd", usd_text(cost).encode()),)
    # One assignment: mitmproxy rebuilds the header list on every single set.
    response.headers.fields = response.headers.fields + added
