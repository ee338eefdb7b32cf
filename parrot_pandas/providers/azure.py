"""Azure OpenAI: the OpenAI Chat Completions body on Azure's deployment URLs.

The request and response bodies are OpenAI's, so :class:`AzureOpenAIProvider` is an
:class:`~parrot_pandas.providers.openai.OpenAIProvider` that differs only where Azure does:

- the URL is ``{endpoint}/openai/deployments/{deployment}/chat/completions?api-version=...``,
  with the ``model`` naming the deployment;
- the key goes in the ``api-key`` header;
- Azure's content filter refuses a prompt with a 400 ``content_filter`` and withholds an answer
  with ``finish_reason: "content_filter"``: both are that row's errors, never retried (the
  verdicts are OpenAI's, see :meth:`OpenAIProvider.judge`); ``DeploymentNotFound`` (404) fails
  the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from .._secrets import redact_url
from ..errors import APIError
from ._azure_batch import AzureBatch
from ._url import endpoint
from .base import Call
from .openai import OpenAIProvider

__all__ = ["AzureOpenAIProvider"]

CONTENT_FILTER = "content_filter"


class AzureOpenAIProvider(OpenAIProvider):
    """``POST {endpoint}/openai/deployments/{model}/chat/completions?api-version=...``.

    Parameters
    ----------
    endpoint : str
        The resource endpoint, as ``AZURE_OPENAI_ENDPOINT`` holds it, e.g.
        ``https://my-resource.openai.azure.com``. A query it carries is kept, before
        ``api-version``.
    api_key : str, optional
        Sent as the ``api-key`` header.
    api_version : str
        The ``api-version`` query parameter (``OPENAI_API_VERSION``), e.g. ``"2024-10-21"``.
    """

    name = "azure"
    label = "Azure OpenAI"
    # As the OpenAI SDK's AzureOpenAI client reads them; there is no default endpoint.
    api_key_env = "AZURE_OPENAI_API_KEY"
    base_url_env = "AZURE_OPENAI_ENDPOINT"
    default_base_url = None
    example_base_url = "https://my-resource.openai.azure.com"
    api_version_env = "OPENAI_API_VERSION"
    example_api_version = "2024-10-21"
    # Every Azure resource has its own host, and every one needs a key.
    vendor_hosts = None
    no_key_hint = ""

    def __init__(self, endpoint: str, api_key: str | None = None, *, api_version: str) -> None:
        super().__init__(endpoint, api_key)
        self._api_version = api_version
        self._query = urlencode({"api-version": api_version})

    def __repr__(self) -> str:
        return (
            f"AzureOpenAIProvider({redact_url(self._base_url)!r}, "
            f"api_version={self._api_version!r})"
        )

    @classmethod
    def from_config(cls, config: Any) -> AzureOpenAIProvider:
        """The provider for a run's ``RunConfig`` (its ``api_version`` too)."""
        return cls(config.base_url, config.api_key, api_version=config.api_version)

    @staticmethod
    def _auth_headers(api_key: str | None) -> dict[str, str]:
        return {"api-key": api_key} if api_key else {}

    def _url_for(self, call: Call) -> str:
        deployment = quote(call.model, safe="")
        path = f"/openai/deployments/{deployment}/chat/completions"
        return endpoint(self._base_url, path, self._query)

    def error(self, call: Call, status: int, body: Any, headers: Mapping[str, str]) -> APIError:
        error = super().error(call, status, body, headers)
        if error.code == CONTENT_FILTER and "content filter" not in error.message.lower():
            error.message = f"Azure content filter: {error.message}"
            error.args = (error.message,)
        elif error.code == "DeploymentNotFound":
            error.message += " (on Azure, model= is the deployment name)"
            error.args = (error.message,)
        return error

    # -- the Batch API (issue 14) -------------------------------------------------------------

    def batch(self) -> AzureBatch:
        """This resource's global-batch API (:class:`~._azure_batch.AzureBatch`)."""
        return AzureBatch(self, self._base_url, self._headers, api_version=self._api_version)
