"""aigw, an AI egress gateway, as a mitmproxy addon: `mitmdump -s addon/gateway.py`.

Hooks only: each reads the flow, asks a module of the `addon` package, and writes the answer.
The decisions live in addon/admission.py (and addon/failure.py, addon/settlement.py), which
mitmproxy imports rather than reloads: updating them does not trigger a script reload.

A request, top to bottom: `request` -> `Admitter.admit` (route, TLS, credential, key, body,
model, budgets and reservation) -> `_answer` (deny, or forward: the credential is injected by
`CredentialInjector`, the last addon of the chain) -> `responseheaders` (redact the credential,
tap a stream) -> `response` / `error` (meter and settle). Each decided request is told to
`Telemetry` (addon/telemetry.py): its log line, its metrics.
"""

import asyncio
import logging
import time

from mitmproxy import ctx, exceptions, http

from addon import denials
from addon.admission import (
    FLIGHTS,
    Admitter,
    Allowed,
    Attempt,
    Denied,
    Flight,
    Outcome,
    Passthrough,
    ReadBody,
    Unavailable,
    denial_level,
    read_body,
)
from addon.failure import FailureMode
from addon.injector import CredentialInjector
from addon.maintenance import Maintenance
from addon.providers.base import redact_credentials, remove_credentials
from addon.runtime import (
    STREAMING_REFUSED,
    Runtime,
    log_fault,
    shape_provider,
    unsafe_options,
)
from addon.settlement import Settler, usage_headers
from addon.telemetry import TELEMETRY_OPTIONS, Telemetry
from store.money import month_of, utc_now

log = logging.getLogger("aigw")


