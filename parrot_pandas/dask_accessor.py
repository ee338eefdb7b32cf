"""``dask.dataframe.DataFrame.llm``: the same accessor on Dask, with one rate budget per API
key.

Registered by ``import parrot_pandas`` when ``dask.dataframe`` can be imported (the
``parrot_pandas[dask]`` extra); nothing else in the package imports dask::

    import dask.dataframe as dd
    import parrot_pandas

    ddf = dd.read_parquet("docs/*.parquet")
    out = ddf.llm.generate("Summarize: ${text}", output="summary")   # lazy
    out.to_parquet("summaries/")                                     # runs here

How it runs
-----------
``ddf.llm.generate`` / ``ddf.llm.extract`` check the template, the options and the fields on
the client against ``ddf._meta`` (every :class:`~parrot_pandas.ConfigurationError` is raised
before anything is computed) and build ``meta`` by running the pandas path's own output
builder on that empty frame, so the columns and dtypes downstream code sees are exactly the
ones the partitions produce. Each partition then goes through the pandas accessor's own run
(``prepare(partition, ...).execute(budget=shared)``, in ``run.py``): there is no second
request path. The output keeps the input's index labels (repeated when a row gives several
answers, as ``DataFrame.explode`` does) and never moves a row to another partition, so known
divisions stay valid and are kept, as dask's own ``explode`` keeps them.

How the budget is shared
------------------------
Every partition that uses the same API key and server asks one budget for permission before
each request. Under ``dask.distributed`` that budget is a
:class:`~parrot_pandas._limits.RateBudget` living in a Dask *actor* on one worker, named
``parrot_pandas-budget-<hash>`` where the hash covers the base URL, the key and the user's
``rpm``/``tpm`` (the key itself is never in the name, a log or the task graph's repr). A
partition talks to it through :class:`SharedBudget`: one round trip per request
(``acquire``, which returns when the request may go, so nobody polls); what a response
teaches (``settle`` with the real token count, ``observe`` with the rate-limit headers) is
batched and carried by the next ``acquire`` instead of costing messages of its own; a 429's
``pause`` is sent at once, so every worker stops. The first partition that needs the budget
creates the actor, leaving the worker's thread pool while it waits so that the actor can
take the freed thread; every worker then keeps a handle, so the actor (and a pause) outlives
one compute. Pauses are durations measured on the actor's clock, so clocks need not agree
across machines. An actor was chosen over ``Semaphore`` (it bounds concurrency, not a rate),
``Variable`` (every acquire would be a read-modify-write race, or a lock plus two round
trips) and pub/sub (splitting the rate statically between workers wastes the share of idle
ones). Without a distributed client (the threaded or synchronous scheduler) the partitions
of one process share one in-process budget instead; the ``processes`` scheduler gets one per
process, so use ``dask.distributed`` to run several processes against one key.

When a worker dies
------------------
Dask runs the partitions that were on it again elsewhere (up to
``distributed.scheduler.allowed-failures`` times). Their rows are not lost and not counted
twice: a partition's output comes from its one successful run. Every answer was written to
the response cache as it arrived (batched, at most about a second behind), so the re-run
reads the finished rows from the cache and pays only for the rest. On one machine every
worker uses the same SQLite file (the default location, or ``cache=PATH``), which is safe
for concurrent writers. On several machines each machine has its own file, so a partition
re-run on another machine pays again for its rows; keep ``cache=`` on a local disk (never
NFS/SMB, which break SQLite's locking) and re-run on the same machines when you can.

If the worker that holds the budget actor dies, the budget's state goes with it. Each
partition that finds it gone goes on alone with an in-process budget held to its equal share
of the key's limits (the limits divided by the cluster's threads), so together they stay
within the limit, and a warning is logged. Once no worker holds a handle on the dead actor,
the next partition creates a new one. While old partitions go alone and new ones share the
new actor, the sum can briefly exceed the limit; the server's 429s then pause and retry as
usual.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import dask.dataframe as dd
import pandas as pd
from dask.dataframe.extensions import register_dataframe_accessor

from ._config import RunConfig
from ._frame import explode
from ._limits import LimitInfo, RateBudget
from ._run import Run, RunSpec, prepare
from ._runner import run_sync
from .accessor import _front_door, _spec
from .errors import ConfigurationError

__all__ = ["DaskLLMAccessor", "SharedBudget", "budget_name"]

logger = logging.getLogger("parrot_pandas")

# RateBudget's default, spelled out because SharedBudget derives the paced rate from it.
_HEADROOM = 0.98
# How long settle/observe reports wait for an acquire to carry them before going alone.
_REPORT_DELAY = 0.05

Call = Callable[..., "concurrent.futures.Future[Any]"]


@register_dataframe_accessor("llm")
class DaskLLMAccessor:
    """Run an LLM over every row of a Dask DataFrame: ``ddf.llm.generate(...)``, ``.extract(...)``.

    The same methods and options as the pandas accessor (``DataFrame.llm``), returning a lazy
    Dask DataFrame. Partitions run through the pandas accessor's own code; all of them share
    one rate budget per API key (see the module docstring).
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


