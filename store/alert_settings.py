"""`alerts:` of mitm.yaml: where budget alerts go and at which fractions of a monthly limit,
declared once as a msgspec Struct and decoded like the rest of the file. Without a
`webhook_url` there are no alerts."""

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

import msgspec

from store.settings import ConfigText, decode_section

DEFAULT_THRESHOLDS = (0.8, 1.0)
MAX_THRESHOLD = 10.0  # 1000% of a limit: far beyond any real alert, a bound on nonsense


class WebhookUrl(ConfigText):
    """An http:// or https:// URL with a host. Never echoed in a message: a webhook URL often
    holds its own secret (Slack's, Teams')."""

    EXPECTED: ClassVar[str] = "an http:// or https:// URL"

    @classmethod
    def parse(cls, value: Any) -> ConfigText:
        """The URL as given; ValueError naming what it must be otherwise."""
        if isinstance(value, str) and not any(c.isspace() for c in value):
            try:
                parts = urlsplit(value)
            except ValueError:
                parts = None
            if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
                return cls(value)
        what = "this string (not shown: it may hold a secret)" if isinstance(value, str) \
            else f"a value of type {type(value).__name__}"
        raise ValueError(f"must be {cls.EXPECTED}, not {what}")


Threshold = Annotated[float, msgspec.Meta(
    gt=0, le=MAX_THRESHOLD,
    description="a fraction of the limit above 0 and at most 10 (0.8: 80%)")]


class AlertsSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`alerts:` of mitm.yaml."""

    webhook_url: WebhookUrl | None = None  # None: no alerts
    thresholds: Annotated[list[Threshold], msgspec.Meta(
        min_length=1, max_length=20,
        description="a list of 1 to 20 fractions of the limit, each above 0 and at most 10",
    )] = msgspec.field(default_factory=lambda: list(DEFAULT_THRESHOLDS))
    timeout_s: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 5.0  # one POST, connect to end
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3  # per alert and run

    @classmethod
    def before_decode(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`thresholds: 0.9` is a list of one."""
        value = data.get("thresholds")
        single = isinstance(value, int | float) and not isinstance(value, bool)
        return {**data, "thresholds": [value]} if single else data


@dataclass(frozen=True)
class AlertSettings:
    """What the sender needs: the URL (never in a repr), the sorted thresholds, the bounds."""

    webhook_url: str = field(repr=False)
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    timeout_s: float = 5.0
    max_attempts: int = 3
    backoff_s: float = 1.0  # the first wait between attempts; each next one doubles
    max_backoff_s: float = 10.0
    run_budget_s: float = 60.0  # one run sends no new alert after this long

    @property
    def destination(self) -> str:
        """The webhook's scheme and host, for log lines (the path may hold a secret)."""
        parts = urlsplit(self.webhook_url)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def load_alert_settings(config: dict, source: str) -> AlertSettings | None:
    """The `alerts:` section of a parsed mitm.yaml; None when no webhook is configured.
    ConfigError naming the file, the key and the reason otherwise."""
    section = decode_section(AlertsSection, config.get("alerts"), source, "alerts")
    if section.webhook_url is None:
        return None
    return AlertSettings(
        webhook_url=str(section.webhook_url),
        thresholds=tuple(sorted(set(section.thresholds))),
        timeout_s=section.timeout_s,
        max_attempts=section.max_attempts,
    )
