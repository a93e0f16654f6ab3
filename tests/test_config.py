"""mitm.yaml: the typed sections, their rules, and the errors operators read (file, key, reason)."""

import datetime
import math
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addon.config import (
    SHIPPED_CONFIG,
    GatewayConfig,
    Policy,
    load_config,
    normalize_host,
)
from store.settings import (
    DEFAULT_STORE_PATH,
    ConfigError,
    ConfigText,
    StoreSettings,
    decode_section,
    store_settings,
)

BASE: dict[str, Any] = {
    "store": {"path": "./var/store", "hash": "blake3"},
    "policy": {
        "unknown_credentials": "block",
        "default_failure_mode": "fail_closed",
        "default_max_output_tokens": 4096,
        "reservation_timeout_s": 3600,
        "flush_interval_s": 1,
        "fail_closed_retry_after_s": 30,
        "fallback_daily_limit_usd": 10,
        "max_staleness_s": 300,
        "max_request_body_bytes": 1024,
    },
    "providers": {
        "x": {"kind": "openai", "hosts": ["api.example.com"], "api_key_env": "X_KEY",
              "plain_http": False},
    },
    "pricing": {
        "fallback": {"input_per_1m": 1, "output_per_1m": 1},
        "models": {
            "m": {"input_per_1m": 1, "output_per_1m": 2, "cached_input_per_1m": 0.5,
                  "cache_write_per_1m": 1.25, "cache_write_1h_per_1m": 2},
        },
    },
    "sync": {"node_id": "n1"},
}


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "mitm.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def refusal(tmp_path: Path, data: Any) -> ConfigError:
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert str(raised.value).startswith(f"{path}: "), raised.value
    return raised.value


def with_value(path: tuple, value: Any, base: dict | None = None) -> dict:
    """A deep copy of BASE with `value` at `path` (keys and list indices)."""
    data = yaml.safe_load(yaml.safe_dump(base or BASE))
    here = data
    for step in path[:-1]:
        here = here[step]
    here[path[-1]] = value
    return data


def key_of(path: tuple) -> str:
    joined = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path)
    return joined[1:] if joined.startswith(".") else joined  # only the separator, not a name's dot


# --- the sections as documented ------------------------------------------------------------


def test_the_shipped_file_and_a_full_one_load(tmp_path):
    shipped = load_config(SHIPPED_CONFIG)
    assert {p.kind for p in shipped.providers} == {"openai", "anthropic", "gemini",
                                                    "azure_openai"}
    assert shipped.policy == Policy(max_request_body_bytes=32 * 2**20)
    config = load_config(write(tmp_path, BASE))
    assert config.source == str(tmp_path / "mitm.yaml")
    assert config.store == StoreSettings(Path("var/store"), "blake3")
    assert config.policy.flush_interval_s == 1.0 and isinstance(config.policy.flush_interval_s,
                                                                 float)
    assert config.policy.max_staleness_s == 300.0 and config.policy.max_request_body_bytes == 1024
    (provider,) = config.providers
    assert (provider.name, provider.kind, provider.hosts, provider.api_key_env,
            provider.plain_http) == ("x", "openai", ("api.example.com",), "X_KEY", False)
    price = config.pricing.lookup("m")
    assert (price.input, price.output, price.cached_input, price.cache_write,
            price.cache_write_1h) == (1_000_000, 2_000_000, 500_000, 1_250_000, 2_000_000)
    assert config.pricing.fallback.input == 1_000_000


def test_an_empty_file_has_every_default_and_the_shipped_providers_and_prices(tmp_path):
    config = load_config(write(tmp_path, ""))
    assert config.policy == Policy()
    assert config.policy.default_failure_mode == "fail_closed"
    assert config.store == StoreSettings(Path(DEFAULT_STORE_PATH), "blake3")
    assert config.provider_for("api.openai.com").kind == "openai"


def test_a_config_without_providers_or_pricing_gets_the_shipped_ones(tmp_path):
    """Moved from tests/test_providers.py."""
    config = tmp_path / "mitm.yaml"
    config.write_text(f"store: {{path: {tmp_path / 's'}}}\n")
    loaded = load_config(config)
    assert loaded.provider_for("api.openai.com").kind == "openai"
    assert loaded.provider_for("myres.openai.azure.com").kind == "azure_openai"
    assert loaded.pricing.lookup("gpt-4o") is not None
    config.write_text("providers: {}\npricing: {models: {}}\n")
    explicit = load_config(config)
    assert explicit.providers == () and explicit.pricing.lookup("gpt-4o") is None


