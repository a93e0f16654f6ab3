"""Reading mitm.yaml: the file is parsed once; each layer declares its own section as a typed
msgspec `Struct` and decodes it with `decode_section`.

Every error names the file, the key and the reason, e.g.
`mitm.yaml: pricing.models.gpt-4o.input_per_1m: must be a finite number from 0 to 1000000, not 'x'`.
"""

import os
import re
import reprlib
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import msgspec
import yaml

from store.hashing import HASH_ALGORITHMS
from store.records import KEY_LAYOUTS

DEFAULT_CONFIG = "mitm.yaml"
# The mitm.yaml shipped with aigw: a file without `providers` or `pricing` gets its sections.
SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "mitm.yaml"
DEFAULT_STORE_PATH = "./var/store"

NonEmptyText = Annotated[str, msgspec.Meta(min_length=1)]


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
    except UnicodeDecodeError:
        raise ConfigError(source, "", "cannot read: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "", f"not valid YAML: {exc}") from exc
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(source, "", "not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(source, "", "the top level must be a mapping")
    return data


# --- typed sections -----------------------------------------------------------------------


class ConfigText(str):
    """A string field with a rule of its own (a host pattern, a failure mode): subclasses
    override `parse`, which returns the normalised value or raises ValueError("must be ..."),
    and `EXPECTED`, what it takes in words."""

    EXPECTED: ClassVar[str] = "a string"

    @classmethod
    def parse(cls, value: Any) -> "ConfigText":
        """The value as this type; ValueError naming what it must be otherwise."""
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {show(value)}")
        return cls(value)


def decode_section[T](cls: type[T], data: Any, source: str, key: str) -> T:
    """`data` (a mapping from the YAML file, at `key`) as the Struct `cls`; ConfigError naming
    the file, the full key path and the reason otherwise.

    A null section is an empty one (every field its default). Struct fields are decoded by
    this function too, and so are the values of `dict[str, Struct]` fields (named by their
    key: `providers.openai.hosts[0]`); the rest is msgspec's strict conversion (no string for
    a number, no 0 for a boolean) with the bounds of each field's `msgspec.Meta`. A Struct may
    define a `before_decode(data) -> data` classmethod to accept a shorthand spelling."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, key, f"must be a mapping, not {show(data)}")
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    for name in data:
        if not isinstance(name, str) or name not in fields:
            raise ConfigError(source, _join(key, str(name)),
                              f"unknown key (expected one of {sorted(fields)})")
    before = getattr(cls, "before_decode", None)
    values = dict(before(data) if before is not None else data)
    for name, value in values.items():
        values[name] = _decode_nested(fields[name].type, value, source, _join(key, name))
    try:
        return msgspec.convert(values, cls, strict=True, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _config_error(fields, values, str(exc), source, key) from None
    except RecursionError:  # a self-referencing YAML anchor where a list is expected
        raise ConfigError(source, key, "nested too deeply") from None


def _decode_nested(tp: Any, value: Any, source: str, key: str) -> Any:
    """A Struct, or a mapping of Structs, decoded with key paths; other values as they are."""
    base, optional = _unwrap(tp)
    if value is None and optional:
        return None
    if isinstance(base, type) and issubclass(base, msgspec.Struct):
        return decode_section(base, value, source, key)
    if get_origin(base) is dict:
        entry = get_args(base)[1]
        if not (isinstance(entry, type) and issubclass(entry, msgspec.Struct)):
            return value
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"must be a mapping, not {show(value)}")
        decoded: dict[str, Any] = {}
        for name, item in value.items():
            # YAML reads `1.5:` or `null:` as a number or null: the name is the text.
            text = str(name)
            if text in decoded:
                raise ConfigError(source, _join(key, text), "named twice")
            decoded[text] = decode_section(entry, item, source, _join(key, text))
        return decoded
    return value


def _dec_hook(tp: type, value: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, ConfigText):
        return tp.parse(value)
    raise NotImplementedError(f"no decoder for {tp!r}")


_AT = re.compile(r"^(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`$")
_PATH = re.compile(r"^\.(?P<name>[^.\[]+)(?P<rest>(?:\[\d+\])*)")


def _config_error(fields: dict[str, Any], values: dict[str, Any], message: str, source: str,
                  key: str) -> ConfigError:
    """A msgspec ValidationError of one flat section as a ConfigError in our words."""
    at = _AT.match(message)
    text, path = (at["text"], at["path"] or "") if at else (message, "")
    if (missing := _MISSING.match(text)) is not None:
        name = missing["field"]
        expected = _expected(fields[name].type) if name in fields else "given"
        return ConfigError(source, _join(key, name), f"required: must be {expected}")
    step = _PATH.match(path)
    if step is None or step["name"] not in fields:
        return ConfigError(source, key, _plain(text))
    name, rest = step["name"], step["rest"]
    where = _join(key, name + rest)
    if text.startswith("must be"):  # a ConfigText's own reason, with the value in it
        return ConfigError(source, where, text)
    tp, value = fields[name].type, values.get(name)
    for index in re.findall(r"\[(\d+)\]", rest):
        tp = _element(tp)
        value = value[int(index)] if isinstance(value, list | tuple) else None
    return ConfigError(source, where, f"must be {_expected(tp)}, not {show(value)}")


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """The type without Annotated and None, and whether None was allowed."""
    if get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        optional = len(args) < len(get_args(tp))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional  # noqa: UP007
    return tp, False


def _element(tp: Any) -> Any:
    base, _ = _unwrap(tp)
    args = get_args(base)
    return args[0] if args else Any


def _expected(tp: Any) -> str:
    """What a field's type accepts, in words: `an integer from 1 to 100`."""
    if get_origin(tp) is Annotated:
        inner, *extra = get_args(tp)
        metas = [m for m in extra if isinstance(m, msgspec.Meta)]
        described = next((m.description for m in metas if m.description), None)
        return described or _expected_base(inner, metas)
    return _expected_base(tp, [])


def _expected_base(base: Any, metas: list[msgspec.Meta]) -> str:
    if get_origin(base) in (Union, types.UnionType):
        args = [a for a in get_args(base) if a is not type(None)]
        text = " or ".join(_expected(a) for a in args)
        return f"{text}, or null" if len(args) < len(get_args(base)) else text
    low = next((m.ge for m in metas if m.ge is not None), None)
    high = next((m.le for m in metas if m.le is not None), None)
    span = f" from {_number(low)} to {_number(high)}" if low is not None and high is not None \
        else f" >= {_number(low)}" if low is not None else ""
    if base is bool:
        return "true or false"
    if base is int:
        return f"an integer{span}"
    if base is float:
        return f"a finite number{span}"
    if base is str:
        return "a non-empty string" if any(m.min_length for m in metas) else "a string"
    if get_origin(base) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(base))
    if isinstance(base, type) and issubclass(base, ConfigText):
        return base.EXPECTED
    if get_origin(base) in (list, tuple):
        return "a list"
    return "a mapping"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _plain(text: str) -> str:
    return text[:1].lower() + text[1:] if text else "invalid value"


_REPR = reprlib.Repr(maxlevel=3, maxdict=4, maxlist=4, maxstring=50, maxlong=40, maxother=50)


def show(value: Any) -> str:
    """A value for a message: its repr, cut when long (a value can be a whole YAML tree)."""
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- the `store:` section -----------------------------------------------------------------


class StoreSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`store:` of mitm.yaml."""

    path: NonEmptyText = DEFAULT_STORE_PATH
    hash: Literal[HASH_ALGORITHMS] = "blake3"  # type: ignore[valid-type]
    # Where `aigw key create` writes a key: the first Workers layout (`apikey:{hash}`) or the
    # later one (`vkey:{hash}:config`); absent: the later one if the records hold any of it.
    key_layout: Literal[KEY_LAYOUTS] | None = None  # type: ignore[valid-type]

    def settings(self, override_path: str | None = None) -> "StoreSettings":
        """The settings the store opens with; a relative path is from the working directory."""
        return StoreSettings(Path(os.path.expanduser(override_path or self.path)), self.hash,
                             self.key_layout)


@dataclass(frozen=True)
class StoreSettings:
    path: Path
    hash_algorithm: str
    key_layout: str | None = None  # None: as the records show (store.admin_accounts)


def store_settings(config: dict[str, Any], source: str, override_path: str | None) -> StoreSettings:
    """The `store:` section; a relative path is taken from the working directory."""
    return decode_section(StoreSection, config.get("store"), source, "store").settings(
        override_path)


# --- the names of the `providers:` section ------------------------------------------------


def provider_names(config: dict[str, Any], source: str) -> frozenset[str]:
    """The names an org's `provider_keys` may use, as the request path looks them up: each
    provider's name and its kind, from `providers:` (the shipped mitm.yaml's when the file has
    no such section, as the gateway reads it). Only the names are read here: the addon checks
    the whole section when the gateway starts."""
    if "providers" not in config:
        if not SHIPPED_CONFIG.exists():
            return frozenset()
        config, source = load_yaml(SHIPPED_CONFIG), str(SHIPPED_CONFIG)
    providers = config.get("providers")
    if providers is None:
        return frozenset()
    if not isinstance(providers, dict):
        raise ConfigError(source, "providers", f"must be a mapping, not {show(providers)}")
    names = set()
    for name, entry in providers.items():
        names.add(str(name))  # YAML reads `1.5:` as a number: the name is the text
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if isinstance(kind, str):
            names.add(kind)
    return frozenset(names)
