"""Section `throughput-tls`: the throughput section over HTTPS: CONNECT through the proxy, TLS
intercepted with each mitmdump's CA, TLS from mitmdump to an upstream with a self-signed
certificate made at start (`ssl_insecure`); the handshakes fall in the warm-up."""

from __future__ import annotations

from aigw_bench import throughput
from aigw_bench.runner import Report, Settings


def run(s: Settings, report: Report) -> None:
    """The section: `throughput.run` with TLS on both sides."""
    throughput.run(s, report, tls=True)
