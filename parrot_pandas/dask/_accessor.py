"""``dask.dataframe.DataFrame.llm``: the pandas accessor's run, once per partition, lazily.

Importing this module imports ``dask.dataframe`` and registers the accessor; ``import
parrot_pandas`` arranges that it happens as soon as ``dask.dataframe`` is imported (see
``_hook.py``).

``ddf.llm.generate`` / ``ddf.llm.extract`` check the template, the options and the fields on
the client against ``ddf._meta`` (every :class:`~parrot_pandas.ConfigurationError` is raised
before anything is computed) and build ``meta`` by running the pandas path's own output
builder on that empty frame, so the columns and dtypes downstream code sees are exactly the
ones the partitions produce. Each partition then goes through the pandas accessor's own run
(``prepare(partition, ...).execute(budget=shared)``, in ``_run.py``): there is no second
request path. The output keeps the input's index labels (repeated when a row gives several
answers, as ``DataFrame.explode`` does) and never moves a row to another partition, so known
divisions stay valid and are kept, as dask's own ``explode`` keeps them.

The task graph holds :func:`llm_generate` / :func:`llm_extract` and a :class:`_PartitionJob`,
all pickled by reference to this module; the job's options (the API key among them) stay out
of its repr, and the rate budget is looked up on the worker (``_budget.py``).

When a worker dies, Dask runs the partitions that were on it again elsewhere (up to
``distributed.scheduler.allowed-failures`` times). Their rows are not lost and not counted
twice: a partition's output comes from its one successful run. Every answer was written to the
response cache as it arrived, so the re-run reads the finished rows from the cache and pays
only for the rest. On one machine every worker uses the same SQLite file (the default
location, or ``cache=PATH``), which is safe for concurrent writers. On several machines each
machine has its own file, so a partition re-run on another machine pays again for its rows;
keep ``cache=`` on a local disk (never NFS/SMB, which break SQLite's locking).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any

import dask.dataframe as dd
import pandas as pd
from dask.dataframe.extensions import register_dataframe_accessor

from .._frame import explode
from .._run import Run, prepare
from .._runner import run_sync
from ..errors import ConfigurationError
from ._budget import default_service

__all__ = ["DaskLLMAccessor", "llm_extract", "llm_generate"]


@register_dataframe_accessor("llm")
class DaskLLMAccessor:
    """Run an LLM over every row of a Dask DataFrame: ``ddf.llm.generate(...)``, ``.extract(...)``.

    The same methods and options as the pandas accessor (``DataFrame.llm``), returning a lazy
    Dask DataFrame. Partitions run through the pandas accessor's own code; all of them share
    one rate budget per API key (see :mod:`parrot_pandas.dask`).
    """

    def __init__(self, dask_obj: dd.DataFrame) -> None:
        self._obj = dask_obj

    def generate(
        self,
        template: str,
        *,
        output: str = "output",
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        **options: Any,
    ) -> dd.DataFrame:
        """Generate text for every row, lazily.

        Parameters
        ----------
        template, output, model, system, n, **options
            As in :meth:`parrot_pandas.LLMAccessor.generate`. ``progress`` defaults to off
            (one bar per partition on the workers' stderr helps nobody; use Dask's progress
            tools).

        Returns
        -------
        dask.dataframe.DataFrame
            Lazy. The input columns, then ``output`` (``string`` dtype); index labels kept,
            divisions kept. ``meta`` is exact before anything is computed. With
            ``errors="coerce"`` an ``llm_error`` column follows.

        Raises
        ------
        ConfigurationError
            At once, on the client: a bad template, option or output name.
        APIError, RowsFailedError
            At compute time, as in the pandas accessor; a ``RowsFailedError`` carries the
            partial result of its partition only (finished rows of every partition are in
            the cache, so a re-run pays only for the rest).

        Examples
        --------
        >>> out = ddf.llm.generate("Summarize: ${text}", output="summary")  # doctest: +SKIP
        >>> out.to_parquet("summaries/")  # doctest: +SKIP
        """
        job = _PartitionJob(template, None, output, model, system, n, options)
        return _lazy(self._obj, job)

    def extract(
        self,
        template: str,
        fields: Any,
        *,
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        **options: Any,
    ) -> dd.DataFrame:
        """Extract structured objects from every row, lazily: one output row per object.

        Parameters
        ----------
        template, fields, model, system, n, **options
            As in :meth:`parrot_pandas.LLMAccessor.extract`.

        Returns
        -------
        dask.dataframe.DataFrame
            Lazy. The input columns, then one column per field with the field's dtype
            (``Int64``, ``Float64``, ``boolean``, ``category``, ...), known in ``meta``.

        Raises
        ------
        ConfigurationError, APIError, RowsFailedError
            As in :meth:`generate`.

        Examples
        --------
        >>> qa = ddf.llm.extract("Q/A pairs in: ${text}", ["question", "answer"])  # doctest: +SKIP
        >>> qa.dtypes  # doctest: +SKIP
        """
        job = _PartitionJob(template, fields, None, model, system, n, options)
        return _lazy(self._obj, job)


@dataclass(frozen=True, eq=False)
class _PartitionJob:
    """What every partition needs to rebuild the run; options (the key too) stay out of repr."""

    template: str
    fields: Any
    output: str | None
    model: str | None
    system: str | None
    n: int
    options: dict[str, Any] = field(repr=False)

    def run_for(self, frame: pd.DataFrame) -> Run:
        return prepare(
            frame, self.template, self.fields, self.output, self.model, self.system, self.n,
            dict(self.options),
        )  # fmt: skip


def _lazy(ddf: dd.DataFrame, job: _PartitionJob) -> dd.DataFrame:
    if "chunksize" in job.options:
        raise ConfigurationError(
            "chunksize= is for pandas frames; a Dask DataFrame is already processed partition "
            "by partition (use ddf.repartition(partition_size=...) to change their size)"
        )
    job = replace(job, options={"progress": False, **job.options})
    run = job.run_for(ddf._meta)
    config = run.config
    # Resolved here, once: every worker then uses the client's model, server and key, whatever
    # its own environment says.
    resolved = {
        "base_url": config.base_url,
        "api_key": config.api_key,
        "provider": config.provider,
        "api_version": config.api_version,
    }
    job = replace(job, model=config.model, n=config.n, options={**job.options, **resolved})
    # The function's name is what Dask's dashboard shows for the tasks.
    func = llm_generate if job.output is not None else llm_extract
    return ddf.map_partitions(func, job, meta=_empty_result(run), enforce_metadata=True)


def _empty_result(run: Run) -> pd.DataFrame:
    """The output for no rows, built by the pandas path's own builder: exact columns and dtypes."""
    out, _ = explode(
        run.frame.iloc[:0], [], run.fields, scalar=run.scalar,
        with_errors=run.config.errors == "coerce",
    )  # fmt: skip
    return out


def llm_generate(partition: pd.DataFrame, job: _PartitionJob) -> pd.DataFrame:
    """One partition of ``ddf.llm.generate``."""
    return _run_partition(partition, job)


def llm_extract(partition: pd.DataFrame, job: _PartitionJob) -> pd.DataFrame:
    """One partition of ``ddf.llm.extract``."""
    return _run_partition(partition, job)


def _run_partition(partition: pd.DataFrame, job: _PartitionJob) -> pd.DataFrame:
    run = job.run_for(partition)
    if partition.empty:
        return _empty_result(run)
    budget = default_service().budget(run.config)
    try:
        return run_sync(
            functools.partial(run.execute, budget=budget), running_loop=run.config.running_loop
        )
    finally:
        budget.close()
