"""The Workers gateway's KV records (both of its versions), each declared once as a strict schema.

Keys (the KV layout, unchanged):
  org:{org_id}:config      user:{user_id}:config      apikey:{hash}
  user:{user_id}:keys:{key_id}      user:{user_id}:quota      org:{org_id}:quota
and the later version's keys (the "vkey" layout: the key is the primary entity):
  vkey:{hash}:config      vkey:{hash}:quota      vkey:id:{key_id} (the hash, as plain text)
and aigw's own in KV (never replicated into a node's records): each node's monthly totals
`aigw:usage:{node}:{month}:{level}:{id}` and fleet-wide reset markers `aigw:reset:{level}:{id}`.

Every writer (admin operations, import, sync) and the request path parse a record with the same
`parse`, so the request path never meets a value a writer did not accept. Decoding is msgspec's
strict mode: a JSON boolean is the only boolean, a number the only amount, and an enum field takes
its documented spellings only. Fields a record may leave out keep their defaults; fields aigw
does not know are ignored, so an existing namespace loads unchanged.
"""

import re
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple, get_args, get_origin

import msgspec
import orjson

FAIL_OPEN = "fail_open"
FAIL_CLOSED = "fail_closed"
FAILURE_MODES = (FAIL_OPEN, FAIL_CLOSED)
# The later Workers gateway spells them with a hyphen.
FAILURE_MODE_SPELLINGS = (*FAILURE_MODES, "fail-open", "fail-closed")
USER_STATUSES = ("active", "suspended")
KEY_STATUSES = ("active", "revoked")
DEFAULT_FALLBACK_DAILY_LIMIT_USD = 10.0
# Amounts become 64-bit nano-dollar counts: 9e9 USD is the largest that fits.
MAX_USD = 9e9
MAX_COUNT = 2**63 - 1
LEVELS = ("key", "user", "org")
RATE_FIELDS = ("rpm_limit", "tpm_limit", "max_parallel_requests")
ADMIN_KEY_PREFIX = "aigw:admin_key:"
VKEY_PREFIX = "vkey:"
VKEY_INDEX_PREFIX = "vkey:id:"
KEY_LAYOUTS = ("apikey", "vkey")
# A key's hash as both layouts store it: hex of a 32-byte digest (blake3 or sha256).
_HASH_TEXT = re.compile(r"[0-9a-f]{64}")

Amount = Annotated[float, msgspec.Meta(ge=0, le=MAX_USD)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Id = Annotated[str, msgspec.Meta(min_length=1)]
# Rate limits (LiteLLM's names): at least 1 (absent or null: no limit), within a 64-bit count.
RateLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)] | None
Month = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$")]
# Times aigw never reads: ISO text (the Workers' created_at) or epoch milliseconds (last_update).
Timestamp = str | Annotated[float, msgspec.Meta(ge=0, le=1e18)] | None
# A time aigw does read: RFC 3339 with its zone (`2025-01-31T12:00:00Z`), nothing looser.
Instant = Annotated[datetime, msgspec.Meta(tz=True)]


class RecordError(ValueError):
    """A record's value is not what its key says it should be: names the key, field and reason."""


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


def vkey_config_key(key_hash: str) -> str:
    return f"vkey:{key_hash}:config"


def vkey_quota_key(key_hash: str) -> str:
    return f"vkey:{key_hash}:quota"


def vkey_index_key(key_id: str) -> str:
    """`vkey:id:{key_id}`: its value is the key's hash as plain text, not JSON."""
    return f"{VKEY_INDEX_PREFIX}{key_id}"


def apikey_label(key_hash: str) -> str:
    """`apikey:{hash}` shortened for messages."""
    return f"apikey:{key_hash[:12]}..." if len(key_hash) > 12 else apikey_key(key_hash)


def record_label(key: str) -> str:
    """A record key for a message: an apikey's hash shortened, a long key cut."""
    if key.startswith("apikey:"):
        return apikey_label(key.removeprefix("apikey:"))
    parts = key.split(":")
    if parts[0] == "vkey" and len(parts) == 3 and parts[1] != "id" and len(parts[1]) > 12:
        return f"vkey:{parts[1][:12]}...:{parts[2]}"
    return key if len(key) <= 80 else key[:60] + "..."


