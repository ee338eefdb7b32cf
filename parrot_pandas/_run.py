"""One run, wired: template -> plan -> scheduler (client, budget, cache) -> frame.

:func:`prepare` does every check that can fail before a request is sent and returns a
:class:`Run`; :meth:`Run.execute` answers the whole frame, :meth:`Run.chunks` streams it.
The pandas accessor and the Dask accessor both go through here: one request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ._batch import BatchClient
from ._batch_run import BATCH_TIMEOUT, BatchBar, BatchScheduler, run_cost
from ._cache import open_cache
from ._client import Client
from ._config import STRUCTURED_STRATEGIES, RunConfig
from ._events import Event, Listener, RowsDone, RowsFailed, RowsSkipped, RunFinished, RunStats
from ._feed import LOOKUP_BATCH, Job
from ._frame import ERROR_COLUMN, explode
from ._limits import Budget, RateBudget
from ._packing import MAX_AUTO_ROWS, template_ends
from ._plan import RequestPlan
from ._progress import progress_listener
from ._scheduler import Scheduler
from ._structured import Field, normalize_fields
from ._template import PromptTemplate
from .errors import ConfigurationError, RowsFailedError
from .providers import provider_for

__all__ = ["Run", "RunSpec", "prepare"]

logger = logging.getLogger("parrot_pandas")

# When streaming, prompts remembered for sharing answers between identical rows; older
# duplicates are served by the cache instead, so memory stays flat in the number of rows.
_STREAM_DEDUPE_WINDOW = 100_000


@dataclass(frozen=True)
class RunSpec:
    """What the caller asked for, not yet checked: the one object a front door hands to prepare.

    ``output`` names ``generate``'s new column; ``None`` means ``extract`` with ``fields``.
    ``options`` are the request parameters and run settings, as keywords. A spec pickles, so
    Dask ships it to the workers; ``options`` may hold the API key, so it stays out of the repr.
    """

    template: str
    output: str | None = None
    fields: Any = None
    model: str | None = None
    system: str | None = None
    n: int = 1
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Run:
    """A validated run over one frame, ready to execute on the caller's event loop.

    A run holds what the caller asked for: ``plan`` is the plan a run *starts* with (and the
    one an estimate counts), never updated. With ``structured="auto"`` the scheduler may fall
    back to another strategy at the setup request; the strategy a run ended with is only
    reported from the scheduler, as ``out.attrs["llm"]["strategy"]``. ``fields`` are the
    output columns, ``generate``'s one text column included (its plan has no fields).
    """

    frame: pd.DataFrame
    template: PromptTemplate
    plan: RequestPlan
    fields: tuple[Field, ...]
    scalar: bool

    @property
    def config(self) -> RunConfig:
        """The run's settings."""
        return self.plan.config

    async def execute(
        self, *, budget: Budget | None = None, listeners: Sequence[Listener] = ()
    ) -> pd.DataFrame:
        """Answer every row and return the output frame.

        Parameters
        ----------
        budget : Budget, optional
            Replaces the run's own rate budget (e.g. one shared by Dask workers).
        listeners : sequence of callables
            Receive the scheduler's events next to the run's own.

        Raises
        ------
        APIError
            The setup request was refused.
        RowsFailedError
            With ``errors="raise"``, when rows failed after retries.
        """
        async with self._scheduler(budget, listeners) as (scheduler, stats):
            outcome = await scheduler.run(self.template.rows(self.frame), rows=len(self.frame))
        failed = any(job is not None and job.error is not None for job in outcome)
        out, errors = self._frame(self.frame, outcome, stats, with_errors=failed)
        if len(errors) and self.config.errors == "raise":
            raise RowsFailedError(out, errors)
        return out

    async def chunks(
        self, chunksize: int, *, budget: Budget | None = None, listeners: Sequence[Listener] = ()
    ) -> AsyncIterator[pd.DataFrame]:
        """Yield finished output frames of about ``chunksize`` input rows each, in input order.

        Requests keep flowing across chunk boundaries, but the run never gets more than a
        couple of chunks ahead of the consumer, so memory stays flat. Every chunk has the same
        columns, ``llm_error`` included, so chunks can be appended to one Parquet file.
        With ``errors="raise"`` a :class:`RowsFailedError` comes after the last chunk, carrying
        the failed rows and their errors.
        """
        changed = asyncio.Event()
        room_made = asyncio.Event()
        emitted = 0
        # Rows are rendered a lookup batch at a time, so the window must hold a chunk plus a
        # batch, or workers could wait for room that only rows not yet handed out can make;
        # and every worker may hold a whole pack of rows.
        pack = self.config.rows_per_request
        pack = MAX_AUTO_ROWS if pack == "auto" else int(pack)
        ahead = 2 * chunksize + 2 * self.config.max_concurrency * pack + LOOKUP_BATCH

        def wake(event: Event) -> None:
            if isinstance(event, (RowsDone, RowsFailed, RowsSkipped)):
                changed.set()

        async def room(fed: int) -> None:
            while fed - emitted >= ahead:
                room_made.clear()
                await room_made.wait()

        outcome: list[Job | None] = []
        failures: list[tuple[pd.DataFrame, pd.Series]] = []
        async with self._scheduler(budget, [*listeners, wake]) as (scheduler, stats):
            task = asyncio.create_task(
                scheduler.run(
                    self.template.rows(self.frame),
                    rows=len(self.frame),
                    outcome=outcome,
                    room=room,
                    dedupe_window=_STREAM_DEDUPE_WINDOW,
                )
            )
            try:
                ready = 0
                while True:
                    finished = task.done()
                    if finished and task.exception() is not None:
                        break
                    while ready < len(outcome) and (outcome[ready] is None or outcome[ready].done):
                        ready += 1
                    while ready - emitted >= chunksize or (finished and emitted < ready):
                        end = min(emitted + chunksize, ready)
                        part, errors = self._frame(
                            self.frame.iloc[emitted:end],
                            outcome[emitted:end],
                            stats,
                            with_errors=True,
                        )
                        # Emitted rows are forgotten: only the consumer holds them now.
                        outcome[emitted:end] = [None] * (end - emitted)
                        emitted = end
                        room_made.set()
                        if len(errors):
                            failures.append((part[part[ERROR_COLUMN].notna()], errors))
                        yield part
                    if finished:
                        break
                    changed.clear()
                    waiter = asyncio.ensure_future(changed.wait())
                    try:
                        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                        await asyncio.gather(waiter, return_exceptions=True)
                await task  # raises the run's own error, if any
            finally:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        if failures and self.config.errors == "raise":
            raise RowsFailedError(
                pd.concat([part for part, _ in failures]), pd.concat([e for _, e in failures])
            )

    @contextlib.asynccontextmanager
    async def _scheduler(
        self, budget: Budget | None, listeners: Sequence[Listener]
    ) -> AsyncIterator[tuple[Scheduler, RunStats]]:
        config = self.config
        stats = RunStats()
        every: list[Listener] = [stats, *listeners]
        bar = progress_listener(config.progress, total=len(self.frame))
        if bar is not None:
            every.append(bar)
        cache = open_cache(config.cache)
        batch_bar = BatchBar(config.progress, len(self.frame)) if config.batch else None
        try:
            kind, timeout = Client, config.timeout
            if batch_bar is not None:
                # A batch file upload or result download can be hundreds of MB.
                kind = BatchClient
                timeout = None if timeout is None else max(timeout, BATCH_TIMEOUT)
            client = kind(
                provider_for(config),
                timeout=timeout,
                max_connections=config.max_concurrency,
                secret=config.api_key,
            )
            async with client:
                scheduling: Any = Scheduler
                if batch_bar is not None:
                    # batch=True: the same scheduler, its rows sent through batches.
                    scheduling = functools.partial(BatchScheduler, on_counts=batch_bar)
                scheduler = scheduling(
                    self.plan,
                    client,
                    budget if budget is not None else RateBudget(rpm=config.rpm, tpm=config.tpm),
                    cache=cache,
                    listeners=every,
                    template_ends=template_ends(self.template),
                )
                try:
                    yield scheduler, stats
                finally:
                    stats(RunFinished(_prompt_cache_facts(client, scheduler)))
                    logger.info("%s", _summary(stats.facts))
        finally:
            if batch_bar is not None:
                batch_bar.close()
            if bar is not None:
                bar.close(self._facts(stats))
            if cache is not None:
                cache.close()

    def _frame(
        self,
        frame: pd.DataFrame,
        outcome: Sequence[Job | None],
        stats: RunStats,
        *,
        with_errors: bool,
    ) -> tuple[pd.DataFrame, pd.Series]:
        out, errors = explode(
            frame,
            outcome,
            self.fields,
            scalar=self.scalar,
            with_errors=with_errors or self.config.errors == "coerce",
        )
        out.attrs["llm"] = self._facts(stats)
        return out, errors

    def _facts(self, stats: RunStats) -> dict[str, Any]:
        facts = dict(stats.facts)
        facts["cost"] = run_cost(self.config.model, self.config.provider, facts)
        return facts


