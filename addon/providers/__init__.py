"""One adapter per API kind. Adding a provider is one file here and a line in ADAPTERS."""

from addon.providers.anthropic import AnthropicAdapter
from addon.providers.azure import AzureOpenAIAdapter
from addon.providers.base import Adapter, Denial, Usage, UsageMeter
from addon.providers.gemini import GeminiAdapter
from addon.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    a.kind: a for a in (OpenAIAdapter, AzureOpenAIAdapter, AnthropicAdapter, GeminiAdapter)
}

__all__ = ["ADAPTERS", "Adapter", "Denial", "Usage", "UsageMeter"]
