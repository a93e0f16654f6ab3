"""Which provider a request is for, from every name it gives: the URL's host, the Host header,
the TLS SNI and the CONNECT target. Pure: names in, a route out."""

from dataclasses import dataclass

from addon.config import GatewayConfig, Provider, is_ip_address, normalize_host


@dataclass(frozen=True, slots=True)
class Route:
    """A request's provider and the host name it must go to; or why its names disagree."""

    provider: Provider | None = None
    host: str = ""
    misdirected: str | None = None  # the names that disagree, for the 421 message


NOT_OURS = Route()


def route(config: GatewayConfig, names: list[str]) -> Route:
    """The provider named by `names` (raw host values; empty ones are skipped). A request whose
    names all name one provider host goes there; one where any name is a provider host and
    another differs is misdirected. An IP address that is no provider's host names nothing
    (a transparent proxy's destination, a CONNECT to an address): the request then goes to the
    provider host it names, never to the address."""
    hosts: list[str] = []
    provider: Provider | None = None
    for raw in names:
        if not raw:
            continue
        host = normalize_host(raw)
        found = config.provider_for(host)
        if found is None and is_ip_address(host):
            continue
        provider = provider or found
        if host not in hosts:
            hosts.append(host)
    if provider is None:
        return NOT_OURS
    if len(hosts) > 1:
        return Route(provider, hosts[0], ", ".join(hosts))
    return Route(provider, hosts[0])
