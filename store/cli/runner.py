"""How a command runs: the global options, the store or Cloudflare target it runs on, and the
failures turned into the one-line error contract of `output`."""

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from store.audit import audited, cli_actor
from store.cli.output import EXIT_ERROR, PROG, emit, fail, one_line, redact, say_created
from store.db import Store, StoreError
from store.records import RecordError
from store.settings import (
    DEFAULT_CONFIG,
    ConfigError,
    StoreSettings,
    load_yaml,
    provider_names,
    store_settings,
)

TARGETS = ("local", "cloudflare")
# An admin operation: it takes the store (or, with --target cloudflare, a
# replication.CloudflareTarget offering the same calls) and returns the JSON answer.
Operation = Callable[[Any], Any]


class Group(click.Group):
    """A command group that lists its commands in the order they were added (the README's),
    not alphabetically. Without a command it is a usage error (one line, exit 2), as it was,
    rather than click's help on stdout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("no_args_is_help", False)
        super().__init__(*args, **kwargs)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@dataclass
class Globals:
    """The options given before the command (or, as users tend to write them, after it)."""

    config: str | None = None
    store: str | None = None
    target: str = "local"
    api_base: str | None = None


def globals_of(ctx: click.Context) -> Globals:
    """The global options of this invocation."""
    return ctx.ensure_object(Globals)


def _set_late(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value is not None and param.name:
        setattr(globals_of(ctx), param.name, value)


def late_globals(*, shown: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Accept the global options after the command too (hidden from its help unless named in
    `shown`): they override the ones given before it, as the argparse CLI did."""
    specs = (
        ("--config", "PATH", click.STRING, "mitm.yaml to read"),
        ("--store", "DIR", click.STRING, "store directory (overrides store.path)"),
        ("--target", "local|cloudflare", click.Choice(TARGETS), "where the command writes"),
        ("--api-base", "URL", click.STRING,
         "Cloudflare API base (default https://api.cloudflare.com/client/v4)"),
    )

    def decorate(command: Callable) -> Callable:
        for flag, metavar, kind, text in reversed(specs):
            command = click.option(
                flag, metavar=metavar, type=kind, help=text, hidden=flag not in shown,
                expose_value=False, callback=_set_late,
            )(command)
        return command

    return decorate


def nothing_to_change(ctx: click.Context, values: dict[str, Any]) -> None:
    """Refuse an update that names no field to change (a usage error: exit 2)."""
    if all(value is None or value == () for value in values.values()):
        flags = ", ".join("--" + name.replace("_", "-") for name in values)
        raise click.UsageError(f"{ctx.command_path.removeprefix(PROG + ' ')}: nothing to change "
                               f"(give one of {flags})", ctx)


def action_of(ctx: click.Context) -> str:
    """What a command does, as the audit log names it: `org create`, `key revoke`."""
    return ctx.command_path.removeprefix(PROG).strip()


def config_from(options: Globals) -> tuple[dict, str]:
    """mitm.yaml as a mapping, and its name (ConfigError if invalid)."""
    if options.config is None:
        path = Path(DEFAULT_CONFIG)
        return (load_yaml(path) if path.exists() else {}), DEFAULT_CONFIG
    return load_yaml(options.config), options.config


def settings_from(options: Globals) -> StoreSettings:
    """The store path and hash algorithm from --config/--store (ConfigError if invalid)."""
    config, source = config_from(options)
    return store_settings(config, source, options.store)


def known_providers(ctx: click.Context) -> frozenset[str]:
    """The provider names and kinds of the mitm.yaml this command reads: the names an org's
    --provider-key may use (an invalid file is the one error line, exit 1)."""
    try:
        return provider_names(*config_from(globals_of(ctx)))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def local_only(ctx: click.Context) -> None:
    """Refuse --target cloudflare for a command that works on the local store only."""
    if globals_of(ctx).target == "cloudflare":
        raise click.UsageError("--target cloudflare is for the org, user, key, usage, quota, "
                               "admin-key, audit and serve commands", ctx)


def on_target(ctx: click.Context, operation: Operation, *, creates_store: bool = False) -> int:
    """Run an org, user, key, usage or quota operation where --target says: the local store, or
    the KV namespace itself (records version-stamped, so every node's next sync pass fetches
    them)."""
    options = globals_of(ctx)
    if options.target != "cloudflare":
        return on_store(ctx, operation, creates_store=creates_store)
    from store import cloudflare as replication  # httpx and sync, for this target only

    try:
        settings = settings_from(options)
        config, source = config_from(options)
        cf, sync = replication.load_sync_settings(config, source, options.api_base)
        with replication.KVClient(cf, sync) as client, audited(cli_actor(), action_of(ctx)):
            result = operation(replication.CloudflareTarget(client, settings.hash_algorithm,
                                                            settings.key_layout))
    except (ConfigError, replication.SyncError, StoreError, RecordError) as exc:
        return fail(exc)
    except Exception as exc:  # one line for the operator, whatever went wrong
        return fail(f"internal error: {type(exc).__name__}: {exc}")
    return emit(result)


def on_store(ctx: click.Context, operation: Operation, *, creates_store: bool = False,
             health: bool = False) -> int:
    """Run `operation` on the local store and print its answer. Only a command that writes the
    first records (`creates_store`) makes a store where there is none, and removes it again if it
    fails: a mistyped path must not look like an empty, healthy store. `health` prints its
    `"ok": false` answer beside the error line."""
    try:
        settings = settings_from(globals_of(ctx))
    except ConfigError as exc:
        return fail(exc)
    local_only(ctx)

    def failed(reason: object) -> int:
        if health:
            emit({"ok": False, "store": str(settings.path), "hash": settings.hash_algorithm,
                  "error": redact(one_line(reason))})
        return fail(reason)

    exists = Store.exists(settings.path)
    if not exists and not creates_store:
        return failed(f"no store at {settings.path} (check --store or store.path; `aigw org "
                      f"create`, `aigw import` or scripts/run creates one)")
    # What opening a new store creates, removed again if the command fails.
    created = [] if exists else [
        p for p in (settings.path, settings.path / "config", settings.path / "ledger")
        if not p.exists()]
    try:
        store = Store(settings.path, hash_algorithm=settings.hash_algorithm,
                      key_layout=settings.key_layout)
    except (StoreError, OSError, ValueError) as exc:
        _remove(created)
        reason: object = exc
        if isinstance(exc, OSError):
            reason = f"cannot open store at {settings.path}: {exc.strerror or exc}"
        return failed(reason)
    try:
        with store, audited(cli_actor(), action_of(ctx)):
            result = operation(store)
    except (StoreError, RecordError, OSError) as exc:
        _remove(created)
        return failed(exc)
    except Exception as exc:  # one line for the operator, whatever went wrong
        _remove(created)
        return fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_ERROR)
    except BaseException:  # Ctrl-C: the store this command created goes too
        _remove(created)
        raise
    if not exists:
        say_created(settings.path)
    return emit(result)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
