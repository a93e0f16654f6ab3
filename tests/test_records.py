"""The strict record schemas (store/records.py): every field of every record kind, fed any JSON
value, is accepted exactly when the documented rule holds, and refused with a RecordError that
names the key and the field (never any other exception, never a credential in the message);
plus the concrete cases of issue 10 and valid records of both Workers gateway versions."""

import json
import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.records import (
    FAILURE_MODE_SPELLINGS,
    KEY_STATUSES,
    MAX_COUNT,
    MAX_USD,
    RESET_PREFIX,
    USER_STATUSES,
    ApiKey,
    KeyListing,
    Org,
    QuotaRecord,
    RecordError,
    Reset,
    ResetMarker,
    UsageKey,
    User,
    counts_after_reset,
    listing_metadata,
    parse_reset_listing,
    parse_usage_key,
    validate_record,
)

HASH = "9f" * 32

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
           | st.sampled_from(["active", "revoked", "suspended", "fail_open", "fail-closed",
                              "Active", "false", "1.5", "inf", "2026-11", "", "NaN",
                              "2030-01-31T12:00:00Z", "2030-01-31T12:00:00+02:00",
                              "2030-01-31T12:00:00", "2030-02-30T12:00:00Z"])
           | st.sampled_from([-1, 0, 1, -0.0, 1.5, 9e9, 9.000001e9, 2**63 - 1, 2**63, 10**400]))
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
field_values = scalars | json_values  # a field's value: a scalar half the time


# --- what each field accepts, by its documented rule --------------------------------------


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def finite(v: Any) -> bool:
    return is_number(v) and (isinstance(v, int) or math.isfinite(v))


def amount(v: Any) -> bool:
    return finite(v) and 0 <= v <= MAX_USD


def count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT


def text(v: Any) -> bool:
    return isinstance(v, str)


def an_id(v: Any) -> bool:
    return isinstance(v, str) and v != ""


def timestamp(v: Any) -> bool:
    # A numeric timestamp is read as a float: an integer is compared once rounded to one
    # (10**18 + 1 reads as 1e18, within the bound).
    return v is None or isinstance(v, str) or (finite(v) and 0 <= as_float(v) <= 1e18)


def as_float(v: int | float) -> float:
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def instant(v: Any) -> bool:
    """RFC 3339 with its zone (a real date and time), or null."""
    if v is None:
        return True
    found = isinstance(v, str) and re.fullmatch(
        r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
        r"([Zz]|[+-][0-9]{2}:?[0-9]{2})", v)
    if not found:
        return False
    try:
        datetime(*(int(part) for part in found.groups()[:6]))
    except ValueError:
        return False
    return True


