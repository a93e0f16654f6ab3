"""`aigw demo`: the demo org, user and key of scripts/run, created once."""

import click

from store import admin
from store.cli.runner import late_globals, on_store


@click.command("demo", help="Create a demo org, user and key once (the key is printed once).")
@late_globals()
@click.pass_context
def demo(ctx: click.Context) -> int:
    """Create the demo org, user and key unless they exist."""
    return on_store(ctx, admin.ensure_demo, creates_store=True)
