"""`aigw serve`: the admin REST API (the Workers gateway's paths and payloads) over the local
store or, with `--target cloudflare`, the KV namespace every node syncs from."""

import logging
import sys
from contextlib import ExitStack

import click

from store.cli.output import fail
from store.cli.runner import config_from, globals_of, late_globals, settings_from
from store.db import Store, StoreError
from store.settings import ConfigError, provider_names


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


@click.command("serve", short_help="The admin REST API over HTTP.",
               help="Serve the admin REST API (the Workers gateway's /admin paths and payloads, "
               "and aigw's listings, audit log, usage log and reports) on HOST:PORT. Every "
               "request needs `Authorization: Bearer <admin key>` (aigw admin-key create). "
               "With --target cloudflare it manages the KV namespace every node syncs from; "
               "the usage log and reports are read from the local store if there is one.")
@click.option("--listen", default="127.0.0.1:8081", show_default=True, metavar="HOST:PORT",
              help="address to listen on (0.0.0.0:PORT opens it to the network)")
@late_globals()
@click.pass_context
def serve(ctx: click.Context, listen: str) -> int:
    """Serve the admin API until interrupted."""
    try:
        host, port = _listen(listen)
    except click.BadParameter as exc:
        raise click.UsageError(f"--listen {exc.format_message()}", ctx) from None
    from store.api.backend import Backend, admin_kv_policy  # aiohttp, for this command only
    from store.api.server import run

    options = globals_of(ctx)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    with ExitStack() as stack:
        try:
            settings = settings_from(options)
            config, source = config_from(options)
            local = None
            if Store.exists(settings.path):
                local = stack.enter_context(
                    Store(settings.path, hash_algorithm=settings.hash_algorithm,
                          key_layout=settings.key_layout, create=False))
            if options.target == "cloudflare":
                from store import cloudflare

                cf, sync = cloudflare.load_sync_settings(config, source, options.api_base)
                client = stack.enter_context(cloudflare.KVClient(cf, admin_kv_policy(sync)))
                target = cloudflare.CloudflareTarget(client, settings.hash_algorithm,
                                                     settings.key_layout)
            elif local is None:
                return fail(f"no store at {settings.path} (check --store or store.path; "
                            f"`aigw admin-key create --name NAME` creates one with the first "
                            f"admin key)")
            else:
                target = local
            backend = Backend(target, local, target_name=options.target,
                              known_providers=provider_names(config, source))
        except (ConfigError, StoreError, OSError) as exc:
            return fail(exc)
        except Exception as exc:  # SyncError from the settings, one line like every command
            return fail(exc)

        def ready(url: str) -> None:
            print(f"aigw: admin API on {url} (target {options.target})", file=sys.stderr,
                  flush=True)

        try:
            run(backend, host, port, on_ready=ready)
        except OSError as exc:
            return fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    return 0