def normalize_failure_mode(value: Any) -> str:
    """`fail_open`/`fail-open` -> `fail_open`; likewise closed, any case (configuration and
    command-line input; records take the exact spellings only). RecordError otherwise."""
    text = value.strip().lower().replace("-", "_") if isinstance(value, str) else None
    if text not in FAILURE_MODES:
        raise RecordError(f"failure_mode: expected fail_open or fail_closed, got {_show(value)}")
    return text


class Org(msgspec.Struct, kw_only=True):
    """`org:{org_id}:config`."""

    org_id: Id = ""  # absent: the key's id
    name: str = ""
    monthly_budget_usd: Amount | None = None  # None: no budget at this level
    failure_mode: Literal["fail_open", "fail_closed", "fail-open", "fail-closed"] = FAIL_CLOSED
    fallback_daily_limit_usd: Amount = msgspec.field(
        default=DEFAULT_FALLBACK_DAILY_LIMIT_USD, name="fallback_daily_limit")
    provider_keys: dict[str, str] = {}
    allowed_models: tuple[Id, ...] | None = None  # None or empty: any model
    rpm_limit: RateLimit = None  # requests admitted per rolling window (policy.rate_window_s)
    tpm_limit: RateLimit = None  # tokens (input + output) per rolling window
    max_parallel_requests: RateLimit = None  # requests in flight, streams until they end
    created_at: Timestamp = None
    updated_at: Timestamp = None

    def __post_init__(self) -> None:
        self.failure_mode = FAIL_OPEN if self.failure_mode in (FAIL_OPEN, "fail-open") \
            else FAIL_CLOSED
        if not self.allowed_models:
            self.allowed_models = None

    @classmethod
    def parse(cls, org_id: str, raw: bytes | str | dict) -> "Org":
        key = org_config_key(org_id)
        org = _decode(cls, raw, key)
        org.org_id = _same_id(key, "org_id", org.org_id, org_id)
        return org


class User(msgspec.Struct, kw_only=True):
    """`user:{user_id}:config`."""

    user_id: Id = ""  # absent: the key's id
    email: str = ""
    org_id: Id | None = None
    monthly_limit_usd: Amount | None = None
    status: Literal["active", "suspended"] = "active"
    rpm_limit: RateLimit = None
    tpm_limit: RateLimit = None
    max_parallel_requests: RateLimit = None
    created_at: Timestamp = None
    updated_at: Timestamp = None

    @property
    def active(self) -> bool:
        return self.status == "active"

    @classmethod
    def parse(cls, user_id: str, raw: bytes | str | dict) -> "User":
        key = user_config_key(user_id)
        user = _decode(cls, raw, key)
        user.user_id = _same_id(key, "user_id", user.user_id, user_id)
        return user


class _Owner(msgspec.Struct):
    """The owner nested in a key record of the three-level version."""

    user_id: Id | None = None
    id: Id | None = None


class ApiKey(msgspec.Struct, kw_only=True):
    """`apikey:{hash}`: what the gateway knows of a presented key. The older version names its
    owner `user_id`; the later one `user` (an id, or an object with one)."""

    key_id: Id = ""  # absent: the start of the hash
    user_id: Id = ""
    user: Id | _Owner | None = None
    org_id: Id | None = None
    key_hash: Id | None = None
    name: str = ""
    status: Literal["active", "revoked"] = "active"
    monthly_limit_usd: Amount | None = None
    passthrough: bool = False  # a developer's own provider key, registered to be metered
    rpm_limit: RateLimit = None
    tpm_limit: RateLimit = None
    max_parallel_requests: RateLimit = None
    created_at: Timestamp = None
    updated_at: Timestamp = None
    revoked_at: Timestamp = None
    last_used_at: Timestamp = None
    rotated_at: Timestamp = None
    # A rotated-out key in its grace period: refused from this instant on (absent: never).
    expires_at: Instant | None = None

    @property
    def active(self) -> bool:
        return self.status == "active"

    @classmethod
    def parse(cls, key_hash: str, raw: bytes | str | dict) -> "ApiKey":
        label = apikey_label(key_hash)
        key = _decode(cls, raw, label)
        owner = key.user
        if isinstance(owner, _Owner):
            if owner.user_id and owner.id and owner.user_id != owner.id:
                raise RecordError(f"{label}: user: user_id and id name different users")
            owner = owner.user_id or owner.id
        if key.user_id and owner and owner != key.user_id:
            raise RecordError(f"{label}: user: names another user than user_id")
        key.user_id = key.user_id or owner or ""
        if not key.user_id:
            raise RecordError(f"{label}: user_id: missing (the key belongs to no user)")
        key.key_id = key.key_id or key_hash[:16]
        return key


