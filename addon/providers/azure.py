"""Azure OpenAI: the deployment names the model in the path, the key goes in `api-key`."""

import re
from typing import Any

from mitmproxy import http

from addon.providers.base import bearer, header
from addon.providers.openai import OpenAIAdapter

_DEPLOYMENT = re.compile(r"/openai/deployments/([^/]+)/")


class AzureOpenAIAdapter(OpenAIAdapter):
    kind = "azure_openai"
    credential_header = b"api-key"
    credential_prefix = ""

    def credential(self, request: http.Request) -> str | None:
        return header(request, b"api-key") or bearer(request)

    def model(self, request: http.Request, body: Any) -> str | None:
        match = _DEPLOYMENT.search(request.path)
        if match:
            return match.group(1)
        return super().model(request, body)  # /openai/v1/... mirrors OpenAI's paths