@dataclass(frozen=True, eq=False)
class _PartitionJob:
    """What every partition needs to rebuild the run; options (the key too) stay out of repr."""

    template: str
    fields: Any
    output: str | None
    model: str
    system: str | None
    n: int
    options: dict[str, Any] = field(repr=False)

    def run_for(self, frame: pd.DataFrame) -> Run:
        return prepare(frame, RunSpec(
            self.template, output=self.output, fields=self.fields, model=self.model,
            system=self.system, n=self.n, options=dict(self.options),
        ))  # fmt: skip


def _lazy(ddf: dd.DataFrame, spec: RunSpec) -> dd.DataFrame:
    if "chunksize" in spec.options:
        raise ConfigurationError(
            "chunksize= is for pandas frames; a Dask DataFrame is already processed partition "
            "by partition (use ddf.repartition(partition_size=...) to change their size)"
        )
    options = {"progress": False, **spec.options}
    run = prepare(ddf._meta, replace(spec, options=dict(options)))
    config = run.config
    # Resolved here, once: every worker then uses the client's model, server and key, whatever
    # its own environment says.
    options.update(
        base_url=config.base_url,
        api_key=config.api_key,
        provider=config.provider,
        api_version=config.api_version,
    )
    job = _PartitionJob(
        spec.template, spec.fields, spec.output, config.model, spec.system, config.n, options
    )
    # The function's name is what Dask's dashboard shows for the tasks.
    func = llm_generate if spec.output is not None else llm_extract
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
    budget = shared_budget(run.config)
    try:
        return run_sync(
            functools.partial(run.execute, budget=budget), running_loop=run.config.running_loop
        )
    finally:
        budget.flush()


# -- the shared budget ------------------------------------------------------------------------


def budget_name(config: RunConfig) -> str:
    """The shared budget's name for a run: one per server, API key and user rate limits.

    The key enters only through a SHA-256 digest, so the name can be shown in Dask's
    dashboard and logs.

    Examples
    --------
    >>> from parrot_pandas._config import RunConfig
    >>> config = RunConfig.from_options(base_url="http://127.0.0.1:8000/v1", api_key="sk-x")
    >>> name = budget_name(config)
    >>> name.startswith("parrot_pandas-budget-") and "sk-x" not in name
    True
    """
    material = json.dumps([config.base_url, config.api_key or "", config.rpm, config.tpm])
    return "parrot_pandas-budget-" + hashlib.sha256(material.encode()).hexdigest()[:20]


