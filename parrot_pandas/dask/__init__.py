"""Dask support: ``ddf.llm``, and the rate budget every partition shares.

``import parrot_pandas`` is enough: ``ddf.llm.generate`` / ``ddf.llm.extract`` are registered
on Dask DataFrames as soon as ``dask.dataframe`` is imported, before or after
``parrot_pandas`` (the ``parrot_pandas[dask]`` extra)::

    import dask.dataframe as dd
    import parrot_pandas

    ddf = dd.read_parquet("docs/*.parquet")
    out = ddf.llm.generate("Summarize: ${text}", output="summary")   # lazy
    out.to_parquet("summaries/")                                     # runs here

Two rooms:

- ``_accessor.py``: the accessor. Checks everything on the client, builds the exact
  ``meta``, and runs each partition through the pandas accessor's own run.
- ``_budget.py``: the shared-budget service. One rate budget per API key for every
  partition: a Dask actor under ``dask.distributed``, an in-process host otherwise.

``_hook.py`` registers the accessor when ``dask.dataframe`` is imported, so that ``import
parrot_pandas`` never imports Dask itself. This package's names are loaded on first use for
the same reason.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._accessor import DaskLLMAccessor
    from ._budget import BudgetService, SharedBudget, budget_name, default_service

__all__ = ["BudgetService", "DaskLLMAccessor", "SharedBudget", "budget_name", "default_service"]

_WHERE = {
    "DaskLLMAccessor": "._accessor",
    "BudgetService": "._budget",
    "SharedBudget": "._budget",
    "budget_name": "._budget",
    "default_service": "._budget",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
