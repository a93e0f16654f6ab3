"""`aigw`: the admin command line over the store.

Each command prints one JSON object on stdout (`export` alone prints the wrangler bulk array).
Errors print one line, `aigw: error: <reason>`, on stderr: exit 2 for usage errors, 1 otherwise.
"""

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from store import admin
from store.db import Store, StoreError
from store.records import FAILURE_MODES, RecordError
from store.settings import DEFAULT_CONFIG, ConfigError, StoreSettings, load_yaml, store_settings

PROG = "aigw"
FAILURE_MODE_CHOICES = (*FAILURE_MODES, *(m.replace("_", "-") for m in FAILURE_MODES))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {_one_line(message)}\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# What a credential looks like: gateway keys, the providers' key shapes, and any long random
# token (40 characters or more, four digits among them: a key of a shape not listed here). An
# error never prints one, whatever raised it.
_CREDENTIAL = re.compile(
    r"gw_(?:live|test)_\w+|\b(?:sk|rk|pk)[-_][\w-]{6,}|\bAIza[\w-]{10,}|\bxai-[\w-]{6,}"
    r"|\bgsk_\w{6,}|\b(?=(?:[A-Za-z_-]*[0-9]){4})[\w-]{40,}")


def redact(text: str) -> str:
    """`text` with anything shaped like a credential replaced by `<redacted>`."""
    return _CREDENTIAL.sub("<redacted>", text)


def _created(path: Path) -> None:
    print(f"{PROG}: created a new store at {path}", file=sys.stderr, flush=True)


def usd(text: str) -> float:
    """argparse type: a non-negative finite USD amount."""
    try:
        return admin.check_usd(text)
    except admin.AdminError:
        raise argparse.ArgumentTypeError(
            f"must be a non-negative number of USD, not {text!r}"
        ) from None


def _model_list(text: str) -> list[str]:
    """argparse type: comma-separated model names; empty allows any model."""
    return [name.strip() for name in text.split(",") if name.strip()]


_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _provider_key(text: str) -> tuple[str, str | None]:
    """argparse type: `NAME=env:VAR` (a variable on the gateway hosts) or `NAME=` (remove).
    The errors never repeat the text: it may be a key typed in the wrong place."""
    name, sep, ref = text.partition("=")
    name, ref = name.strip(), ref.strip()
    if not sep or not name or not _ENV_VAR.fullmatch(name.replace("-", "_")):
        raise argparse.ArgumentTypeError("must be NAME=env:VAR (or NAME= to remove it)")
    if not ref:
        return name, None
    variable = ref[4:].strip() if ref.startswith("env:") else ""
    if not _ENV_VAR.fullmatch(variable):
        # A literal key on the command line would sit in shell history and the process list.
        raise argparse.ArgumentTypeError(
            f"{name}: give env:VAR, VAR a variable name on the gateway hosts; a literal key "
            "goes in with `aigw import`, never on the command line")
    return name, f"env:{variable}"


def _add_access_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-models", type=_model_list, metavar="MODEL,...",
                   help="the only models the org may use (\"\": any model)")
    p.add_argument("--provider-key", type=_provider_key, action="append", metavar="NAME=env:VAR",
                   help="the org's credential for a provider, read from VAR on the gateway "
                   "hosts (NAME= removes it); repeatable")


