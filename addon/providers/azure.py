"""Azure OpenAI: the deployment names the model in the path, the key goes in `api-key`."""

import re
from typing import Any

from mitmproxy import http

from addon.providers.base import bearer
from addon.providers.openai import OpenAIAdapter

_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")


class AzureOpenAIAdapter(OpenAIAdapter):
    kind = "azure_openai"
    credential_headers = ("api-key", "authorization")

    def credential(self, request: http.Request) -> str | None:
        return request.headers.get("api-key") or bearer(request)

    def set_credential(self, request: http.Request, secret: str) -> None:
        for name in self.credential_headers:
            request.headers.pop(name, None)
        request.headers["api-key"] = secret

    def model(self, request: http.Request, body: Any) -> str | None:
        match = _DEPLOYMENT.search(request.path)
        if match:
            return match.group(1)
        return super().model(request, body)  # /openai/v1/... mirrors OpenAI's paths