def nullable(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


def one_of(values: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in values


def same_id(expected: str) -> Callable[[Any], bool]:
    return lambda v: v == expected


def string_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def model_list(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(an_id(m) for m in v))


def month(v: Any) -> bool:
    return (isinstance(v, str) and len(v) == 7 and v[:4].isascii() and v[:4].isdigit()
            and v[4] == "-" and v[5:] in {f"{m:02d}" for m in range(1, 13)})


def owner_u1(v: Any) -> bool:
    """The later version's `user` beside `user_id: u1`: absent, that id, or an object naming
    it (or no id at all)."""
    if v is None or v == "u1":
        return True
    return isinstance(v, dict) and all(v.get(k) in (None, "u1") for k in ("user_id", "id"))


TIMES = {"created_at": timestamp, "updated_at": timestamp}

# kind: (record key, a valid record, {field: rule}); a rule says which values are accepted.
KINDS: dict[str, tuple[str, dict, dict[str, Callable[[Any], bool]]]] = {
    "org": ("org:o1:config",
            {"org_id": "o1", "name": "Acme", "monthly_budget_usd": 100,
             "failure_mode": "fail_closed", "fallback_daily_limit": 10,
             "provider_keys": {"openai": "sk-x"}, "allowed_models": ["gpt-4o"]},
            {"org_id": same_id("o1"), "name": text, "monthly_budget_usd": nullable(amount),
             "failure_mode": one_of(FAILURE_MODE_SPELLINGS), "fallback_daily_limit": amount,
             "provider_keys": string_map, "allowed_models": model_list, **TIMES}),
    "user": ("user:u1:config",
             {"user_id": "u1", "email": "a@b.c", "monthly_limit_usd": 20, "org_id": "o1",
              "status": "active"},
             {"user_id": same_id("u1"), "email": text, "org_id": nullable(an_id),
              "monthly_limit_usd": nullable(amount), "status": one_of(USER_STATUSES), **TIMES}),
    "apikey": (f"apikey:{HASH}",
               {"key_id": "k1", "key_hash": HASH, "user_id": "u1", "org_id": "o1", "name": "n",
                "status": "active", "monthly_limit_usd": 5, "passthrough": False},
               {"key_id": an_id, "user_id": an_id, "user": owner_u1,
                "key_hash": nullable(an_id), "org_id": nullable(an_id),
                "name": text, "status": one_of(KEY_STATUSES),
                "monthly_limit_usd": nullable(amount),
                "passthrough": lambda v: isinstance(v, bool),
                "revoked_at": timestamp, "last_used_at": timestamp, "rotated_at": timestamp,
                "expires_at": instant, **TIMES}),
    "quota": ("user:u1:quota",
              {"month_usage_usd": 1.5, "current_month": "2026-11", "request_count": 3,
               "last_update": 1_717_000_000_000},
              {"month_usage_usd": amount, "current_month": month, "request_count": count,
               "last_update": timestamp}),
    "listing": ("user:u1:keys:k1",
                {"key_id": "k1", "key_hash": HASH, "name": "n", "status": "active",
                 "created_at": "2024-03-01T10:00:00Z", "last_used_at": None, "revoked_at": None},
                {"key_id": nullable(same_id("k1")), "key_hash": nullable(an_id),
                 "previous_key_hash": nullable(an_id), "name": text,
                 "status": one_of(KEY_STATUSES), "created_at": timestamp,
                 "last_used_at": timestamp, "revoked_at": timestamp, "rotated_at": timestamp}),
    "reset": ("aigw:reset:user:u1",
              {"level": "user", "id": "u1", "month": "2026-11", "at_ms": 1_780_000_000_000,
               "reason": "new project"},
              {"level": same_id("user"), "id": same_id("u1"), "month": month,
               "at_ms": lambda v: count(v) and v >= 1, "reason": text}),
}
# aigw's own reset marker names what it resets: only its reason may be left out.
REQUIRED = {("apikey", "user_id"), ("reset", "level"), ("reset", "id"), ("reset", "month"),
            ("reset", "at_ms")}
FIELDS = [(kind, name) for kind, (_, _, rules) in KINDS.items() for name in rules]


def outcome(key: str, raw: bytes | dict) -> RecordError | None:
    """None when accepted, the RecordError when refused; any other exception fails the test."""
    try:
        validate_record(key, raw)
    except RecordError as exc:
        return exc
    return None


def as_json(value: Any) -> bytes | None:
    """The value as JSON text, or None when it has no JSON form (NaN, infinity)."""
    try:
        return json.dumps(value, allow_nan=False).encode()
    except ValueError:
        return None


@pytest.mark.parametrize(("kind", "name"), FIELDS)
@settings(max_examples=100, deadline=None)
@given(value=field_values)
def test_any_value_of_any_field_is_accepted_exactly_when_its_rule_holds(kind, name, value):
    key, valid, rules = KINDS[kind]
    record = {**valid, name: value}
    expected = rules[name](value)
    for raw in (record, as_json(record)):
        if raw is None:
            continue
        error = outcome(key, raw)
        assert (error is None) == expected, (record, error)
        if error is not None:
            assert str(error).startswith(key.split(":")[0]) and name in str(error)


@pytest.mark.parametrize(("kind", "name"), FIELDS)
def test_every_field_may_be_left_out_but_a_keys_owner(kind, name):
    key, valid, _ = KINDS[kind]
    error = outcome(key, {k: v for k, v in valid.items() if k != name})
    if (kind, name) == ("apikey", "user_id"):  # nor `user`: the key belongs to no one
        assert error is not None and "user_id: missing" in str(error)
    elif (kind, name) in REQUIRED:
        assert error is not None and f"{name}: missing" in str(error)
    else:
        assert error is None


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=150, deadline=None)
@given(value=json_values)
def test_any_json_as_a_whole_record_is_accepted_or_refused_cleanly(kind, value):
    key, _, _ = KINDS[kind]
    for raw in (value if isinstance(value, dict) else None, as_json(value)):
        if raw is None:
            continue
        error = outcome(key, raw)
        assert error is None or str(error).startswith(key.split(":")[0])


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=60))
def test_any_bytes_are_accepted_or_refused_cleanly(raw):
    for key, _, _ in KINDS.values():
        outcome(key, raw)