@pytest.mark.parametrize("text", ["providers:\n", "providers: null\n", "providers: {}\n"])
def test_providers_given_as_empty_mean_none(tmp_path, text):
    assert load_config(write(tmp_path, text)).providers == ()


def test_pricing_left_empty_means_the_fallback_for_every_model(tmp_path):
    for text in ("pricing: {}\n", "pricing: null\n", "pricing: {fallback: null, models: null}\n"):
        table = load_config(write(tmp_path, text)).pricing
        assert table.lookup("gpt-4o") is None
        assert table.price("gpt-4o").input == 1_000_000  # $1 per 1M: the Workers' fallback


def test_a_price_left_out_defaults_from_the_input_price(tmp_path):
    data = with_value(("pricing", "models", "m"), {"input_per_1m": 4, "output_per_1m": 8})
    price = load_config(write(tmp_path, data)).pricing.lookup("m")
    assert (price.cached_input, price.cache_write, price.cache_write_1h) == (
        4_000_000, 5_000_000, 8_000_000)


def test_sync_is_passed_through_untouched(tmp_path):
    data = with_value(("sync",), {"whatever": [1, {"x": None}], "interval_s": "not mine"})
    assert isinstance(load_config(write(tmp_path, data)), GatewayConfig)


def test_the_store_override_replaces_the_path(tmp_path):
    path = write(tmp_path, {"store": {"path": "~/s", "hash": "sha256"}})
    assert load_config(path).store == StoreSettings(Path.home() / "s", "sha256")
    assert load_config(path, str(tmp_path / "o")).store.path == tmp_path / "o"
    assert store_settings({"store": {"hash": "sha256"}}, "f.yaml", "/x") == StoreSettings(
        Path("/x"), "sha256")
    assert store_settings({}, "f.yaml", None) == StoreSettings(Path(DEFAULT_STORE_PATH), "blake3")


def test_store_settings_refuse_like_the_gateway():
    for section, key in (({"hash": "md5"}, "store.hash"), ({"path": 3}, "store.path"),
                         ({"path": ""}, "store.path"), ({"extra": 1}, "store.extra"),
                         ([], "store")):
        with pytest.raises(ConfigError) as raised:
            store_settings({"store": section, "bogus": "aigw reads only store and sync"},
                           "f.yaml", None)
        assert raised.value.key == key and str(raised.value).startswith(f"f.yaml: {key}: ")


# --- hosts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry,stored", [
    ("api.example.com", "api.example.com"),
    ("API.Example.COM.", "api.example.com"),
    ("api.example.com:443", "api.example.com"),
    ("*.openai.azure.com", "*.openai.azure.com"),
    ("*.example.com", "*.example.com"),
    ("localhost", "localhost"),
    ("10.0.0.7", "10.0.0.7"),
    ("[::1]", "::1"),
    ("::1", "::1"),
])
def test_host_entries_are_names_or_one_label_wildcards(tmp_path, entry, stored):
    config = load_config(write(tmp_path, with_value(("providers", "x", "hosts"), [entry])))
    assert config.providers[0].hosts == (stored,)
    assert all(re.compile(p) for p in config.allow_hosts())


def test_one_host_name_alone_is_a_list_of_one(tmp_path):
    config = load_config(write(tmp_path, with_value(("providers", "x", "hosts"), "a.example")))
    assert config.providers[0].hosts == ("a.example",)


@pytest.mark.parametrize("entry", [
    r"^api\.openai\.com$", "api.groq.com|evil", "(", ".*", "*.com", "*", "*.", "a.*.com",
    "**.example.com", "api..example.com", "-a.example.com", "a b.example", "", " ", 3, None,
    True, ["api.example.com"], {"a": 1}, "ápi.example.com",
])
def test_bad_host_entries_are_refused_naming_the_entry(tmp_path, entry):
    data = with_value(("providers", "x", "hosts"), ["ok.example.com", entry])
    error = refusal(tmp_path, data)
    assert error.key == "providers.x.hosts[1]", error
    assert "host name" in error.reason and "not a regular expression" in error.reason


