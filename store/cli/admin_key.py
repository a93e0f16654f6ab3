"""`aigw admin-key create|list|revoke` and `aigw audit`: who may use the admin API, and what
every admin write did."""

from datetime import UTC, datetime

import click

from store import admin_keys, audit
from store.cli.log import ISO_TIME
from store.cli.runner import Group, late_globals, on_target

group = Group("admin-key", help="Keys of the admin API (aigw serve).")


@group.command("create", help="Create an admin API key (printed once, stored as a hash).")
@click.option("--name", required=True, help="who or what uses the key")
@click.option("--role", type=click.Choice(admin_keys.ROLES), default="admin", show_default=True,
              help="admin: every endpoint; viewer: GET only")
@late_globals()
@click.pass_context
def create(ctx: click.Context, name: str, role: str) -> int:
    """Create an admin key."""
    return on_target(ctx, lambda target: admin_keys.create_admin_key(target, name, role),
                     creates_store=True)


@group.command("list", help="List the admin keys (never the keys themselves).")
@late_globals()
@click.pass_context
def list_(ctx: click.Context) -> int:
    """List the admin keys."""
    return on_target(ctx, admin_keys.list_admin_keys)


@group.command("revoke", help="Revoke an admin key.")
@click.argument("admin_key_id", metavar="ID")
@late_globals()
@click.pass_context
def revoke(ctx: click.Context, admin_key_id: str) -> int:
    """Revoke an admin key."""
    return on_target(ctx, lambda target: admin_keys.revoke_admin_key(target, admin_key_id))




@click.command("audit", short_help="The audit log of admin writes.",
               help="The audit log: every write through the CLI or the admin API, oldest first, "
               "with who (cli:USER or admin_key:ID), what, when, and each record before and "
               "after (secrets redacted). Quota resets appear with their reason.")
@click.option("--since", type=ISO_TIME, metavar="ISO",
              help="entries at or after this time (no zone: UTC)")
@click.option("--limit", type=click.IntRange(min=0), metavar="N", help="the newest N entries")
@late_globals()
@click.pass_context
def audit_log(ctx: click.Context, since: float | None, limit: int | None) -> int:
    """List the audit log."""
    when = None if since is None else datetime.fromtimestamp(since, UTC)
    return on_target(ctx, lambda target: audit.entries(target, when, limit))