def prepare(frame: pd.DataFrame, spec: RunSpec, *, sending: bool = True) -> Run:
    """Every check that can fail before a request is sent; returns the ready :class:`Run`.

    Parameters
    ----------
    frame : pandas.DataFrame
        The rows to answer.
    spec : RunSpec
        What the caller asked for.
    sending : bool, default True
        ``False`` for estimates: no API key is needed, and output names that already are
        columns are allowed, since nothing is sent or built.

    Raises
    ------
    ConfigurationError
        A bad template, option, output name or ``fields``.
    """
    config = RunConfig.from_options(
        model=spec.model, system=spec.system, n=spec.n, need_key=sending, **spec.options
    )
    prompt = PromptTemplate(spec.template)
    prompt.check(frame.columns)
    output = spec.output
    if output is not None:
        if not isinstance(output, str) or not output:
            raise ConfigurationError(f"output must be a non-empty column name, got {output!r}")
        out_fields = normalize_fields({output: str})
    else:
        out_fields = normalize_fields(spec.fields)
    if sending:
        _check_collisions(frame, [f.name for f in out_fields], from_output=output is not None)
    if output is not None:
        plan = RequestPlan(config)
    else:
        # "auto" starts with the best strategy; the scheduler falls back at the setup request.
        first = STRUCTURED_STRATEGIES[0] if config.structured == "auto" else config.structured
        plan = RequestPlan(config, out_fields, strategy=first)
    return Run(frame, prompt, plan, out_fields, scalar=output is not None)


