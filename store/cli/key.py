"""`aigw key create|update|register|rotate|revoke|list`: API keys of a user."""

import click

from store import admin
from store.cli.params import GRACE_SECONDS, USD, rate_limits, rate_options
from store.cli.runner import Group, late_globals, nothing_to_change, on_target

group = Group("key", help="API keys.")


@group.command("create", help="Issue a gateway key (printed once, never stored).")
@click.option("--user", "user_id", required=True, metavar="USER_ID", help="the key's user")
@click.option("--name", default=admin.DEFAULT_KEY_NAME, show_default=True, help="the key's name")
@click.option("--limit", type=USD, metavar="USD", help="monthly limit of this key in USD")
@rate_options
@late_globals()
@click.pass_context
def create(ctx: click.Context, user_id: str, name: str, limit: float | None, rpm: int | None,
           tpm: int | None, max_parallel: int | None) -> int:
    """Issue a gateway key."""
    return on_target(ctx, lambda store: admin.create_key(
        store, user_id, name, limit, rates=rate_limits(rpm, tpm, max_parallel)))


@group.command("update", help="Change a key's monthly limit or rate limits.")
@click.argument("key_id", metavar="KEY_ID")
@click.option("--limit", type=USD, metavar="USD", help="monthly limit of this key in USD")
@rate_options
@late_globals()
@click.pass_context
def update(ctx: click.Context, key_id: str, limit: float | None, rpm: int | None,
           tpm: int | None, max_parallel: int | None) -> int:
    """Change a key's limits."""
    nothing_to_change(ctx, {"limit": limit, "rpm": rpm, "tpm": tpm,
                            "max_parallel": max_parallel})
    return on_target(ctx, lambda store: admin.update_key(
        store, key_id, limit_usd=limit, rates=rate_limits(rpm, tpm, max_parallel)))


@group.command("register",
               help="Register a developer's own provider key (metered, forwarded unchanged).")
@click.option("--user", "user_id", required=True, metavar="USER_ID", help="the key's user")
@click.option("--name", required=True, help="the key's name")
@click.option("--from-env", required=True, metavar="VAR",
              help="environment variable holding the provider key")
@click.option("--limit", type=USD, metavar="USD", help="monthly limit of this key in USD")
@late_globals()
@click.pass_context
def register(ctx: click.Context, user_id: str, name: str, from_env: str,
             limit: float | None) -> int:
    """Register a developer's own provider key, read from an environment variable."""
    return on_target(ctx, lambda store: admin.register_key(store, user_id, name, from_env,
                                                           limit))


@group.command("rotate", help="Replace a gateway key by a new one (printed once): the same "
               "key_id, limits and usage; the old one stops after --grace-s.")
@click.argument("key_id", metavar="KEY_ID")
@click.option("--grace-s", "grace_s", type=GRACE_SECONDS, default=0, show_default=True,
              metavar="S", help="seconds the old key keeps working (at most 30 days)")
@late_globals()
@click.pass_context
def rotate(ctx: click.Context, key_id: str, grace_s: float) -> int:
    """Rotate a gateway key."""
    return on_target(ctx, lambda store: admin.rotate_key(store, key_id, grace_s))


@group.command("revoke", help="Revoke a key.")
@click.argument("key_id", metavar="KEY_ID")
@late_globals()
@click.pass_context
def revoke(ctx: click.Context, key_id: str) -> int:
    """Revoke a key."""
    return on_target(ctx, lambda store: admin.revoke_key(store, key_id))


@group.command("list", help="List a user's or an org's keys, with each key's limit and "
               "last_used_at.")
@click.option("--user", "user_id", metavar="USER_ID", help="the user's keys")
@click.option("--org", "org_id", metavar="ORG_ID",
              help="the org's keys: its users' and those charged to it")
@late_globals()
@click.pass_context
def list_(ctx: click.Context, user_id: str | None, org_id: str | None) -> int:
    """List a user's or an org's keys."""
    if (user_id is None) == (org_id is None):
        raise click.UsageError("key list: give exactly one of --user or --org", ctx)
    return on_target(ctx, lambda store: admin.list_keys(store, user_id, org_id))
