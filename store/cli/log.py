"""`aigw log`: the per-request usage records, streamed as JSON lines or CSV; and how a command
that prints text (not one JSON object) runs on the local store."""

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from store.cli.output import EXIT_ERROR, EXIT_OK, fail
from store.cli.runner import globals_of, late_globals, local_only, settings_from
from store.db import Store, StoreError
from store.records import RecordError
from store.report import LOG_FORMATS, LogFilter, log_lines, parse_time
from store.settings import ConfigError


class IsoTime(click.ParamType):
    """An ISO 8601 date or time (no zone: UTC), as epoch seconds."""

    name = "ISO"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_time(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


ISO_TIME = IsoTime()


def write_lines(lines: Iterable[str]) -> int:
    """Write `lines` to stdout as they come; the exit status (1 if stdout closed early)."""
    out = sys.stdout
    try:
        for line in lines:
            out.write(line)
        out.flush()
    except BrokenPipeError:  # `aigw log | head`: stop quietly, as `emit` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    return EXIT_OK


def on_store_text(ctx: click.Context, produce: Callable[[Store], int]) -> int:
    """Open the existing local store and let `produce` write its text output (it returns the
    exit status). No store at the path is the one error line, as for every reading command;
    the store is never created."""
    try:
        settings = settings_from(globals_of(ctx))
    except ConfigError as exc:
        return fail(exc)
    local_only(ctx)
    if not Store.exists(settings.path):
        return fail(f"no store at {settings.path} (check --store or store.path; `aigw org "
                    f"create`, `aigw import` or scripts/run creates one)")
    try:
        with Store(settings.path, hash_algorithm=settings.hash_algorithm, create=False) as store:
            return produce(store)
    except (StoreError, RecordError, OSError) as exc:
        return fail(exc)
    except Exception as exc:  # one line for the operator, whatever went wrong
        return fail(f"internal error: {type(exc).__name__}: {exc}")


@click.command("log", short_help="The per-request usage records, streamed.",
               help="The per-request usage records (metered and fail-open grace requests) kept "
               "for policy.usage_log_retention_days, in the order they were settled: one JSON "
               "object a line, or CSV with a header. Times are the requests' start, ISO 8601 "
               "UTC; --since is inclusive, --until exclusive; a time without a zone is UTC.")
@click.option("--since", type=ISO_TIME, metavar="ISO", help="from this time (inclusive)")
@click.option("--until", type=ISO_TIME, metavar="ISO", help="up to this time (exclusive)")
@click.option("--org", "org_id", metavar="ID", help="only this org's requests")
@click.option("--user", "user_id", metavar="ID", help="only this user's requests")
@click.option("--key", "key_id", metavar="ID", help="only this key's requests")
@click.option("--model", metavar="M", help="only requests for this model")
@click.option("--format", "fmt", type=click.Choice(LOG_FORMATS), default="jsonl",
              show_default=True, help="JSON lines or CSV")
@late_globals()
@click.pass_context
def log(ctx: click.Context, since: float | None, until: float | None, org_id: str | None,
        user_id: str | None, key_id: str | None, model: str | None, fmt: str) -> int:
    """Stream the usage records that match."""
    where = LogFilter(since, until, org_id, user_id, key_id, model)
    return on_store_text(ctx, lambda store: write_lines(log_lines(store, where, fmt)))
