"""`aigw report`: a month's spend, requests and tokens grouped, as JSON, CSV, a table or a
self-contained HTML page with charts."""

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from store.cli.log import on_store_text, write_lines
from store.cli.output import emit
from store.cli.runner import late_globals, on_store
from store.db import Store
from store.money import month_of, utc_now
from store.report import GROUPS, REPORT_FORMATS, month_report, parse_month, report_text


class Month(click.ParamType):
    """A UTC month, `YYYY-MM`."""

    name = "YYYY-MM"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        try:
            return parse_month(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


MONTH = Month()


def _write_file(path: Path, content: str) -> None:
    """Write `content` to `path` whole or not at all (a temporary file renamed over it)."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@click.command("report", short_help="A month's spend, requests and tokens, grouped.",
               help="A month's spend, requests and tokens (from the usage records kept), "
               "grouped by org, user, key, model, provider or UTC day, with each org's and "
               "user's budget use. --format html writes one self-contained page with charts "
               "(daily spend, spend by model, budget use against the limits); with --output "
               "the report goes to FILE and stdout gets one JSON object saying where.")
@click.option("--month", type=MONTH, metavar="YYYY-MM",
              help="the UTC month (default: the current one)")
@click.option("--by", type=click.Choice(GROUPS), default="model", show_default=True,
              help="what to group by")
@click.option("--format", "fmt", type=click.Choice(REPORT_FORMATS), default="json",
              show_default=True, help="json, csv, table or html")
@click.option("--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              metavar="FILE", help="write the report to FILE instead of stdout")
@late_globals()
@click.pass_context
def report(ctx: click.Context, month: str | None, by: str, fmt: str,
           output: Path | None) -> int:
    """Report a month's usage."""
    month = month or month_of(utc_now())
    if fmt == "json" and output is None:
        return on_store(ctx, lambda store: month_report(store, month, by))

    def produce(store: Store) -> int:
        if fmt == "json":
            content = json.dumps(month_report(store, month, by), indent=2) + "\n"
        else:
            content = report_text(store, month, by, fmt)
        if output is None:
            return write_lines([content])
        _write_file(output, content)
        return emit({"month": month, "by": by, "format": fmt, "output": str(output),
                     "bytes": len(content.encode())})

    return on_store_text(ctx, produce)
