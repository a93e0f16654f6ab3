"""The failure modes: what happens to a request when quota data is unavailable. `fail_closed`
refuses with 503; `fail_open` forwards within a daily fallback limit, charged to a local grace
ledger kept for reconciliation."""

import logging
from typing import Any

from mitmproxy import http

from addon import denials
from addon.admission import (
    Allowed,
    Denied,
    Flight,
    Outcome,
    ReadBody,
    Unavailable,
    needs_thread,
    provider_secret,
    read_body,
)
from addon.metering import estimate_tokens
from addon.runtime import Runtime
from store.db import UsageRecord
from store.hashing import looks_like_gateway_key
from store.money import day_of, from_usd, month_of, utc_now
from store.records import FAIL_OPEN

log = logging.getLogger("aigw")

UNVERIFIED = "unverified"  # the grace bucket of keys whose user the gateway could not look up


class FailureMode:
    """Decides requests whose quota data is unavailable, and charges the grace ledger."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._memory: dict[tuple[str, str], int] = {}  # grace spent, when even the ledger is down

    def decide(self, flow: http.HTTPFlow, why: Unavailable) -> Outcome:
        """The org's failure mode (the default one when the org itself is unknown). Fail-open
        caps each user at the daily fallback limit; keys whose user could not be looked up
        share one cap, so inventing keys does not multiply it."""
        config = self.runtime.config
        if config is None:
            return Denied(why.provider, denials.not_ready())
        policy, org = config.policy, why.org
        mode = org.failure_mode if org is not None else policy.default_failure_mode
        log.warning("aigw: quota data unavailable (%s); %s", why.reason, mode)
        if mode != FAIL_OPEN or why.credential is None:
            return Denied(why.provider, denials.quota_unavailable(policy.fail_closed_retry_after_s))
        limit = from_usd(
            org.fallback_daily_limit_usd if org is not None else policy.fallback_daily_limit_usd)
        now = utc_now()
        day = day_of(now)
        who = f"user:{why.user_id}" if why.user_id else UNVERIFIED
        if self._used(day, who) >= limit:
            return Denied(why.provider, denials.fallback_used_up(limit, now))
        secret = (provider_secret(why.provider, org) if looks_like_gateway_key(why.credential)
                  else why.credential)
        if secret is None:
            return Denied(why.provider, denials.no_credential(why.provider.name))

        def forward(decoded: bytes | None, body: Any) -> Outcome:
            if decoded is None:
                return Denied(why.provider, denials.too_large(policy.max_request_body_bytes),
                              strip_body=True)
            flight = Flight(
                provider=why.provider, mode="grace",
                model=why.provider.adapter.model(flow.request, body), month=month_of(now),
                estimate_nusd=0, input_tokens_estimate=estimate_tokens(len(decoded)),
                org_id=org.org_id if org else None, key_id=why.key_id, user_id=why.user_id,
                grace_who=who, grace_day=day)
            return Allowed(flight, secret, {"decision": "grace", "reason": why.reason})

        if needs_thread(flow.request):
            return ReadBody(forward)
        return forward(*read_body(flow.request, policy.max_request_body_bytes))

    def _used(self, day: str, who: str) -> int:
        store = self.runtime.store
        try:
            used = store.ledger.grace_used(day, who)[0] if store is not None else 0
        except Exception:
            used = 0
        return max(used, self._memory.get((day, who), 0))

    def charge(self, flight: Flight, cost: int, entry: UsageRecord) -> None:
        """Add a grace request to the total of the day it was admitted on (the day whose limit
        let it through, also when it ends after midnight); never raises."""
        day = flight.grace_day or day_of(utc_now())
        who = flight.grace_who or UNVERIFIED
        self._memory[(day, who)] = self._memory.get((day, who), 0) + cost
        try:
            store = self.runtime.store
            assert store is not None
            store.ledger.grace_charge(day, who, cost, entry)
        except Exception:
            # The log line is the reconciliation record when the ledger itself is down.
            log.error("aigw: grace ledger unavailable; unrecorded grace request: %s", entry)