def _failure_mode(text: str) -> str:
    value = text.strip().lower()
    if value not in FAILURE_MODE_CHOICES:
        raise argparse.ArgumentTypeError(
            f"must be fail_open or fail_closed (or fail-open, fail-closed), not {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(
        prog=PROG,
        description="aigw admin: orgs, users, keys, usage and the store. Every command prints "
        "one JSON object on stdout, except `export`, which prints the wrangler bulk JSON array.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"mitm.yaml to read (default ./{DEFAULT_CONFIG}, used only if it exists)",
    )
    parser.add_argument("--store", metavar="DIR", help="store directory (overrides store.path)")
    parser.add_argument(
        "--target", choices=("local", "cloudflare"), default="local",
        help="where org, user and key commands write: the local store (default) or the "
        "Cloudflare KV namespace every node syncs from",
    )
    parser.add_argument(
        "--api-base", metavar="URL",
        help="Cloudflare API base (default https://api.cloudflare.com/client/v4)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    org = commands.add_parser("org", help="organizations").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = org.add_parser("create", help="create an org")
    p.add_argument("--name", required=True)
    p.add_argument("--budget", type=usd, required=True, metavar="USD",
                   help="monthly budget in USD")
    p.add_argument("--failure-mode", type=_failure_mode, default="fail_closed",
                   metavar="fail_open|fail_closed")
    p.add_argument("--fallback-daily-limit", type=usd, metavar="USD",
                   help="daily limit while quota data is unavailable (fail_open; default 10)")
    _add_access_options(p)
    p.set_defaults(run=_org_create, creates_store=True)
    p = org.add_parser("update", help="change an org")
    p.add_argument("org_id", metavar="ORG_ID")
    p.add_argument("--name")
    p.add_argument("--budget", type=usd, metavar="USD")
    p.add_argument("--failure-mode", type=_failure_mode, metavar="fail_open|fail_closed")
    p.add_argument("--fallback-daily-limit", type=usd, metavar="USD")
    _add_access_options(p)
    p.set_defaults(run=_org_update)
    p = org.add_parser("show", help="show an org")
    p.add_argument("org_id", metavar="ORG_ID")
    p.set_defaults(run=lambda store, a: admin.show_org(store, a.org_id))

    user = commands.add_parser("user", help="users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = user.add_parser("create", help="create a user in an org")
    p.add_argument("--org", required=True, metavar="ORG_ID")
    p.add_argument("--email", required=True)
    p.add_argument("--limit", type=usd, required=True, metavar="USD", help="monthly limit")
    p.set_defaults(run=lambda store, a: admin.create_user(store, a.org, a.email, a.limit))
    p = user.add_parser("update", help="change a user's limit or status")
    p.add_argument("user_id", metavar="USER_ID")
    p.add_argument("--limit", type=usd, metavar="USD")
    p.add_argument("--status", choices=admin.USER_STATUSES)
    p.set_defaults(run=_user_update)
    p = user.add_parser("show", help="show a user")
    p.add_argument("user_id", metavar="USER_ID")
    p.set_defaults(run=lambda store, a: admin.show_user(store, a.user_id))

    key = commands.add_parser("key", help="API keys").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = key.add_parser("create", help="issue a gateway key (printed once, never stored)")
    p.add_argument("--user", required=True, metavar="USER_ID")
    p.add_argument("--name", default=admin.DEFAULT_KEY_NAME)
    p.add_argument("--limit", type=usd, metavar="USD", help="monthly limit of this key")
    p.set_defaults(run=lambda store, a: admin.create_key(store, a.user, a.name, a.limit))
    p = key.add_parser(
        "register",
        help="register a developer's own provider key (metered, forwarded unchanged)",
    )
    p.add_argument("--user", required=True, metavar="USER_ID")
    p.add_argument("--name", required=True)
    p.add_argument("--from-env", required=True, metavar="VAR",
                   help="environment variable holding the provider key")
    p.add_argument("--limit", type=usd, metavar="USD", help="monthly limit of this key")
    p.set_defaults(
        run=lambda store, a: admin.register_key(store, a.user, a.name, a.from_env, a.limit)
    )
    p = key.add_parser("revoke", help="revoke a key")
    p.add_argument("key_id", metavar="KEY_ID")
    p.set_defaults(run=lambda store, a: admin.revoke_key(store, a.key_id))
    p = key.add_parser("list", help="list a user's keys")
    p.add_argument("--user", required=True, metavar="USER_ID")
    p.set_defaults(run=lambda store, a: admin.list_keys(store, a.user))

    p = commands.add_parser("usage", help="current month's usage of a user, org or key")
    p.add_argument("level", choices=admin.LEVELS)
    p.add_argument("id", metavar="ID")
    p.set_defaults(run=lambda store, a: admin.level_usage(store, a.level, a.id))

    quota = commands.add_parser("quota", help="quotas").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = quota.add_parser("reset", help="zero the current month's usage (audited)")
    p.add_argument("level", choices=admin.LEVELS)
    p.add_argument("id", metavar="ID")
    p.add_argument("--reason", required=True, metavar="TEXT")
    p.set_defaults(run=lambda store, a: admin.reset_quota(store, a.level, a.id, a.reason))

    import_help = (
        "import a wrangler bulk JSON file ([{\"key\": ..., \"value\": ...}, ...]): every item "
        "is validated first, then all are written in one transaction, or none"
    )
    p = commands.add_parser("import", help=import_help, description=import_help)
    p.add_argument("file", metavar="FILE", help="bulk JSON file, or - for stdin")
    p.set_defaults(run=_import, creates_store=True)

    export_help = (
        "print every record as a wrangler bulk JSON array (the one command whose output is an "
        "array, not an object): `aigw import` and `wrangler kv bulk put` accept it"
    )
    p = commands.add_parser("export", help=export_help, description=export_help)
    p.set_defaults(run=lambda store, a: admin.export_bulk(store))

    p = commands.add_parser("health", help="check that the store opens and answers")
    p.set_defaults(run=lambda store, a: admin.health(store))

    sync_help = (
        "replicate the Cloudflare KV namespace into the local store and push this node's usage "
        "(CLOUDFLARE_API_TOKEN, CLOUDFLARE_ACCOUNT_ID, CLOUDFLARE_KV_NAMESPACE_ID or "
        "sync.cloudflare in mitm.yaml); prints one JSON summary per pass"
    )
    p = commands.add_parser("sync", help=sync_help, description=sync_help)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="one pass, then exit (for cron)")
    mode.add_argument("--interval", type=float, metavar="SECONDS",
                      help="seconds between passes (default sync.interval_s, 30)")
    p.add_argument("--full", action="store_true",
                   help="also re-fetch every record without a version stamp (stamped ones "
                   "are fetched whenever their stamp changes)")
    p.add_argument("--api-base", metavar="URL", default=argparse.SUPPRESS,
                   help="Cloudflare API base (default https://api.cloudflare.com/client/v4)")
    p.set_defaults(run=None)

    p = commands.add_parser("demo", help="create a demo org, user and key once")
    p.set_defaults(run=lambda store, a: admin.ensure_demo(store), creates_store=True)
    return parser


def _org_create(store: Store, args: argparse.Namespace) -> dict:
    return admin.create_org(
        store, args.name, args.budget, args.failure_mode, args.fallback_daily_limit,
        allowed_models=args.allowed_models, provider_keys=dict(args.provider_key or ()),
    )


def _org_update(store: Store, args: argparse.Namespace) -> dict:
    return admin.update_org(
        store,
        args.org_id,
        name=args.name,
        budget_usd=args.budget,
        failure_mode=args.failure_mode,
        fallback_daily_limit_usd=args.fallback_daily_limit,
        allowed_models=args.allowed_models,
        provider_keys=dict(args.provider_key or ()),
    )


def _user_update(store: Store, args: argparse.Namespace) -> dict:
    return admin.update_user(store, args.user_id, limit_usd=args.limit, status=args.status)


def _import(store: Store, args: argparse.Namespace) -> dict:
    name = "stdin" if args.file == "-" else args.file
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise admin.AdminError(f"{name}: cannot read: {reason}") from None
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise admin.AdminError(f"{name}: not valid JSON: {exc}") from None
    except RecursionError:
        raise admin.AdminError(f"{name}: not valid JSON: nested too deeply") from None
    try:
        return admin.import_bulk(store, items)
    except admin.AdminError as exc:
        raise admin.AdminError(f"{name}: {exc}") from None


_UPDATE_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("org", "update"): ("name", "budget", "failure_mode", "fallback_daily_limit",
                        "allowed_models", "provider_key"),
    ("user", "update"): ("limit", "status"),
}


