"""aigw's mitmproxy hooks (loaded by the entry script addon/gateway.py).

One request, top to bottom (`_request`): readiness -> the provider its names agree on -> TLS ->
the credential -> the key, user and org -> the body, decoded within bounds -> the model -> the
budgets, decided and reserved in one ledger transaction -> the org's credential, injected by the
last addon of the chain just before the request leaves. Then (`_settle`): meter the provider's
usage -> settle the reservation to the real cost. Whatever cannot be decided gets an answer: 503
while the gateway is not ready, the org's failure mode when quota data is unavailable.
"""

import asyncio
import functools
import logging
import os
import secrets
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from addon.config import SHIPPED_CONFIG, GatewayConfig, Provider, load_config, normalize_host
from addon.metering import StreamTap, estimate_tokens, parse_json, usage_from_body
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
from addon.providers.base import Adapter, header, redact_credentials, remove_credentials
from addon.providers.openai import OpenAIAdapter
from addon.routing import route
from addon.streams import BodyTooLarge, decode_bounded
from store import Store, StoreUnavailable
from store.db import Counter, Flusher, Identity, Level, StoreMissing, UsageRecord
from store.hashing import looks_like_gateway_key
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
INLINE_DECODE = 16 * 1024  # compressed bodies above this are decoded off the event loop
TICK_S = 5.0  # heartbeat, store re-open and configuration re-check period
MAINTENANCE_EVERY = 6  # ticks between maintenance passes (30 s)
NOT_READY_LOG_EVERY = 6  # ticks between repeats of the not-ready error (30 s)
NOT_READY_RETRY_AFTER_S = 10
READ_ONLY_METHODS = ("GET", "HEAD", "OPTIONS", "DELETE")
UNVERIFIED = "unverified"  # the grace bucket of keys whose user the gateway could not look up
STREAMING_REFUSED = (
    "aigw: mitmproxy's stream_large_bodies sends a request body upstream before the gateway "
    "has decided on it; unset it (the gateway streams provider responses itself)")
_GATEWAYS_HERE: set[str] = set()  # the gateways (instances) running in this process
# Kept across script reloads (this module is imported, not reloaded): the allow_hosts the gateway
# derived, so a new instance still recognises them as its own, and the last good configuration,
# whose providers give a not-ready gateway's answers their native shape.
_DERIVED_ALLOW_HOSTS: list[list[str]] = []
_LAST_GOOD: list[GatewayConfig] = []
# The requests in flight, also kept across reloads: a new instance settles the flows its
# predecessor admitted (their responses arrive after the reload).
_FLIGHTS: dict[str, "Flight"] = {}


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


class CredentialInjector:
    """The last addon of the chain: puts the provider credential into an admitted request just
    before mitmproxy sends it, so no addon before it (mitmweb's view, a saved stream, a dump)
    ever sees the credential. The gateway redacts it again once the request has left."""

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Adapter, str]] = {}
        self.sent: dict[str, http.HTTPFlow] = {}  # holding a credential until redacted

    def request(self, flow: http.HTTPFlow) -> None:
        entry = self.pending.pop(flow.id, None)
        if entry is not None and flow.response is None and flow.live:
            entry[0].set_credential(flow.request, entry[1])
            self.sent[flow.id] = flow

    def redact(self, flow: http.HTTPFlow) -> None:
        self.pending.pop(flow.id, None)
        self.sent.pop(flow.id, None)
        redact_credentials(flow.request)

    def redact_all(self) -> None:
        """Flows still in flight (at shutdown, a saved-flows file gets them next)."""
        for flow in list(self.sent.values()):
            self.redact(flow)


