"""The floor of `scripts/bench --floor`: a mitmproxy addon doing only the wire work any metering
gateway does on every request, with no store, no decision and no ledger. It reads the
credential and parses the request body (the model), swaps the credential, parses the response's
usage and adds the seven x-gateway-* headers, as aigw's addon does. Measured beside bare
mitmdump and the real addon, it shows how much of the addon's cost is the gateway's own."""

import orjson
from mitmproxy import http

UPSTREAM_SECRET = "Bearer sk-bench-floor-upstream-fake"


class Floor:
    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        flow.metadata["floor"] = (
            request.headers.get("authorization"),
            orjson.loads(request.raw_content or b"{}").get("model"),
        )
        request.headers["authorization"] = UPSTREAM_SECRET

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        pass  # the addon looks at the headers here to tell a stream

    def response(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None:
            return
        usage = orjson.loads(response.raw_content or b"{}").get("usage") or {}
        cost = (usage.get("prompt_tokens", 0) * 150 + usage.get("completion_tokens", 0) * 600)
        text = f"{cost / 1e9:.6f}".encode()
        response.headers.fields = response.headers.fields + (
            (b"x-gateway-usage-usd", text),
            (b"x-gateway-limit-level", b"key"),
            (b"x-gateway-request-count", b"1"),
            (b"x-gateway-current-month", b"2026-11"),
            (b"x-gateway-limit-usd", b"1000000000.00"),
            (b"x-gateway-remaining-usd", b"999999999.00"),
            (b"x-gateway-cost-usd", text),
        )


addons = [Floor()]
