"""One small module per wire protocol; :func:`provider_for` picks one for a run."""

from __future__ import annotations

from .anthropic import AnthropicProvider
from .azure import AzureOpenAIProvider
from .base import Call, Completion, HTTPRequest, Provider
from .openai import OpenAIProvider

__all__ = [
    "AnthropicProvider",
    "AzureOpenAIProvider",
    "Call",
    "Completion",
    "HTTPRequest",
    "OpenAIProvider",
    "Provider",
    "provider_for",
]


def provider_for(config) -> Provider:
    """The provider a run's configuration asks for (``config.provider``).

    Parameters
    ----------
    config : RunConfig
        Its ``provider``, ``base_url``, ``api_key`` and (Azure) ``api_version``.

    Returns
    -------
    Provider
        :class:`OpenAIProvider` (any OpenAI-compatible server), :class:`AnthropicProvider`
        or :class:`AzureOpenAIProvider`.
    """
    if config.provider == "anthropic":
        return AnthropicProvider(config.base_url, config.api_key)
    if config.provider == "azure":
        return AzureOpenAIProvider(config.base_url, config.api_key, api_version=config.api_version)
    return OpenAIProvider(config.base_url, config.api_key)
