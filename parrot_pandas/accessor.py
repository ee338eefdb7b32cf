"""``DataFrame.llm``: the front door. Validates, then hands the work to the modules below."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pandas as pd

from ._estimate import estimate as _estimate
from ._run import Run, prepare
from ._runner import iterate_sync, run_sync
from .errors import ConfigurationError

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
        chunksize: int | None = None,
        **options: Any,
    ) -> pd.DataFrame | Iterator[pd.DataFrame]:
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
        chunksize : int, optional
            Stream the result: return an iterator of finished frames of about ``chunksize``
            input rows each, in input order, with requests flowing across chunk boundaries
            (for frames too large to hold every answer in memory). Every chunk carries an
            ``llm_error`` column so all chunks share one schema.
        **options
            Request parameters passed to the API (``temperature``, ``max_tokens``, ``seed``,
            ``top_p``, ``stop``, ``extra_body``, ...) and run settings (``api_key``,
            ``base_url``, ``max_concurrency``, ``max_retries``, ``timeout``, ``rpm``, ``tpm``,
            ``cache``, ``refresh``, ``errors``, ``progress``, ``running_loop``); see the README.

        Returns
        -------
        pandas.DataFrame or iterator of pandas.DataFrame
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
        run = prepare(self._obj, template, None, output, model, system, n, options)
        return _sync(run, chunksize)

    async def agenerate(
        self,
        template: str,
        *,
        output: str = "output",
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        chunksize: int | None = None,
        **options: Any,
    ) -> pd.DataFrame | AsyncIterator[pd.DataFrame]:
        """Coroutine version of :meth:`generate`, for code already running in an event loop.

        With ``chunksize`` it returns an async iterator of frames
        (``async for part in await df.llm.agenerate(..., chunksize=1000)``).

        Examples
        --------
        >>> out = await df.llm.agenerate("Summarize: ${text}")  # doctest: +SKIP
        """
        run = prepare(self._obj, template, None, output, model, system, n, options)
        if chunksize is None:
            return await run.execute()
        return run.chunks(_chunksize(chunksize))

    def extract(
        self,
        template: str,
        fields: Any,
        *,
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        chunksize: int | None = None,
        **options: Any,
    ) -> pd.DataFrame | Iterator[pd.DataFrame]:
        """Extract structured objects from every row, one output row per object.

        Parameters
        ----------
        template : str
            The prompt, with ``${column}`` placeholders (see :meth:`generate`).
        fields : list of str, dict, or pydantic model
            The keys of each object: ``["question", "answer"]``, or name -> type
            (``str``, ``int``, ``float``, ``bool``, ``list[str]``, ``Literal[...]``, an Enum,
            ``Optional[...]``), or a pydantic model class. Columns get matching dtypes.
        model, system, n, chunksize, **options
            As in :meth:`generate`. With ``n > 1`` objects repeated across samples are
            deduplicated.

        Returns
        -------
        pandas.DataFrame or iterator of pandas.DataFrame
            The input columns, then one column per field; one row per extracted object. A row
            that yields no object keeps one row with NA fields, so no input row disappears.

        Raises
        ------
        ConfigurationError, APIError, RowsFailedError
            As in :meth:`generate`. Invalid JSON or wrong keys are retried before a row fails.

        Examples
        --------
        >>> qa = df.llm.extract(
        ...     "Q/A pairs in: ${text}", fields=["question", "answer"], n=3
        ... )  # doctest: +SKIP
        """
        run = prepare(self._obj, template, fields, None, model, system, n, options)
        return _sync(run, chunksize)

    async def aextract(
        self,
        template: str,
        fields: Any,
        *,
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        chunksize: int | None = None,
        **options: Any,
    ) -> pd.DataFrame | AsyncIterator[pd.DataFrame]:
        """Coroutine version of :meth:`extract`.

        Examples
        --------
        >>> qa = await df.llm.aextract("Q/A in: ${text}", ["question", "answer"])  # doctest: +SKIP
        """
        run = prepare(self._obj, template, fields, None, model, system, n, options)
        if chunksize is None:
            return await run.execute()
        return run.chunks(_chunksize(chunksize))

    def estimate(
        self,
        template: str,
        *,
        fields: Any = None,
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        **options: Any,
    ) -> pd.Series:
        """What :meth:`generate` (or :meth:`extract`, with ``fields``) would send and cost.

        Renders every prompt exactly as the run would and sends nothing; needs no API key.

        Parameters
        ----------
        template, model, system, n, **options
            As in :meth:`generate`; ``max_tokens`` bounds the completion tokens.
        fields : optional
            Estimate :meth:`extract` with these fields instead of :meth:`generate`.

        Returns
        -------
        pandas.Series
            ``rows``, ``skipped_rows``, ``cached_rows`` (already in the cache for this exact
            call), ``duplicate_rows`` (sent once, shared), ``requests``, ``prompt_tokens``,
            ``completion_tokens`` (``None`` without ``max_tokens``), ``cost`` in USD
            (``None`` when the model's price is unknown: never a guess) and ``tokenizer``.

        Examples
        --------
        >>> df.llm.estimate("Summarize: ${text}", max_tokens=200)  # doctest: +SKIP
        """
        output = None if fields is not None else "output"
        run = prepare(self._obj, template, fields, output, model, system, n, options, sending=False)
        return _estimate(run.frame, run.template, run.plan)


def _sync(run: Run, chunksize: int | None) -> pd.DataFrame | Iterator[pd.DataFrame]:
    if chunksize is None:
        return run_sync(run.execute, running_loop=run.config.running_loop)
    size = _chunksize(chunksize)
    return iterate_sync(lambda: run.chunks(size))


def _chunksize(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"chunksize must be a positive number of input rows (or None), got {value!r}"
        )
    return value