class Gateway:
    def __init__(self) -> None:
        self.runtime = Runtime()
        self.admitter = Admitter(self.runtime)
        self.failure = FailureMode(self.runtime)
        self.settler = Settler(self.runtime, self.failure)
        self.maintenance = Maintenance(self.runtime, self.settler, self._reload)
        self.injector = CredentialInjector(self.requestheaders)
        self.telemetry = Telemetry(self.runtime, self.settler)
        self.settler.observer = self.telemetry.settled
        self.flights: dict[str, Flight] = FLIGHTS  # shared with the instances after a reload
        self._unsafe: str | None = None  # why mitmproxy's options were refused, if they were
        # The (aigw_config, aigw_store) last loaded, and the last refused: see `configure`.
        self._loaded: tuple[str, str] | None = None
        self._refused: tuple[str, str] | None = None

    @property
    def store(self):
        return self.runtime.store

    @store.setter
    def store(self, store) -> None:
        self.runtime.store = store

    # --- lifecycle --------------------------------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "aigw_config", str, "./mitm.yaml", "Path to aigw's configuration (mitm.yaml).")
        loader.add_option(
            "aigw_store", str, "", "LMDB data directory; overrides store.path of mitm.yaml.")
        Telemetry.load(loader)

    def configure(self, updated: set[str]) -> None:
        if getattr(ctx.options, "stream_large_bodies", None):
            self.runtime.not_ready = STREAMING_REFUSED
            raise exceptions.OptionsError(STREAMING_REFUSED)
        refused = self.runtime.not_ready is not None and \
            self.runtime.not_ready in (STREAMING_REFUSED, self._unsafe)
        if {"aigw_config", "aigw_store"} & updated or refused:
            if self._loaded is None and self._refused not in (None, self._given()):
                # mitmproxy rolls a refused first configuration back to the options' defaults
                # (aigw proxy's workers set theirs as one update): nobody asked for those, and
                # loading them would hide the refusal behind their own error (or open
                # ./mitm.yaml's store). The refusal stands; the gateway stays not ready.
                return
            error = self._load()
            if error is not None:
                raise exceptions.OptionsError(error)
        if self._check_options() is not None:
            raise exceptions.OptionsError(self._unsafe)
        if TELEMETRY_OPTIONS & updated:
            try:
                self.telemetry.configure(ctx.options)
            except ValueError as exc:
                raise exceptions.OptionsError(str(exc)) from None
        self._derive_allow_hosts()

    def _load(self) -> str | None:
        """Read mitm.yaml and open the store; why not, if not. Changes no option: `configure`
        checks the options first (an update from inside a refused one would be refused and
        rolled back again, recursively)."""
        self.admitter.forget()
        error = self.runtime.load(ctx.options.aigw_config, ctx.options.aigw_store or None)
        if error is None:
            self.telemetry.use_config()
            self._loaded, self._refused = self._given(), None
        else:
            self._refused = self._given()
        return error

    @staticmethod
    def _given() -> tuple[str, str]:
        return ctx.options.aigw_config, ctx.options.aigw_store

    def _reload(self) -> str | None:
        """mitm.yaml changed on disk (the maintenance tick): load it, check mitmproxy's options
        against it (a new provider may be one they would let pass), then derive them."""
        error = self._load()
        if error is None:
            error = self._check_options()
            if error is not None:
                log.error("aigw: not ready: %s", error)
                return error
            self._derive_allow_hosts()
        return error

    def _check_options(self) -> str | None:
        """Why mitmproxy's options would let a provider request pass undecided under the
        loaded mitm.yaml, if they would: the gateway is then not ready."""
        self._unsafe = unsafe_options(ctx.options, self.runtime.config)
        if self._unsafe is not None:
            self.runtime.not_ready = self._unsafe
        return self._unsafe

    def _derive_allow_hosts(self) -> None:
        derived = self.runtime.derived_allow_hosts(ctx.options.allow_hosts,
                                                   ctx.options.ignore_hosts)
        if derived is not None:
            ctx.options.update(allow_hosts=derived)

    def running(self) -> None:
        addons = ctx.master.addons
        previous = addons.get("credentialinjector")  # an earlier instance's, if it lingered
        if previous is not self.injector:
            if previous is not None:
                addons.remove(previous)
            addons.add(self.injector)  # after every other addon: see its docstring
        self.maintenance.start()

    def done(self) -> None:
        self.maintenance.stop()
        try:
            if ctx.master.addons.get("credentialinjector") is self.injector:
                ctx.master.addons.remove(self.injector)
        except Exception as exc:  # the master may be gone already
            log_fault("could not remove the credential injector", exc)
        self.runtime.not_ready = "the gateway is shutting down"
        self.injector.redact_all()
        self.settler.retry_unsettled()
        self.telemetry.stop()
        self.runtime.close()

    # --- requests ---------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A provider's request body is never streamed upstream: mitmproxy would send it before
        the `request` hook, undecided."""
        try:
            if flow.request.stream and self.admitter.provider_of(flow) is not None:
                flow.request.stream = False
        except Exception as exc:  # the request hook decides, or refuses, on its own
            log_fault("could not check a request's headers", exc)

    def request(self, flow: http.HTTPFlow):
        """Decide; a body that must be read off the event loop returns a coroutine (mitmproxy
        awaits it). No exception passes: mitmproxy would forward the flow undecided."""
        if flow.response or flow.error or not flow.live:
            return None
        attempt = Attempt(started=time.perf_counter())
        try:
            if self.runtime.config is None or self.runtime.not_ready:
                later = self._deny(flow, Denied(shape_provider(flow.request.host),
                                                denials.not_ready()))
            else:
                later = self._answer(flow, self.admitter.admit(flow, attempt), attempt)
        except Exception as exc:
            later = self._fault(flow, exc, attempt)
        if later is None:
            self.telemetry.decided(flow, attempt)
        return later

    def _answer(self, flow: http.HTTPFlow, outcome: Outcome, attempt: Attempt):
        """Write a decision into the flow."""
        if isinstance(outcome, Allowed):
            remove_credentials(flow.request)  # the injector adds the provider's as it leaves
            self.injector.pending[flow.id] = (outcome.flight.provider.adapter, outcome.secret)
            self.flights[flow.id] = outcome.flight
            flow.metadata["aigw"] = outcome.metadata
            outcome.metadata["provider"] = outcome.flight.provider.name
        elif isinstance(outcome, Denied):
            self._deny(flow, outcome)
        elif isinstance(outcome, Unavailable):
            if outcome.store_fault:
                self.telemetry.store_error()
            return self._answer(flow, self.failure.decide(flow, outcome), attempt)
        elif isinstance(outcome, ReadBody):
            return self._read_then(flow, outcome, attempt)
        elif isinstance(outcome, Passthrough):
            flow.metadata["aigw"] = {"decision": "passthrough"}
        return None

    async def _read_then(self, flow: http.HTTPFlow, outcome: ReadBody, attempt: Attempt) -> None:
        try:
            config = self.runtime.config
            assert config is not None
            body = await asyncio.to_thread(read_body, flow.request,
                                           config.policy.max_request_body_bytes)
            if flow.live and flow.response is None and flow.error is None:
                later = self._answer(flow, outcome.then(*body), attempt)
                if later is not None:
                    await later
        except Exception as exc:
            later = self._fault(flow, exc, attempt)
            if later is not None:
                await later
        self.telemetry.decided(flow, attempt)

    def _fault(self, flow: http.HTTPFlow, exc: Exception, attempt: Attempt):
        """An unexpected fault while deciding: the failure mode, never an undecided forward."""
        log_fault("request decision failed", exc)
        self.flights.pop(flow.id, None)
        self.injector.pending.pop(flow.id, None)
        store = self.runtime.store
        if attempt.reserved and store is not None:
            try:
                store.ledger.release(flow.id)
            except Exception as release_exc:
                log_fault("could not release the reservation of a failed request", release_exc)
        flow.response = None
        provider = attempt.provider or shape_provider(flow.request.host)
        why = Unavailable(provider, f"internal error: {type(exc).__name__}", attempt.org,
                          attempt.credential, attempt.user_id, key_id=attempt.key_id)
        try:
            return self._answer(flow, self.failure.decide(flow, why),
                                Attempt(started=attempt.started))
        except Exception as again:  # even the failure mode failed: refuse
            log_fault("the failure mode failed too; refusing", again)
            self.flights.pop(flow.id, None)
            self.injector.pending.pop(flow.id, None)
            flow.response = None
            return self._deny(flow, Denied(provider, denials.not_ready()))

    def _deny(self, flow: http.HTTPFlow, denied: Denied) -> None:
        """Answer in place of the provider; the refused flow keeps no client credential."""
        self.injector.pending.pop(flow.id, None)
        redact_credentials(flow.request)
        if denied.strip_body:  # too large to keep around (a dump would decode it)
            flow.request.headers.pop("content-encoding", None)
            flow.request.content = b""
        denial = denied.denial
        flow.response = denied.provider.adapter.deny(denial)
        usage_headers(flow.response, denial_level(denied), month_of(utc_now()))
        flow.metadata["aigw"] = {"decision": "denied", "status": denial.status,
                                 "error": denial.error_type, "provider": denied.provider.name}
        log.info("aigw: denied %s %s: %s", flow.request.host, denial.status, denial.error_type)

    # --- responses --------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if "aigw" in flow.metadata:
            self.injector.redact(flow)  # sent: nothing after this needs the credential
        flight = self.flights.get(flow.id)
        if flight is not None and flow.response is not None:
            self.settler.tap(flow, flight)

    def response(self, flow: http.HTTPFlow):
        if "aigw" in flow.metadata:
            self.injector.redact(flow)
        flight = self.flights.pop(flow.id, None)
        if flight is None:
            self.telemetry.passthrough_done(flow)
            return None
        return self.settler.settle(flow, flight)

    def error(self, flow: http.HTTPFlow):
        return self.response(flow)


addons = [Gateway()]