def _check_collisions(frame: pd.DataFrame, names: list[str], *, from_output: bool) -> None:
    existing = {str(c) for c in frame.columns}
    clash = [name for name in names if name in existing]
    if clash:
        fix = "pass output='...' with a new name" if from_output else "rename the fields"
        raise ConfigurationError(
            f"output column(s) {clash} already exist in the DataFrame and would be overwritten; "
            f"{fix}, or drop the column(s) first"
        )
    if ERROR_COLUMN in existing:
        raise ConfigurationError(
            f"the DataFrame already has a column named {ERROR_COLUMN!r}, which parrot_pandas uses "
            "for per-row errors; rename it first"
        )


def _prompt_cache_facts(client: Client, scheduler: Scheduler) -> dict[str, int]:
    # Live answers' prompt-cache tokens (the client counts them) plus a batch's lines'.
    facts = scheduler.facts() if isinstance(scheduler, BatchScheduler) else {}
    return {
        "cached_prompt_tokens": client.prompt_cache.read
        + facts.get("batch_cached_prompt_tokens", 0),
        "cache_creation_tokens": client.prompt_cache.written
        + facts.get("batch_cache_creation_tokens", 0),
    }


def _summary(facts: dict[str, Any]) -> str:
    limits = ", ".join(f"{k}={facts[k]:g}" for k in ("rpm", "tpm") if facts.get(k))
    packed = ""
    if facts.get("packed_requests"):
        reasons = facts.get("reask_reasons") or {}
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
        packed = (
            f", {facts['packed_requests']} packed requests of up to "
            f"{facts.get('rows_per_request')} rows ({facts.get('repacked_rows', 0)} rows asked "
            f"again{': ' + why if why else ''})"
        )
    return (
        f"llm run: {facts['rows']} rows ({facts['cached_rows']} from cache, "
        f"{facts['skipped_rows']} skipped, {facts['failed_rows']} failed), "
        f"{facts['requests']} requests ({facts['retries']} retries), "
        f"limits: {limits or 'none announced'}, concurrency {facts.get('concurrency')}, "
        f"strategy {facts.get('strategy')}{packed}, {facts['elapsed']:.1f}s"
    )