def config_from(args: argparse.Namespace) -> tuple[dict, str]:
    """mitm.yaml as a mapping, and its name (ConfigError if invalid)."""
    if args.config is None:
        path = Path(DEFAULT_CONFIG)
        return (load_yaml(path) if path.exists() else {}), DEFAULT_CONFIG
    return load_yaml(args.config), args.config


def settings_from(args: argparse.Namespace) -> StoreSettings:
    """The store path and hash algorithm from --config/--store (ConfigError if invalid)."""
    config, source = config_from(args)
    return store_settings(config, source, args.store)


def _print(value: Any) -> int:
    try:
        print(json.dumps(value, indent=2), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _fail(message: object, code: int = 1) -> int:
    print(f"{PROG}: error: {redact(_one_line(message))}", file=sys.stderr)
    return code


def _health_failure(settings: StoreSettings, exc: object) -> int:
    _print({
        "ok": False,
        "store": str(settings.path),
        "hash": settings.hash_algorithm,
        "error": redact(_one_line(exc)),
    })
    return _fail(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the global options may also follow the command, as users tend to write them
        late = _Parser(prog=PROG, add_help=False)
        for flag in ("--config", "--store", "--target", "--api-base"):
            late.add_argument(flag, default=argparse.SUPPRESS)
        given, unknown = late.parse_known_args(extra)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if getattr(given, "target", "local") not in ("local", "cloudflare"):
            parser.error(f"--target must be local or cloudflare, not {given.target!r}")
        for name, value in vars(given).items():
            setattr(args, name, value)
    fields = _UPDATE_FIELDS.get((args.command, getattr(args, "action", None)), ())
    if fields and all(getattr(args, name) is None for name in fields):
        flags = ", ".join("--" + name.replace("_", "-") for name in fields)
        parser.error(f"{args.command} {args.action}: nothing to change (give one of {flags})")
    run: Callable[[Store, argparse.Namespace], Any] = args.run
    try:
        settings = settings_from(args)
    except ConfigError as exc:
        return _fail(exc)
    if args.target == "cloudflare":
        if args.command not in ("org", "user", "key"):
            parser.error("--target cloudflare is for the org, user and key commands")
        return _on_cloudflare(args, run, settings)
    if args.command == "sync":
        return _sync(args, settings)
    exists = Store.exists(settings.path)
    if not exists and not getattr(args, "creates_store", False):
        # Only the commands that write the first records create a store: a mistyped path
        # must not look like an empty, healthy one.
        missing = (f"no store at {settings.path} (check --store or store.path; `aigw org "
                   f"create`, `aigw import` or scripts/run creates one)")
        return _health_failure(settings, missing) if args.command == "health" else _fail(missing)
    # What opening a new store creates, removed again if the command fails: a failed first
    # command must not leave an empty store that looks like a healthy one.
    created = [] if exists else [
        p for p in (settings.path, settings.path / "config", settings.path / "ledger")
        if not p.exists()]
    try:
        store = Store(settings.path, hash_algorithm=settings.hash_algorithm)
    except (StoreError, OSError, ValueError) as exc:
        _remove(created)
        reason: object = exc
        if isinstance(exc, OSError):
            reason = f"cannot open store at {settings.path}: {exc.strerror or exc}"
        if args.command == "health":
            return _health_failure(settings, reason)
        return _fail(reason)
    try:
        with store:
            result = run(store, args)
    except (StoreError, RecordError, OSError) as exc:
        _remove(created)
        if args.command == "health":
            return _health_failure(settings, exc)
        return _fail(exc)
    except Exception as exc:  # one line for the operator, whatever went wrong
        _remove(created)
        return _fail(f"internal error: {type(exc).__name__}: {exc}")
    if not exists:
        _created(settings.path)
    return _print(result)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _on_cloudflare(args: argparse.Namespace, run: Callable, settings: StoreSettings) -> int:
    """An org, user or key command against the KV namespace itself (records version-stamped,
    so every node's next sync pass fetches them)."""
    from store import replication

    try:
        config, source = config_from(args)
        cf, sync = replication.load_sync_settings(config, source, args.api_base)
        with replication.KVClient(cf, sync) as client:
            result = run(replication.CloudflareTarget(client, settings.hash_algorithm), args)
    except (ConfigError, replication.SyncError, StoreError, RecordError) as exc:
        return _fail(exc)
    except Exception as exc:
        return _fail(f"internal error: {type(exc).__name__}: {exc}")
    return _print(result)


def _sync(args: argparse.Namespace, settings: StoreSettings) -> int:
    """`aigw sync`: one pass (--once) or a loop; a pass that does not complete exits non-zero
    (--once) or is retried with backoff (loop)."""
    import logging

    from store import replication

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    try:
        config, source = config_from(args)
        cf, sync = replication.load_sync_settings(config, source, args.api_base)
    except ConfigError as exc:
        return _fail(exc)
    interval = args.interval if args.interval is not None else sync.interval_s
    if interval < 1:
        return _fail("--interval must be at least 1 second (one KV write per key per second)")
    exists = Store.exists(settings.path)
    try:
        store = Store(settings.path, hash_algorithm=settings.hash_algorithm)
    except (StoreError, OSError) as exc:
        return _fail(exc)
    if not exists:  # said at once: a sync loop may run for days
        _created(settings.path)
    with store, replication.KVClient(cf, sync) as client:
        progress = replication.progress_reporter(sys.stderr)
        replicator = replication.Replicator(store, client, sync, progress=progress)
        if args.once:
            try:
                summary = replicator.sync_once(full=True if args.full else None)
            except replication.SyncError as exc:
                return _fail(f"sync pass did not complete, nothing applied: {exc}")
            finally:
                progress.close()
            print(summary.line(), file=sys.stderr)
            return _print({"ok": True, **summary.__dict__})
        try:
            replication.run_loop(
                replicator, interval, stop=lambda: False,
                report=lambda line: print(line, file=sys.stderr, flush=True),
                on_pass=lambda summary: print(json.dumps({"ok": True, **summary.__dict__}),
                                              flush=True),
                full_first=args.full,
            )
        except KeyboardInterrupt:
            return 0
        finally:
            progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