def vkey_label(key_hash: str) -> str:
    """`vkey:{hash}:config` shortened for messages."""
    return record_label(vkey_config_key(key_hash))


class VirtualKey(msgspec.Struct, kw_only=True):
    """`vkey:{hash}:config`: a key of the later Workers gateway, the primary entity there. It
    names its org and its user (a user id) itself; the gateway writes every field but `name`.
    aigw's own fields (rate limits, rotation, revocation time) are those of `ApiKey`."""

    key_id: Id
    key_hash: Id | None = None
    org_id: Id
    user: Id
    name: str = ""
    monthly_limit_usd: Amount | None = None  # absent: no limit at this level
    status: Literal["active", "revoked"]  # the later gateway refuses a key without one
    passthrough: bool = False
    rpm_limit: RateLimit = None
    tpm_limit: RateLimit = None
    max_parallel_requests: RateLimit = None
    created_at: Timestamp = None
    updated_at: Timestamp = None
    revoked_at: Timestamp = None
    rotated_at: Timestamp = None
    expires_at: Instant | None = None
    previous_key_hash: Id | None = None  # the key rotated out, while it may be in its grace

    @classmethod
    def parse(cls, key_hash: str, raw: bytes | str | dict) -> "VirtualKey":
        label = vkey_label(key_hash)
        key = _decode(cls, raw, label)
        if key.key_hash is not None and key.key_hash != key_hash:
            raise RecordError(f"{label}: key_hash: not the hash its key names")
        return key

    def as_api_key(self) -> ApiKey:
        """The key as the request path and the admin operations read either layout."""
        return ApiKey(
            key_id=self.key_id, user_id=self.user, org_id=self.org_id, key_hash=self.key_hash,
            name=self.name, status=self.status, monthly_limit_usd=self.monthly_limit_usd,
            passthrough=self.passthrough, rpm_limit=self.rpm_limit, tpm_limit=self.tpm_limit,
            max_parallel_requests=self.max_parallel_requests, created_at=self.created_at,
            updated_at=self.updated_at, revoked_at=self.revoked_at, rotated_at=self.rotated_at,
            expires_at=self.expires_at)


def parse_vkey_index(key_id: str, raw: bytes | str) -> str:
    """The hash a `vkey:id:{key_id}` index holds (plain text); RecordError otherwise."""
    label = vkey_index_key(key_id)
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise RecordError(f"{label}: not valid UTF-8 text") from None
    if not isinstance(text, str) or not _HASH_TEXT.fullmatch(text):
        raise RecordError(f"{label}: expected a key's hash (64 lowercase hex characters, "
                          "plain text)")
    return text


class QuotaRecord(msgspec.Struct, kw_only=True):
    """The Workers gateway's own monthly totals (`user:{id}:quota`, `org:{id}:quota`, and the
    later version's `vkey:{hash}:quota`)."""

    month_usage_usd: Amount = 0.0
    current_month: Month = ""  # absent: no month, so it counts for none (as a stale one)
    request_count: Count = 0
    last_update: Timestamp = None

    @classmethod
    def parse(cls, raw: bytes | str | dict, key: str = "quota record") -> "QuotaRecord":
        return _decode(cls, raw, key)

    def usage_in(self, month: str) -> tuple[int, int]:
        """(nano-dollars, requests) this record contributes to `month`: zero for an older month."""
        if self.current_month != month:
            return 0, 0
        return round(self.month_usage_usd * 1_000_000_000), self.request_count


class KeyListing(msgspec.Struct, kw_only=True):
    """`user:{user_id}:keys:{key_id}`: a user's key as the admin API lists it."""

    key_id: Id | None = None  # aigw's listings repeat the id and the hash
    key_hash: Id | None = None
    previous_key_hash: Id | None = None  # the key rotated out, while it may be in its grace
    name: str = ""
    status: Literal["active", "revoked"] = "active"
    created_at: Timestamp = None
    last_used_at: Timestamp = None
    revoked_at: Timestamp = None
    rotated_at: Timestamp = None

    @classmethod
    def parse(cls, user_id: str, key_id: str, raw: bytes | str | dict) -> "KeyListing":
        key = user_key_listing_key(user_id, key_id)
        listing = _decode(cls, raw, key)
        if listing.key_id is not None:
            _same_id(key, "key_id", listing.key_id, key_id)
        return listing


