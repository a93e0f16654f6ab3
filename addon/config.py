"""mitm.yaml, declared once as typed sections (msgspec Structs) and decoded in the addon's
`configure` into the settings the request path reads."""

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from addon.pricing import Price, PriceTable
from addon.providers import ADAPTERS, Adapter
from addon.requestlog import LogFormat
from store.alert_settings import AlertsSection
from store.rates import MAX_WINDOW_S
from store.records import FAIL_CLOSED, MAX_USD, RecordError, normalize_failure_mode
from store.settings import (
    SHIPPED_CONFIG,
    ConfigText,
    NonEmptyText,
    StoreSection,
    StoreSettings,
    decode_section,
    load_yaml,
    show,
)

UNKNOWN_CREDENTIALS = ("block", "passthrough")
FALLBACK_PRICE_USD_PER_1M = 1.0  # the Workers gateway's $0.001 per 1K tokens
# Bounds far beyond any real setting that keep every figure a 64-bit count and every wait one
# the OS accepts: a year of seconds, a billion tokens at $1 each, a TiB of body.
MAX_SECONDS = 366 * 24 * 3600
MAX_TOKENS = 10**9
MAX_BODY_BYTES = 2**40
MAX_PRICE_USD_PER_1M = 1_000_000.0

# A host entry: a DNS name, or `*.` and a name (the wildcard stands for exactly one label).
_HOST_NAME = re.compile(r"(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def normalize_host(value: str) -> str:
    """A host name as matched: lower case, no port, no trailing dot, no IPv6 brackets."""
    host = value.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_ip_address(host: str) -> bool:
    """Whether a normalised host is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- the schema of mitm.yaml --------------------------------------------------------------


class HostPattern(ConfigText):
    """One `hosts` entry, normalised: an exact host name (or IP address), or `*.domain`."""

    EXPECTED: ClassVar[str] = ("a host name such as api.example.com, or *.example.com for one "
                               "label of that domain (not a regular expression)")

    @classmethod
    def parse(cls, value: Any) -> ConfigText:
        """The entry normalised; ValueError for a regex, `*.com`, or anything not a name."""
        host = normalize_host(value) if isinstance(value, str) else ""
        # A wildcard stands for one label of a domain that is not a top-level one (`*.com`: no).
        if host and (is_ip_address(host) or _HOST_NAME.fullmatch(host)
                     and not (host.startswith("*.") and "." not in host[2:])):
            return cls(host)
        raise ValueError(f"must be {cls.EXPECTED}, not {show(value)}")


class FailureMode(ConfigText):
    """`fail_open` or `fail_closed`, in either spelling (`fail-open`) and any case."""

    EXPECTED: ClassVar[str] = "one of fail_open, fail_closed (or fail-open, fail-closed)"

    @classmethod
    def parse(cls, value: Any) -> ConfigText:
        """The mode in its underscore spelling; ValueError for anything else."""
        try:
            return cls(normalize_failure_mode(value))
        except RecordError:
            raise ValueError(f"must be {cls.EXPECTED}, not {show(value)}") from None


Seconds = Annotated[int, msgspec.Meta(ge=1, le=MAX_SECONDS)]
UsdPer1M = Annotated[float, msgspec.Meta(ge=0, le=MAX_PRICE_USD_PER_1M)]
HostList = Annotated[list[HostPattern], msgspec.Meta(
    min_length=1, description="a non-empty list of host names")]


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`policy:`."""

    unknown_credentials: Literal[UNKNOWN_CREDENTIALS] = "block"  # type: ignore[valid-type]
    default_failure_mode: FailureMode = FAIL_CLOSED  # type: ignore[assignment]
    default_max_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] = 4096
    reservation_timeout_s: Seconds = 3600
    flush_interval_s: Annotated[float, msgspec.Meta(ge=0.05, le=MAX_SECONDS)] = 1.0
    fail_closed_retry_after_s: Seconds = 30
    fallback_daily_limit_usd: Annotated[float, msgspec.Meta(ge=0, le=MAX_USD)] = 10.0
    # A replica older than this: quota data unavailable (null: no limit).
    max_staleness_s: Annotated[float, msgspec.Meta(ge=1, le=MAX_SECONDS)] | None = None
    # The decoded size of a request body; a larger one gets 413.
    max_request_body_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_BODY_BYTES)] = 32 * 2**20
    # Days a per-request usage record is kept (`aigw log`, `aigw report`); maintenance prunes.
    usage_log_retention_days: Annotated[int, msgspec.Meta(ge=1, le=36600)] = 90
    # One line per decided request on the "aigw.requests" logger (addon/requestlog.py).
    request_log: LogFormat = "json"  # type: ignore[assignment]
    # The rolling window of rpm_limit and tpm_limit, in whole seconds (short ones for tests).
    rate_window_s: Annotated[int, msgspec.Meta(ge=1, le=MAX_WINDOW_S)] = 60

    def __post_init__(self) -> None:
        # Readers compare and log plain strings, not FailureMode values.
        msgspec.structs.force_setattr(self, "default_failure_mode", str(self.default_failure_mode))


class ProviderSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`providers.NAME:`."""

    kind: Literal[tuple(ADAPTERS)]  # type: ignore[valid-type]
    hosts: HostList
    api_key_env: NonEmptyText | None = None
    # Credentials may go upstream without TLS (a server on a private network).
    plain_http: bool = False

    @classmethod
    def before_decode(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`hosts: api.example.com` is a list of one."""
        hosts = data.get("hosts")
        return {**data, "hosts": [hosts]} if isinstance(hosts, str) else data


class PriceSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`pricing.fallback:` and `pricing.models.NAME:`: USD per 1M tokens."""

    input_per_1m: UsdPer1M
    output_per_1m: UsdPer1M
    cached_input_per_1m: UsdPer1M | None = None  # absent: the input price
    cache_write_per_1m: UsdPer1M | None = None  # absent: 1.25x input
    cache_write_1h_per_1m: UsdPer1M | None = None  # absent: 2x input

    def price(self) -> Price:
        """The entry as the integer price the meter uses."""
        return Price.from_usd_per_1m(self.input_per_1m, self.output_per_1m,
                                     self.cached_input_per_1m, self.cache_write_per_1m,
                                     self.cache_write_1h_per_1m)


class PricingSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`pricing:`."""

    fallback: PriceSection | None = None  # absent: FALLBACK_PRICE_USD_PER_1M
    models: dict[str, PriceSection] = {}


class ConfigFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole of mitm.yaml."""

    store: StoreSection = StoreSection()
    policy: Policy = Policy()
    providers: dict[str, ProviderSection] = {}
    pricing: PricingSection = PricingSection()
    sync: Any = None  # store/cloudflare reads it, from the same file
    alerts: AlertsSection = AlertsSection()  # store/alerts.py reads it, from the same file


# --- what the request path reads ----------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str
    adapter: Adapter
    hosts: tuple[str, ...]  # exact names and `*.domain` wildcards, normalised
    api_key_env: str | None
    plain_http: bool = False  # credentials may go upstream without TLS (a private network)

    def matches(self, host: str) -> bool:
        """Whether a normalised host name is one of this provider's: the whole name matches."""
        for pattern in self.hosts:
            if pattern.startswith("*."):
                label, dot, rest = host.partition(".")
                if label and dot and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def default_credential(self) -> str | None:
        """The gateway host's own key for this provider (environment), if any."""
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


@dataclass(frozen=True)
class GatewayConfig:
    source: str
    store: StoreSettings
    policy: Policy
    providers: tuple[Provider, ...]
    pricing: PriceTable

    def provider_for(self, host: str) -> Provider | None:
        """The provider of a normalised host name (see `normalize_host`), if any."""
        for provider in self.providers:
            if provider.matches(host):
                return provider
        return None

    def allow_hosts(self) -> list[str]:
        """mitmproxy `allow_hosts` patterns (searched in `host:port`) for the providers."""
        return [allow_hosts_pattern(h) for p in self.providers for h in p.hosts]


def allow_hosts_pattern(host: str) -> str:
    """A host entry as a regex over mitmproxy's `host:port` (case is ignored by mitmproxy)."""
    if host.startswith("*."):
        return rf"^[^.:]+\.{re.escape(host[2:])}\.?:\d+$"
    return rf"^{re.escape(host)}\.?:\d+$"


def load_config(path: str | Path, store_override: str | None = None) -> GatewayConfig:
    """Read and validate mitm.yaml; raises ConfigError naming the file, key and reason."""
    source = str(path)
    data = load_yaml(path)
    file = decode_section(ConfigFile, data, source, "")
    # A file without `providers` or `pricing` gets the shipped ones: leaving them out must not
    # mean that no AI traffic is intercepted, or that every model costs the fallback price.
    missing = {"providers", "pricing"} - set(data)
    shipped = _shipped(path) if missing else None
    providers = shipped.providers if shipped and "providers" in missing else file.providers
    pricing = shipped.pricing if shipped and "pricing" in missing else file.pricing
    return GatewayConfig(
        source=source,
        store=file.store.settings(store_override),
        policy=file.policy,
        providers=tuple(_provider(name, entry) for name, entry in providers.items()),
        pricing=_price_table(pricing),
    )


def _shipped(path: str | Path) -> ConfigFile | None:
    if not SHIPPED_CONFIG.exists() or SHIPPED_CONFIG == Path(path).resolve():
        return None
    return decode_section(ConfigFile, load_yaml(SHIPPED_CONFIG), str(SHIPPED_CONFIG), "")


def _provider(name: str, entry: ProviderSection) -> Provider:
    return Provider(name=name, kind=entry.kind, adapter=ADAPTERS[entry.kind](),
                    hosts=tuple(str(host) for host in entry.hosts),
                    api_key_env=entry.api_key_env, plain_http=entry.plain_http)


def _price_table(pricing: PricingSection) -> PriceTable:
    fallback = pricing.fallback.price() if pricing.fallback is not None else \
        Price.from_usd_per_1m(FALLBACK_PRICE_USD_PER_1M, FALLBACK_PRICE_USD_PER_1M)
    return PriceTable({name: entry.price() for name, entry in pricing.models.items()}, fallback)
