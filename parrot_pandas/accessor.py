"""``DataFrame.llm``: the front door. Validates, then hands the work to the modules below."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .cache import open_cache
from .client import Client
from .config import STRUCTURED_STRATEGIES, RunConfig
from .errors import ConfigurationError, RowsFailedError
from .events import Listener, RunStats
from .frame import ERROR_COLUMN, explode
from .limits import Budget, RateBudget
from .plan import RequestPlan
from .progress import progress_listener
from .providers import provider_for
from .runner import run_sync
from .scheduler import Scheduler
from .structured import Field, normalize_fields
from .template import PromptTemplate

__all__ = ["LLMAccessor"]


@pd.api.extensions.register_dataframe_accessor("llm")
class LLMAccessor:
    """Run an LLM over every row: ``df.llm.generate(...)``, ``df.llm.extract(...)``.

    Registered on ``import parrot_pandas``. Every method returns a new DataFrame (the input
    is never modified) with the input's columns first, then the new ones, and the source
    row's index label on every output row, so results join back to the input.
    """

    def __init__(self, pandas_obj: pd.DataFrame) -> None:
        self._obj = pandas_obj

    def generate(
        self,
        template: str,
        *,
        output: str = "output",
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        **options: Any,
    ) -> pd.DataFrame:
        """Generate text for every row.

        Parameters
        ----------
        template : str
            The prompt, with ``${column}`` placeholders (``string.Template`` syntax; ``$$`` is
            a literal ``$``). Rows with a missing (NaN/None) value are not sent.
        output : str, default "output"
            Name of the new column; it must not already be a column.
        model : str, optional
            Model name; defaults to ``$PARROT_PANDAS_MODEL`` or ``"gpt-4o-mini"``.
        system : str, optional
            A system message sent before every prompt.
        n : int, default 1
            Samples per row. Identical samples are deduplicated: one output row per
            distinct answer.
        **options
            Request parameters passed to the API (``temperature``, ``max_tokens``, ``seed``,
            ``top_p``, ``stop``, ``extra_body``, ...) and run settings (``api_key``,
            ``base_url``, ``max_concurrency``, ``max_retries``, ``timeout``, ``rpm``, ``tpm``,
            ``cache``, ``refresh``, ``errors``, ``progress``, ``running_loop``); see the README.

        Returns
        -------
        pandas.DataFrame
            The input columns, then ``output``; one row per distinct answer, index labels
            kept. Run facts (requests, retries, cached rows, tokens, elapsed seconds) are in
            ``.attrs["llm"]``.

        Raises
        ------
        ConfigurationError
            Before any request: a bad template, option, or output name.
        APIError
            The server refused the setup request (bad key, model or URL), with its message.
        RowsFailedError
            With ``errors="raise"``, when rows failed after retries; carries the partial
            result (``exc.result``) and the per-row errors (``exc.errors``).

        Examples
        --------
        >>> out = df.llm.generate("Summarize: ${text}", output="summary")  # doctest: +SKIP
        >>> df.join(out[["summary"]])  # doctest: +SKIP
        """
        run = _prepare(self._obj, template, None, output, model, system, n, options)
        return run_sync(run.execute, running_loop=run.config.running_loop)

    async def agenerate(
        self,
        template: str,
        *,
        output: str = "output",
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        **options: Any,
    ) -> pd.DataFrame:
        """Coroutine version of :meth:`generate`, for code already running in an event loop.

        Examples
        --------
        >>> out = await df.llm.agenerate("Summarize: ${text}")  # doctest: +SKIP
        """
        run = _prepare(self._obj, template, None, output, model, system, n, options)
        return await run.execute()

    def extract(
        self,
        template: str,
        fields: Any,
        *,
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        **options: Any,
    ) -> pd.DataFrame:
        """Extract structured objects from every row, one output row per object.

        Parameters
        ----------
        template : str
            The prompt, with ``${column}`` placeholders (see :meth:`generate`).
        fields : list of str, dict, or pydantic model
            The keys of each object: ``["question", "answer"]``, or name -> type
            (``str``, ``int``, ``float``, ``bool``, ``list[str]``, ``Literal[...]``, an Enum,
            ``Optional[...]``), or a pydantic model class. Columns get matching dtypes.
        model, system, n, **options
            As in :meth:`generate`. With ``n > 1`` objects repeated across samples are
            deduplicated.

        Returns
        -------
        pandas.DataFrame
            The input columns, then one column per field; one row per extracted object. A row
            that yields no object keeps one row with NA fields, so no input row disappears.

        Raises
        ------
        ConfigurationError, APIError, RowsFailedError
            As in :meth:`generate`. Invalid JSON or wrong keys are retried before a row fails.

        Examples
        --------
        >>> qa = df.llm.extract("Q/A pairs in: ${text}", fields=["question", "answer"], n=3)  # doctest: +SKIP
        """
        run = _prepare(self._obj, template, fields, None, model, system, n, options)
        return run_sync(run.execute, running_loop=run.config.running_loop)

    async def aextract(
        self,
        template: str,
        fields: Any,
        *,
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        **options: Any,
    ) -> pd.DataFrame:
        """Coroutine version of :meth:`extract`.

        Examples
        --------
        >>> qa = await df.llm.aextract("Q/A pairs in: ${text}", ["question", "answer"])  # doctest: +SKIP
        """
        run = _prepare(self._obj, template, fields, None, model, system, n, options)
        return await run.execute()


@dataclass(frozen=True)
class _Run:
    """A validated run, ready to execute on whichever loop the caller provides."""

    frame: pd.DataFrame
    template: PromptTemplate
    plan: RequestPlan
    fields: tuple[Field, ...]
    scalar: bool

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    async def execute(
        self, *, budget: Budget | None = None, listeners: Sequence[Listener] = ()
    ) -> pd.DataFrame:
        """Run every row and build the output frame.

        ``budget`` replaces the run's own rate budget (e.g. one shared by Dask workers);
        ``listeners`` receive the scheduler's events next to the run's own.
        """
        config = self.config
        stats = RunStats()
        listeners = [stats, *listeners]
        bar = progress_listener(config.progress, total=len(self.frame))
        if bar is not None:
            listeners.append(bar)
        cache = open_cache(config.cache)
        try:
            client = Client(
                provider_for(config),
                timeout=config.timeout,
                max_connections=config.max_concurrency,
                secret=config.api_key,
            )
            async with client:
                scheduler = Scheduler(
                    self.plan,
                    client,
                    budget if budget is not None else RateBudget(rpm=config.rpm, tpm=config.tpm),
                    cache=cache, listeners=listeners,
                )
                outcome = await scheduler.run(self.template.rows(self.frame), rows=len(self.frame))
        finally:
            if bar is not None:
                bar.close()
            if cache is not None:
                cache.close()
        out, errors = explode(
            self.frame,
            outcome,
            self.fields,
            scalar=self.scalar,
            with_errors=config.errors == "coerce" or any(
                job is not None and job.error is not None for job in outcome
            ),
        )
        out.attrs["llm"] = dict(stats.facts)
        if len(errors) and config.errors == "raise":
            raise RowsFailedError(out, errors)
        return out


def _prepare(
    frame: pd.DataFrame,
    template: str,
    fields: Any,
    output: str | None,
    model: str | None,
    system: str | None,
    n: int,
    options: dict[str, Any],
) -> _Run:
    """Every check that can fail before a request is sent."""
    config = RunConfig.from_options(model=model, system=system, n=n, **options)
    prompt = PromptTemplate(template)
    prompt.check(frame.columns)
    if output is not None:
        if not isinstance(output, str) or not output:
            raise ConfigurationError(f"output must be a non-empty column name, got {output!r}")
        out_fields = normalize_fields({output: str})
    else:
        out_fields = normalize_fields(fields)
    _check_collisions(frame, [f.name for f in out_fields], from_output=output is not None)
    if output is not None:
        plan = RequestPlan(config)
    else:
        # "auto" starts with the best strategy; the scheduler falls back at the setup request.
        first = STRUCTURED_STRATEGIES[0] if config.structured == "auto" else config.structured
        plan = RequestPlan(config, out_fields, strategy=first)
    return _Run(frame, prompt, plan, out_fields, scalar=output is not None)


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

