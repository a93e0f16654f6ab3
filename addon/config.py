"""mitm.yaml, parsed and validated once (in the addon's `configure`) into typed settings."""

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addon.pricing import Price, PriceTable
from addon.providers import ADAPTERS, Adapter
from store.records import FAILURE_MODES, normalize_failure_mode
from store.settings import Section, StoreSettings, load_yaml, store_settings

UNKNOWN_CREDENTIALS = ("block", "passthrough")
FALLBACK_PRICE_USD_PER_1M = 1.0  # the Workers gateway's $0.001 per 1K tokens


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
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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
class Policy:
    unknown_credentials: str = "block"
    default_failure_mode: str = "fail_closed"
    default_max_output_tokens: int = 4096
    reservation_timeout_s: int = 3600
    flush_interval_s: float = 1.0
    fail_closed_retry_after_s: int = 30
    fallback_daily_limit_usd: float = 10.0
    max_staleness_s: float | None = None  # a replica older than this: quota data unavailable
    max_request_body_bytes: int = 32 * 1024 * 1024  # decoded size; larger bodies get 413


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
    root = Section(source, "", data)
    root.check_keys({"store", "policy", "providers", "pricing", "sync"})
    # A file without `providers` or `pricing` gets the shipped ones: leaving them out must not
    # mean that no AI traffic is intercepted, or that every model costs the fallback price.
    defaults = _shipped(path, {"providers", "pricing"} - set(data))
    return GatewayConfig(
        source=source,
        store=store_settings(data, source, store_override),
        policy=parse_policy(root.section("policy")),
        providers=parse_providers(_section(root, defaults, "providers")),
        pricing=parse_pricing(_section(root, defaults, "pricing")),
    )


SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "mitm.yaml"


def _shipped(path: str | Path, missing: set[str]) -> Section | None:
    if not missing or not SHIPPED_CONFIG.exists() or SHIPPED_CONFIG == Path(path).resolve():
        return None
    return Section(str(SHIPPED_CONFIG), "", load_yaml(SHIPPED_CONFIG))


def _section(root: Section, defaults: Section | None, name: str) -> Section:
    if name not in root.data and defaults is not None:
        return defaults.section(name)
    return root.section(name)


def parse_policy(section: Section) -> Policy:
    section.check_keys(set(Policy.__dataclass_fields__))
    defaults = Policy()
    try:
        failure_mode = normalize_failure_mode(
            section.data.get("default_failure_mode", defaults.default_failure_mode)
        )
    except ValueError:
        raise section.error(
            "default_failure_mode", f"must be one of {', '.join(FAILURE_MODES)}"
        ) from None
    return Policy(
        unknown_credentials=section.text(
            "unknown_credentials", defaults.unknown_credentials, UNKNOWN_CREDENTIALS
        ),
        default_failure_mode=failure_mode,
        default_max_output_tokens=section.integer(
            "default_max_output_tokens", defaults.default_max_output_tokens, minimum=1
        ),
        reservation_timeout_s=section.integer(
            "reservation_timeout_s", defaults.reservation_timeout_s, minimum=1
        ),
        flush_interval_s=section.number("flush_interval_s", defaults.flush_interval_s,
                                        minimum=0.05),
        fail_closed_retry_after_s=section.integer(
            "fail_closed_retry_after_s", defaults.fail_closed_retry_after_s, minimum=1
        ),
        fallback_daily_limit_usd=section.number(
            "fallback_daily_limit_usd", defaults.fallback_daily_limit_usd
        ),
        max_staleness_s=(
            None if section.data.get("max_staleness_s") is None
            else section.number("max_staleness_s", minimum=1)
        ),
        max_request_body_bytes=section.integer(
            "max_request_body_bytes", defaults.max_request_body_bytes, minimum=1
        ),
    )


def parse_providers(section: Section) -> tuple[Provider, ...]:
    providers = []
    for name in section.data:
        entry = section.section(str(name))
        entry.check_keys({"kind", "hosts", "api_key_env", "plain_http"})
        kind = entry.text("kind", None, tuple(ADAPTERS))
        hosts = entry.data.get("hosts")
        if isinstance(hosts, str):
            hosts = [hosts]
        if not isinstance(hosts, list) or not hosts:
            raise entry.error("hosts", "must be a non-empty list of host names")
        plain_http = entry.data.get("plain_http", False)
        if not isinstance(plain_http, bool):
            raise entry.error("plain_http", f"must be true or false, not {plain_http!r}")
        providers.append(
            Provider(
                name=str(name),
                kind=kind,
                adapter=ADAPTERS[kind](),
                hosts=tuple(_host_entry(entry, i, host) for i, host in enumerate(hosts)),
                api_key_env=entry.optional_text("api_key_env"),
                plain_http=plain_http,
            )
        )
    return tuple(providers)


def _host_entry(entry: Section, index: int, value: Any) -> str:
    """One `hosts` entry: an exact host name (or IP address), or `*.domain`."""
    host = normalize_host(value) if isinstance(value, str) else ""
    # A wildcard stands for one label of a domain that is not a top-level one (`*.com`: no).
    if host and (is_ip_address(host) or _HOST_NAME.fullmatch(host)
                 and not (host.startswith("*.") and "." not in host[2:])):
        return host
    raise entry.error(
        f"hosts[{index}]",
        f"must be a host name such as api.example.com, or *.example.com for one label of "
        f"that domain (not a regular expression), not {value!r}",
    )


def _price(section: Section) -> Price:
    section.check_keys(
        {"input_per_1m", "output_per_1m", "cached_input_per_1m", "cache_write_per_1m",
         "cache_write_1h_per_1m"}
    )

    def optional(name: str) -> float | None:
        return None if section.data.get(name) is None else section.number(name)

    return Price.from_usd_per_1m(
        section.number("input_per_1m"),
        section.number("output_per_1m"),
        optional("cached_input_per_1m"),
        optional("cache_write_per_1m"),
        optional("cache_write_1h_per_1m"),
    )


def parse_pricing(section: Section) -> PriceTable:
    section.check_keys({"fallback", "models"})
    if section.data.get("fallback") is None:
        fallback = Price.from_usd_per_1m(FALLBACK_PRICE_USD_PER_1M, FALLBACK_PRICE_USD_PER_1M)
    else:
        fallback = _price(section.section("fallback"))
    models_section = section.section("models")
    models: dict[str, Any] = {
        str(name): _price(models_section.section(str(name))) for name in models_section.data
    }
    return PriceTable(models, fallback)
