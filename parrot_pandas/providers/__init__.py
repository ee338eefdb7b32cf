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
    "PROVIDERS",
    "provider_for",
]

# Every wire protocol a run can speak, by its ``provider=`` name. A new provider is one module
# whose class states its facts (environment variables, default URL, samples per request,
# parameter renames), added here.
PROVIDERS: dict[str, type[Provider]] = {
    cls.name: cls for cls in (OpenAIProvider, AnthropicProvider, AzureOpenAIProvider)
}


def provider_for(config) -> Provider:
    """The provider a run's configuration asks for (``config.provider``).

    Parameters
    ----------
    config : RunConfig
        Its ``provider`` (a key of :data:`PROVIDERS`), ``base_url``, ``api_key`` and (Azure)
        ``api_version``.

    Returns
    -------
    Provider
        :class:`OpenAIProvider` (any OpenAI-compatible server), :class:`AnthropicProvider`
        or :class:`AzureOpenAIProvider`.
    """
    return PROVIDERS[config.provider].from_config(config)
