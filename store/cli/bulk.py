"""`aigw import` and `aigw export`: records as wrangler bulk JSON
(`[{"key": ..., "value": "<json string>"}, ...]`)."""

import json
import sys
from pathlib import Path

import click

from store import admin
from store.cli.output import PROG
from store.cli.runner import late_globals, on_store
from store.db import Store

IMPORT_HELP = (
    "Import a wrangler bulk JSON file ([{\"key\": ..., \"value\": ...}, ...]): every item is "
    "validated first, then all are written in one transaction, or none."
)
EXPORT_HELP = (
    "Print every record as a wrangler bulk JSON array (the one command whose output is an "
    "array, not an object): `aigw import` and `wrangler kv bulk put` accept it. Literal provider "
    "keys read <redacted> (env:VAR references stay) unless --include-secrets; stderr says how "
    "many, and `aigw import` refuses a record with one."
)


def read_bulk(file: str) -> list:
    """The parsed bulk JSON of `file` (`-`: stdin); AdminError naming the file otherwise."""
    name = "stdin" if file == "-" else file
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise admin.AdminError(f"{name}: cannot read: {reason}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise admin.AdminError(f"{name}: not valid JSON: {exc}") from None
    except RecursionError:
        raise admin.AdminError(f"{name}: not valid JSON: nested too deeply") from None


def _import(store: Store, file: str) -> dict:
    items = read_bulk(file)
    try:
        return admin.import_bulk(store, items)
    except admin.AdminError as exc:
        raise admin.AdminError(f"{'stdin' if file == '-' else file}: {exc}") from None


@click.command("import", help=IMPORT_HELP, short_help="Import a wrangler bulk JSON file.")
@click.argument("file", metavar="FILE")
@late_globals()
@click.pass_context
def import_(ctx: click.Context, file: str) -> int:
    """Import a wrangler bulk JSON file (`-`: stdin), all of it or nothing."""
    return on_store(ctx, lambda store: _import(store, file), creates_store=True)


def _export(store: Store, include_secrets: bool) -> list[dict]:
    items = admin.export_bulk(store, include_secrets)
    if not include_secrets and (redacted := admin.count_redacted(items)):
        print(f"{PROG}: {redacted} literal provider key{'s' * (redacted != 1)} redacted: "
              "`aigw import` refuses them (--include-secrets exports them)",
              file=sys.stderr, flush=True)
    return items


@click.command("export", help=EXPORT_HELP,
               short_help="Print every record as a wrangler bulk JSON array.")
@click.option("--include-secrets", is_flag=True,
              help="export literal provider keys as they are (default: <redacted>)")
@late_globals()
@click.pass_context
def export(ctx: click.Context, include_secrets: bool) -> int:
    """Print every record as a wrangler bulk JSON array."""
    return on_store(ctx, lambda store: _export(store, include_secrets))
