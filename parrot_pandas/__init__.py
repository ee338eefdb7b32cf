"""parrot_pandas: run an LLM over every row of a DataFrame, in parallel, at your rate limit.

Importing the package registers the ``DataFrame.llm`` accessor::

    import parrot_pandas
    out = df.llm.generate("Summarize: ${text}", output="summary", model="gpt-4o-mini")
"""

from __future__ import annotations

from ._cache_admin import cache_info, clear_cache
from ._pricing import Price, count_tokens, price_of, set_price
from .accessor import LLMAccessor
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
    "LLMAccessor",
    "ParrotError",
    "Price",
    "RowsFailedError",
    "StructuredOutputError",
    "Verdict",
    "__version__",
    "cache_info",
    "clear_cache",
    "count_tokens",
    "price_of",
    "set_price",
]

try:
    import dask.dataframe as _dask_dataframe  # noqa: F401
except ImportError:  # Dask is optional: pip install "parrot_pandas[dask]"
    pass
else:
    from . import dask_accessor as _dask_accessor  # noqa: F401  (registers ddf.llm on Dask)