@pytest.mark.parametrize("hosts", [[], None, 3, {"a": "b"}])
def test_hosts_must_be_a_non_empty_list(tmp_path, hosts):
    error = refusal(tmp_path, with_value(("providers", "x", "hosts"), hosts))
    assert error.key == "providers.x.hosts" and "non-empty list of host names" in error.reason


# --- every other rule ----------------------------------------------------------------------


@pytest.mark.parametrize("spelling,mode", [
    ("fail_open", "fail_open"), ("fail-open", "fail_open"), ("FAIL-CLOSED", "fail_closed"),
    ("fail_closed", "fail_closed"), (" fail-closed ", "fail_closed"),
])
def test_the_default_failure_mode_takes_both_spellings(tmp_path, spelling, mode):
    config = load_config(write(tmp_path, with_value(("policy", "default_failure_mode"),
                                                    spelling)))
    assert config.policy.default_failure_mode == mode
    assert type(config.policy.default_failure_mode) is str


@pytest.mark.parametrize("path,value", [
    (("policy", "default_failure_mode"), "open"),
    (("policy", "default_failure_mode"), None),
    (("policy", "unknown_credentials"), "maybe"),
    (("policy", "unknown_credentials"), "Block"),
    (("policy", "flush_interval_s"), 0.01),
    (("policy", "flush_interval_s"), 0),
    (("policy", "flush_interval_s"), ".nan"),
    (("policy", "flush_interval_s"), float("inf")),
    (("policy", "flush_interval_s"), "1"),
    (("policy", "default_max_output_tokens"), 0),
    (("policy", "default_max_output_tokens"), 1.5),
    (("policy", "default_max_output_tokens"), 2.0),
    (("policy", "default_max_output_tokens"), True),
    (("policy", "default_max_output_tokens"), 10**30),
    (("policy", "reservation_timeout_s"), 0),
    (("policy", "reservation_timeout_s"), -5),
    (("policy", "fail_closed_retry_after_s"), None),
    (("policy", "fallback_daily_limit_usd"), -1),
    (("policy", "fallback_daily_limit_usd"), float("nan")),
    (("policy", "fallback_daily_limit_usd"), 10**400),
    (("policy", "max_staleness_s"), 0.5),
    (("policy", "max_staleness_s"), float("-inf")),
    (("policy", "max_request_body_bytes"), 0),
    (("policy", "max_request_body_bytes"), "32MiB"),
    (("providers", "x", "kind"), "nope"),
    (("providers", "x", "kind"), None),
    (("providers", "x", "plain_http"), "false"),
    (("providers", "x", "plain_http"), 0),
    (("providers", "x", "plain_http"), None),
    (("providers", "x", "api_key_env"), ""),
    (("providers", "x", "api_key_env"), 5),
    (("pricing", "models", "m", "input_per_1m"), "x"),
    (("pricing", "models", "m", "input_per_1m"), None),
    (("pricing", "models", "m", "output_per_1m"), -0.1),
    (("pricing", "models", "m", "cached_input_per_1m"), float("inf")),
    (("pricing", "models", "m", "cache_write_per_1m"), True),
    (("pricing", "models", "m", "cache_write_1h_per_1m"), [1]),
    (("pricing", "fallback", "input_per_1m"), float("nan")),
    (("store", "hash"), "md5"),
    (("store", "path"), 7),
    (("store", "path"), datetime.date(2026, 12, 1)),
])
def test_a_bad_value_is_refused_naming_file_key_and_reason(tmp_path, path, value):
    if value == ".nan":
        value = float("nan")
    error = refusal(tmp_path, with_value(path, value))
    assert error.key == key_of(path), error
    assert error.reason.startswith("must be") or error.reason.startswith("required"), error


@pytest.mark.parametrize("path", [
    ("bogus",), ("policy", "flush_interval"), ("store", "paths"), ("providers", "x", "host"),
    ("pricing", "model"), ("pricing", "models", "m", "input"), ("pricing", "fallback", "x"),
])
def test_unknown_keys_are_refused_by_name(tmp_path, path):
    error = refusal(tmp_path, with_value(path, 1))
    assert error.key == key_of(path) and error.reason.startswith("unknown key (expected one of")


@pytest.mark.parametrize("path,key", [
    (("providers", "x"), "providers.x.kind"),
    (("pricing", "models", "m"), "pricing.models.m.input_per_1m"),
])
def test_an_empty_entry_names_its_first_required_key(tmp_path, path, key):
    error = refusal(tmp_path, with_value(path, None))
    assert error.key == key and error.reason.startswith("required: must be")


