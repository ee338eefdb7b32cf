"""One small module per wire protocol; :func:`provider_for` picks one for a run."""

from __future__ import annotations

from .base import Call, Completion, HTTPRequest, Provider
from .openai import OpenAIProvider

__all__ = ["Call", "Completion", "HTTPRequest", "OpenAIProvider", "Provider", "provider_for"]


def provider_for(config) -> Provider:
    """The provider a run's configuration asks for (OpenAI-compatible for now)."""
    return OpenAIProvider(config.base_url, config.api_key)