class AdminKeyRecord(msgspec.Struct, kw_only=True):
    """`aigw:admin_key:{hash}`: a key of the admin API (`aigw admin-key create`)."""

    admin_key_id: Id
    name: Id
    role: Literal["admin", "viewer"]
    status: Literal["active", "revoked"] = "active"
    created_at: Timestamp = None
    revoked_at: Timestamp = None

    @property
    def active(self) -> bool:
        return self.status == "active"

    @classmethod
    def parse(cls, key_hash: str, raw: bytes | str | dict) -> "AdminKeyRecord":
        return _decode(cls, raw, f"{ADMIN_KEY_PREFIX}{key_hash[:12]}...")


class UsageFigures(msgspec.Struct):
    """The KV metadata of another node's `aigw:usage:{node}:{month}:{level}:{id}` key."""

    n: Count  # nano-dollars
    r: Count  # requests
    # The fleet-wide reset of this level (its marker's at_ms) the node had applied to its ledger
    # when it pushed these figures; 0: none. Figures pushed before the level's marker count zero.
    z: Count = 0


class UsageKey(NamedTuple):
    """A node's pushed monthly totals of one level, from its key's name and metadata."""

    node: str
    month: str
    level: str
    id: str
    used_nusd: int
    requests: int
    reset_ms: int  # the reset marker the node had applied (UsageFigures.z)


def parse_usage_key(name: str, metadata: Any, prefix: str) -> UsageKey:
    """A node's usage key and its metadata; RecordError naming the key otherwise."""
    label = record_label(name)
    parts = name[len(prefix):].split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise RecordError(f"{label}: expected {prefix}NODE:MONTH:LEVEL:ID")
    node, month, level, level_id = parts
    _check_month_level(label, month, level)
    if not isinstance(metadata, dict):
        raise RecordError(f"{label}: metadata: expected an object, got {_show(metadata)}")
    figures = _decode(UsageFigures, metadata, f"{label}: metadata")
    return UsageKey(node, month, level, level_id, figures.n, figures.r, figures.z)


def _check_month_level(label: str, month: str, level: str) -> None:
    if not re.fullmatch(r"[0-9]{4}-(0[1-9]|1[0-2])", month):
        raise RecordError(f"{label}: month: expected YYYY-MM, got {_show(month)}")
    if level not in LEVELS:
        raise RecordError(f"{label}: level: expected one of key, user, org, got {_show(level)}")


# --- fleet-wide quota resets ------------------------------------------------------------------

RESET_PREFIX = "aigw:reset:"


def reset_marker_key(level: str, level_id: str) -> str:
    """The KV key of a level's fleet-wide reset marker (one per level: the latest reset)."""
    return f"{RESET_PREFIX}{level}:{level_id}"


class ResetMarker(msgspec.Struct, kw_only=True):
    """`aigw:reset:{level}:{id}`: a fleet-wide quota reset, written by `aigw --target cloudflare
    quota reset`. Its KV metadata repeats `at_ms` and `month` (`listing_metadata`), so a sync
    pass reads every marker from its listing alone."""

    level: Literal["key", "user", "org"]
    id: Id
    month: Month  # the month whose usage was reset
    at_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]  # when (epoch ms): the marker's version
    reason: str = ""

    @classmethod
    def parse(cls, key: str, raw: bytes | str | dict) -> "ResetMarker":
        level, level_id = _reset_key_parts(key)
        marker = _decode(cls, raw, record_label(key))
        if (marker.level, marker.id) != (level, level_id):
            raise RecordError(f"{record_label(key)}: level and id: expected {level} "
                              f"{_show(level_id)}, the ones its key names")
        return marker

    def listing_metadata(self) -> dict:
        """What the marker's KV metadata holds beside aigw's version stamp."""
        return {"t": self.at_ms, "m": self.month}


class _ResetMetadata(msgspec.Struct):
    t: Annotated[int, msgspec.Meta(ge=1, le=MAX_COUNT)]
    m: Month


class Reset(NamedTuple):
    """A reset marker as a listing shows it."""

    level: str
    id: str
    month: str
    at_ms: int


def _reset_key_parts(key: str) -> tuple[str, str]:
    label = record_label(key)
    level, _, level_id = key.removeprefix(RESET_PREFIX).partition(":")
    if not key.startswith(RESET_PREFIX) or not level_id:
        raise RecordError(f"{label}: expected {RESET_PREFIX}LEVEL:ID")
    if level not in LEVELS:
        raise RecordError(f"{label}: level: expected one of key, user, org, got {_show(level)}")
    return level, level_id


