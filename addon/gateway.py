"""aigw: an AI egress gateway as a mitmproxy addon (`mitmdump -s addon/gateway.py`).

One request, top to bottom (`_admit`): detect the provider -> extract the credential -> look up
the key, user and org -> decide -> reserve the request's maximum cost -> forward with the org's
real credential. Then (`_settle`): meter the provider's usage -> settle the reservation to the
real cost.
"""

import asyncio
import functools
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field

from mitmproxy import ctx, exceptions, http

from addon.config import GatewayConfig, Provider, load_config
from addon.metering import StreamTap, body_of, estimate_tokens, parse_json, usage_from_body
from addon.policy import (
    Budget,
    LevelUsage,
    binding_level,
    budgets_of,
    check_identity,
    decide_budgets,
    model_not_allowed,
    unauthorized,
)
from addon.providers import Denial, Usage
from store import Store, StoreUnavailable
from store.db import Counter, Flusher, Identity, Level, UsageRecord
from store.hashing import hash_key, looks_like_gateway_key
from store.money import (
    day_of,
    from_usd,
    month_of,
    month_span,
    seconds_to_day_end,
    to_usd,
    usd_text,
    utc_now,
)
from store.records import FAIL_OPEN, Org
from store.settings import ConfigError

log = logging.getLogger("aigw")

LARGE_BODY = 256 * 1024  # bodies above this are parsed off the event loop
MAINTENANCE_INTERVAL_S = 30
PEER_CHECK_S = 0.1  # how often a gateway alone on its ledger looks for others joining
PEER_WAIT_MAX_S = 5.0  # how long a joining gateway waits at most for the others' answer
PUBLISH_EVERY = 10  # held reservations are written every PUBLISH_EVERY * PEER_CHECK_S anyway
HEARTBEAT_EVERY = 50  # a gateway refreshes its registration every HEARTBEAT_EVERY * PEER_CHECK_S
_GATEWAYS_HERE: set[str] = set()  # the gateways (instances) running in this process


@dataclass(slots=True)  # built per request: a frozen one costs a call per field
class Account:
    """What the request path derives from a key's records, kept while they do not change."""

    identity: Identity
    month: str
    budgets: tuple[Budget, ...]
    levels: tuple[Level, ...]
    user_id: str
    allowed_models: frozenset[str]  # empty: any model
    secrets: dict[str, str | None] = field(default_factory=dict)  # provider name -> credential


@dataclass(slots=True)
class Flight:
    """A forwarded request the gateway must settle when its response ends or fails."""

    provider: Provider
    mode: str  # "metered" | "grace"
    model: str | None
    month: str
    estimate_nusd: int
    input_tokens_estimate: int
    account: Account | None = None
    counters: list[Counter] | None = None  # the levels' counters when the request was admitted
    org_id: str | None = None
    grace_who: str | None = None
    injected_usage: bool = False  # the gateway asked for stream usage the client did not
    tap: StreamTap | None = None
    started: float = field(default_factory=time.time)