@pytest.mark.parametrize("path", [("store",), ("policy",), ("providers",), ("providers", "x"),
                                  ("pricing",), ("pricing", "models"),
                                  ("pricing", "models", "m")])
def test_a_section_that_is_not_a_mapping_is_refused(tmp_path, path):
    error = refusal(tmp_path, with_value(path, [1, 2]))
    assert error.key == key_of(path) and error.reason == "must be a mapping, not [1, 2]"


def test_names_that_yaml_reads_as_numbers_are_names(tmp_path):
    text = ("providers: {1: {kind: openai, hosts: [a.example]}}\n"
            "pricing: {models: {1.5: {input_per_1m: 1, output_per_1m: 1}}}\n")
    config = load_config(write(tmp_path, text))
    assert config.providers[0].name == "1" and config.pricing.lookup("1.5") is not None
    error = refusal(tmp_path, "providers: {1: {kind: openai, hosts: [a]}, '1': {kind: gemini,"
                              " hosts: [b]}}\n")
    assert error.key == "providers.1" and error.reason == "named twice"


@pytest.mark.parametrize("text,reason", [
    ("[1, 2", "not valid YAML"),
    ("- a\n- b\n", "the top level must be a mapping"),
    ("a: &a [*a]\n", "unknown key"),
])
def test_a_file_that_is_not_a_mapping_is_refused(tmp_path, text, reason):
    assert reason in str(refusal(tmp_path, text))


def test_an_unreadable_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="absent.yaml: cannot read"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"store: {path: caf\xe9}\n")
    with pytest.raises(ConfigError, match="latin.yaml: cannot read"):
        load_config(tmp_path / "latin.yaml")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("providers: {x: {kind: nope, hosts: [a]}}", "providers.x.kind"),
        ("providers: {x: {kind: openai, hosts: ['(']}}", "providers.x.hosts[0]"),
        ("pricing: {models: {m: {input_per_1m: x, output_per_1m: 1}}}",
         "pricing.models.m.input_per_1m"),
        ("store: {hash: md5}", "store.hash"),
        ("bogus: 1", "bogus"),
        ("policy: {unknown_credentials: maybe}", "policy.unknown_credentials"),
        ("[1, 2", "not valid YAML"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path, text, needle):
    """The cases of tests/test_gateway.py's test of the same name, at load_config."""
    error = refusal(tmp_path, text)
    assert str(tmp_path / "mitm.yaml") in str(error) and needle in str(error)


def test_a_long_value_is_cut_in_the_message(tmp_path):
    error = refusal(tmp_path, with_value(("policy", "flush_interval_s"), "x" * 10_000))
    assert len(str(error)) < 400 and "..." in error.reason


# --- any value anywhere: a ConfigError naming the key, or a valid config ------------------

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["", "fail-open", "FAIL_OPEN", "block", "passthrough", "blake3",
                              "sha256", "openai", "gemini", "azure_openai", "anthropic",
                              "*.example.com", "*.com", "api.example.com.", "[::1]:8443",
                              "^a$", "0.05", "1e400", ".inf", "yes", "~"])
           | st.dates() | st.datetimes() | st.binary(max_size=8))
names = st.text(max_size=12) | st.integers() | st.none() | st.booleans() | st.sampled_from(
    ["input_per_1m", "output_per_1m", "kind", "hosts", "path", "models", "fallback"])
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(names, inner, max_size=4), max_leaves=12)
# Mostly scalars, and numbers in the documented ranges, so that valid configs come up too.
field_values = scalars | st.integers(0, 10**5) | st.floats(0, 10**4) | values

PATHS = [
    ("store",), ("store", "path"), ("store", "hash"), ("policy",),
    *[("policy", name) for name in BASE["policy"]],
    ("providers",), ("providers", "x"), ("providers", "x", "kind"),
    ("providers", "x", "hosts"), ("providers", "x", "hosts", 0),
    ("providers", "x", "api_key_env"), ("providers", "x", "plain_http"),
    ("pricing",), ("pricing", "fallback"), ("pricing", "models"), ("pricing", "models", "m"),
    *[("pricing", "fallback", name) for name in ("input_per_1m", "output_per_1m")],
    *[("pricing", "models", "m", name) for name in BASE["pricing"]["models"]["m"]],
    ("sync",),
]