def parse_reset_listing(name: str, metadata: Any) -> Reset:
    """A reset marker from its key and KV metadata (a listing entry); RecordError naming the key
    otherwise."""
    level, level_id = _reset_key_parts(name)
    label = record_label(name)
    if not isinstance(metadata, dict):
        raise RecordError(f"{label}: metadata: expected an object, got {_show(metadata)}")
    fields = _decode(_ResetMetadata, metadata, f"{label}: metadata")
    return Reset(level, level_id, fields.m, fields.t)


def counts_after_reset(usage: UsageKey, reset: Reset | None) -> bool:
    """Whether a node's pushed figures count, given its level's reset marker: not when the
    marker is of the figures' month and the node had not applied it when it pushed them (they
    hold usage from before the reset)."""
    return reset is None or reset.month != usage.month or usage.reset_ms >= reset.at_ms


def listing_metadata(key: str, raw: bytes) -> dict:
    """What a record's KV metadata holds beside aigw's version stamp, derived from its value (so
    the two never disagree): a reset marker's `at_ms` and month; nothing for other records."""
    if key.startswith(RESET_PREFIX):
        return ResetMarker.parse(key, raw).listing_metadata()
    return {}


def validate_record(key: str, raw: bytes | str | dict) -> None:
    """Raise RecordError when a value under a known key pattern is not a valid record."""
    parts = key.split(":")
    if parts[0] == "org" and len(parts) == 3 and parts[2] == "config":
        Org.parse(parts[1], raw)
    elif parts[0] == "user" and len(parts) == 3 and parts[2] == "config":
        User.parse(parts[1], raw)
    elif parts[0] == "apikey" and len(parts) == 2:
        ApiKey.parse(parts[1], raw)
    elif len(parts) == 3 and parts[0] in ("user", "org", "vkey") and parts[2] == "quota" \
            and parts[1] != "id":
        QuotaRecord.parse(raw, record_label(key))
    elif key.startswith(VKEY_INDEX_PREFIX):
        parse_vkey_index(key.removeprefix(VKEY_INDEX_PREFIX),
                         raw if not isinstance(raw, dict) else "")
    elif parts[0] == "vkey" and len(parts) == 3 and parts[2] == "config":
        VirtualKey.parse(parts[1], raw)
    elif parts[0] == "user" and len(parts) == 4 and parts[2] == "keys":
        KeyListing.parse(parts[1], parts[3], raw)
    elif key.startswith(ADMIN_KEY_PREFIX):
        AdminKeyRecord.parse(key.removeprefix(ADMIN_KEY_PREFIX), raw)
    elif key.startswith(RESET_PREFIX):
        ResetMarker.parse(key, raw)


# --- decoding and its messages ------------------------------------------------------------

_AT = re.compile(r"^(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_EXPECTED = re.compile(r"^Expected `(?P<types>[^`]+)`, got `(?P<got>\w+)`$")
_BOUND = re.compile(r"^Expected `(?P<type>\w+)` (?P<op>>=|<=) (?P<bound>[-0-9.e+]+)$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`$")
_TYPE_WORDS = {"bool": "a boolean", "float": "a number", "int": "an integer", "str": "a string",
               "object": "an object", "array": "an array", "null": "null",
               "datetime": "an ISO time with its zone"}
_SECRET_FIELDS = ("provider_keys",)


def _decode[T](cls: type[T], raw: bytes | str | dict, label: str) -> T:
    try:
        if isinstance(raw, dict):
            return msgspec.convert(raw, cls, strict=True)
        return msgspec.json.decode(raw, type=cls, strict=True)
    except msgspec.ValidationError as exc:
        raise RecordError(f"{label}: {explain(cls, str(exc), raw)}") from None
    except msgspec.DecodeError:
        raise RecordError(f"{label}: not valid JSON (UTF-8)") from None
    except RecursionError:  # msgspec decodes nested values recursively
        raise RecordError(f"{label}: nested too deeply") from None
    except (TypeError, ValueError) as exc:  # a Python caller's dict with keys that are not text
        raise RecordError(f"{label}: not a JSON object: {type(exc).__name__}") from None