class Gateway:
    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.store: Store | None = None
        self.injector = CredentialInjector()
        self._not_ready: str | None = "not configured yet"  # why requests cannot be decided
        self._config_seen: tuple[str, float] | None = None  # a bad file's path and mtime
        self._store_warned_at = -1e9
        self._flusher: Flusher | None = None
        self._flights = _FLIGHTS
        self._accounts: dict[str, Account] = {}
        self._budgets: dict[tuple, Budget] = {}  # one per level, limit and outside usage
        self._unsettled: list[tuple] = []  # ledger writes that failed, retried by maintenance
        self._grace_memory: dict[tuple[str, str], int] = {}  # when even the ledger is down
        self._ticker: asyncio.Task | None = None
        self._month: tuple[str, float, float] = ("", 0.0, 0.0)  # name, start, end (UNIX times)
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
        if getattr(ctx.options, "stream_large_bodies", None):
            self._not_ready = STREAMING_REFUSED
            raise exceptions.OptionsError(STREAMING_REFUSED)
        if "aigw_config" in updated or "aigw_store" in updated or (
                self._not_ready == STREAMING_REFUSED):
            error = self._load()
            if error is not None:
                raise exceptions.OptionsError(error)
        self._derive_allow_hosts()

    def _load(self) -> str | None:
        """(Re)read mitm.yaml and open the store; the error that leaves the gateway not ready."""
        path = ctx.options.aigw_config
        self._close_store()
        self.config = None
        self._accounts.clear()
        self._budgets.clear()
        try:
            config = load_config(path, ctx.options.aigw_store or None)
        except Exception as exc:  # ConfigError names file, key and reason; anything else too
            message = str(exc) if isinstance(exc, ConfigError) else (
                f"{path}: cannot be read: {_fault_text(exc)}")
            self._config_seen = (path, _mtime(path))
            self._not_ready = f"invalid configuration: {message}"
            return message
        self._config_seen = None
        self.config = config
        _LAST_GOOD[:] = [config]
        self._not_ready = None
        missing = self._open_store()
        if missing is not None:
            self._not_ready = missing
            return missing
        _warn_of_missing_credentials(config)
        return None

    def _derive_allow_hosts(self) -> None:
        """Intercept only the providers' hosts (everything else is tunnelled untouched), unless
        the operator set allow_hosts or ignore_hosts."""
        if self.config is None:
            return
        ours = _DERIVED_ALLOW_HOSTS[0] if _DERIVED_ALLOW_HOSTS else None
        if (not ctx.options.allow_hosts and not ctx.options.ignore_hosts
                or ctx.options.allow_hosts == ours):
            derived = self.config.allow_hosts()
            if ctx.options.allow_hosts != derived:
                _DERIVED_ALLOW_HOSTS[:] = [derived]
                ctx.options.update(allow_hosts=derived)

    def _open_store(self) -> str | None:
        """Open the store. A missing one is an error (returned: the gateway is not ready); one
        that cannot be opened now leaves `store` None: failure modes apply until a retry works."""
        assert self.config is not None
        settings = self.config.store
        try:
            self.store = Store(settings.path, hash_algorithm=settings.hash_algorithm,
                               create=False)
        except StoreMissing as exc:
            return str(exc)
        except StoreUnavailable as exc:
            self.store = None
            # A warning, not an error: mitmdump ends on an error logged at startup, and the
            # gateway must start and apply the failure modes until the store opens.
            if time.monotonic() - self._store_warned_at >= TICK_S * NOT_READY_LOG_EVERY:
                self._store_warned_at = time.monotonic()
                log.warning("aigw: store unavailable (%s); applying failure modes, retrying "
                            "every %.0fs", exc, TICK_S)
            return None
        try:
            self.store.ledger.join(self._owner["host"], _process_info(), self._is_live)
        except StoreUnavailable as exc:
            log.warning("aigw: could not register on the ledger (%s); applying failure modes",
                        exc)
            self.store.close()
            self.store = None
            return None
        _GATEWAYS_HERE.add(self._owner["host"])
        self._flusher = Flusher(self.store, self.config.policy.flush_interval_s)
        self._flusher.start()
        released = self._release_stale()
        log.info(
            "aigw ready: store %s, %d providers%s",
            settings.path,
            len(self.config.providers),
            f", released {released} stale reservations" if released else "",
        )
        return None

    def _close_store(self) -> None:
        if self.store is not None:
            try:
                self.store.ledger.leave()
            except Exception as exc:
                _log_fault("could not leave the ledger cleanly", exc)
            _GATEWAYS_HERE.discard(self._owner["host"])
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def running(self) -> None:
        addons = ctx.master.addons
        previous = addons.get("credentialinjector")  # an earlier instance's, if it lingered
        if previous is not self.injector:
            if previous is not None:
                addons.remove(previous)
            addons.add(self.injector)  # after every other addon: see its docstring
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def done(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        try:
            if ctx.master.addons.get("credentialinjector") is self.injector:
                ctx.master.addons.remove(self.injector)
        except Exception as exc:  # the master may be gone already
            _log_fault("could not remove the credential injector", exc)
        self._not_ready = "the gateway is shutting down"
        self.injector.redact_all()
        self._retry_unsettled()
        self._close_store()

    # --- the request path --------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A provider's request body is never streamed upstream: mitmproxy would send it before
        the `request` hook, undecided (the gateway also refuses `stream_large_bodies`)."""
        if flow.request.stream and self.config is not None:
            try:
                if route(self.config, _names_of(flow)).provider is not None:
                    flow.request.stream = False
            except Exception as exc:  # the request hook decides, or refuses, on its own
                _log_fault("could not check a request's headers", exc)

    def request(self, flow: http.HTTPFlow):
        """Synchronous for ordinary bodies; a large or compressed body is read off the event
        loop (mitmproxy awaits the coroutine returned then). Never lets an exception pass:
        mitmproxy would log it and forward the flow undecided."""
        if flow.response or flow.error or not flow.live:
            return None
        known: dict = {}  # what the decision learnt before failing, for the failure mode
        try:
            later = self._request(flow, known)
        except Exception as exc:
            return self._failed(flow, exc, known)
        if later is None:
            return None
        return self._guarded(flow, later, known)

    async def _guarded(self, flow: http.HTTPFlow, later, known: dict) -> None:
        try:
            await later
        except Exception as exc:
            again = self._failed(flow, exc, known)
            if again is not None:
                await again

    def _request(self, flow: http.HTTPFlow, known: dict):
        config = self.config
        if config is None or self._not_ready:
            return self._deny(flow, _shape_provider(flow), _not_ready_denial())
        request = flow.request
        where = route(config, _names_of(flow))
        provider = known["provider"] = where.provider
        if provider is None:
            return None  # not an AI host: not ours to decide
        if where.misdirected:
            return self._deny(flow, provider, _misdirected(where.misdirected))
        if normalize_host(request.host) != where.host:
            request.host = where.host  # never to the address: to the provider host it names
        if request.scheme != "https" and not provider.plain_http:
            return self._deny(flow, provider, _https_required(provider))
        if header(request, b"upgrade") is not None:
            return self._deny(flow, provider, _upgrade_refused())
        if provider.adapter.is_unmetered(request):
            return self._deny(flow, provider, _unmetered_refused())
        credential = known["credential"] = provider.adapter.credential(request)
        if credential is None:
            return self._deny(flow, provider, unauthorized("No API key provided."))
        if not credential.isascii():  # no key of ours, nor a provider's; hashing may fail on it
            return self._deny(flow, provider, unauthorized("Incorrect API key provided."))
        limit = config.policy.max_request_body_bytes
        raw = request.raw_content or b""
        if len(raw) > limit:
            return self._deny(flow, provider, _too_large(limit), strip_body=True)
        account = self._authenticate(flow, provider, credential, known)
        if not isinstance(account, Account):
            return account  # decided (denied, passthrough), or a failure mode still reading
        if _needs_thread(request):
            return self._admit_later(flow, provider, account, known)
        decoded, body = _read_body(request, limit)
        return self._admit(flow, provider, account, decoded, body, known)

    async def _admit_later(self, flow: http.HTTPFlow, provider: Provider, account: "Account",
                           known: dict) -> None:
        assert self.config is not None
        limit = self.config.policy.max_request_body_bytes
        decoded, body = await asyncio.to_thread(_read_body, flow.request, limit)
        if flow.live and flow.response is None and flow.error is None:
            later = self._admit(flow, provider, account, decoded, body, known)
            if later is not None:  # a failure mode that reads the body again
                await later

    def _authenticate(self, flow: http.HTTPFlow, provider: Provider, credential: str,
                      known: dict):
        """The key's Account; anything else once the request is decided (denied, passed
        through) or taken by a failure mode (which may return a coroutine still reading)."""
        assert self.config is not None
        if self.store is None:
            return self._unavailable(flow, provider, None, "store unavailable", credential)
        key_hash = self.store.hash(credential)
        month = self._month_at(time.time())
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
            denial = check_identity(identity, None)  # the model: in `_admit`, every request
            if denial is not None:
                return self._deny(flow, provider, denial)
            if identity.org is None:
                user_id = identity.key.user_id if identity.key else None
                return self._unavailable(flow, provider, None, "organization record missing",
                                         credential, user_id)
            account = self._account(key_hash, identity, month)
        known["org"] = identity.org
        known["user_id"] = account.user_id
        return account

    def _admit(self, flow: http.HTTPFlow, provider: Provider, account: Account,
               decoded: bytes | None, body, known: dict) -> None:
        """Decide on a key that passed its checks: body size, model, staleness, budgets; then
        reserve and hand the credential to the injector."""
        assert self.config is not None and self.store is not None
        request, adapter = flow.request, provider.adapter
        org = account.identity.org
        assert org is not None
        if decoded is None:
            limit = self.config.policy.max_request_body_bytes
            return self._deny(flow, provider, _too_large(limit), strip_body=True)
        model = adapter.model(request, body)
        if account.allowed_models and model not in account.allowed_models:
            if model is not None:
                return self._deny(flow, provider, model_not_allowed(org.org_id, model))
            if request.method not in READ_ONLY_METHODS or decoded:
                return self._deny(flow, provider, _model_required(org.org_id))
        now = time.time()
        stale = self._staleness(now)
        if stale:
            return self._unavailable(flow, provider, org, stale, known["credential"],
                                     account.user_id)

        input_tokens = estimate_tokens(len(decoded))
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
            return self._unavailable(flow, provider, org, str(exc), known["credential"],
                                     account.user_id)
        if denial is not None:
            return self._deny(flow, provider, denial, binding_level(account.budgets, counters))
        known["reserved"] = True

        key = account.identity.key
        assert key is not None
        if key.passthrough:
            secret = known["credential"]
        else:
            try:
                secret = account.secrets[provider.name]
            except KeyError:
                secret = account.secrets[provider.name] = _provider_secret(provider, org)
        if secret is None:
            self.store.ledger.release(flow.id)
            return self._deny(flow, provider, _no_credential(provider))
        injected = adapter.request_stream_usage(request, body)
        if injected:
            request.headers["accept-encoding"] = "identity"  # the gateway rewrites this stream
        self._send_with(flow, adapter, secret)
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

    def _send_with(self, flow: http.HTTPFlow, adapter: Adapter, secret: str) -> None:
        """Strip the client's credentials now; the injector adds `secret` as the request
        leaves."""
        remove_credentials(flow.request)
        self.injector.pending[flow.id] = (adapter, secret)

    def _reserve(
        self, reservation_id: str, account: Account, estimate: int, now: float
    ) -> tuple[Denial | None, list[Counter]]:
        """Decide on the ledger's counters and reserve the request's maximum cost, in one
        ledger write transaction: atomic across every process sharing the store."""
        assert self.store is not None
        seen: list[list[Counter]] = []

        def refuse(counters: list[Counter]) -> Denial | None:
            seen.append(counters)
            return decide_budgets(account.budgets, counters, estimate, now, account.month)

        denial = self.store.ledger.reserve(
            reservation_id, account.levels, account.month, estimate, refuse, owner=self._owner
        )
        return denial, seen[-1]

    def _staleness(self, now: float) -> str | None:
        """Why the replica is too old to decide on, if it is (policy.max_staleness_s)."""
        assert self.store is not None and self.config is not None
        limit = self.config.policy.max_staleness_s
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

    # --- responses ----------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if "aigw" in flow.metadata:
            self.injector.redact(flow)  # sent: nothing after this needs the credential
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
        except Exception as exc:
            _log_fault("could not tap the stream; it will be charged an estimate", exc)

    def response(self, flow: http.HTTPFlow):
        if "aigw" in flow.metadata:
            self.injector.redact(flow)
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
        except Exception as exc:
            _log_fault("reading usage failed; charging an estimate", exc)
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
        except Exception as exc:
            _log_fault("metering failed; charging the reserved estimate", exc)
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
            log.error("aigw: ledger write failed (%s); will retry: %s", _fault_text(exc), entry)
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
        *,
        strip_body: bool = False,
    ) -> None:
        """Answer in place of the provider; the refused flow keeps no client credential."""
        self.injector.pending.pop(flow.id, None)
        redact_credentials(flow.request)
        if strip_body:  # a body too large to keep around (a dump would decode it)
            flow.request.headers.pop("content-encoding", None)
            flow.request.content = b""
        flow.response = provider.adapter.deny(denial)
        if level is not None:
            _usage_headers(flow.response, level, month_of(utc_now()))
        flow.metadata["aigw"] = {"decision": "denied", "status": denial.status,
                                 "error": denial.error_type}
        log.info("aigw: denied %s %s: %s", flow.request.host, denial.status, denial.error_type)

    def _failed(self, flow: http.HTTPFlow, exc: Exception, known: dict):
        """An unexpected fault while deciding: the failure mode, never an undecided forward."""
        _log_fault("request decision failed", exc)
        self._flights.pop(flow.id, None)
        self.injector.pending.pop(flow.id, None)
        if known.get("reserved") and self.store is not None:
            try:
                self.store.ledger.release(flow.id)
            except Exception as release_exc:
                _log_fault("could not release the reservation of a failed request", release_exc)
        flow.response = None
        provider = known.get("provider") or _shape_provider(flow)
        try:
            later = self._unavailable(flow, provider, known.get("org"),
                                      f"internal error: {type(exc).__name__}",
                                      known.get("credential"), known.get("user_id"))
        except Exception as again:  # even the failure mode failed: refuse
            later = None
            self._refuse_after(flow, provider, again)
        if later is not None:
            return self._settled_failure(flow, provider, later)
        return None

    async def _settled_failure(self, flow: http.HTTPFlow, provider: Provider, later) -> None:
        try:
            await later
        except Exception as again:
            self._refuse_after(flow, provider, again)

    def _refuse_after(self, flow: http.HTTPFlow, provider: Provider, exc: Exception) -> None:
        _log_fault("the failure mode failed too; refusing", exc)
        self.injector.pending.pop(flow.id, None)
        self._flights.pop(flow.id, None)
        flow.response = None
        self._deny(flow, provider, _not_ready_denial())

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
        policy = self.config.policy if self.config is not None else None
        if policy is None:
            return self._deny(flow, provider, _not_ready_denial())
        mode = org.failure_mode if org is not None else policy.default_failure_mode
        log.warning("aigw: quota data unavailable (%s); %s", reason, mode)
        if mode != FAIL_OPEN or credential is None:
            retry = policy.fail_closed_retry_after_s
            return self._deny(flow, provider, _unavailable_denial(retry))
        limit = from_usd(
            org.fallback_daily_limit_usd if org is not None else policy.fallback_daily_limit_usd
        )
        now = utc_now()
        # Keys the gateway could not check (their user unknown) share one cap: inventing keys
        # must not multiply the fallback limit.
        who = f"user:{user_id}" if user_id else UNVERIFIED
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
        grace = functools.partial(self._grace, flow, provider, org, reason, secret, who, now)
        limit_bytes = policy.max_request_body_bytes
        if _needs_thread(flow.request):
            return self._grace_later(flow, grace, limit_bytes)
        return grace(*_read_body(flow.request, limit_bytes))

    async def _grace_later(self, flow: http.HTTPFlow, grace, limit: int) -> None:
        decoded, body = await asyncio.to_thread(_read_body, flow.request, limit)
        if flow.live and flow.response is None and flow.error is None:
            grace(decoded, body)

    def _grace(self, flow: http.HTTPFlow, provider: Provider, org: Org | None, reason: str,
               secret: str, who: str, now, decoded: bytes | None, body) -> None:
        """Forward in fail-open mode: charged to the grace ledger when it settles."""
        assert self.config is not None
        if decoded is None:
            limit = self.config.policy.max_request_body_bytes
            return self._deny(flow, provider, _too_large(limit), strip_body=True)
        self._send_with(flow, provider.adapter, secret)
        self._flights[flow.id] = Flight(
            provider=provider,
            mode="grace",
            model=provider.adapter.model(flow.request, body),
            month=month_of(now),
            estimate_nusd=0,
            input_tokens_estimate=estimate_tokens(len(decoded)),
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

    # --- background: heartbeat, retries, maintenance ------------------------------------------

    async def _tick(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(TICK_S)
            ticks += 1
            try:
                self._tick_once(ticks)
                if ticks % MAINTENANCE_EVERY == 0:
                    self._maintain()
            except Exception as exc:
                _log_fault("background maintenance failed; retrying", exc)

    def _tick_once(self, ticks: int) -> None:
        if self._config_seen is not None:
            path, mtime = self._config_seen
            if _mtime(path) != mtime:  # the bad file changed: try it again
                if self._load() is None:
                    self._derive_allow_hosts()
        elif self.config is not None and self.store is None:
            self._not_ready = self._open_store()  # missing, or unavailable until now
        if self._not_ready:
            if ticks % NOT_READY_LOG_EVERY == 1:
                log.error("aigw: not ready, answering 503 to every request: %s", self._not_ready)
        elif self.store is not None:
            self.store.ledger.heartbeat()

    def _maintain(self) -> None:
        self._retry_unsettled()
        self._release_stale()

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


# --- pure helpers -------------------------------------------------------------------------------


def _names_of(flow: http.HTTPFlow) -> list[str]:
    """Every name the request gives for where it goes: the URL's host, the Host header, the TLS
    SNI and, inside a TLS tunnel, the CONNECT target (or a transparent proxy's destination)."""
    request = flow.request
    names = [request.host, request.host_header or "", flow.client_conn.sni or ""]
    address = flow.server_conn.address
    if flow.client_conn.tls and address:
        names.append(str(address[0]))
    return names


def _needs_thread(request: http.Request) -> bool:
    """Whether reading the body would hold the event loop too long: large, or compressed."""
    size = len(request.raw_content or b"")
    return size > LARGE_BODY or size > INLINE_DECODE and (
        header(request, b"content-encoding") is not None)


def _read_body(request: http.Request, limit: int) -> tuple[bytes | None, object]:
    """The request body decoded within `limit` bytes and its JSON value: (None, None) when it
    is larger. A body that cannot be decoded is judged by the provider: its raw bytes."""
    raw = request.raw_content or b""
    encoding = header(request, b"content-encoding")
    if encoding is None:
        decoded = raw
    else:
        try:
            decoded = decode_bounded(raw, encoding, limit)
        except BodyTooLarge:
            return None, None
        except ValueError:
            decoded = raw
    if len(decoded) > limit:
        return None, None
    return decoded, parse_json(decoded)


def _mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return -1.0


def _shape_provider(flow: http.HTTPFlow) -> Provider:
    """A provider to answer in the native shape of, when the gateway cannot route: the last good
    configuration's (or the shipped one's) provider of the host, else OpenAI's shape."""
    host = normalize_host(flow.request.host)
    for config in _LAST_GOOD or _shipped():
        found = config.provider_for(host)
        if found is not None:
            return found
    return _FALLBACK_PROVIDER


@functools.lru_cache(maxsize=1)
def _shipped_config() -> GatewayConfig | None:
    try:
        return load_config(SHIPPED_CONFIG)
    except ConfigError:
        return None


def _shipped() -> list[GatewayConfig]:
    shipped = _shipped_config()
    return [shipped] if shipped is not None else []


_FALLBACK_PROVIDER = Provider("unknown", "openai", OpenAIAdapter(), (), None)


def _fault_text(exc: BaseException) -> str:
    """An exception for a log line without its message (a message may quote the string it
    failed on, a credential among them): its type and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}"


def _log_fault(what: str, exc: BaseException) -> None:
    log.error("aigw: %s: %s", what, _fault_text(exc))


def _not_ready_denial() -> Denial:
    return Denial(
        503,
        "quota_unavailable",
        "The gateway is not ready (its configuration or store is unavailable); the request was "
        "not forwarded.",
        headers=(("retry-after", str(NOT_READY_RETRY_AFTER_S)),),
    )


def _unavailable_denial(retry_after_s: int) -> Denial:
    return Denial(
        503,
        "quota_unavailable",
        "The gateway cannot check quotas right now; the request was not forwarded.",
        headers=(("retry-after", str(retry_after_s)),),
    )


def _misdirected(names: str) -> Denial:
    return Denial(
        421,
        "misdirected_request",
        f"The request names different hosts ({names}) in its URL, Host header, TLS SNI or "
        f"CONNECT target; the gateway forwards a request to a provider only when they agree.",
        headers=(("x-should-retry", "false"),),
    )


def _https_required(provider: Provider) -> Denial:
    return Denial(
        403,
        "https_required",
        f"Requests to {provider.name} must use https: the gateway sends no credential over "
        f"plain HTTP.",
        headers=(("x-should-retry", "false"),),
    )


def _too_large(limit: int) -> Denial:
    return Denial(
        413,
        "request_too_large",
        f"The request body is larger than the gateway's limit of {limit} bytes (decoded).",
        headers=(("x-should-retry", "false"),),
    )


def _unmetered_refused() -> Denial:
    return Denial(
        403,
        "endpoint_not_metered",
        "The gateway cannot meter batch or fine-tuning jobs (they are billed after the "
        "request), so it does not forward them.",
        headers=(("x-should-retry", "false"),),
    )


def _upgrade_refused() -> Denial:
    return Denial(
        403,
        "upgrade_not_supported",
        "The gateway does not meter WebSocket or other upgraded sessions (such as the Realtime "
        "API), so it does not forward them.",
        headers=(("x-should-retry", "false"),),
    )


def _model_required(org_id: str) -> Denial:
    return Denial(
        400,
        "invalid_model",
        f"Organization {org_id} allows only some models: the request must name one, as a "
        f"string.",
        headers=(("x-should-retry", "false"),),
    )


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