def check(config_or_error: GatewayConfig | ConfigError, path: tuple) -> None:
    if isinstance(config_or_error, ConfigError):
        key = key_of(path)
        got = config_or_error.key
        assert got == key or got.startswith((f"{key}.", f"{key}[")), (key, config_or_error)
        assert config_or_error.reason, config_or_error
        return
    config = config_or_error
    numbers = [config.policy.flush_interval_s, config.policy.fallback_daily_limit_usd,
               config.policy.max_staleness_s or 1.0]
    assert all(isinstance(n, float) and math.isfinite(n) for n in numbers)
    assert all(type(n) is int for n in (config.policy.reservation_timeout_s,
                                        config.policy.default_max_output_tokens,
                                        config.policy.fail_closed_retry_after_s,
                                        config.policy.max_request_body_bytes))
    assert config.policy.default_failure_mode in ("fail_open", "fail_closed")
    for provider in config.providers:
        assert provider.hosts and all(h == normalize_host(h) for h in provider.hosts)
        assert isinstance(provider.plain_http, bool)
    for pattern in config.allow_hosts():
        re.compile(pattern)
    assert 0 <= config.pricing.fallback.input <= 10**12


def outcome(path: Path) -> GatewayConfig | ConfigError:
    try:
        return load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: "), exc
        return exc


_TMP = tempfile.TemporaryDirectory(prefix="aigw-config-")  # removed at exit
_DIR = Path(_TMP.name)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), field_values)
def test_any_value_in_any_field_is_refused_by_its_key_or_valid(path, value):
    file = _DIR / "mitm.yaml"
    file.write_text(yaml.safe_dump(with_value(path, value), sort_keys=False))
    check(outcome(file), path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names, values)
def test_any_top_level_key_is_known_or_refused_by_name(name, value):
    data = with_value((name,), value) if isinstance(name, str) else {**BASE, name: value}
    file = _DIR / "top.yaml"
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    result = outcome(file)
    if isinstance(result, ConfigError):
        check(result, (str(name),))
        if str(name) not in BASE:
            assert result.reason.startswith("unknown key"), result
    else:
        assert name in BASE


@settings(max_examples=200, deadline=None)
@given(values)
def test_store_settings_give_settings_or_a_store_error(value):
    try:
        got = store_settings({"store": value}, "f.yaml", None)
    except ConfigError as exc:
        assert exc.key.startswith("store") and str(exc).startswith("f.yaml: store")
    else:
        assert isinstance(got, StoreSettings) and got.hash_algorithm in ("blake3", "sha256")


# --- decode_section for any other section (as store/cloudflare's `sync:` does) -------


class _Node(ConfigText):
    EXPECTED = "a node id without ':'"

    @classmethod
    def parse(cls, value: Any) -> ConfigText:
        if not isinstance(value, str) or not value or ":" in value:
            raise ValueError(f"must be {cls.EXPECTED}, not {value!r}")
        return cls(value)


class _Peer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    weight: Annotated[int, msgspec.Meta(ge=1, le=9)] = 1


class _Example(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node_id: _Node | None = None
    interval_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0
    push: bool = True
    peers: dict[str, _Peer] = {}


def test_decode_section_serves_any_struct():
    assert decode_section(_Example, None, "f.yaml", "sync") == _Example()
    got = decode_section(_Example, {"node_id": "n1", "peers": {"b": {"weight": 3}, "c": None}},
                         "f.yaml", "sync")
    assert got.node_id == "n1" and got.peers == {"b": _Peer(3), "c": _Peer()}
    for data, key, reason in (
        ({"node_id": "a:b"}, "sync.node_id", "must be a node id without ':', not 'a:b'"),
        ({"interval_s": 0}, "sync.interval_s", "must be a finite number from 1 to 3600, not 0"),
        ({"push": "no"}, "sync.push", "must be true or false, not 'no'"),
        ({"peers": {"b": {"weight": 10}}}, "sync.peers.b.weight",
         "must be an integer from 1 to 9, not 10"),
        ({"other": 1}, "sync.other",
         "unknown key (expected one of ['interval_s', 'node_id', 'peers', 'push'])"),
    ):
        with pytest.raises(ConfigError) as raised:
            decode_section(_Example, data, "f.yaml", "sync")
        assert (raised.value.key, raised.value.reason) == (key, reason)
        assert str(raised.value) == f"f.yaml: {key}: {reason}"