def shared_budget(config: RunConfig) -> SharedBudget:
    """A :class:`SharedBudget` for this run, bound to the budget every partition with its key uses.

    Inside a ``dask.distributed`` worker: the actor named :func:`budget_name` (created by the
    first partition that asks). Anywhere else: a budget shared by this process.
    """
    name = budget_name(config)
    with _ACTORS_LOCK:
        limits = _LIMITS.setdefault(name, _Limits(config.rpm, config.tpm))
    worker = _current_worker()
    if worker is None:
        return SharedBudget(_LOCAL.transport(name, config.rpm, config.tpm), limits=limits)
    try:
        actor, limits.share = _actor_for(name, config.rpm, config.tpm)
    except Exception as exc:  # noqa: BLE001  (a cluster problem must not fail the rows)
        logger.warning(
            "no shared rate budget (%s); this partition paces on its own at 1/%d of the "
            "rate limit", str(exc) or type(exc).__name__, limits.share,
        )  # fmt: skip
        return SharedBudget(None, limits=limits)
    return SharedBudget(
        _actor_transport(worker, actor),
        limits=limits,
        on_lost=functools.partial(_forget_actor, name, actor),
    )


@dataclass
class _Limits:
    """What this process last learned of one shared budget: what a partition going alone needs."""

    rpm: float | None = None
    tpm: float | None = None
    share: int = 1  # partitions that can run at once (the cluster's threads)


class _BudgetHost:
    """The shared state: one :class:`RateBudget`, driven by async calls.

    Under ``dask.distributed`` this is the actor; every method is a coroutine so that they all
    run on the hosting worker's event loop (RateBudget is not thread-safe; an actor's plain
    methods would run in a separate thread).
    """

    def __init__(self, rpm: float | None, tpm: float | None) -> None:
        self._budget = RateBudget(rpm=rpm, tpm=tpm, headroom=_HEADROOM)

    async def acquire(self, tokens: int, reports: list[tuple[Any, ...]]) -> tuple[Any, Any]:
        self._apply(reports)
        await self._budget.acquire(tokens)
        return self._budget.rpm, self._budget.tpm

    async def report(self, reports: list[tuple[Any, ...]]) -> None:
        self._apply(reports)

    async def pause(self, seconds: float, reports: list[tuple[Any, ...]]) -> None:
        self._apply(reports)
        self._budget.pause(seconds)

    async def snapshot(self) -> dict[str, Any]:
        return self._budget.snapshot()

    def _apply(self, reports: list[tuple[Any, ...]]) -> None:
        for kind, *args in reports:
            if kind == "settle":
                self._budget.settle(*args)
            elif kind == "observe":
                self._budget.observe(*args)


