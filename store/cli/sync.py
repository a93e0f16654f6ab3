"""`aigw sync`: replicate the Cloudflare KV namespace into the local store and push this node's
usage, one pass (`--once`) or a loop."""

import json
import logging
import sys

import click

from store.alert_settings import load_alert_settings
from store.cli.output import EXIT_OK, emit, fail, say_created
from store.cli.runner import config_from, globals_of, late_globals, local_only, settings_from
from store.db import Store, StoreError
from store.settings import ConfigError

SYNC_HELP = (
    "Replicate the Cloudflare KV namespace into the local store and push this node's usage "
    "(CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID, CLOUDFLARE_KV_NAMESPACE_ID or "
    "sync.cloudflare in mitm.yaml); prints one JSON summary per pass."
)


@click.command("sync", help=SYNC_HELP,
               short_help="Replicate the Cloudflare KV namespace; push this node's usage.")
@click.option("--once", is_flag=True, help="one pass, then exit (for cron)")
@click.option("--interval", type=float, metavar="SECONDS",
              help="seconds between passes (default sync.interval_s, 30)")
@click.option("--full", is_flag=True,
              help="also re-fetch every record without a version stamp (stamped ones are "
              "fetched whenever their stamp changes)")
@late_globals(shown=("--api-base",))
@click.pass_context
def sync(ctx: click.Context, once: bool, interval: float | None, full: bool) -> int:
    """One pass (--once) or a loop; a pass that does not complete applies nothing and exits
    non-zero (--once) or is retried with backoff (loop)."""
    if once and interval is not None:
        raise click.UsageError("--interval: not allowed with --once", ctx)
    from store import cloudflare as replication  # httpx and sync, for this command only

    options = globals_of(ctx)
    try:
        settings = settings_from(options)
    except ConfigError as exc:
        return fail(exc)
    local_only(ctx)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    try:
        config, source = config_from(options)
        cf, sync_settings = replication.load_sync_settings(config, source, options.api_base)
        alert_settings = load_alert_settings(config, source)
    except ConfigError as exc:
        return fail(exc)
    seconds = interval if interval is not None else sync_settings.interval_s
    if not seconds >= 1:
        return fail("--interval must be at least 1 second (one KV write per key per second)")
    exists = Store.exists(settings.path)
    try:
        store = Store(settings.path, hash_algorithm=settings.hash_algorithm)
    except (StoreError, OSError) as exc:
        return fail(exc)
    if not exists:  # said at once: a sync loop may run for days
        say_created(settings.path)
    with store, replication.KVClient(cf, sync_settings) as client:
        progress = replication.progress_reporter(sys.stderr)
        replicator = replication.Replicator(store, client, sync_settings, progress=progress,
                                            alerts=alert_settings)
        if once:
            try:
                summary = replicator.sync_once(full=True if full else None)
            except replication.SyncError as exc:
                return fail(f"sync pass did not complete, nothing applied: {exc}")
            finally:
                progress.close()
            print(summary.line(), file=sys.stderr)
            return emit({"ok": True, **summary.__dict__})
        try:
            replication.run_loop(
                replicator, seconds, stop=lambda: False,
                report=lambda line: print(line, file=sys.stderr, flush=True),
                on_pass=lambda summary: print(json.dumps({"ok": True, **summary.__dict__}),
                                              flush=True),
                full_first=full,
            )
        except KeyboardInterrupt:
            return EXIT_OK
        finally:
            progress.close()
    return EXIT_OK
