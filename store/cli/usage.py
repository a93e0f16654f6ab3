"""`aigw usage` and `aigw quota reset`: the current month's usage of a user, org or key."""

import click

from store import admin
from store.cli.runner import Group, late_globals, on_store

LEVEL = click.Choice(admin.LEVELS)


@click.command("usage", short_help="Current month's usage of a user, org or key.",
               help="Current month's usage of a user, org or key: what the gateway enforces "
               "(this node, the other nodes, the Workers quota record), each shown.")
@click.argument("level", type=LEVEL, metavar="user|org|key")
@click.argument("level_id", metavar="ID")
@late_globals()
@click.pass_context
def usage(ctx: click.Context, level: str, level_id: str) -> int:
    """Current month's usage of a user, org or key."""
    return on_store(ctx, lambda store: admin.level_usage(store, level, level_id))


quota = Group("quota", help="Quotas.")


@quota.command("reset", help="Zero the current month's usage (audited).")
@click.argument("level", type=LEVEL, metavar="user|org|key")
@click.argument("level_id", metavar="ID")
@click.option("--reason", required=True, metavar="TEXT", help="why, kept in the audit record")
@late_globals()
@click.pass_context
def reset(ctx: click.Context, level: str, level_id: str, reason: str) -> int:
    """Zero the current month's usage of a user, org or key."""
    return on_store(ctx, lambda store: admin.reset_quota(store, level, level_id, reason))
