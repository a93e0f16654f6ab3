"""`aigw health`: whether the store opens and answers, and what it holds."""

import click

from store import admin
from store.cli.runner import late_globals, on_store


@click.command("health", short_help="Check that the store opens and answers.",
               help="Check that the store opens and answers: record counts, reservations, "
               "gateways, node id, last sync, invalid_records.")
@late_globals()
@click.pass_context
def health(ctx: click.Context) -> int:
    """Check the store; prints `"ok": false` beside the error line when it cannot."""
    return on_store(ctx, admin.health, health=True)