class Gateway:
    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.store: Store | None = None
        self._flusher: Flusher | None = None
        self._flights: dict[str, Flight] = {}
        self._accounts: dict[str, Account] = {}
        self._budgets: dict[tuple, Budget] = {}  # one per level, limit and outside usage
        self._providers_by_host: dict[str, Provider | None] = {}
        self._unsettled: list[tuple] = []  # ledger writes that failed, retried by maintenance
        self._grace_memory: dict[tuple[str, str], int] = {}  # when even the ledger is down
        self._derived_allow_hosts: list[str] | None = None
        self._maintenance: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._peers_settled_at = 0.0  # until then, a joining gateway waits for the others
        self._joined_at = 0.0
        self._peers_acked: frozenset[str] = frozenset()  # the others we said we share with
        self._month: tuple[str, float, float] = ("", 0.0, 0.0)  # name, start, end (UNIX times)
        self._max_staleness_s: float | None = None
        # Reservations name their owner, so a restarted gateway can release a crashed one's.
        self._instance = secrets.token_hex(4)
        self._owner = {"pid": os.getpid(), "host": f"{socket.gethostname()}/{self._instance}"}

    # --- lifecycle -------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "aigw_config", str, "./mitm.yaml", "Path to aigw's configuration (mitm.yaml)."
        )
        loader.add_option(
            "aigw_store", str, "", "LMDB data directory; overrides store.path of mitm.yaml."
        )

    def configure(self, updated: set[str]) -> None:
        if "aigw_config" in updated or "aigw_store" in updated:
            try:
                config = load_config(ctx.options.aigw_config, ctx.options.aigw_store or None)
            except ConfigError as exc:
                raise exceptions.OptionsError(str(exc)) from None
            self._close_store()
            self.config = config
            self._max_staleness_s = config.policy.max_staleness_s
            self._providers_by_host.clear()
            self._accounts.clear()
            self._budgets.clear()
            self._open_store()
            _warn_of_missing_credentials(config)
        # Intercept only the providers' hosts; everything else is tunnelled untouched.
        if self.config is not None and (
            not ctx.options.allow_hosts and not ctx.options.ignore_hosts
            or ctx.options.allow_hosts == self._derived_allow_hosts
        ):
            derived = self.config.allow_hosts()
            if ctx.options.allow_hosts != derived:
                self._derived_allow_hosts = derived
                ctx.options.update(allow_hosts=derived)

    def _open_store(self) -> None:
        assert self.config is not None
        settings = self.config.store
        try:
            self.store = Store(settings.path, hash_algorithm=settings.hash_algorithm)
        except StoreUnavailable as exc:
            self.store = None  # every request takes its failure mode until the store opens
            log.error("aigw store unavailable (%s); applying failure modes", exc)
            return
        self._flusher = Flusher(self.store, self.config.policy.flush_interval_s)
        self._flusher.start()
        _GATEWAYS_HERE.add(self._owner["host"])
        self._peers_acked = frozenset()
        try:
            others = self.store.ledger.join(self._owner["host"], _process_info(), self._is_live)
        except StoreUnavailable as exc:
            log.error("aigw could not register on the ledger (%s); applying failure modes", exc)
            self._close_store()
            return
        if others:
            # A gateway that was alone holds its reservations in memory until it sees us join
            # (PEER_CHECK_S): decide nothing before they are in the ledger.
            self._joined_at = time.time()
            self._peers_settled_at = time.monotonic() + PEER_WAIT_MAX_S
            log.info("aigw shares its ledger with %d other gateway(s)", len(others))
        released = self._release_stale()
        log.info(
            "aigw ready: store %s, %d providers%s",
            settings.path,
            len(self.config.providers),
            f", released {released} stale reservations" if released else "",
        )

    def _close_store(self) -> None:
        if self.store is not None:
            try:
                self.store.ledger.leave()
            except Exception:
                log.exception("aigw: could not leave the ledger cleanly")
            _GATEWAYS_HERE.discard(self._owner["host"])
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._maintenance is None:
            self._maintenance = loop.create_task(self._maintain())
        if self._watch is None:
            self._watch = loop.create_task(self._watch_peers())

    def done(self) -> None:
        for task in (self._maintenance, self._watch):
            if task is not None:
                task.cancel()
        self._maintenance = self._watch = None
        self._retry_unsettled()
        self._close_store()

    # --- the request path --------------------------------------------------------------------

    def request(self, flow: http.HTTPFlow):
        """Synchronous for ordinary bodies; a large body is parsed off the event loop (mitmproxy
        awaits the coroutine returned then)."""
        if flow.response or flow.error or not flow.live or self.config is None:
            return None
        provider = self._provider(flow.request.host)
        if provider is None:
            return None
        raw = _request_body(flow.request)
        if len(raw) > LARGE_BODY or self._peers_settled_at:
            return self._decide_later(flow, provider, raw)
        self._decide(flow, provider, raw, parse_json(raw))
        return None

    async def _decide_later(self, flow: http.HTTPFlow, provider: Provider, raw: bytes) -> None:
        """A large body is parsed off the event loop; a gateway that just joined others on
        the ledger first waits until they have written the reservations they held."""
        if self._peers_settled_at:
            await self._wait_for_peers()
        body = await asyncio.to_thread(parse_json, raw) if len(raw) > LARGE_BODY else (
            parse_json(raw))
        self._decide(flow, provider, raw, body)

    async def _wait_for_peers(self) -> None:
        while True:  # asks at least once: the first request may come long after the join
            try:
                if self.store is None or self.store.ledger.caught_up(self._joined_at):
                    break
            except Exception:  # the decision that follows meets the fault and decides
                log.exception("aigw: could not read the other gateways' registrations")
                break
            if time.monotonic() >= self._peers_settled_at:
                log.warning("aigw: the other gateways did not answer in %.0fs; deciding anyway",
                            PEER_WAIT_MAX_S)
                break
            await asyncio.sleep(PEER_CHECK_S / 2)
        self._peers_settled_at = 0.0

    def _provider(self, host: str) -> Provider | None:
        try:
            return self._providers_by_host[host]
        except KeyError:
            assert self.config is not None
            provider = self.config.provider_for(host)
            if len(self._providers_by_host) < 10_000:
                self._providers_by_host[host] = provider
            return provider

    def _decide(self, flow: http.HTTPFlow, provider: Provider, raw: bytes, body) -> None:
        known: dict = {}  # what _admit learnt before failing, for the failure mode
        try:
            self._admit(flow, provider, raw, body, known)
        except Exception as exc:  # never let mitmproxy forward a flow we failed to decide
            log.exception("aigw: request decision failed")
            self._flights.pop(flow.id, None)
            if known.get("reserved") and self.store is not None:
                try:
                    self.store.ledger.release(flow.id)
                except Exception:
                    log.exception("aigw: could not release the reservation of a failed request")
            flow.response = None
            self._unavailable(flow, provider, known.get("org"), f"internal error: {exc!r}",
                              known.get("credential"), known.get("user_id"))

    def _admit(
        self, flow: http.HTTPFlow, provider: Provider, raw: bytes, body, known: dict
    ) -> None:
        assert self.config is not None
        request, adapter = flow.request, provider.adapter
        credential = known["credential"] = adapter.credential(request)
        if credential is None:
            return self._deny(flow, provider, unauthorized("No API key provided."))
        model = adapter.model(request, body)
        if self.store is None:
            return self._unavailable(flow, provider, None, "store unavailable", credential)
        key_hash = self.store.hash(credential)
        now = time.time()
        month = self._month_at(now)
        try:
            identity = self.store.records.resolve(key_hash, month)
        except StoreUnavailable as exc:
            return self._unavailable(flow, provider, None, str(exc), credential)
        account = self._accounts.get(key_hash)
        if account is None or account.identity is not identity or account.month != month:
            # A key not seen since its records last changed: check them all.
            if identity.key is None and not looks_like_gateway_key(credential):
                if self.config.policy.unknown_credentials == "passthrough":
                    flow.metadata["aigw"] = {"decision": "passthrough"}
                    return None
            denial = check_identity(identity, None)  # the model: below, for every request
            if denial is not None:
                return self._deny(flow, provider, denial)
            if identity.org is None:
                user_id = identity.key.user_id if identity.key else None
                return self._unavailable(flow, provider, None, "organization record missing",
                                         credential, user_id)
            account = self._account(key_hash, identity, month)
        org = known["org"] = identity.org
        known["user_id"] = account.user_id
        assert org is not None
        if account.allowed_models and model and model not in account.allowed_models:
            return self._deny(flow, provider, model_not_allowed(org.org_id, model))
        if self._max_staleness_s is not None:
            stale = self._staleness(now)
            if stale:
                return self._unavailable(flow, provider, org, stale, credential, account.user_id)

        input_tokens = estimate_tokens(len(raw))
        max_output = adapter.max_output_tokens(request, body)
        estimate = self.config.pricing.price(model).cost_nusd(
            Usage(
                input_tokens=input_tokens,
                output_tokens=max_output or self.config.policy.default_max_output_tokens,
            )
        )
        try:
            denial, counters = self._reserve(flow.id, account, estimate, now)
        except StoreUnavailable as exc:
            return self._unavailable(flow, provider, org, str(exc), credential, known["user_id"])
        if denial is not None:
            return self._deny(flow, provider, denial, binding_level(account.budgets, counters))
        known["reserved"] = True

        key = identity.key
        assert key is not None
        if key.passthrough:
            secret = credential
        else:
            try:
                secret = account.secrets[provider.name]
            except KeyError:
                secret = account.secrets[provider.name] = _provider_secret(provider, org)
        if secret is None:
            self.store.ledger.release(flow.id)
            return self._deny(flow, provider, _no_credential(provider))
        adapter.set_credential(request, secret)
        injected = adapter.request_stream_usage(request, body)
        if injected:
            request.headers["accept-encoding"] = "identity"  # the gateway rewrites this stream
        self._flights[flow.id] = Flight(
            provider=provider,
            mode="metered",
            model=model,
            month=account.month,
            estimate_nusd=estimate,
            input_tokens_estimate=input_tokens,
            account=account,
            counters=counters,
            org_id=org.org_id,
            injected_usage=injected,
        )
        flow.metadata["aigw"] = {
            "decision": "allowed",
            "key_id": key.key_id,
            "user_id": key.user_id,
            "org_id": org.org_id,
            "model": model,
            "reserved_usd": to_usd(estimate),
        }
        return None

    def _reserve(
        self, reservation_id: str, account: Account, estimate: int, now
    ) -> tuple[Denial | None, list[Counter]]:
        """Decide on the ledger's counters and reserve the request's maximum cost. A gateway
        alone on its ledger holds the reservation in memory: nothing is written on the request
        path, and the decision is as exact as a transaction. Beside other gateways, decision and
        reservation are one ledger transaction."""
        assert self.store is not None
        ledger = self.store.ledger
        counters, alone = ledger.peek(account.levels, account.month)
        if alone:
            denial = decide_budgets(account.budgets, counters, estimate, now, account.month)
            if denial is None:
                ledger.hold(reservation_id, account.levels, account.month, estimate)
            return denial, counters
        seen: list[list[Counter]] = []

        def refuse(counters: list[Counter]) -> Denial | None:
            seen.append(counters)
            return decide_budgets(account.budgets, counters, estimate, now, account.month)

        denial = ledger.reserve(
            reservation_id, account.levels, account.month, estimate, refuse, owner=self._owner
        )
        return denial, seen[-1]

    def _staleness(self, now: float) -> str | None:
        """Why the replica is too old to decide on, if it is (policy.max_staleness_s)."""
        assert self.store is not None
        limit = self._max_staleness_s
        if limit is None:
            return None
        last = self.store.records.last_sync()
        if last is None:
            return "the store has never completed a sync pass"
        age = now - float(last.get("finished_at", 0))
        if age > limit:
            return f"the last complete sync pass is {age:.0f}s old (max_staleness_s {limit})"
        return None

    def _account(self, key_hash: str, identity: Identity, month: str) -> Account:
        """What the request path keeps of a key whose records passed `check_identity`."""
        assert identity.key is not None and identity.org is not None
        if len(self._accounts) >= 200_000:
            self._accounts.clear()
        if len(self._budgets) >= 200_000:  # outside usage moves with every sync pass
            self._budgets.clear()
        # The keys of one user or org share its budget: fewer objects for the collector to walk.
        budgets = tuple(self._budgets.setdefault(
            (b.level, b.id, b.limit_nusd, b.external_nusd, b.external_requests), b)
            for b in budgets_of(identity, month))
        account = Account(identity, month, budgets, tuple(b.ledger_level for b in budgets),
                          identity.key.user_id, frozenset(identity.org.allowed_models or ()))
        self._accounts[key_hash] = account
        return account

    def _month_at(self, now: float) -> str:
        """The UTC month of `now`, recomputed only when a month ends."""
        name, start, end = self._month
        if not start <= now < end:
            name, start, end = self._month = month_span(now)
        return name

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        flight = self._flights.get(flow.id)
        response = flow.response
        if flight is None or response is None:
            return
        try:
            adapter = flight.provider.adapter
            # Streams are metered as they pass; so is any body mitmproxy was already told to
            # stream (stream_large_bodies), which would otherwise never be seen whole.
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
                _usage_headers(response, binding_level(flight.account.budgets, flight.counters),
                               flight.month)
        except Exception:
            log.exception("aigw: could not tap the stream; it will be charged an estimate")

    def response(self, flow: http.HTTPFlow):
        flight = self._flights.pop(flow.id, None)
        if flight is None:
            return None
        response = flow.response
        if flight.tap is None and response is not None and len(response.raw_content or b"") > (
            LARGE_BODY
        ):
            return self._settle_large(flow, flight)
        self._settle(flow, flight, None)
        return None

    def error(self, flow: http.HTTPFlow):
        return self.response(flow)

    # --- settling ---------------------------------------------------------------------------

    async def _settle_large(self, flow: http.HTTPFlow, flight: Flight) -> None:
        assert flow.response is not None
        try:
            usage = await asyncio.to_thread(
                usage_from_body, flight.provider.adapter, flow.response
            )
        except Exception:
            log.exception("aigw: reading usage failed; charging an estimate")
            usage = None
        self._settle(flow, flight, usage or False)

    def _settle(self, flow: http.HTTPFlow, flight: Flight, usage: Usage | None | bool) -> None:
        """Meter and charge; never raises (a failure charges the reserved estimate)."""
        response = flow.response
        try:
            if usage is None:
                if flight.tap is not None:
                    usage = flight.tap.usage()
                elif response is not None and response.raw_content is not None:
                    usage = usage_from_body(flight.provider.adapter, response)
            estimated = not usage
            if not usage:
                usage = self._estimate_usage(flow, flight)
            assert self.config is not None and isinstance(usage, Usage)
            cost = self.config.pricing.price(usage.model or flight.model).cost_nusd(usage)
        except Exception:
            log.exception("aigw: metering failed; charging the reserved estimate")
            usage, cost, estimated = None, flight.estimate_nusd, True
        after = self._record(flow, flight, cost, estimated, usage)
        if response is not None and flight.tap is None and after is not None:
            _usage_headers(response, after, flight.month, cost)

    def _estimate_usage(self, flow: http.HTTPFlow, flight: Flight) -> Usage:
        """No usage reported: nothing if the provider never answered or refused the request,
        else input from the request and output from what was delivered."""
        response = flow.response
        if response is None and not flow.server_conn.timestamp_tcp_setup:
            return Usage(model=flight.model)  # never reached the provider
        if response is not None and response.status_code >= 400:
            return Usage(model=flight.model)  # providers do not bill refused requests
        if flight.tap is not None:
            output = estimate_tokens(flight.tap.text_chars)
        elif response is not None and response.raw_content:
            output = estimate_tokens(len(response.raw_content))
        else:
            output = 0
        return Usage(
            input_tokens=flight.input_tokens_estimate, output_tokens=output, model=flight.model
        )

    def _record(
        self, flow: http.HTTPFlow, flight: Flight, cost: int, estimated: bool, usage: Usage | None
    ) -> LevelUsage | None:
        """Write the request's cost to the ledger (or the grace ledger); never raises. Returns
        the binding level after the write, for the response headers."""
        key = flight.account.identity.key if flight.account else None
        u = usage or Usage()
        entry = UsageRecord(
            round(flight.started, 3),
            flight.provider.name,
            u.model or flight.model,
            key.key_id if key else None,
            key.user_id if key else None,
            flight.org_id,
            flight.mode,
            flow.response.status_code if flow.response else None,
            str(flow.error) if flow.error else None,
            cost,
            estimated,
            u.input_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.cache_write_1h_tokens,
            u.output_tokens,
            u.reasoning_tokens,
            flight.grace_who,
        )
        flow.metadata.setdefault("aigw", {}).update(
            {"cost_usd": to_usd(cost), "estimated": estimated}
        )
        if flight.mode == "grace" or flight.account is None:
            self._grace_charge(flight, cost, entry)
            return None
        levels = flight.account.levels
        try:
            assert self.store is not None
            counters = self.store.ledger.settle(flow.id, levels, flight.month, cost, entry)
        except Exception as exc:
            log.error("aigw: ledger write failed (%s); will retry: %s", exc, entry)
            self._unsettled.append((flow.id, levels, flight.month, cost, entry))
            return None
        return binding_level(flight.account.budgets, counters)

    # --- denials and failure modes --------------------------------------------------------

    def _deny(
        self,
        flow: http.HTTPFlow,
        provider: Provider,
        denial: Denial,
        level: LevelUsage | None = None,
    ) -> None:
        flow.response = provider.adapter.deny(denial)
        if level is not None:
            _usage_headers(flow.response, level, month_of(utc_now()))
        flow.metadata["aigw"] = {"decision": "denied", "status": denial.status,
                                 "error": denial.error_type}
        log.info("aigw: denied %s %s: %s", flow.request.host, denial.status, denial.error_type)

    def _unavailable(
        self,
        flow: http.HTTPFlow,
        provider: Provider,
        org: Org | None,
        reason: str,
        credential: str | None = None,
        user_id: str | None = None,
    ) -> None:
        """Quota data is unavailable: the org's failure mode decides (the default when the org
        itself is unknown). Fail-open caps each user (each key, when the user is unknown) at the
        daily fallback limit."""
        assert self.config is not None
        policy = self.config.policy
        mode = org.failure_mode if org is not None else policy.default_failure_mode
        log.warning("aigw: quota data unavailable (%s); %s", reason, mode)
        if mode != FAIL_OPEN or credential is None:
            retry = policy.fail_closed_retry_after_s
            return self._deny(
                flow,
                provider,
                Denial(
                    503,
                    "quota_unavailable",
                    "The gateway cannot check quotas right now; the request was not forwarded.",
                    headers=(("retry-after", str(retry)),),
                ),
            )
        limit = from_usd(
            org.fallback_daily_limit_usd if org is not None else policy.fallback_daily_limit_usd
        )
        now = utc_now()
        who = f"user:{user_id}" if user_id else f"key:{hash_key(credential)[:16]}"
        if self._grace_used(day_of(now), who) >= limit:
            return self._deny(
                flow,
                provider,
                Denial(
                    429,
                    "fallback_daily_limit_exceeded",
                    f"The gateway is in fail-open mode and the daily fallback limit of "
                    f"${to_usd(limit):.2f} is used up.",
                    headers=(("retry-after", str(seconds_to_day_end(now))),
                             ("x-should-retry", "false")),
                ),
            )
        secret = _provider_secret(provider, org) if looks_like_gateway_key(credential) else (
            credential
        )
        if secret is None:
            return self._deny(flow, provider, _no_credential(provider))
        provider.adapter.set_credential(flow.request, secret)
        body = _request_body(flow.request)
        self._flights[flow.id] = Flight(
            provider=provider,
            mode="grace",
            model=provider.adapter.model(flow.request, parse_json(body)),
            month=month_of(now),
            estimate_nusd=0,
            input_tokens_estimate=estimate_tokens(len(body)),
            org_id=org.org_id if org else None,
            grace_who=who,
        )
        flow.metadata["aigw"] = {"decision": "grace", "reason": reason}
        return None

    def _grace_used(self, day: str, who: str) -> int:
        try:
            assert self.store is not None
            used = self.store.ledger.grace_used(day, who)[0]
        except Exception:
            used = 0
        return max(used, self._grace_memory.get((day, who), 0))

    def _grace_charge(self, flight: Flight, cost: int, entry: UsageRecord) -> None:
        day = day_of(utc_now())
        who = flight.grace_who or "unknown"
        self._grace_memory[(day, who)] = self._grace_memory.get((day, who), 0) + cost
        try:
            assert self.store is not None
            self.store.ledger.grace_charge(day, who, cost, entry)
        except Exception:
            # The log line is the reconciliation record when the ledger itself is down.
            log.error("aigw: grace ledger unavailable; unrecorded grace request: %s", entry)

    # --- maintenance ------------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            try:
                if self.store is None and self.config is not None:
                    self._open_store()
                self._retry_unsettled()
                if self.store is not None and self.config is not None:
                    timeout_ms = self.config.policy.reservation_timeout_s * 1000
                    self.store.ledger.drop_held(int(time.time() * 1000) - timeout_ms)
                await asyncio.to_thread(self._release_stale)
            except Exception:
                log.exception("aigw: maintenance failed")

    async def _watch_peers(self) -> None:
        """Keep this gateway's registration alive; write held reservations to the ledger at
        once when another gateway shares it, and every second anyway, so `aigw usage` shows
        what is in flight."""
        ticks = 0
        while True:
            await asyncio.sleep(PEER_CHECK_S)
            ticks += 1
            ledger = self.store.ledger if self.store is not None else None
            if ledger is None:
                continue
            try:
                others = frozenset(ledger.gateways()) - {self._owner["host"]}
                if others - self._peers_acked:
                    # Someone joined: write what we hold, then tell them (caught_up).
                    ledger.publish()
                    ledger.heartbeat(shared=True)
                elif ticks % HEARTBEAT_EVERY == 0:
                    ledger.heartbeat()
                if ledger.held() and (ticks % PUBLISH_EVERY == 0 or others):
                    ledger.publish()
                self._peers_acked = others
            except Exception:
                log.exception("aigw: could not update the ledger registration or write held "
                              "reservations; retrying")

    def _is_live(self, gateway: str, entry: dict) -> bool:
        """Whether a registered gateway whose heartbeat is recent still runs. Its pid tells
        only in our own pid namespace on this host; elsewhere (another host, another
        container) the heartbeat alone decides."""
        if entry.get("host") != _HOSTNAME or entry.get("pidns") != _PIDNS:
            return True
        pid = entry.get("pid")
        if pid == os.getpid():  # ours: a gateway of this process, or a reused pid's
            return gateway in _GATEWAYS_HERE
        return _pid_alive(pid)

    def _retry_unsettled(self) -> None:
        pending, self._unsettled = self._unsettled, []
        for reservation_id, levels, month, cost, entry in pending:
            try:
                assert self.store is not None
                self.store.ledger.settle(reservation_id, levels, month, cost, entry)
            except Exception:
                self._unsettled.append((reservation_id, levels, month, cost, entry))

    def _release_stale(self) -> int:
        """Release reservations of gateways no longer registered (crashed, or stopped before
        their requests ended) and any older than the configured timeout."""
        if self.store is None or self.config is None:
            return 0
        timeout_ms = self.config.policy.reservation_timeout_s * 1000
        now_ms = int(time.time() * 1000)
        live = set(self.store.ledger.gateways())

        def is_stale(record: dict) -> bool:
            if now_ms - int(record.get("created_ms", 0)) > timeout_ms:
                return True
            return str(record.get("host", "")) not in live

        return self.store.ledger.release_stale(is_stale)


