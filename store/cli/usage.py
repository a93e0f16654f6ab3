"""`aigw usage` and `aigw quota reset`: a month's usage of a user, org or key (the current one
unless `--month` names another)."""

import click

from store import admin
from store.cli.report import MONTH
from store.cli.runner import Group, late_globals, on_target

LEVEL = click.Choice(admin.LEVELS)


@click.command("usage", short_help="A month's usage of a user, org or key.",
               help="A month's usage of a user, org or key (the current UTC month unless "
               "--month names another): what the gateway enforces (this node, the other "
               "nodes, the Workers quota record), each shown; with --target cloudflare, every "
               "node's pushed totals.")
@click.argument("level", type=LEVEL, metavar="user|org|key")
@click.argument("level_id", metavar="ID")
@click.option("--month", type=MONTH, metavar="YYYY-MM",
              help="the UTC month (default: the current one)")
@late_globals()
@click.pass_context
def usage(ctx: click.Context, level: str, level_id: str, month: str | None) -> int:
    """A month's usage of a user, org or key."""
    return on_target(ctx, lambda target: admin.level_usage(target, level, level_id, month))


quota = Group("quota", help="Quotas.")


@quota.command("reset", help="Zero the current month's usage (audited): of this node's store, "
               "or with --target cloudflare of every node (at its next sync pass).")
@click.argument("level", type=LEVEL, metavar="user|org|key")
@click.argument("level_id", metavar="ID")
@click.option("--reason", required=True, metavar="TEXT", help="why, kept in the audit record")
@late_globals()
@click.pass_context
def reset(ctx: click.Context, level: str, level_id: str, reason: str) -> int:
    """Zero the current month's usage of a user, org or key."""
    return on_target(ctx, lambda target: admin.reset_quota(target, level, level_id, reason))
