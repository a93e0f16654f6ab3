"""The value types of aigw's options, checked before anything runs (a bad one is exit 2)."""

import re
from typing import Any

import click

from store.admin import AdminError, check_grace_s, check_usd
from store.records import FAILURE_MODES, MAX_COUNT

FAILURE_MODE_CHOICES = (*FAILURE_MODES, *(m.replace("_", "-") for m in FAILURE_MODES))
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Usd(click.ParamType):
    """A non-negative finite amount of USD."""

    name = "USD"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            return check_usd(value)
        except AdminError:
            self.fail(f"must be a non-negative number of USD, not {value!r}", param, ctx)


class GraceSeconds(click.ParamType):
    """A rotation's grace period: seconds, from 0 to 30 days."""

    name = "S"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            return check_grace_s(value)
        except AdminError as exc:
            self.fail(str(exc).removeprefix("grace_s "), param, ctx)


class FailureMode(click.ParamType):
    """fail_open or fail_closed, also spelt with a hyphen, in any case."""

    name = "fail_open|fail_closed"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text not in FAILURE_MODE_CHOICES:
            self.fail(f"must be fail_open or fail_closed (or fail-open, fail-closed), not "
                      f"{value!r}", param, ctx)
        return text


class ModelList(click.ParamType):
    """Comma-separated model names; empty allows any model."""

    name = "MODEL,..."

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value
        return [name.strip() for name in str(value).split(",") if name.strip()]


class ProviderKey(click.ParamType):
    """`NAME=env:VAR` (a variable on the gateway hosts) or `NAME=` (remove it), as
    `(NAME, "env:VAR" or None)`. The errors never repeat the text: it may be a key typed in the
    wrong place."""

    name = "NAME=env:VAR"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, str | None]:
        if isinstance(value, tuple):
            return value
        name, sep, ref = str(value).partition("=")
        name, ref = name.strip(), ref.strip()
        if not sep or not name or not _ENV_VAR.fullmatch(name.replace("-", "_")):
            self.fail("must be NAME=env:VAR (or NAME= to remove it)", param, ctx)
        if not ref:
            return name, None
        variable = ref[4:].strip() if ref.startswith("env:") else ""
        if not _ENV_VAR.fullmatch(variable):
            # A literal key on the command line would sit in shell history and the process list.
            self.fail(f"{name}: give env:VAR, VAR a variable name on the gateway hosts; a "
                      "literal key goes in with `aigw import`, never on the command line",
                      param, ctx)
        return name, f"env:{variable}"


class RateLimit(click.ParamType):
    """A whole number of at least 1, or "" to remove the limit (then 0: see `rate_limits`)."""

    name = "N"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = str(value).strip()
        if not text:
            return 0
        if not text.isdigit() or int(text) < 1 or int(text) > MAX_COUNT:
            self.fail(f"must be a whole number of at least 1 (or \"\" to remove it), not "
                      f"{value!r}", param, ctx)
        return int(text)


def rate_limits(rpm: int | None, tpm: int | None, max_parallel: int | None
                ) -> dict[str, int | None]:
    """The rate-limit flags given, as the admin operations take them (None: remove)."""
    given = {"rpm_limit": rpm, "tpm_limit": tpm, "max_parallel_requests": max_parallel}
    return {name: value or None for name, value in given.items() if value is not None}


def rate_options(command: Any) -> Any:
    """--rpm, --tpm and --max-parallel."""
    for flag, what in reversed((
            ("--rpm", "requests admitted per rolling minute (policy.rate_window_s)"),
            ("--tpm", "tokens (input + output) per rolling minute"),
            ("--max-parallel", "requests in flight at once (streams until they end)"))):
        command = click.option(flag, type=RATE_LIMIT, metavar="N",
                               help=f'{what}; "" removes the limit')(command)
    return command


USD = Usd()
GRACE_SECONDS = GraceSeconds()
RATE_LIMIT = RateLimit()
FAILURE_MODE = FailureMode()
MODEL_LIST = ModelList()
PROVIDER_KEY = ProviderKey()
