"""What a node needs to reach its Workers KV namespace, and how its sync behaves: credentials as
wrangler users have them (CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID,
CLOUDFLARE_KV_NAMESPACE_ID), else `sync.cloudflare` in mitm.yaml; the rest from `sync:`, declared
once as typed sections (msgspec Structs) and decoded like the rest of mitm.yaml."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

import msgspec

from store.settings import ConfigError, ConfigText, NonEmptyText, decode_section, show

DEFAULT_API_BASE = "https://api.cloudflare.com/client/v4"
MAX_SECONDS = 366 * 24 * 3600  # a year: far beyond any real interval, a wait the OS accepts


@dataclass(frozen=True)
class CloudflareSettings:
    """One KV namespace and the token that reads and writes it (never shown in a repr)."""

    account_id: str
    namespace_id: str
    api_token: str = field(repr=False)
    api_base: str = DEFAULT_API_BASE


@dataclass(frozen=True)
class SyncSettings:
    """The sync's pace, its request budget and its retry policy."""

    interval_s: float = 30.0
    full_interval_s: float = 3600.0  # re-fetch records without a stamp this often
    request_budget: int = 600  # requests per budget window: half of Cloudflare's limit
    budget_window_s: float = 300.0
    node_id: str | None = None
    push_usage: bool = True
    max_attempts: int = 6
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0
    # A sync pass waits as long as Cloudflare asks and for its own budget; `aigw serve` answers
    # people, so it gives up sooner (store.api: ADMIN_KV_POLICY).
    max_retry_after_s: float = 600.0
    wait_for_budget: bool = True


class NodeId(ConfigText):
    """A node's name in its usage keys (`aigw:usage:{node}:{month}:...`): no ':' in it."""

    EXPECTED: ClassVar[str] = "a non-empty name without ':'"

    @classmethod
    def parse(cls, value: Any) -> ConfigText:
        """The name; ValueError for anything but a non-empty string without ':'."""
        if not isinstance(value, str) or not value or ":" in value:
            raise ValueError(f"must be {cls.EXPECTED}, not {show(value)}")
        return cls(value)


class CloudflareSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`sync.cloudflare:` (each value is taken only where its environment variable is unset)."""

    account_id: NonEmptyText | None = None
    namespace_id: NonEmptyText | None = None
    api_token_file: NonEmptyText | None = None
    api_base: NonEmptyText | None = None


class SyncSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`sync:` of mitm.yaml."""

    cloudflare: CloudflareSection = CloudflareSection()
    node_id: NodeId | None = None  # None: the random id created once with the store
    interval_s: Annotated[float, msgspec.Meta(ge=1, le=MAX_SECONDS)] = 30.0
    full_interval_s: Annotated[float, msgspec.Meta(ge=1, le=MAX_SECONDS)] = 3600.0
    request_budget: Annotated[int, msgspec.Meta(ge=10, le=1_000_000)] = 600
    push_usage: bool = True
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 6
    timeout_s: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0


def load_sync_settings(config: dict, source: str, api_base: str | None = None,
                       environ: dict | None = None) -> tuple[CloudflareSettings, SyncSettings]:
    """Credentials as wrangler users have them (CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID,
    CLOUDFLARE_KV_NAMESPACE_ID), else `sync.cloudflare` in mitm.yaml; the rest from `sync:`.
    ConfigError naming the file, the key and the reason otherwise."""
    env = os.environ if environ is None else environ
    section = decode_section(SyncSection, config.get("sync"), source, "sync")
    cf = section.cloudflare
    token = env.get("CLOUDFLARE_API_TOKEN")
    if not token and cf.api_token_file:
        path = Path(os.path.expanduser(cf.api_token_file))
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(source, "sync.cloudflare.api_token_file",
                              f"cannot read {path}: {exc.strerror}") from None
    account = env.get("CLOUDFLARE_ACCOUNT_ID") or cf.account_id
    namespace = env.get("CLOUDFLARE_KV_NAMESPACE_ID") or cf.namespace_id
    missing = [name for name, value in (("CLOUDFLARE_API_TOKEN (or sync.cloudflare."
                                         "api_token_file)", token),
                                        ("CLOUDFLARE_ACCOUNT_ID (or sync.cloudflare.account_id)",
                                         account),
                                        ("CLOUDFLARE_KV_NAMESPACE_ID (or sync.cloudflare."
                                         "namespace_id)", namespace)) if not value]
    if missing:
        raise ConfigError(source, "sync.cloudflare", "missing " + ", ".join(missing))
    base = api_base or cf.api_base or DEFAULT_API_BASE
    return (
        CloudflareSettings(str(account), str(namespace), str(token), str(base).rstrip("/")),
        SyncSettings(
            interval_s=section.interval_s,
            full_interval_s=section.full_interval_s,
            request_budget=section.request_budget,
            node_id=None if section.node_id is None else str(section.node_id),
            push_usage=section.push_usage,
            max_attempts=section.max_attempts,
            timeout_s=section.timeout_s,
        ),
    )