def _same_id(key: str, field: str, stored: str, expected: str) -> str:
    """The record's own id, which must be the one its key names (absent: that one)."""
    if stored and stored != expected:
        raise RecordError(f"{key}: {field}: {_show(stored)} is not the id the key names")
    return expected


def explain(cls: type, message: str, raw: bytes | str | dict) -> str:
    """`field: reason` from a msgspec validation message about decoding `raw` as `cls` (a
    record, or an admin API body), showing the offending value only when it is short and
    cannot be a credential."""
    at = _AT.match(message)
    text, path = (at["text"], at["path"] or "") if at else (message, "")
    field = path.lstrip(".").replace("[...]", " (a value)")
    missing = _MISSING.match(text)
    if missing:
        return f"{missing['field']}: missing"
    unknown = _UNKNOWN.match(text)
    if unknown:  # only where a struct forbids unknown fields (the admin API's bodies)
        return f"{unknown['field']}: not a field of this endpoint"
    if not field:
        expected = _EXPECTED.match(text)
        if expected:
            return f"expected a JSON object, got {_TYPE_WORDS.get(expected['got'], 'another')}"
        return _plain(text)
    secret = field.split(".")[0].split("[")[0] in _SECRET_FIELDS or "[...]" in path
    value = _MISSING_VALUE if secret else _value_at(raw, path)
    shown = f", got {_show(value)}" if value is not _MISSING_VALUE else ""
    if (expected := _EXPECTED.match(text)) is not None:
        words = " or ".join(_TYPE_WORDS.get(t.strip(), t.strip())
                            for t in expected["types"].split("|"))
        got = shown or f", got {_TYPE_WORDS.get(expected['got'], expected['got'])}"
        return f"{field}: expected {words}{got}"
    if (bound := _BOUND.match(text)) is not None:
        if bound["op"] == ">=" and float(bound["bound"]) == 0:
            what = "a non-negative number" if bound["type"] == "float" else "a non-negative integer"
        else:
            word = "at least" if bound["op"] == ">=" else "at most"
            what = f"{word} {float(bound['bound']):.15g}"
        return f"{field}: expected {what}{shown}"
    if text.startswith("Invalid enum value"):
        allowed = _literal_values(cls, field.split(".")[-1])
        return f"{field}: expected one of {', '.join(allowed)} (exact spelling){shown}"
    if "RFC3339" in text or "timezone component" in text:
        return f"{field}: expected an ISO time with its zone, as 2025-01-31T12:00:00Z{shown}"
    if "matching regex" in text:
        return f"{field}: expected a month as YYYY-MM{shown}"
    if "of length >=" in text:
        return f"{field}: expected a non-empty string{shown}"
    if text.startswith("Number out of range"):
        return f"{field}: expected a finite number, got one out of range"
    return f"{field}: {_plain(text)}"


def _plain(text: str) -> str:
    """A msgspec message without any quoted value in it."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", "a value", text).lower() or "invalid value"


def _literal_values(cls: type, name: str) -> tuple[str, ...]:
    """The spellings a Literal field takes, also inside a union (`Literal[...] | UnsetType`)."""
    pending, found = [getattr(cls, "__annotations__", {}).get(name)], []
    while pending:
        hint = pending.pop(0)
        if get_origin(hint) is Literal:
            found += [str(value) for value in get_args(hint)]
        else:
            pending += list(get_args(hint))
    return tuple(found) or ("the documented values",)


_MISSING_VALUE = object()


def _value_at(raw: bytes | str | dict, path: str) -> Any:
    """The value at a msgspec path (`.a.b[0]`) of the raw record, if it can be found."""
    try:
        data = raw if isinstance(raw, dict) else orjson.loads(raw)
    except (orjson.JSONDecodeError, RecursionError):
        return _MISSING_VALUE
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", path):
        try:
            data = data[name] if name else data[int(index)]
        except (KeyError, IndexError, TypeError):
            return _MISSING_VALUE
    return data


def _show(value: Any) -> str:
    """A value for a message: scalars as JSON, short strings quoted, and never a string that
    could be a credential (long, or shaped like a gateway or provider key)."""
    if value is None or isinstance(value, bool):
        return orjson.dumps(value).decode()
    if isinstance(value, int | float):
        text = repr(value)
        return text if len(text) <= 24 else "a number"
    if isinstance(value, str):
        risky = len(value) > 24 or value.lower().startswith(("gw_", "sk-", "sk_", "aiza"))
        return f"a string of {len(value)} characters" if risky else orjson.dumps(value).decode()
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
