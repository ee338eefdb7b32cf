"""Azure OpenAI's global batch: OpenAI's Batch API on Azure's URLs.

What differs from :mod:`._openai_batch`, as Azure documents it:

- the endpoints are ``{endpoint}/openai/files`` and ``{endpoint}/openai/batches``, each with
  ``?api-version=``, and the key goes in the ``api-key`` header;
- each line's ``url`` and the batch's ``endpoint`` are ``/chat/completions``, and each line's
  ``model`` names a deployment of the *Global-Batch* type (a standard deployment refuses it);
- a file holds up to 100,000 requests and 200 MB;
- Azure does not expire a batch that takes longer than its 24-hour target; it keeps running
  until it ends or is cancelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from ._batch import BatchLimits
from ._openai_batch import OpenAIBatch
from ._url import endpoint

if TYPE_CHECKING:
    from .azure import AzureOpenAIProvider

__all__ = ["AZURE_LIMITS", "AzureBatch"]

AZURE_LIMITS = BatchLimits(max_requests=100_000, max_bytes=200 * 1024**2)


class AzureBatch(OpenAIBatch):
    """The global-batch API of an :class:`~parrot_pandas.providers.azure.AzureOpenAIProvider`.

    Parameters
    ----------
    provider : AzureOpenAIProvider
    base_url : str
        The resource endpoint (``https://my-resource.openai.azure.com``).
    headers : mapping
        The provider's headers (``api-key`` among them).
    api_version : str
        Sent as ``?api-version=`` on every request.
    """

    name = "azure"
    limits = AZURE_LIMITS
    line_url = "/chat/completions"

    def __init__(
        self,
        provider: AzureOpenAIProvider,
        base_url: str,
        headers: Mapping[str, str],
        *,
        api_version: str,
    ) -> None:
        super().__init__(provider, base_url, headers)
        self._api_version = api_version

    def _url(self, path: str, **query: Any) -> str:
        extra = {k: v for k, v in query.items() if v is not None}
        extra["api-version"] = self._api_version
        return endpoint(self._base_url, "/openai" + path, urlencode(extra))
