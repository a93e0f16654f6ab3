"""Admission: one request in, one decision out, top to bottom in `Admitter.admit`:
route -> TLS -> credential -> key, user, org -> body -> model -> staleness -> budgets, decided and
reserved in one ledger transaction -> the org's credential. Each outcome is a value (`Allowed`,
`Denied`, `Unavailable`, `Passthrough`, `ReadBody`, or None: not an AI request); the hooks write
it into the flow. Nothing here logs or answers the client."""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import http

from addon import denials
from addon.config import Provider, normalize_host
from addon.metering import StreamTap, estimate_tokens, parse_json
from addon.policy import (
    Budget,
    binding_level,
    budgets_of,
    check_identity,
    decide_budgets,
    decide_rates,
    model_not_allowed,
    rate_headers,
    rotated_out,
    unauthorized,
)
from addon.providers import Denial, Usage
from addon.providers.base import header
from addon.routing import route
from addon.runtime import Runtime
from addon.streams import BodyTooLarge, decode_bounded
from store import StoreUnavailable
from store.db import Counter, Identity, Level
from store.hashing import looks_like_gateway_key
from store.ledger import RateAsk, rate_key
from store.lru import LRU
from store.money import month_span, to_usd
from store.records import Org

LARGE_BODY = 256 * 1024  # bodies above this are read off the event loop
INLINE_DECODE = 16 * 1024  # compressed bodies above this are decoded off the event loop
CACHE_SIZE = 200_000
READ_ONLY_METHODS = ("GET", "HEAD", "OPTIONS", "DELETE")
# A client's `max_tokens: 2**62` must be decided on its budget, not overflow the ledger's 64-bit
# counters into the failure mode: its cost is capped (pricing.MAX_COST_NUSD), and its tokens
# for a token limit's window here.
MAX_OUTPUT_TOKENS = 10**9


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
    limited: tuple[Budget, ...] = ()  # the levels with rate limits, and their window keys
    rate_keys: tuple[bytes, ...] = ()


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
    key_id: str | None = None  # a grace flight has no account: who it was for, for the records
    user_id: str | None = None
    grace_who: str | None = None
    grace_day: str | None = None  # the UTC day whose fallback limit admitted a grace flight
    injected_usage: bool = False  # the gateway asked for stream usage the client did not
    rate_headers: tuple[tuple[bytes, bytes], ...] = ()  # x-ratelimit-*, as of admission
    tap: StreamTap | None = None
    started: float = field(default_factory=time.time)


@dataclass(slots=True)
class Attempt:
    """What the decision of one request has learnt so far: what the failure mode needs when an
    unexpected fault interrupts it."""

    provider: Provider | None = None
    credential: str | None = None
    org: Org | None = None
    user_id: str | None = None
    reserved: bool = False
    key_id: str | None = None  # what the request log names a denial by
    model: str | None = None
    started: float = 0.0  # time.perf_counter() when the request hook began


# --- the outcomes ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allowed:
    """Forward, with `secret` as the provider credential; settle `flight` at the end."""

    flight: Flight
    secret: str
    metadata: dict