@settings(max_examples=200, deadline=None)
@given(metadata=json_values, name=st.sampled_from([
    "aigw:usage:n1:2026-11:org:o1", "aigw:usage:n1:2026-11:team:o1", "aigw:usage:n1:11:key:k",
    "aigw:usage:n1:2026-11:user", "aigw:usage::2026-11:user:u"]))
def test_other_nodes_usage_figures_are_accepted_or_refused_cleanly(metadata, name):
    try:
        figures = parse_usage_key(name, metadata, "aigw:usage:")
    except RecordError as exc:
        assert str(exc).startswith(name)
        return
    assert name == "aigw:usage:n1:2026-11:org:o1"
    assert (figures.node, figures.month, figures.level, figures.id) == ("n1", "2026-11", "org",
                                                                        "o1")
    assert isinstance(metadata, dict) and count(figures.used_nusd) and count(figures.requests)
    assert (metadata["n"], metadata["r"], metadata.get("z", 0)) == (
        figures.used_nusd, figures.requests, figures.reset_ms)
    assert count(figures.reset_ms)


# A figures' metadata that only a valid one is: hypothesis rarely builds one by chance.
usage_metadata = st.fixed_dictionaries(
    {"n": scalars, "r": scalars}, optional={"z": scalars, "aigw": st.text(max_size=16)})


@settings(max_examples=300, deadline=None)
@given(metadata=usage_metadata)
def test_usage_figures_take_counts_only_and_the_reset_they_follow(metadata):
    name = "aigw:usage:n1:2026-11:user:u1"
    valid = all(count(metadata[k]) for k in ("n", "r")) and count(metadata.get("z", 0))
    try:
        figures = parse_usage_key(name, metadata, "aigw:usage:")
    except RecordError as exc:
        assert not valid and str(exc).startswith(f"{name}: metadata: ")
        return
    assert valid and figures == UsageKey("n1", "2026-11", "user", "u1", metadata["n"],
                                         metadata["r"], metadata.get("z", 0))


# --- reset markers as a listing shows them --------------------------------------------------

reset_metadata = st.fixed_dictionaries(
    {}, optional={"t": scalars, "m": scalars, "aigw": st.text(max_size=16)}) | json_values
RESET_NAMES = ["aigw:reset:user:u1", "aigw:reset:org:o:1", "aigw:reset:key:k1",
               "aigw:reset:team:u1", "aigw:reset:user:", "aigw:reset:user", "aigw:reset:",
               "aigw:reset::u1", "aigw:reset:User:u1"]
GOOD_RESET_NAMES = {"aigw:reset:user:u1": ("user", "u1"), "aigw:reset:org:o:1": ("org", "o:1"),
                    "aigw:reset:key:k1": ("key", "k1")}


@settings(max_examples=400, deadline=None)
@given(metadata=reset_metadata, name=st.sampled_from(RESET_NAMES))
def test_a_reset_marker_listing_is_accepted_exactly_when_valid(metadata, name):
    valid = (name in GOOD_RESET_NAMES and isinstance(metadata, dict)
             and count(metadata.get("t")) and metadata["t"] >= 1 and month(metadata.get("m")))
    try:
        reset = parse_reset_listing(name, metadata)
    except RecordError as exc:
        assert not valid and str(exc).startswith(name)
        return
    assert valid and reset == Reset(*GOOD_RESET_NAMES[name], metadata["m"], metadata["t"])


@pytest.mark.parametrize(("name", "metadata", "message"), [
    ("aigw:reset:user:u1", None, "aigw:reset:user:u1: metadata: expected an object, got null"),
    ("aigw:reset:user:u1", {"m": "2026-11"}, "metadata: t: missing"),
    ("aigw:reset:user:u1", {"t": "1780000000000", "m": "2026-11"},
     'metadata: t: expected an integer, got "1780000000000"'),
    ("aigw:reset:user:u1", {"t": 0, "m": "2026-11"}, "metadata: t: expected at least 1, got 0"),
    ("aigw:reset:user:u1", {"t": True, "m": "2026-11"}, "t: expected an integer, got true"),
    ("aigw:reset:user:u1", {"t": 1.5, "m": "2026-11"}, "t: expected an integer, got 1.5"),
    ("aigw:reset:user:u1", {"t": 2**70, "m": "2026-11"}, "t: expected at most"),
    ("aigw:reset:user:u1", {"t": 5, "m": "2026-13"}, 'm: expected a month as YYYY-MM'),
    ("aigw:reset:team:u1", {"t": 5, "m": "2026-11"},
     'aigw:reset:team:u1: level: expected one of key, user, org, got "team"'),
    ("aigw:reset:user", {"t": 5, "m": "2026-11"}, "expected aigw:reset:LEVEL:ID"),
])
def test_a_malformed_reset_marker_is_refused_naming_key_field_and_reason(name, metadata,
                                                                         message):
    with pytest.raises(RecordError) as caught:
        parse_reset_listing(name, metadata)
    assert message in str(caught.value)


