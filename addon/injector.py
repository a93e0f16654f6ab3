"""The provider credential goes into a request only as it leaves, and out of it once it has."""

from collections.abc import Callable

from mitmproxy import http

from addon.providers.base import Adapter, redact_credentials


class CredentialInjector:
    """The last addon of the chain: puts the provider credential into an admitted request just
    before mitmproxy sends it, so no addon before it (mitmweb's view, a saved stream, a dump)
    ever sees the credential. The gateway redacts it again once the request has left."""

    def __init__(self, unstream: Callable[[http.HTTPFlow], None] = lambda flow: None) -> None:
        self.pending: dict[str, tuple[Adapter, str]] = {}
        self.sent: dict[str, http.HTTPFlow] = {}  # holding a credential until redacted
        self._unstream = unstream

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Last again: an addon loaded after the gateway (`scripts=`) that asks mitmproxy to
        stream a provider's request body upstream is undone here, before mitmproxy acts on it;
        the gateway decides on the whole body in its request hook."""
        self._unstream(flow)

    def request(self, flow: http.HTTPFlow) -> None:
        entry = self.pending.pop(flow.id, None)
        if entry is not None and flow.response is None and flow.live:
            entry[0].set_credential(flow.request, entry[1])
            self.sent[flow.id] = flow

    def redact(self, flow: http.HTTPFlow) -> None:
        self.pending.pop(flow.id, None)
        self.sent.pop(flow.id, None)
        redact_credentials(flow.request)

    def redact_all(self) -> None:
        """Flows still in flight (at shutdown, a saved-flows file gets them next)."""
        for flow in list(self.sent.values()):
            self.redact(flow)
