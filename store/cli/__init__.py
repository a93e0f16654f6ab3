"""`aigw`: the admin command line over the store, on click.

Each command prints one JSON object on stdout (`export` alone prints the wrangler bulk array).
Errors print one line, `aigw: error: <reason>`, on stderr: exit 2 for usage errors, 1 otherwise.
One module per command group; `output` holds that contract, `runner` how a command runs.
"""

import sys
from collections.abc import Sequence
from typing import Any

import click

from store.cli import (
    admin_key,
    bulk,
    demo,
    health,
    key,
    log,
    org,
    proxy,
    report,
    serve,
    sync,
    usage,
    user,
)
from store.cli.output import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, fail, redact
from store.cli.runner import TARGETS, Globals, Group
from store.settings import DEFAULT_CONFIG

__all__ = ["PROG", "cli", "main", "redact"]

DESCRIPTION = (
    "aigw admin: orgs, users, keys, usage and the store. Every command prints one JSON object "
    "on stdout, except `export`, which prints the wrangler bulk JSON array. An error is one line "
    "on stderr: exit 2 for a wrong command line, 1 otherwise."
)


class AigwGroup(Group):
    """The root group: click's errors become the one error line, and the exit status is the
    command's (its callback returns it)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name or PROG, complete_var, standalone_mode=False,
                                **extra)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            code = fail(exc.format_message() + hint, EXIT_USAGE)
        except click.ClickException as exc:
            code = fail(exc.format_message(), exc.exit_code)
        except click.Abort:  # Ctrl-C while click itself was parsing or prompting
            code = fail("interrupted", EXIT_INTERRUPTED)
        code = EXIT_OK if code is None else code
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: click.Context) -> Any:
        """The command's exit status; Ctrl-C is one error line too (click's own handler would
        print a blank line before it)."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            if sys.stderr.isatty():
                print(file=sys.stderr)  # past the terminal's ^C
            return fail("interrupted", EXIT_INTERRUPTED)


@click.group(cls=AigwGroup, name=PROG, help=DESCRIPTION,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", metavar="PATH",
              help=f"mitm.yaml to read (default ./{DEFAULT_CONFIG}, used only if it exists)")
@click.option("--store", metavar="DIR", help="store directory (overrides store.path)")
@click.option("--target", type=click.Choice(TARGETS), default="local", show_default=True,
              help="where org, user, key, usage and quota commands work: the local store or "
              "the Cloudflare KV namespace every node syncs from")
@click.option("--api-base", metavar="URL",
              help="Cloudflare API base (default https://api.cloudflare.com/client/v4)")
@click.pass_context
def cli(ctx: click.Context, config: str | None, store: str | None, target: str,
        api_base: str | None) -> None:
    """The global options, read before the command runs."""
    ctx.obj = Globals(config=config, store=store, target=target, api_base=api_base)


for command in (org.group, user.group, key.group, usage.usage, usage.quota, log.log,
                report.report, bulk.import_, bulk.export, health.health, sync.sync, demo.demo,
                admin_key.group, admin_key.audit_log, serve.serve, proxy.proxy, proxy.ca):
    cli.add_command(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    return cli.main(list(argv) if argv is not None else None, prog_name=PROG,
                    standalone_mode=False)