def test_a_marker_value_and_its_listing_metadata_agree():
    raw = orjson.dumps({"level": "org", "id": "o1", "month": "2026-11", "at_ms": 42,
                        "reason": "audit"})
    key = f"{RESET_PREFIX}org:o1"
    marker = ResetMarker.parse(key, raw)
    assert listing_metadata(key, raw) == {"t": 42, "m": "2026-11"}
    assert parse_reset_listing(key, {"aigw": "stamp", **listing_metadata(key, raw)}) == Reset(
        "org", "o1", "2026-11", 42) and marker.reason == "audit"
    assert listing_metadata("org:o1:config", b"{}") == {}
    with pytest.raises(RecordError, match="level and id: expected org"):
        ResetMarker.parse(f"{RESET_PREFIX}org:o2", raw)  # another level's marker


def test_figures_pushed_before_their_levels_reset_do_not_count():
    reset = Reset("user", "u1", "2026-11", 1000)

    def figures(month: str, reset_ms: int) -> UsageKey:
        return UsageKey("n1", month, "user", "u1", 5, 1, reset_ms)

    assert counts_after_reset(figures("2026-11", 0), None)  # no reset
    assert not counts_after_reset(figures("2026-11", 0), reset)  # pushed before any
    assert not counts_after_reset(figures("2026-11", 999), reset)  # after an older reset only
    assert counts_after_reset(figures("2026-11", 1000), reset)  # after this reset
    assert counts_after_reset(figures("2026-11", 1001), reset)  # after a newer one
    assert counts_after_reset(figures("2026-10", 0), reset)  # another month's


SECRETS = ["sk-proj-" + "A1" * 20, "gw_live_" + "0f" * 16, "AIzaSy" + "B" * 33,
           "sk-ant-api03-" + "c" * 30]


@pytest.mark.parametrize(("kind", "name"), FIELDS)
@pytest.mark.parametrize("secret", SECRETS)
def test_a_refusal_never_shows_a_credential(kind, name, secret):
    key, valid, _ = KINDS[kind]
    for value in (secret, [secret], {"openai": secret, "x": 1}, {"k": [secret]}):
        error = outcome(key, {**valid, name: value})
        if error is not None:
            assert secret[:10] not in str(error)
    error = outcome(key, {**valid, "provider_keys": secret, name: 7})
    assert error is None or secret[:10] not in str(error)


