"""What a node needs to reach its Workers KV namespace, and how its sync behaves: credentials as
wrangler users have them (CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID,
CLOUDFLARE_KV_NAMESPACE_ID), else `sync.cloudflare` in mitm.yaml; the rest from `sync:`."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from store.settings import ConfigError, Section

DEFAULT_API_BASE = "https://api.cloudflare.com/client/v4"


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


def load_sync_settings(config: dict, source: str, api_base: str | None = None,
                       environ: dict | None = None) -> tuple[CloudflareSettings, SyncSettings]:
    """Credentials as wrangler users have them (CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID,
    CLOUDFLARE_KV_NAMESPACE_ID), else `sync.cloudflare` in mitm.yaml; the rest from `sync:`."""
    env = os.environ if environ is None else environ
    section = Section(source, "sync", config.get("sync"))
    section.check_keys({"cloudflare", "node_id", "interval_s", "full_interval_s",
                        "request_budget", "push_usage", "max_attempts", "timeout_s"})
    cf = section.section("cloudflare")
    cf.check_keys({"account_id", "namespace_id", "api_token_file", "api_base"})
    token = env.get("CLOUDFLARE_API_TOKEN")
    if not token and cf.data.get("api_token_file"):
        path = Path(os.path.expanduser(cf.text("api_token_file")))
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise cf.error("api_token_file", f"cannot read {path}: {exc.strerror}") from None
    account = env.get("CLOUDFLARE_ACCOUNT_ID") or cf.optional_text("account_id")
    namespace = env.get("CLOUDFLARE_KV_NAMESPACE_ID") or cf.optional_text("namespace_id")
    missing = [name for name, value in (("CLOUDFLARE_API_TOKEN (or sync.cloudflare."
                                         "api_token_file)", token),
                                        ("CLOUDFLARE_ACCOUNT_ID (or sync.cloudflare.account_id)",
                                         account),
                                        ("CLOUDFLARE_KV_NAMESPACE_ID (or sync.cloudflare."
                                         "namespace_id)", namespace)) if not value]
    if missing:
        raise ConfigError(source, "sync.cloudflare", "missing " + ", ".join(missing))
    base = api_base or cf.data.get("api_base") or DEFAULT_API_BASE
    defaults = SyncSettings()
    push = section.data.get("push_usage", True)
    if not isinstance(push, bool):
        raise section.error("push_usage", f"must be true or false, not {push!r}")
    return (
        CloudflareSettings(str(account), str(namespace), str(token), str(base).rstrip("/")),
        SyncSettings(
            interval_s=section.number("interval_s", defaults.interval_s, minimum=1),
            full_interval_s=section.number("full_interval_s", defaults.full_interval_s,
                                           minimum=1),
            request_budget=section.integer("request_budget", defaults.request_budget, minimum=10),
            node_id=_node_id(section),
            push_usage=push,
            max_attempts=section.integer("max_attempts", defaults.max_attempts, minimum=1),
            timeout_s=section.number("timeout_s", defaults.timeout_s, minimum=1),
        ),
    )


def _node_id(section: Section) -> str | None:
    node = section.optional_text("node_id")
    if node is not None and ":" in node:  # usage keys are aigw:usage:{node}:{month}:...
        raise section.error("node_id", f"must not contain ':', not {node!r}")
    return node
