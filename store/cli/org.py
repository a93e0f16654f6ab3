"""`aigw org create|update|show|list`: organizations."""

from collections.abc import Callable

import click

from store import admin
from store.cli.params import (
    FAILURE_MODE,
    MODEL_LIST,
    PROVIDER_KEY,
    USD,
    rate_limits,
    rate_options,
)
from store.cli.runner import Group, known_providers, late_globals, nothing_to_change, on_target

group = Group("org", help="Organizations.")
PROVIDER_KEY_HELP = (
    "the org's credential for a provider of mitm.yaml (NAME: a provider's name or kind), read "
    "from VAR on the gateway hosts (NAME= removes it); repeatable")


def _org_options(*, create: bool) -> Callable[[Callable], Callable]:
    """The options that set an org's fields (required ones only when creating)."""
    options = [
        click.option("--name", required=create, help="the org's name"),
        click.option("--budget", type=USD, required=create, metavar="USD",
                     help="monthly budget in USD"),
        click.option("--failure-mode", type=FAILURE_MODE, metavar="fail_open|fail_closed",
                     default="fail_closed" if create else None,
                     help="what requests get while quota data is unavailable"
                     + (" (default fail_closed)" if create else "")),
        click.option("--fallback-daily-limit", type=USD, metavar="USD",
                     help="daily limit of each user while quota data is unavailable "
                     "(fail_open; default 10)"),
        click.option("--allowed-models", type=MODEL_LIST, metavar="MODEL,...",
                     help='the only models the org may use ("": any model)'),
        click.option("--provider-key", type=PROVIDER_KEY, multiple=True, metavar="NAME=env:VAR",
                     help=PROVIDER_KEY_HELP),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@group.command("create", help="Create an org.")
@_org_options(create=True)
@rate_options
@late_globals()
@click.pass_context
def create(ctx: click.Context, name: str, budget: float, failure_mode: str,
           fallback_daily_limit: float | None, allowed_models: list[str] | None,
           provider_key: tuple[tuple[str, str | None], ...], rpm: int | None, tpm: int | None,
           max_parallel: int | None) -> int:
    """Create an org."""
    known = known_providers(ctx) if provider_key else None
    return on_target(ctx, lambda store: admin.create_org(
        store, name, budget, failure_mode, fallback_daily_limit,
        allowed_models=allowed_models, provider_keys=dict(provider_key),
        rates=rate_limits(rpm, tpm, max_parallel), known_providers=known,
    ), creates_store=True)


@group.command("update", help="Change an org's fields (at least one).")
@click.argument("org_id", metavar="ORG_ID")
@_org_options(create=False)
@rate_options
@late_globals()
@click.pass_context
def update(ctx: click.Context, org_id: str, name: str | None, budget: float | None,
           failure_mode: str | None, fallback_daily_limit: float | None,
           allowed_models: list[str] | None,
           provider_key: tuple[tuple[str, str | None], ...], rpm: int | None, tpm: int | None,
           max_parallel: int | None) -> int:
    """Change the given fields of an org."""
    nothing_to_change(ctx, {"name": name, "budget": budget, "failure_mode": failure_mode,
                            "fallback_daily_limit": fallback_daily_limit,
                            "allowed_models": allowed_models, "provider_key": provider_key,
                            "rpm": rpm, "tpm": tpm, "max_parallel": max_parallel})
    known = known_providers(ctx) if provider_key else None
    return on_target(ctx, lambda store: admin.update_org(
        store, org_id, name=name, budget_usd=budget, failure_mode=failure_mode,
        fallback_daily_limit_usd=fallback_daily_limit, allowed_models=allowed_models,
        provider_keys=dict(provider_key), rates=rate_limits(rpm, tpm, max_parallel),
        known_providers=known,
    ))


@group.command("show", help="Show an org (literal provider keys redacted; env:VAR shown).")
@click.argument("org_id", metavar="ORG_ID")
@late_globals()
@click.pass_context
def show(ctx: click.Context, org_id: str) -> int:
    """Show an org."""
    return on_target(ctx, lambda store: admin.show_org(store, org_id))


@group.command("list", help="List every org, by name (literal provider keys redacted).")
@late_globals()
@click.pass_context
def list_(ctx: click.Context) -> int:
    """List every org."""
    return on_target(ctx, admin.list_orgs)
