"""Test-only mitmproxy addon: send requests for the providers' hosts to a local fake provider.

Load it AFTER the gateway (`mitmdump -s addon/gateway.py -s tests/support/redirect.py`), so the
gateway sees the real host, and run mitmdump with `--set connection_strategy=lazy` (otherwise
mitmproxy connects to the real host at CONNECT time, before this addon can change the target).

Configuration (option, else environment variable):
  aigw_test_upstream / AIGW_TEST_UPSTREAM       "127.0.0.1:54321": where to send the requests
  aigw_test_redirect_hosts / AIGW_TEST_REDIRECT_HOSTS
                                                comma-separated host globs; default: the providers

The request keeps its original Host header, path, query and headers; only the connection target
(scheme, host, port) changes, to plain http://host:port. `flow.metadata["aigw_test_redirected"]`
holds the original "host:port". Requests the gateway already answered are left alone.

The rewrite happens in the `request` hook, except for requests whose body is streamed
(`flow.request.stream` set by an earlier addon's `requestheaders`, or by `stream_large_bodies`):
mitmproxy connects upstream right after `requestheaders` for those and runs `request` only when
the body has been sent, so they are rewritten in `requestheaders` (after the gateway's).
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http

DEFAULT_HOSTS = (
    "api.openai.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "*.openai.azure.com",
)

log = logging.getLogger(__name__)


def parse_upstream(spec: str) -> tuple[str, int]:
    """ "host:port" -> (host, port); raises ValueError."""
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {spec!r}")
    return host.strip("[]"), int(port)


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns)


class Redirect:
    def __init__(self) -> None:
        self.target: tuple[str, int] | None = None
        self.hosts: tuple[str, ...] = DEFAULT_HOSTS

    def load(self, loader) -> None:
        loader.add_option(
            "aigw_test_upstream", str, "",
            "host:port to send provider requests to (default: $AIGW_TEST_UPSTREAM)",
        )
        loader.add_option(
            "aigw_test_redirect_hosts", Sequence[str], [],
            "host globs to redirect (default: $AIGW_TEST_REDIRECT_HOSTS or the providers)",
        )

    def configure(self, updated) -> None:
        spec = ctx.options.aigw_test_upstream or os.environ.get("AIGW_TEST_UPSTREAM", "")
        if spec:
            try:
                self.target = parse_upstream(spec)
            except ValueError as e:
                raise exceptions.OptionsError(f"aigw_test_upstream: {e}") from e
        else:
            self.target = None
            log.warning("redirect: no AIGW_TEST_UPSTREAM / aigw_test_upstream; not redirecting")
        hosts = list(ctx.options.aigw_test_redirect_hosts)
        if not hosts and os.environ.get("AIGW_TEST_REDIRECT_HOSTS"):
            hosts = [h.strip() for h in os.environ["AIGW_TEST_REDIRECT_HOSTS"].split(",")]
        self.hosts = tuple(h for h in hosts if h) or DEFAULT_HOSTS

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream:
            self._redirect(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self._redirect(flow)

    def _redirect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or self.target is None:
            return
        if "aigw_test_redirected" in flow.metadata:
            return
        req = flow.request
        if not host_matches(req.host, self.hosts):
            return
        original = f"{req.host}:{req.port}"
        host_header = req.host_header
        req.scheme = "http"
        req.host, req.port = self.target
        req.host_header = host_header  # setting .host rewrote it; keep the original
        flow.metadata["aigw_test_redirected"] = original
        log.debug("redirect: %s -> %s:%d", original, *self.target)


addons = [Redirect()]
