"""The JSON bodies the admin API accepts, each declared once and decoded strictly: a field of the
wrong type or one the endpoint does not know is a 400 naming it (a typo never passes as
"unchanged"). Values are then checked by the admin operations, as for the CLI."""

from typing import Any

import msgspec

from store.records import RATE_FIELDS, explain

UNSET: Any = msgspec.UNSET
Unset = msgspec.UnsetType
Number = int | float


class PayloadError(ValueError):
    """A body that is not what the endpoint takes: names the field and the reason."""


class _Body(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields left out are UNSET: an update changes only what it names. A rate limit set to
    null is removed."""

    rpm_limit: int | None | Unset = UNSET
    tpm_limit: int | None | Unset = UNSET
    max_parallel_requests: int | None | Unset = UNSET

    def rates(self) -> dict[str, int | None]:
        """The rate limits the body names (None: remove that limit)."""
        return {name: getattr(self, name) for name in RATE_FIELDS
                if getattr(self, name) is not UNSET}


class OrgCreate(_Body):
    name: str
    monthly_budget_usd: Number = 100.0  # the Workers gateway's default
    failure_mode: str = "fail_closed"
    fallback_daily_limit: Number | None = None
    provider_keys: dict[str, str] = {}
    allowed_models: list[str] | None = None


class OrgUpdate(_Body):
    name: str | Unset = UNSET
    monthly_budget_usd: Number | Unset = UNSET
    failure_mode: str | Unset = UNSET
    fallback_daily_limit: Number | Unset = UNSET
    provider_keys: dict[str, str] | Unset = UNSET  # replaces the org's whole map, as in Workers
    allowed_models: list[str] | None | Unset = UNSET


class UserCreate(_Body):
    email: str
    org_id: str
    monthly_limit_usd: Number = 10.0  # the Workers gateway's default


class UserUpdate(_Body):
    email: str | Unset = UNSET
    monthly_limit_usd: Number | Unset = UNSET
    status: str | Unset = UNSET


class KeyCreate(_Body):
    name: str | None = None
    monthly_limit_usd: Number | None = None


class KeyUpdate(_Body):
    monthly_limit_usd: Number | Unset = UNSET


class KeyRotate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    grace_s: Number = 0


class QuotaReset(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    reset_reason: str = "reset through the admin API (no reason given)"


def decode[T](kind: type[T], body: bytes) -> T:
    """The body as `kind` (an empty body: every field's default); PayloadError otherwise."""
    if not body.strip():
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise PayloadError(explain(kind, str(exc), body)) from None
    except msgspec.DecodeError:
        raise PayloadError("the body is not valid JSON") from None