@dataclass(frozen=True, slots=True)
class Denied:
    provider: Provider
    denial: Denial
    counters: tuple[tuple[Budget, ...], list[Counter]] | None = None  # for the usage headers
    strip_body: bool = False  # a body too large to keep around (a dump would decode it)


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Quota data is unavailable: the failure mode decides (addon/failure.py)."""

    provider: Provider
    reason: str
    org: Org | None = None
    credential: str | None = None
    user_id: str | None = None
    store_fault: bool = False  # the store itself failed (counted in aigw_store_errors_total)
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class Passthrough:
    """An unknown credential forwarded as it is (`unknown_credentials: passthrough`)."""


@dataclass(frozen=True, slots=True)
class ReadBody:
    """The body must be read off the event loop first: `then(decoded, body)` decides."""

    then: Callable[[bytes | None, Any], "Outcome"]


Outcome = Allowed | Denied | Unavailable | Passthrough | ReadBody | None

# The requests in flight, by flow id. Module state, so it outlives a script reload (this module
# is imported, not reloaded): a new gateway instance settles what its predecessor admitted.
FLIGHTS: dict[str, Flight] = {}


class Admitter:
    """Decides requests on the runtime's configuration and store."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._accounts: LRU[str, Account] = LRU(CACHE_SIZE)
        self._budgets: LRU[tuple, Budget] = LRU(CACHE_SIZE)  # per level, limit, outside usage
        self._month: tuple[str, float, float] = ("", 0.0, 0.0)  # name, start, end

    def forget(self) -> None:
        """Drop what was derived from the records (the configuration changed)."""
        self._accounts.clear()
        self._budgets.clear()

    def provider_of(self, flow: http.HTTPFlow) -> Provider | None:
        config = self.runtime.config
        return None if config is None else route(config, names_of(flow)).provider

    def admit(self, flow: http.HTTPFlow, attempt: Attempt) -> Outcome:
        """The decision on one request (see the module docstring)."""
        config = self.runtime.config
        if config is None or self.runtime.not_ready:
            return None  # the hook answers: not ready
        request = flow.request
        where = route(config, names_of(flow))
        provider = attempt.provider = where.provider
        if provider is None:
            return None  # not an AI host: not ours to decide
        if where.misdirected:
            return Denied(provider, denials.misdirected(where.misdirected))
        if normalize_host(request.host) != where.host:
            request.host = where.host  # never to the address: to the provider host it names
        if request.scheme != "https" and not provider.plain_http:
            return Denied(provider, denials.https_required(provider.name))
        if header(request, b"upgrade") is not None:
            return Denied(provider, denials.upgrade_refused())
        if provider.adapter.is_unmetered(request):
            return Denied(provider, denials.not_metered())
        credential = attempt.credential = provider.adapter.credential(request)
        if credential is None:
            return Denied(provider, unauthorized("No API key provided."))
        if not credential.isascii():  # no key of ours, nor a provider's; hashing may fail on it
            return Denied(provider, unauthorized("Incorrect API key provided."))
        limit = config.policy.max_request_body_bytes
        if len(request.raw_content or b"") > limit:
            return Denied(provider, denials.too_large(limit), strip_body=True)
        account = self._authenticate(provider, credential, attempt)
        if not isinstance(account, Account):
            return account
        if needs_thread(request):
            return ReadBody(lambda decoded, body: self._admit(
                flow, provider, account, decoded, body, attempt))
        return self._admit(flow, provider, account, *read_body(request, limit), attempt)

    def _authenticate(self, provider: Provider, credential: str, attempt: Attempt
                      ) -> "Account | Outcome":
        """The key's Account, or the outcome when its records decide the request."""
        config, store = self.runtime.config, self.runtime.store
        assert config is not None
        if store is None:
            return Unavailable(provider, "store unavailable", credential=credential,
                               store_fault=True)
        key_hash = store.hash(credential)
        now = time.time()
        month = self._month_at(now)
        try:
            identity = store.records.resolve(key_hash, month)
        except StoreUnavailable as exc:
            return Unavailable(provider, str(exc), credential=credential, store_fault=True)
        # On every request, not only when the records change: the clock ends a grace period.
        key = identity.key
        if key is not None and key.expires_at is not None and now >= key.expires_at.timestamp():
            return Denied(provider, rotated_out(key.key_id))
        account = self._accounts.get(key_hash)
        if account is None or account.identity is not identity or account.month != month:
            # A key not seen since its records last changed: check them all.
            if identity.key is None and not looks_like_gateway_key(credential):
                if config.policy.unknown_credentials == "passthrough":
                    return Passthrough()
            denial = check_identity(identity, None)  # the model: in `_admit`, every request
            if denial is not None:
                return Denied(provider, denial)
            if identity.org is None:
                key = identity.key
                return Unavailable(provider, "organization record missing",
                                   credential=credential,
                                   user_id=key.user_id if key else None,
                                   key_id=key.key_id if key else None)
            account = self._account(key_hash, identity, month)
        attempt.org, attempt.user_id = identity.org, account.user_id
        attempt.key_id = identity.key.key_id if identity.key is not None else None
        return account

    def _admit(self, flow: http.HTTPFlow, provider: Provider, account: Account,
               decoded: bytes | None, body: Any, attempt: Attempt) -> Outcome:
        """Decide on a key that passed its checks: body size, model, staleness, budgets; then
        reserve, and name the credential to inject."""
        config, store = self.runtime.config, self.runtime.store
        assert config is not None and store is not None
        request, adapter = flow.request, provider.adapter
        org = account.identity.org
        assert org is not None
        if decoded is None:
            return Denied(provider, denials.too_large(config.policy.max_request_body_bytes),
                          strip_body=True)
        model = attempt.model = adapter.model(request, body)
        if account.allowed_models and model not in account.allowed_models:
            if model is not None:
                return Denied(provider, model_not_allowed(org.org_id, model))
            if request.method not in READ_ONLY_METHODS or decoded:
                return Denied(provider, denials.model_required(org.org_id))
        now = time.time()
        stale = self._staleness(now)
        if stale:
            return Unavailable(provider, stale, org, attempt.credential, account.user_id,
                               key_id=attempt.key_id)

        input_tokens = estimate_tokens(len(decoded))
        max_output = min(adapter.max_output_tokens(request, body) or 0, MAX_OUTPUT_TOKENS)
        estimate = config.pricing.price(model).cost_nusd(Usage(
            input_tokens=input_tokens,
            output_tokens=max_output or config.policy.default_max_output_tokens))
        tokens = input_tokens + (max_output or config.policy.default_max_output_tokens)
        try:
            denial, counters, limits = self._reserve(flow.id, account, estimate, tokens, now)
        except StoreUnavailable as exc:
            return Unavailable(provider, str(exc), org, attempt.credential, account.user_id,
                               store_fault=True, key_id=attempt.key_id)
        if denial is not None:
            return Denied(provider, denial, (account.budgets, counters))
        attempt.reserved = True

        key = account.identity.key
        assert key is not None
        if key.passthrough:
            secret = attempt.credential
        else:
            try:
                secret = account.secrets[provider.name]
            except KeyError:
                secret = account.secrets[provider.name] = provider_secret(provider, org)
        if secret is None:
            store.ledger.release(flow.id)
            attempt.reserved = False
            return Denied(provider, denials.no_credential(provider.name))
        injected = adapter.request_stream_usage(request, body)
        if injected:
            request.headers["accept-encoding"] = "identity"  # the gateway rewrites this stream
        flight = Flight(provider=provider, mode="metered", model=model, month=account.month,
                        estimate_nusd=estimate, input_tokens_estimate=input_tokens,
                        account=account, counters=counters, org_id=org.org_id,
                        injected_usage=injected, rate_headers=limits)
        return Allowed(flight, secret, {
            "decision": "allowed", "key_id": key.key_id, "user_id": key.user_id,
            "org_id": org.org_id, "model": model, "reserved_usd": to_usd(estimate)})

    def _reserve(self, reservation_id: str, account: Account, estimate: int, tokens: int,
                 now: float) -> tuple[Denial | None, list[Counter], tuple]:
        """Decide on the ledger's counters and rate windows and reserve the request's maximum
        cost (and count it in the windows), in one ledger write transaction: atomic across
        every process sharing the store. Returns the x-ratelimit-* headers too."""
        store, config = self.runtime.store, self.runtime.config
        assert store is not None and config is not None
        seen: list[list[Counter]] = []

        def refuse(counters: list[Counter]) -> Denial | None:
            seen.append(counters)
            return decide_budgets(account.budgets, counters, estimate, now, account.month)

        rates = None
        windows: list = []
        if account.limited:
            def decide(found: list) -> Denial | None:
                windows[:] = found  # the ledger adds this request to them once it is admitted
                return decide_rates(account.limited, found, now)

            rates = RateAsk(account.rate_keys, config.policy.rate_window_s, now, tokens, decide)
        denial = store.ledger.reserve(reservation_id, account.levels, account.month, estimate,
                                      refuse, owner=self.runtime.owner, rates=rates)
        limits = rate_headers(account.limited, windows, now) if windows and denial is None \
            else ()
        return denial, seen[-1], limits

    def _staleness(self, now: float) -> str | None:
        """Why the replica is too old to decide on, if it is (policy.max_staleness_s)."""
        config, store = self.runtime.config, self.runtime.store
        assert config is not None and store is not None
        limit = config.policy.max_staleness_s
        if limit is None:
            return None
        last = store.records.last_sync()
        if last is None:
            return "the store has never completed a sync pass"
        age = now - float(last.get("finished_at", 0))
        if age > limit:
            return f"the last complete sync pass is {age:.0f}s old (max_staleness_s {limit})"
        return None

    def _account(self, key_hash: str, identity: Identity, month: str) -> Account:
        """What the request path keeps of a key whose records passed `check_identity`."""
        assert identity.key is not None and identity.org is not None
        # The keys of one user or org share its budget: fewer objects for the collector to walk.
        budgets = []
        for b in budgets_of(identity, month):
            shared_key = (b.level, b.id, b.limit_nusd, b.external_nusd, b.external_requests,
                          b.rpm_limit, b.tpm_limit, b.max_parallel)
            shared = self._budgets.get(shared_key)
            if shared is None:
                self._budgets.put(shared_key, b)
            budgets.append(shared or b)
        account = Account(identity, month, tuple(budgets),
                          tuple(b.ledger_level for b in budgets), identity.key.user_id,
                          frozenset(identity.org.allowed_models or ()))
        account.limited = tuple(b for b in budgets if b.rate_limited)
        account.rate_keys = tuple(rate_key(b.ledger_level) for b in account.limited)
        self._accounts.put(key_hash, account)
        return account

    def _month_at(self, now: float) -> str:
        """The UTC month of `now`, recomputed only when a month ends."""
        name, start, end = self._month
        if not start <= now < end:
            name, start, end = self._month = month_span(now)
        return name


