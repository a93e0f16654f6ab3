"""The gateway's own refusals (beside the budget ones in addon/policy.py), as Denial values each
adapter renders in its provider's native shape."""

from addon.providers import Denial
from store.money import seconds_to_day_end, to_usd

NOT_READY_RETRY_AFTER_S = 10


def _final(status: int, error_type: str, message: str) -> Denial:
    """A refusal retrying cannot change: the SDKs must not retry it."""
    return Denial(status, error_type, message, headers=(("x-should-retry", "false"),))


def not_ready() -> Denial:
    return Denial(
        503,
        "quota_unavailable",
        "The gateway is not ready (its configuration or store is unavailable); the request was "
        "not forwarded.",
        headers=(("retry-after", str(NOT_READY_RETRY_AFTER_S)),),
    )


def quota_unavailable(retry_after_s: int) -> Denial:
    return Denial(
        503,
        "quota_unavailable",
        "The gateway cannot check quotas right now; the request was not forwarded.",
        headers=(("retry-after", str(retry_after_s)),),
    )


def fallback_used_up(limit_nusd: int, now) -> Denial:
    return Denial(
        429,
        "fallback_daily_limit_exceeded",
        f"The gateway is in fail-open mode and the daily fallback limit of "
        f"${to_usd(limit_nusd):.2f} is used up.",
        headers=(("retry-after", str(seconds_to_day_end(now))), ("x-should-retry", "false")),
    )


def misdirected(names: str) -> Denial:
    return _final(
        421, "misdirected_request",
        f"The request names different hosts ({names}) in its URL, Host header, TLS SNI or "
        f"CONNECT target; the gateway forwards a request to a provider only when they agree.")


def https_required(provider_name: str) -> Denial:
    return _final(
        403, "https_required",
        f"Requests to {provider_name} must use https: the gateway sends no credential over "
        f"plain HTTP.")


def too_large(limit: int) -> Denial:
    return _final(
        413, "request_too_large",
        f"The request body is larger than the gateway's limit of {limit} bytes (decoded).")


def not_metered() -> Denial:
    return _final(
        403, "endpoint_not_metered",
        "The gateway cannot meter batch or fine-tuning jobs (they are billed after the "
        "request), so it does not forward them.")


def upgrade_refused() -> Denial:
    return _final(
        403, "upgrade_not_supported",
        "The gateway does not meter WebSocket or other upgraded sessions (such as the Realtime "
        "API), so it does not forward them.")


def model_required(org_id: str) -> Denial:
    return _final(
        400, "invalid_model",
        f"Organization {org_id} allows only some models: the request must name one, as a "
        f"string.")


def no_credential(provider_name: str) -> Denial:
    return _final(
        502, "provider_credential_missing",
        f"The gateway has no credential for provider {provider_name!r}.")
