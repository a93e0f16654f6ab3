"""What every admin operation shares: its error, ids, times, amounts, and reading and writing
records checked with the parser the request path uses."""

import json
import math
import re
import secrets
import unicodedata
from collections.abc import Sequence
from typing import Any

from store import audit
from store.db import StoreError
from store.money import month_of, utc_now
from store.records import (
    RecordError,
    validate_record,
)
from store.target import AdminTarget

LEVELS = ("user", "org", "key")
DEFAULT_KEY_NAME = "default"
DEMO_META = "demo"
REDACTED = "<redacted>"  # what an admin answer or a redacted export shows in place of a key
# A reference to a variable on the gateway hosts (provider_keys `env:VAR`): its name is no secret.
_ENV_REFERENCE = re.compile(r"env:[A-Za-z_][A-Za-z0-9_]*")
ISO_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # every *_at field aigw writes, in UTC


class AdminError(StoreError):
    """An admin operation cannot be carried out: an invalid value (the admin API answers 400),
    or one of the kinds below."""


class NotFound(AdminError):
    """The org, user or key named does not exist (404)."""


class Conflict(AdminError):
    """The write would duplicate what exists: an email in the org, a registered key (409)."""


def now_iso() -> str:
    """The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`."""
    return utc_now().strftime(ISO_FORMAT)


def new_id(prefix: str) -> str:
    """A fresh id such as `org_1a2b3c4d5e6f`."""
    return f"{prefix}_{secrets.token_hex(6)}"


def check_number(value: Any, name: str, most: float = math.inf, what: str = "") -> float:
    """A finite number from 0 to `most` as float (-0.0 is 0); AdminError naming `name` and
    `what` it must be otherwise."""
    what = what or "a non-negative number"
    if isinstance(value, bool):
        raise AdminError(f"{name} must be {what}, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AdminError(f"{name} must be {what}, not {value!r}") from None
    if not math.isfinite(number) or not 0 <= number <= most:
        raise AdminError(f"{name} must be {what}, finite, not {value!r}")
    return number + 0.0


def check_usd(value: Any, name: str = "amount") -> float:
    """A non-negative finite USD amount as float; AdminError otherwise."""
    return check_number(value, name)


def _current_month() -> str:
    return month_of(utc_now())


def _dump(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _load(store: AdminTarget, key: str, what: str) -> dict:
    try:
        value = store.records.get_json(key)
    except ValueError as exc:
        raise AdminError(f"{what}: stored record is not valid JSON: {exc}") from exc
    if value is None:
        raise NotFound(f"unknown {what}")
    if not isinstance(value, dict):
        raise AdminError(f"{what}: stored record is not a JSON object")
    return value


def _check_text(value: Any, name: str, *, visible: bool = False) -> str:
    """A non-empty text without control characters (a NUL or newline in a name or an id
    breaks logs, CSV and the KV key it may become), stripped. `visible`: no invisible format
    character either (a zero-width space makes an email look like another); a name may need
    one (Persian writes the zero-width non-joiner)."""
    if not isinstance(value, str) or not value.strip():
        raise AdminError(f"{name} must be a non-empty string")
    refused = ("Cc", "Cf") if visible else ("Cc",)
    if any(unicodedata.category(c) in refused for c in value.strip()):
        what = "control or invisible format characters" if visible else "control characters"
        raise AdminError(f"{name} must not hold {what}")
    return value.strip()


def _write(store: AdminTarget, puts: dict[str, bytes], deletes: Sequence[str] = (),
           details: dict | None = None) -> None:
    """Write records after checking each with the parser the request path uses: an admin
    operation never leaves a record the gateway would misread or refuse."""
    for key, raw in puts.items():
        try:
            validate_record(key, raw)
        except RecordError as exc:
            raise AdminError(str(exc)) from None
    store.records.write({**puts, **audit.entry_for(store, puts, deletes, details)}, deletes)


def shown_provider_key(ref: object) -> str:
    """A provider_keys value as an admin answer shows it: an `env:VAR` reference in clear (it
    names a variable, it is not a key), anything else `<redacted>`."""
    return ref if isinstance(ref, str) and _ENV_REFERENCE.fullmatch(ref) else REDACTED


def _redacted(record: dict) -> dict:
    """The record as every admin answer shows it: literal provider keys redacted."""
    out = dict(record)
    keys = out.get("provider_keys")
    if isinstance(keys, dict):
        out["provider_keys"] = {name: shown_provider_key(ref) if isinstance(ref, str) else REDACTED
                                for name, ref in keys.items()}
    elif keys is not None:  # not a map (a record the gateway refuses): nothing of it is shown
        out["provider_keys"] = REDACTED
    return out



def _json_or_none(raw: bytes | None) -> dict | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
