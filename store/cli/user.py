"""`aigw user create|update|show|list|delete`: users of an org."""

import click

from store import admin
from store.cli.params import USD, rate_limits, rate_options
from store.cli.runner import Group, late_globals, nothing_to_change, on_target
from store.records import USER_STATUSES

group = Group("user", help="Users.")


@group.command("create", help="Create a user in an org (an email is unique within an org).")
@click.option("--org", "org_id", required=True, metavar="ORG_ID", help="the user's org")
@click.option("--email", required=True, help="the user's e-mail address")
@click.option("--limit", type=USD, required=True, metavar="USD", help="monthly limit in USD")
@rate_options
@late_globals()
@click.pass_context
def create(ctx: click.Context, org_id: str, email: str, limit: float, rpm: int | None,
           tpm: int | None, max_parallel: int | None) -> int:
    """Create a user in an org."""
    return on_target(ctx, lambda store: admin.create_user(
        store, org_id, email, limit, rates=rate_limits(rpm, tpm, max_parallel)))


@group.command("update", help="Change a user's limits or status.")
@click.argument("user_id", metavar="USER_ID")
@click.option("--limit", type=USD, metavar="USD", help="monthly limit in USD")
@click.option("--status", type=click.Choice(USER_STATUSES), help="a suspended user's keys get 401")
@click.option("--email", help="a new e-mail address (unique within the org)")
@rate_options
@late_globals()
@click.pass_context
def update(ctx: click.Context, user_id: str, limit: float | None, status: str | None,
           email: str | None, rpm: int | None, tpm: int | None, max_parallel: int | None) -> int:
    """Change a user's limits, status or email."""
    nothing_to_change(ctx, {"limit": limit, "status": status, "email": email, "rpm": rpm,
                            "tpm": tpm, "max_parallel": max_parallel})
    return on_target(ctx, lambda store: admin.update_user(
        store, user_id, limit_usd=limit, status=status, email=email,
        rates=rate_limits(rpm, tpm, max_parallel)))


@group.command("delete", help="Delete a user and the user's keys (metered usage stays).")
@click.argument("user_id", metavar="USER_ID")
@late_globals()
@click.pass_context
def delete(ctx: click.Context, user_id: str) -> int:
    """Delete a user."""
    return on_target(ctx, lambda store: admin.delete_user(store, user_id))


@group.command("show", help="Show a user.")
@click.argument("user_id", metavar="USER_ID")
@late_globals()
@click.pass_context
def show(ctx: click.Context, user_id: str) -> int:
    """Show a user."""
    return on_target(ctx, lambda store: admin.show_user(store, user_id))


@group.command("list", help="List users, by email: all, an org's, or those with an email.")
@click.option("--org", "org_id", metavar="ORG_ID", help="only the users of this org")
@click.option("--email", metavar="EMAIL", help="only the users with this email (any case)")
@late_globals()
@click.pass_context
def list_(ctx: click.Context, org_id: str | None, email: str | None) -> int:
    """List users."""
    return on_target(ctx, lambda store: admin.list_users(store, org_id, email))