# --- the cases of issue 10 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        (f"apikey:{HASH}", {"user_id": "u", "passthrough": "false"},
         'apikey:9f9f9f9f9f9f...: passthrough: expected a boolean, got "false"'),
        ("user:u:quota", b'{"current_month": "2026-11", "request_count": "1.5"}',
         'user:u:quota: request_count: expected an integer, got "1.5"'),
        ("org:o:quota", b'{"current_month": "2026-11", "request_count": 1.5}',
         "org:o:quota: request_count: expected an integer, got 1.5"),
        ("org:o:config", b'{"monthly_budget_usd": "inf"}',
         'org:o:config: monthly_budget_usd: expected a number or null, got "inf"'),
        ("org:o:config", b'{"monthly_budget_usd": 1e400}',
         "org:o:config: monthly_budget_usd: expected a finite number, got one out of range"),
        ("org:o:config", {"monthly_budget_usd": math.inf},
         "org:o:config: monthly_budget_usd: expected at most 9000000000, got inf"),
        ("user:u:config", b'{"monthly_limit_usd": "20"}',
         'user:u:config: monthly_limit_usd: expected a number or null, got "20"'),
        ("user:u:config", b'{"status": "paused"}',
         'user:u:config: status: expected one of active, suspended (exact spelling), '
         'got "paused"'),
        ("user:u:config", b'{"status": "Active"}', 'got "Active"'),
        (f"apikey:{HASH}", {"user_id": "u", "status": "disabled"},
         "status: expected one of active, revoked"),
        ("org:o:config", {"failure_mode": "Fail_Open"}, "failure_mode: expected one of "
         "fail_open, fail_closed, fail-open, fail-closed (exact spelling)"),
        ("org:o:config", {"provider_keys": {"openai": 12}},
         "org:o:config: provider_keys (a value): expected a string, got an integer"),
        ("org:o:config", {"allowed_models": ["gpt-4o", ""]},
         'org:o:config: allowed_models[1]: expected a non-empty string, got ""'),
        ("org:o:config", {"org_id": "o2"}, 'org:o:config: org_id: "o2" is not the id'),
        (f"apikey:{HASH}", {"name": "nobody's"}, "user_id: missing"),
        (f"apikey:{HASH}", {"user_id": "u1", "user": "u2"}, "user: names another user"),
        (f"apikey:{HASH}", {"user_id": "u", "expires_at": "2030-01-31T12:00:00"},
         'apikey:9f9f9f9f9f9f...: expires_at: expected an ISO time with its zone, as '
         '2025-01-31T12:00:00Z, got "2030-01-31T12:00:00"'),
        (f"apikey:{HASH}", {"user_id": "u", "expires_at": 1_900_000_000},
         "expires_at: expected an ISO time with its zone or null, got 1900000000"),
        ("user:u:quota", b"[1, 2]", "user:u:quota: expected a JSON object, got an array"),
        ("user:u:quota", b"\xff\xfe", "user:u:quota: not valid JSON"),
    ],
)
def test_issue_10_cases_are_refused_naming_key_field_and_reason(key, raw, message):
    with pytest.raises(RecordError) as caught:
        validate_record(key, raw)
    assert message in str(caught.value)


def test_values_nested_too_deeply_are_refused_not_a_crash():
    nested: dict = {}
    for _ in range(5_000):
        nested = {"x": nested}
    for kind, (key, valid, rules) in KINDS.items():
        field = next(iter(rules))
        for raw in (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                    b'{"%s": ' % field.encode() + b"[" * 5_000 + b"]" * 5_000 + b"}",
                    {**valid, field: nested}):
            error = outcome(key, raw)
            assert error is not None and str(error).startswith(key.split(":")[0]), kind


def test_records_of_both_workers_versions_read_as_documented():
    old = ApiKey.parse(HASH, orjson.dumps({"user_id": "u1", "key_id": "k1", "name": "n",
                                           "status": "active", "created_at": "x"}))
    assert (old.user_id, old.org_id, old.monthly_limit_usd, old.passthrough) == (
        "u1", None, None, False)
    nested = ApiKey.parse(HASH, {"key_id": "k2", "key_hash": HASH, "org_id": "o",
                                 "user": {"user_id": "u2", "email": "e"}, "status": "revoked",
                                 "monthly_limit_usd": 5})
    assert (nested.user_id, nested.org_id, nested.active) == ("u2", "o", False)
    assert ApiKey.parse(HASH, {"user": "u3"}).user_id == "u3"
    assert ApiKey.parse(HASH, {"user_id": "u3"}).key_id == HASH[:16]
    org = Org.parse("o", {"name": "Acme", "monthly_budget_usd": 100, "failure_mode": "fail-open",
                          "future_field": {"anything": [1]}})
    assert (org.org_id, org.failure_mode, org.fallback_daily_limit_usd) == ("o", "fail_open",
                                                                            10.0)
    assert Org.parse("o", {"failure_mode": "fail-closed"}).failure_mode == "fail_closed"
    assert Org.parse("o", {"allowed_models": []}).allowed_models is None
    assert Org.parse("o", {"allowed_models": ["a", "b"]}).allowed_models == ("a", "b")
    user = User.parse("u", {"email": "a@b.c", "org_id": "o"})
    assert (user.user_id, user.status, user.active) == ("u", "active", True)
    assert User.parse("u", {"status": "suspended"}).active is False
    quota = QuotaRecord.parse({"month_usage_usd": 2, "current_month": "2026-11",
                               "request_count": 4})
    assert quota.usage_in("2026-11") == (2_000_000_000, 4) and quota.usage_in("2026-12") == (0, 0)
    assert QuotaRecord.parse({"month_usage_usd": 2}).usage_in("2026-11") == (0, 0)
    assert KeyListing.parse("u", "k", {"name": "n", "last_used_at": None}).status == "active"
