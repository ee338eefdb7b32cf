"""parrot_pandas: run an LLM over every row of a DataFrame, in parallel, at your rate limit.

Importing the package registers the ``DataFrame.llm`` accessor (and ``ddf.llm`` on Dask,
once ``dask.dataframe`` is imported)::

    import parrot_pandas
    out = df.llm.generate("Summarize: ${text}", output="summary", model="gpt-4o-mini")

A call that names no ``model`` uses ``$PARROT_PANDAS_MODEL``, else :data:`DEFAULT_MODEL`.
"""

from __future__ import annotations

from ._batches import cancel_batches, list_batches
from ._cache_admin import cache_info, clear_cache
from ._config import DEFAULT_MODEL
from ._pricing import Price, price_of, set_price
from ._tokens import count_tokens
from .accessor import LLMAccessor
from .dask import _hook as _dask_hook
from .errors import (
    APIConnectionError,
    APIError,
    ConfigurationError,
    ParrotError,
    RowsFailedError,
    StructuredOutputError,
    Verdict,
)

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "ConfigurationError",
    "DEFAULT_MODEL",
    "LLMAccessor",
    "ParrotError",
    "Price",
    "RowsFailedError",
    "StructuredOutputError",
    "Verdict",
    "__version__",
    "cache_info",
    "cancel_batches",
    "clear_cache",
    "count_tokens",
    "list_batches",
    "price_of",
    "set_price",
]

# ddf.llm on Dask (the parrot_pandas[dask] extra): registered as soon as dask.dataframe is
# imported, before or after this line. Importing it here would cost about a second.
_dask_hook.install()