def _request_body(request: http.Request) -> bytes:
    """The request body, decoded if the client compressed it."""
    body = body_of(request)
    return request.raw_content or b"" if body is None else body


def _provider_secret(provider: Provider, org: Org | None) -> str | None:
    """The org's own credential for this provider, else the gateway host's."""
    if org is not None:
        ref = org.provider_keys.get(provider.name) or org.provider_keys.get(provider.kind)
        if ref:
            if ref.startswith("env:"):
                return os.environ.get(ref[4:]) or None
            return ref
    return provider.default_credential()


def _warn_of_missing_credentials(config: GatewayConfig) -> None:
    """Say at start which providers have no key on the gateway host: their requests get 502
    unless the org has its own (`provider_keys`)."""
    missing = [p for p in config.providers if p.api_key_env and p.default_credential() is None]
    if missing:
        log.warning(
            "aigw: no gateway-host credential for %s; their requests need the org's "
            "provider_keys or get 502 provider_credential_missing",
            ", ".join(f"{p.name} (${p.api_key_env} unset)" for p in missing),
        )


def _no_credential(provider: Provider) -> Denial:
    return Denial(
        502,
        "provider_credential_missing",
        f"The gateway has no credential for provider {provider.name!r}.",
        headers=(("x-should-retry", "false"),),
    )


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_PIDNS = _pid_namespace()
_HOSTNAME = socket.gethostname()


def _process_info() -> dict:
    """What another gateway needs to tell whether this process still runs."""
    return {"pid": os.getpid(), "host": _HOSTNAME, "pidns": _PIDNS}


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.lru_cache(maxsize=4096)
def _limit_text(nusd: int) -> bytes:
    """A limit as header text: the same few values again and again."""
    return usd_text(nusd).encode()


def _usage_headers(
    response: http.Response, level: LevelUsage | None, month: str, cost: int | None = None
) -> None:
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


addons = [Gateway()]
