"""`aigw import` and `aigw export`: records as wrangler bulk JSON
(`[{"key": ..., "value": "<json string>"}, ...]`)."""

import json
import sys
from pathlib import Path

import click

from store import admin
from store.cli.runner import late_globals, on_store
from store.db import Store

IMPORT_HELP = (
    "Import a wrangler bulk JSON file ([{\"key\": ..., \"value\": ...}, ...]): every item is "
    "validated first, then all are written in one transaction, or none."
)
EXPORT_HELP = (
    "Print every record as a wrangler bulk JSON array (the one command whose output is an "
    "array, not an object): `aigw import` and `wrangler kv bulk put` accept it."
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


@click.command("export", help=EXPORT_HELP,
               short_help="Print every record as a wrangler bulk JSON array.")
@late_globals()
@click.pass_context
def export(ctx: click.Context) -> int:
    """Print every record as a wrangler bulk JSON array."""
    return on_store(ctx, admin.export_bulk)
