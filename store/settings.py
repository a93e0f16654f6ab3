"""Reading mitm.yaml: the file is parsed once; each layer validates its own section.

Every error names the file, the key and the reason, e.g.
`mitm.yaml: pricing.models.gpt-4o.input_per_1m: must be a non-negative number, not 'x'`.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from store.hashing import HASH_ALGORITHMS

DEFAULT_CONFIG = "mitm.yaml"
DEFAULT_STORE_PATH = "./var/store"


class ConfigError(ValueError):
    """mitm.yaml (or an option) is invalid; the message names the file, key and reason."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")
        self.source, self.key, self.reason = source, key, reason


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError if unreadable or not a mapping."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", "the top level must be a mapping")
    return data


class Section:
    """A mapping inside the config, with typed getters that raise ConfigError naming the key."""

    def __init__(self, source: str, prefix: str, data: Any) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, prefix, "must be a mapping")
        self.source, self.prefix, self.data = source, prefix, data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def section(self, name: str) -> "Section":
        return Section(self.source, self.key(name), self.data.get(name))

    def check_keys(self, allowed: set[str]) -> None:
        for name in self.data:
            if name not in allowed:
                raise self.error(str(name), f"unknown key (expected one of {sorted(allowed)})")

    def text(self, name: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.data.get(name, default)
        if not isinstance(value, str) or not value:
            raise self.error(name, f"must be a non-empty string, not {value!r}")
        if choices and value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def optional_text(self, name: str) -> str | None:
        if self.data.get(name) is None:
            return None
        return self.text(name)

    def number(self, name: str, default: float | None = None, *, minimum: float = 0) -> float:
        value = self.data.get(name, default)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not math.isfinite(value) or value < minimum):
            raise self.error(name, f"must be a finite number >= {minimum:g}, not {value!r}")
        return float(value)

    def integer(self, name: str, default: int | None = None, *, minimum: int = 0) -> int:
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(name, f"must be an integer >= {minimum}, not {value!r}")
        return value


@dataclass(frozen=True)
class StoreSettings:
    path: Path
    hash_algorithm: str


def store_settings(config: dict[str, Any], source: str, override_path: str | None) -> StoreSettings:
    """The `store:` section; a relative path is taken from the working directory."""
    section = Section(source, "store", config.get("store"))
    section.check_keys({"path", "hash"})
    path = override_path or section.text("path", DEFAULT_STORE_PATH)
    algorithm = section.text("hash", "blake3", HASH_ALGORITHMS)
    return StoreSettings(Path(os.path.expanduser(path)), algorithm)
