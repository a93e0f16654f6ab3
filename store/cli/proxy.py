"""`aigw proxy`: the gateway as a production egress proxy, one worker process per CPU on one
port, and `aigw ca bundle`: the CA bundle clients trust. Both run mitmproxy code, imported
from `addon` only when they run (the rest of the CLI never loads mitmproxy)."""

import click

from store.cli.output import EXIT_USAGE, emit, fail
from store.cli.runner import Group, globals_of, late_globals, local_only


@click.command("proxy", short_help="Run the gateway: N workers on one port.",
               help="Run the gateway as an egress proxy: N worker processes, each a mitmproxy "
               "with the gateway, all accepting on one port (the kernel spreads the "
               "connections), sharing the store and the CA directory. A worker that dies is "
               "restarted; SIGTERM lets the requests in flight finish (up to --drain-s), then "
               "exits; SIGHUP replaces the workers one at a time, each reading mitm.yaml "
               "again. Logs go to stderr, each worker's lines prefixed with its name; nothing "
               "is printed on stdout.")
@click.option("--workers", type=int, metavar="N",
              help="worker processes (default: one per CPU this process may run on)")
@click.option("--listen-host", default="127.0.0.1", show_default=True, metavar="HOST",
              help="address to listen on (0.0.0.0 or '' opens it to the network)")
@click.option("--listen-port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              metavar="PORT")
@click.option("--mode", "modes", multiple=True, metavar="MODE",
              help="mitmproxy's mode: regular (default), reverse:URL, transparent, "
              "upstream:URL, socks5; repeat for several")
@click.option("--set", "sets", multiple=True, metavar="OPTION=VALUE",
              help="any option of mitmproxy's or aigw's, as mitmdump's --set "
              "(scripts=PATH adds addons after the gateway); repeat for several")
@click.option("--drain-s", type=click.FloatRange(min=0), default=10.0, show_default=True,
              metavar="S", help="how long SIGTERM waits for requests in flight")
@late_globals()
@click.pass_context
def proxy(ctx: click.Context, workers: int | None, listen_host: str, listen_port: int,
          modes: tuple[str, ...], sets: tuple[str, ...], drain_s: float) -> int:
    """Run until SIGTERM or SIGINT; exit 0 after a drain, 1 if it could not start."""
    local_only(ctx)
    from addon.supervisor import BadFlag, ProxySpec, SupervisorError, default_workers, run

    options = globals_of(ctx)
    spec = ProxySpec(workers=default_workers() if workers is None else workers,
                     listen_host=listen_host, listen_port=listen_port, modes=list(modes),
                     sets=list(sets), drain_s=drain_s, config=options.config,
                     store=options.store)
    try:
        return run(spec)
    except BadFlag as exc:
        return fail(exc, EXIT_USAGE)
    except SupervisorError as exc:
        return fail(exc)


@click.group("ca", cls=Group, short_help="The gateway's CA.",
             help="The CA that the gateway intercepts TLS with (mitmproxy's, in its confdir).")
def ca() -> None:
    """The `ca` commands."""


@ca.command("bundle", short_help="Write the system's roots plus the gateway's CA to one file.",
            help="Write one PEM file with the system's root certificates and the gateway's CA "
            "(made first if the confdir has none), for SSL_CERT_FILE, REQUESTS_CA_BUNDLE, "
            "CURL_CA_BUNDLE and the like: trusting it does not narrow a client's trust for "
            "other hosts. Prints where it wrote what.")
@click.option("--confdir", metavar="DIR", help="mitmproxy's confdir (default ~/.mitmproxy)")
@click.option("--output", metavar="FILE",
              help="where to write the bundle (default CONFDIR/aigw-ca-bundle.pem)")
def bundle(confdir: str | None, output: str | None) -> int:
    """Write the bundle; one JSON object."""
    from addon import ca as gateway_ca

    try:
        return emit(gateway_ca.write_bundle(confdir, output))
    except OSError as exc:
        return fail(f"cannot write the CA bundle: {exc.strerror or exc}: "
                    f"{exc.filename or output or confdir or '~/.mitmproxy'}")
