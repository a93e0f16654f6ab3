"""The Workers gateway's KV records, read tolerantly (both of its versions) into typed values.

Keys (the KV layout, unchanged):
  org:{org_id}:config      user:{user_id}:config      apikey:{hash}
  user:{user_id}:keys:{key_id}      user:{user_id}:quota      org:{org_id}:quota
"""

from dataclasses import dataclass, field
from typing import Any

import orjson

FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"
FAILURE_MODES = (FAIL_OPEN, FAIL_CLOSED)
DEFAULT_FALLBACK_DAILY_LIMIT_USD = 10.0


class RecordError(ValueError):
    """A record's value is not what its key says it should be."""


def org_config_key(org_id: str) -> str:
    return f"org:{org_id}:config"


def org_quota_key(org_id: str) -> str:
    return f"org:{org_id}:quota"


def user_config_key(user_id: str) -> str:
    return f"user:{user_id}:config"


def user_quota_key(user_id: str) -> str:
    return f"user:{user_id}:quota"


def user_key_listing_key(user_id: str, key_id: str) -> str:
    return f"user:{user_id}:keys:{key_id}"


def apikey_key(key_hash: str) -> str:
    return f"apikey:{key_hash}"


def normalize_failure_mode(value: Any) -> str:
    """`fail_open`/`fail-open` -> `fail_open`; likewise closed. Raises RecordError otherwise."""
    text = str(value).strip().lower().replace("-", "_")
    if text not in FAILURE_MODES:
        raise RecordError(f"failure_mode must be fail_open or fail_closed, not {value!r}")
    return text


def _limit(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RecordError(f"{name} must be a number, not {value!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise RecordError(f"{name} must be a number, not {value!r}") from exc
    if number != number or number < 0:
        raise RecordError(f"{name} must be a non-negative number, not {value!r}")
    return number


def _object(raw: bytes | str | dict, what: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RecordError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RecordError(f"{what} must be a JSON object")
    return value


@dataclass(slots=True)  # built per request: a frozen one costs a call per field
class Org:
    org_id: str
    name: str
    monthly_budget_usd: float | None
    failure_mode: str = FAIL_CLOSED
    fallback_daily_limit_usd: float = DEFAULT_FALLBACK_DAILY_LIMIT_USD
    provider_keys: dict[str, str] = field(default_factory=dict)
    allowed_models: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, org_id: str, raw: bytes | str | dict) -> "Org":
        data = _object(raw, f"org {org_id} config")
        provider_keys = data.get("provider_keys") or {}
        if not isinstance(provider_keys, dict):
            raise RecordError(f"org {org_id}: provider_keys must be an object")
        allowed = data.get("allowed_models")
        if allowed is not None and not (
            isinstance(allowed, list) and all(isinstance(m, str) for m in allowed)
        ):
            raise RecordError(f"org {org_id}: allowed_models must be a list of model names")
        fallback = _limit(data.get("fallback_daily_limit"), "fallback_daily_limit")
        return cls(
            org_id=str(data.get("org_id") or org_id),
            name=str(data.get("name") or ""),
            monthly_budget_usd=_limit(data.get("monthly_budget_usd"), "monthly_budget_usd"),
            failure_mode=normalize_failure_mode(data.get("failure_mode") or FAIL_CLOSED),
            fallback_daily_limit_usd=(
                DEFAULT_FALLBACK_DAILY_LIMIT_USD if fallback is None else fallback
            ),
            provider_keys={str(k): str(v) for k, v in provider_keys.items()},
            allowed_models=tuple(allowed) if allowed else None,
        )


@dataclass(slots=True)  # built per request: a frozen one costs a call per field
class User:
    user_id: str
    email: str
    org_id: str | None
    monthly_limit_usd: float | None
    status: str = "active"

    @property
    def active(self) -> bool:
        return self.status == "active"

    @classmethod
    def parse(cls, user_id: str, raw: bytes | str | dict) -> "User":
        data = _object(raw, f"user {user_id} config")
        org_id = data.get("org_id")
        return cls(
            user_id=str(data.get("user_id") or user_id),
            email=str(data.get("email") or ""),
            org_id=str(org_id) if org_id else None,
            monthly_limit_usd=_limit(data.get("monthly_limit_usd"), "monthly_limit_usd"),
            status=str(data.get("status") or "active"),
        )


@dataclass(slots=True)  # built per request: a frozen one costs a call per field
class ApiKey:
    """What `apikey:{hash}` says about a presented key."""

    key_id: str
    user_id: str
    org_id: str | None
    name: str
    status: str
    monthly_limit_usd: float | None
    passthrough: bool = False  # a developer's own provider key, registered to be metered

    @property
    def active(self) -> bool:
        return self.status == "active"

    @classmethod
    def parse(cls, key_hash: str, raw: bytes | str | dict) -> "ApiKey":
        data = _object(raw, f"apikey {key_hash[:12]}")
        user = data.get("user_id") or data.get("user")
        if isinstance(user, dict):  # the three-level version nests the owner
            user = user.get("user_id") or user.get("id")
        if not user:
            raise RecordError(f"apikey {key_hash[:12]}: no user_id")
        org_id = data.get("org_id")
        return cls(
            key_id=str(data.get("key_id") or key_hash[:16]),
            user_id=str(user),
            org_id=str(org_id) if org_id else None,
            name=str(data.get("name") or ""),
            status=str(data.get("status") or "active"),
            monthly_limit_usd=_limit(data.get("monthly_limit_usd"), "monthly_limit_usd"),
            passthrough=bool(data.get("passthrough", False)),
        )


@dataclass(slots=True)  # built per request: a frozen one costs a call per field
class QuotaRecord:
    """The Workers gateway's own monthly totals (`user:{id}:quota`, `org:{id}:quota`)."""

    month_usage_usd: float
    current_month: str
    request_count: int

    @classmethod
    def parse(cls, raw: bytes | str | dict) -> "QuotaRecord":
        data = _object(raw, "quota record")
        usage = _limit(data.get("month_usage_usd"), "month_usage_usd") or 0.0
        return cls(
            month_usage_usd=usage,
            current_month=str(data.get("current_month") or ""),
            request_count=int(data.get("request_count") or 0),
        )

    def usage_in(self, month: str) -> tuple[int, int]:
        """(nano-dollars, requests) this record contributes to `month`: zero for an older month."""
        if self.current_month != month:
            return 0, 0
        return round(self.month_usage_usd * 1_000_000_000), self.request_count


def validate_record(key: str, raw: bytes | str) -> None:
    """Raise RecordError when a value under a known key pattern cannot be read by the gateway."""
    parts = key.split(":")
    if parts[0] == "org" and len(parts) == 3 and parts[2] == "config":
        Org.parse(parts[1], raw)
    elif parts[0] == "user" and len(parts) == 3 and parts[2] == "config":
        User.parse(parts[1], raw)
    elif parts[0] == "apikey" and len(parts) == 2:
        ApiKey.parse(parts[1], raw)
    elif len(parts) == 3 and parts[0] in ("user", "org") and parts[2] == "quota":
        QuotaRecord.parse(raw)
    elif parts[0] == "user" and len(parts) == 4 and parts[2] == "keys":
        _object(raw, key)
