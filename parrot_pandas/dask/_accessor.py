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

The task graph holds :func:`llm_generate` / :func:`llm_extract` and the caller's ``RunSpec``,
pickled by reference to their modules; the spec's options (the API key among them) stay out
of its repr, and the rate budget is looked up on the worker (``_budget.py``).

When a worker dies, Dask runs the partitions that were on it again elsewhere (up to
``distributed.scheduler.allowed-failures`` times). Their rows are not lost and not counted
twice: a partition's output comes from its one successful run. Every answer was written to the
response cache as it arrived, so the re-run reads the finished rows from the cache and pays
only for the rest. On one machine every worker uses the same SQLite file (the default
location, or ``cache=PATH``), which is safe for concurrent writers. On several machines each
machine has its own file, so a partition re-run on another machine pays again for its rows;
keep ``cache=`` on a local disk (never NFS/SMB, which break SQLite's locking).

``batch=True``: each partition is one batch run of its own rows, as ``df.llm.extract(...,
batch=True)`` would run it: its first row goes live (the setup request), the rest go into
a batch whose record is kept in the cache file, and the partition's task waits for it. Under
``dask.distributed`` the waiting task leaves the worker's thread pool (``secede``), so every
partition submits its batch at once instead of one pool-full after another; the other
schedulers hold a thread per waiting batch, so give them no more partitions than threads. A
partition run again (a worker died, or the call is repeated) finds its batch's record and
re-attaches: it never submits a second time. That needs every run of a partition to see the
same cache file, so ``batch=True`` is refused on a cluster whose workers are on several
machines (each machine has its own cache file): run on one machine, or compute the frame and
call the pandas accessor.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import dask.dataframe as dd
import pandas as pd
from dask.dataframe.extensions import register_dataframe_accessor

from .._frame import explode
from .._run import Run, RunSpec, prepare
from .._runner import run_sync
from ..accessor import _front_door, _spec
from ..errors import ConfigurationError
from ._budget import _current_worker, default_service

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

    @_front_door
    def generate(self, template: str, *, output: str = "output", **options: Any) -> dd.DataFrame:
        """Generate text for every row, lazily.

        Parameters
        ----------
        template, output
            As in :meth:`parrot_pandas.LLMAccessor.generate`. ``progress`` (in ``options``)
            defaults to off (one bar per partition on the workers' stderr helps nobody; use
            Dask's progress tools), and ``chunksize`` is not taken.

        Returns
        -------
        dask.dataframe.DataFrame
            Lazy. The input columns, then ``output`` (``string`` dtype); index labels kept,
            divisions kept. ``meta`` is exact before anything is computed. With
            ``errors="coerce"`` an ``llm_error`` column follows.

        Raises
        ------
        ConfigurationError
            At once, on the client: a bad template, option or output name; ``batch=True``
            while the default ``dask.distributed`` client's workers are on several machines
            (see the module docstring: one batch per partition, resumable on one machine).
        APIError, RowsFailedError
            At compute time, as in the pandas accessor; a ``RowsFailedError`` carries the
            partial result of its partition only (finished rows of every partition are in
            the cache, so a re-run pays only for the rest).

        Examples
        --------
        >>> out = ddf.llm.generate("Summarize: ${text}", output="summary")  # doctest: +SKIP
        >>> out.to_parquet("summaries/")  # doctest: +SKIP
        """
        return _lazy(self._obj, _spec(template, options, output=output))

    @_front_door
    def extract(self, template: str, fields: Any, **options: Any) -> dd.DataFrame:
        """Extract structured objects from every row, lazily: one output row per object.

        Parameters
        ----------
        template, fields
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
        return _lazy(self._obj, _spec(template, options, fields=fields))


def _lazy(ddf: dd.DataFrame, spec: RunSpec) -> dd.DataFrame:
    if "chunksize" in spec.options:
        raise ConfigurationError(
            "chunksize= is for pandas frames; a Dask DataFrame is already processed partition "
            "by partition (use ddf.repartition(partition_size=...) to change their size)"
        )
    spec = replace(spec, options={"progress": False, **spec.options})
    run = prepare(ddf._meta, spec)
    config = run.config
    if config.batch:
        _check_one_machine()
    # Resolved here, once: every worker then uses the client's model, server and key, whatever
    # its own environment says.
    resolved = {
        "base_url": config.base_url,
        "api_key": config.api_key,
        "provider": config.provider,
        "api_version": config.api_version,
    }
    spec = replace(spec, model=config.model, n=config.n, options={**spec.options, **resolved})
    # The function's name is what Dask's dashboard shows for the tasks.
    func = llm_generate if spec.output is not None else llm_extract
    return ddf.map_partitions(func, spec, meta=_empty_result(run), enforce_metadata=True)


def _empty_result(run: Run) -> pd.DataFrame:
    """The output for no rows, built by the pandas path's own builder: exact columns and dtypes."""
    out, _ = explode(
        run.frame.iloc[:0], [], run.fields, scalar=run.scalar,
        with_errors=run.config.errors == "coerce",
    )  # fmt: skip
    return out


def llm_generate(partition: pd.DataFrame, spec: RunSpec) -> pd.DataFrame:
    """One partition of ``ddf.llm.generate``."""
    return _run_partition(partition, spec)


def llm_extract(partition: pd.DataFrame, spec: RunSpec) -> pd.DataFrame:
    """One partition of ``ddf.llm.extract``."""
    return _run_partition(partition, spec)


def _run_partition(partition: pd.DataFrame, spec: RunSpec) -> pd.DataFrame:
    run = prepare(partition, spec)
    if partition.empty:
        return _empty_result(run)
    budget = default_service().budget(run.config)
    try:
        with _off_the_pool(run.config.batch):
            return run_sync(
                functools.partial(run.execute, budget=budget),
                running_loop=run.config.running_loop,
            )
    finally:
        budget.close()


@contextlib.contextmanager
def _off_the_pool(batch: bool) -> Iterator[None]:
    """A batch partition waits for hours: off the worker's thread pool meanwhile
    (``dask.distributed`` only), so that the next partitions submit their batches now."""
    if not batch or _current_worker() is None:
        yield
        return
    from distributed import rejoin, secede

    secede()
    try:
        yield
    finally:
        rejoin()


def _check_one_machine() -> None:
    """Refuse ``batch=True`` when the default ``dask.distributed`` client's workers are on
    several machines: a partition retried on another machine would not find its batch's
    record (each machine has its own cache file) and would submit its rows again."""
    if "distributed" not in sys.modules:  # no client can exist: nothing to import (1 s)
        return
    from distributed import get_client

    try:
        client = get_client()
    except ValueError:  # no client: the threaded, processes or synchronous scheduler
        return
    workers = client.scheduler_info().get("workers", {}).values()
    hosts = sorted({worker.get("host") for worker in workers} - {None})
    if len(hosts) > 1:
        raise ConfigurationError(
            f"batch=True on a Dask cluster spread over {len(hosts)} machines "
            f"({', '.join(hosts[:3])}{', ...' if len(hosts) > 3 else ''}) cannot promise to "
            "submit each row once: a batch's record lives in the cache file of the machine "
            "that submitted it, so a partition run again on another machine would submit its "
            "rows a second time. Run batch=True on one machine (a LocalCluster), or compute "
            "the frame and call the pandas accessor (ddf.compute().llm.extract(..., "
            "batch=True)), or pass batch=False"
        )