def denial_level(denied: Denied):
    """The binding level of a budget denial, for the x-gateway-* headers."""
    return None if denied.counters is None else binding_level(*denied.counters)


# --- pure helpers ---------------------------------------------------------------------------


def names_of(flow: http.HTTPFlow) -> list[str]:
    """Every name the request gives for where it goes: the URL's host, the Host header, the TLS
    SNI and, inside a TLS tunnel, the CONNECT target (or a transparent proxy's destination)."""
    request = flow.request
    names = [request.host, request.host_header or "", flow.client_conn.sni or ""]
    address = flow.server_conn.address
    if flow.client_conn.tls and address:
        names.append(str(address[0]))
    return names


def needs_thread(request: http.Request) -> bool:
    """Whether reading the body would hold the event loop too long: large, or compressed."""
    size = len(request.raw_content or b"")
    return size > LARGE_BODY or size > INLINE_DECODE and (
        header(request, b"content-encoding") is not None)


def read_body(request: http.Request, limit: int) -> tuple[bytes | None, Any]:
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


def provider_secret(provider: Provider, org: Org | None) -> str | None:
    """The org's own credential for this provider, else the gateway host's."""
    if org is not None:
        ref = org.provider_keys.get(provider.name) or org.provider_keys.get(provider.kind)
        if ref:
            if ref.startswith("env:"):
                return os.environ.get(ref[4:]) or None
            return ref
    return provider.default_credential()