class SharedBudget:
    """A :class:`~parrot_pandas._limits.Budget` whose state lives in a shared :class:`_BudgetHost`.

    One per partition run, used from that run's event loop. ``acquire`` is one round trip to
    the host; ``settle`` and ``observe`` are batched and sent with the next ``acquire`` (or
    after 50 ms without one); ``pause`` goes at once. If the host cannot be reached, the rest
    of the run paces alone with an in-process :class:`RateBudget` held to ``1 / share`` of the
    limits (the last ones the host reported, and the server's announced ones), so partitions
    going alone together stay within the key's limit; a warning is logged.

    Parameters
    ----------
    call : callable or None
        ``call(method, *args)`` starts the host's coroutine ``method`` and returns a
        :class:`concurrent.futures.Future` of its result, from any thread; ``None`` to go
        alone from the start.
    limits : _Limits, optional
        The user's limits and the share, updated with the limits the host reports; shared by
        the runs of one process.
    on_lost : callable, optional
        Called once when the host is found unreachable.
    """

    def __init__(
        self,
        call: Call | None,
        *,
        limits: _Limits | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._call = call
        self._limits = limits if limits is not None else _Limits()
        self._on_lost = on_lost
        self._reports: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._own: RateBudget | None = None if call is not None else self._alone()

    def __repr__(self) -> str:
        where = "shared" if self._own is None else f"alone at 1/{self._limits.share}"
        return f"SharedBudget(rpm={self._limits.rpm!r}, tpm={self._limits.tpm!r}, {where})"

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until the shared budget lets one request costing `tokens` go."""
        if self._own is None:
            assert self._call is not None
            reports = self._take_reports()
            try:
                rpm, tpm = await asyncio.wrap_future(self._call("acquire", tokens, reports))
            except Exception as exc:  # noqa: BLE001  (any transport failure: go on alone)
                self._lost(exc, reports)
            else:
                self._limits.rpm, self._limits.tpm = rpm, tpm
                return
        assert self._own is not None
        await self._own.acquire(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the shared token count once a response reports its usage (batched)."""
        if self._own is not None:
            self._own.settle(estimated, actual)
        elif estimated != actual:
            self._report(("settle", estimated, actual))

    def observe(self, info: LimitInfo) -> None:
        """Pass a response's rate-limit headers to the shared budget (batched)."""
        if self._own is not None:
            self._own.observe(self._my_share(info))
        elif not info.empty:
            self._report(("observe", info))

    def pause(self, seconds: float) -> None:
        """Stop every partition that shares the budget for `seconds`; sent at once."""
        if self._own is not None:
            self._own.pause(seconds)
        else:
            self._send("pause", seconds, self._take_reports())

    def flush(self) -> None:
        """Send the batched reports now (a run calls it when it ends). Safe from any thread."""
        if self._own is None:
            reports = self._take_reports()
            if reports:
                self._send("report", reports)

    def requests_per_second(self, tokens_per_request: float) -> float | None:
        """The request rate the shared limits sustain, as last reported by the host."""
        if self._own is not None:
            return self._own.requests_per_second(tokens_per_request)
        rates = []
        if self._limits.rpm is not None:
            rates.append(self._limits.rpm * _HEADROOM / 60.0)
        if self._limits.tpm is not None and tokens_per_request > 0:
            rates.append(self._limits.tpm * _HEADROOM / 60.0 / tokens_per_request)
        return min(rates) if rates else None

    def snapshot(self) -> dict[str, Any]:
        """The limits in effect, for ``attrs``."""
        if self._own is not None:
            return self._own.snapshot()
        return {"rpm": self._limits.rpm, "tpm": self._limits.tpm}

    # -- internals ------------------------------------------------------------------------

    def _report(self, report: tuple[Any, ...]) -> None:
        self._reports.append(report)
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(_REPORT_DELAY, self.flush)

    def _take_reports(self) -> list[tuple[Any, ...]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reports, self._reports = self._reports, []
        return reports

    def _send(self, method: str, *args: Any) -> None:
        assert self._call is not None
        try:
            self._call(method, *args).add_done_callback(_log_failure)
        except Exception as exc:  # noqa: BLE001
            self._lost(exc, [])

    def _lost(self, exc: BaseException, reports: list[tuple[Any, ...]]) -> None:
        if self._own is not None:
            return
        logger.warning(
            "the shared rate budget is unreachable (%s); this partition goes on alone at 1/%d "
            "of the rate limit", str(exc) or type(exc).__name__, self._limits.share,
        )  # fmt: skip
        self._own = self._alone()
        for kind, *args in [*reports, *self._take_reports()]:
            getattr(self, kind)(*args)
        if self._on_lost is not None:
            self._on_lost()

    def _alone(self) -> RateBudget:
        share = self._limits.share
        budget = RateBudget(
            rpm=None if self._limits.rpm is None else self._limits.rpm / share,
            tpm=None if self._limits.tpm is None else self._limits.tpm / share,
        )
        # Start empty: several partitions going alone at once must not each open with a burst
        # while the server's window is already spent.
        budget.pause(0.0)
        return budget

    def _my_share(self, info: LimitInfo) -> LimitInfo:
        """`info` with the announced limits cut to this partition's share."""
        share = self._limits.share
        if share == 1 or (info.limit_requests is None and info.limit_tokens is None):
            return info

        # Whole numbers, as headers give them; rounding down keeps the shares within the limit.
        def part(limit: int | None) -> int | None:
            return None if limit is None else max(1, limit // share)

        return replace(
            info, limit_requests=part(info.limit_requests), limit_tokens=part(info.limit_tokens)
        )


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.debug("shared rate budget message failed: %s", future.exception())


# -- where the host lives ---------------------------------------------------------------------


def _current_worker() -> Any:
    try:
        from distributed import get_worker
    except ImportError:
        return None
    try:
        return get_worker()
    except ValueError:
        return None


# This process's handles on budget actors (name -> (future, actor, share)). Holding the future
# keeps the actor alive between partitions and computes: a pause outlives one partition.
_ACTORS: dict[str, tuple[Any, Any, int]] = {}
_ACTORS_LOCK = threading.Lock()
_ACTOR_PRIORITY = 1_000_000
# Per budget name: the limits last reported and the share a partition takes when alone.
_LIMITS: dict[str, _Limits] = {}


def _actor_for(name: str, rpm: float | None, tpm: float | None) -> tuple[Any, int]:
    """The budget actor called `name` and the cluster's thread count; created on first use."""
    with _ACTORS_LOCK:
        found = _ACTORS.get(name)
    if found is None:
        from distributed import worker_client

        # The actor is itself a task and needs a thread slot, which this task holds:
        # worker_client() secedes from the pool while we wait (and rejoins after), and the
        # priority gives the freed slot to the actor rather than to the next partition. The
        # fixed key makes every worker's submit name the same single actor. No lock is held
        # while waiting: a partition that blocked on it would hold its slot.
        with worker_client() as client:
            future = client.submit(
                _BudgetHost, rpm, tpm, key=name, actor=True, priority=_ACTOR_PRIORITY
            )
            # Raises if the worker holding it died during this compute: the key stays erred
            # (not rebuilt) until every handle on it is dropped, so that every partition
            # then goes on at its fixed share and together they stay within the limit.
            actor = future.result()
            workers = client.scheduler_info()["workers"].values()
            threads = max(1, sum(w.get("nthreads", 1) for w in workers))
        with _ACTORS_LOCK:
            found = _ACTORS.setdefault(name, (future, actor, threads))
    return found[1], found[2]


def _forget_actor(name: str, actor: Any) -> None:
    with _ACTORS_LOCK:
        if name in _ACTORS and _ACTORS[name][1] is actor:
            del _ACTORS[name]


def _actor_transport(worker: Any, actor: Any) -> Call:
    """``call(method, *args)`` for an actor, usable from the partition's own event loop.

    Actor calls belong on the worker's event loop (their futures are bound to it); the result
    crosses back through a thread-safe concurrent future.
    """
    loop = worker.loop

    def call(method: str, *args: Any) -> concurrent.futures.Future[Any]:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        async def run() -> None:
            try:
                result = await getattr(actor, method)(*args)
            except BaseException as exc:  # handed to the caller's thread
                if not done.cancelled():
                    done.set_exception(exc)
            else:
                if not done.cancelled():
                    done.set_result(result)

        loop.add_callback(run)
        return done

    return call


class _LocalHosts:
    """Budget hosts shared by the partitions of this process, on one private event loop."""

    def __init__(self) -> None:
        self._hosts: dict[str, _BudgetHost] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def transport(self, name: str, rpm: float | None, tpm: float | None) -> Call:
        with self._lock:
            # Also after a fork: the child has the loop object but not the thread running it.
            if self._thread is None or not self._thread.is_alive():
                self._hosts.clear()
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="parrot_pandas-budget", daemon=True
                )
                self._thread.start()
            host = self._hosts.get(name)
            if host is None:
                host = self._hosts[name] = _BudgetHost(rpm, tpm)
            loop = self._loop
            assert loop is not None

        def call(method: str, *args: Any) -> concurrent.futures.Future[Any]:
            return asyncio.run_coroutine_threadsafe(getattr(host, method)(*args), loop)

        return call


_LOCAL = _LocalHosts()
