"""``DataFrame.llm``: the front door. Validates, then hands the work to the modules below.

The keyword parameters every front-door method takes (``model``, ``system``, ``n`` and
``**options``) are declared once, in :data:`_SHARED`, with their defaults and their docs:
:func:`_front_door` adds them to each method's signature and docstring, for the pandas
accessor and the Dask one alike. A method's own parameters (``output``, ``fields``,
``chunksize``) stay in its ``def``, where type checkers and readers see them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar, overload

import pandas as pd

from ._batch_run import with_batch_figures
from ._config import RUN_SETTINGS
from ._estimate import estimate as _estimate
from ._run import Run, RunSpec, prepare
from ._runner import iterate_sync, run_sync
from .errors import ConfigurationError

__all__ = ["LLMAccessor"]

_Method = TypeVar("_Method", bound=Callable[..., Any])


@dataclasses.dataclass(frozen=True)
class _Keyword:
    """A keyword parameter of every front-door method; its default is :class:`RunSpec`'s."""

    name: str
    doc: str  # numpydoc: "name : type" and the description, indented by four spaces

    def parameter(self) -> inspect.Parameter:
        spec = {f.name: f for f in dataclasses.fields(RunSpec)}[self.name]
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default, annotation=spec.type
        )


# To add a parameter to every front door: a field (and its default) on RunSpec, that
# field used in prepare, and its doc here.
_SHARED = (
    _Keyword(
        "model",
        """model : str, optional
    Model name (Azure: the deployment name); defaults to ``$PARROT_PANDAS_MODEL`` or
    ``"gpt-4o-mini"``.""",
    ),
    _Keyword(
        "system",
        """system : str, optional
    A system message sent before every prompt.""",
    ),
    _Keyword(
        "n",
        """n : int, default 1
    Samples per row. Identical samples are deduplicated: one output row per distinct
    answer (for ``extract``, objects repeated across samples are kept once).""",
    ),
)

# The run settings are listed from RunConfig's own list, so a new one is documented at once.
_OPTIONS_DOC = "**options\n" + textwrap.fill(
    "Request parameters passed to the API (``temperature``, ``max_tokens``, ``seed``, "
    "``top_p``, ``stop``, ``extra_body``, ...) and run settings ("
    + ", ".join(f"``{name}``" for name in sorted(RUN_SETTINGS))
    + "); see the README. An unknown option raises and names the closest valid one.",
    width=88,
    initial_indent="    ",
    subsequent_indent="    ",
    break_on_hyphens=False,
)


def _front_door(method: _Method) -> _Method:
    """Give a front-door method the shared keyword parameters: in its signature and its docs.

    They go before ``**options`` in ``inspect.signature`` (so ``help()``, IDEs and Jupyter
    show them) and at the end of the docstring's Parameters section, with ``**options``.
    The method itself receives them inside ``**options``; :func:`_spec` takes them out.
    """
    signature = inspect.signature(method)
    *own, rest = signature.parameters.values()
    if rest.kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{method.__qualname__} must end with **options")
    shared = [keyword.parameter() for keyword in _SHARED]
    method.__signature__ = signature.replace(parameters=[*own, *shared, rest])  # type: ignore[attr-defined]
    if method.__doc__ is not None:  # None under python -OO
        method.__doc__ = _with_shared_docs(method.__doc__, method.__qualname__)
    return method


def _with_shared_docs(doc: str, name: str) -> str:
    # Python 3.13 strips docstring indentation at compile time; earlier versions keep it.
    found = re.search(r"\n\n([ \t]*)Returns\n", doc)
    if found is None or "\n" + found.group(1) + "Parameters\n" not in doc:
        raise TypeError(f"{name}'s docstring needs a Parameters and a Returns section")
    indent = found.group(1)
    text = "\n".join([*(keyword.doc for keyword in _SHARED), _OPTIONS_DOC])
    block = "\n".join(indent + line if line else line for line in text.splitlines())
    return doc[: found.start()] + "\n" + block + doc[found.start() :]


def _spec(
    template: str, options: dict[str, Any], *, output: str | None = None, fields: Any = None
) -> RunSpec:
    """The caller's request: the shared keywords taken out of ``options``, defaults applied."""
    defaults = RunSpec(template)
    shared = {k.name: options.pop(k.name, getattr(defaults, k.name)) for k in _SHARED}
    return RunSpec(template, output=output, fields=fields, options=options, **shared)


@pd.api.extensions.register_dataframe_accessor("llm")
class LLMAccessor:
    """Run an LLM over every row: ``df.llm.generate(...)``, ``df.llm.extract(...)``.

    Registered on ``import parrot_pandas``. Every method returns a new DataFrame (the input
    is never modified) with the input's columns first, then the new ones, and the source
    row's index label on every output row, so results join back to the input.
    """

    def __init__(self, pandas_obj: pd.DataFrame) -> None:
        self._obj = pandas_obj

    # The overloads tell type checkers what ``chunksize`` decides: a frame, or an iterator of
    # frames. Every other keyword is in ``**options`` for them; the real signature is below.
    @overload
    def generate(
        self, template: str, *, chunksize: None = None, **options: Any
    ) -> pd.DataFrame: ...
    @overload
    def generate(
        self, template: str, *, chunksize: int, **options: Any
    ) -> Iterator[pd.DataFrame]: ...
    @overload
    def generate(
        self, template: str, *, chunksize: int | None = None, **options: Any
    ) -> pd.DataFrame | Iterator[pd.DataFrame]: ...

    @_front_door
    def generate(
        self,
        template: str,
        *,
        output: str = "output",
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
        chunksize : int, optional
            Stream the result: return an iterator of finished frames of about ``chunksize``
            input rows each, in input order, with requests flowing across chunk boundaries
            (for frames too large to hold every answer in memory). Every chunk carries an
            ``llm_error`` column so all chunks share one schema.

        Returns
        -------
        pandas.DataFrame or iterator of pandas.DataFrame
            The input columns, then ``output``; one row per distinct answer, index labels
            kept. Run facts (requests, retries, cached rows, tokens, elapsed seconds) are in
            ``.attrs["llm"]``. With ``chunksize``, an iterator of such frames.

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
        run = prepare(self._obj, _spec(template, options, output=output))
        return _sync(run, chunksize)

    @overload
    async def agenerate(
        self, template: str, *, chunksize: None = None, **options: Any
    ) -> pd.DataFrame: ...
    @overload
    async def agenerate(
        self, template: str, *, chunksize: int, **options: Any
    ) -> AsyncIterator[pd.DataFrame]: ...
    @overload
    async def agenerate(
        self, template: str, *, chunksize: int | None = None, **options: Any
    ) -> pd.DataFrame | AsyncIterator[pd.DataFrame]: ...

    @_front_door
    async def agenerate(
        self,
        template: str,
        *,
        output: str = "output",
        chunksize: int | None = None,
        **options: Any,
    ) -> pd.DataFrame | AsyncIterator[pd.DataFrame]:
        """Coroutine version of :meth:`generate`, for code already running in an event loop.

        Parameters
        ----------
        template : str
            The prompt, with ``${column}`` placeholders (see :meth:`generate`).
        output : str, default "output"
            Name of the new column; it must not already be a column.
        chunksize : int, optional
            Return an async iterator of finished frames of about ``chunksize`` input rows
            each, in input order (``async for part in await df.llm.agenerate(...)``).

        Returns
        -------
        pandas.DataFrame or async iterator of pandas.DataFrame
            As in :meth:`generate`.

        Raises
        ------
        ConfigurationError, APIError, RowsFailedError
            As in :meth:`generate`.

        Examples
        --------
        >>> out = await df.llm.agenerate("Summarize: ${text}")  # doctest: +SKIP
        """
        run = prepare(self._obj, _spec(template, options, output=output))
        if chunksize is None:
            return await run.execute()
        return run.chunks(_chunksize(chunksize))

    @overload
    def extract(
        self, template: str, fields: Any, *, chunksize: None = None, **options: Any
    ) -> pd.DataFrame: ...
    @overload
    def extract(
        self, template: str, fields: Any, *, chunksize: int, **options: Any
    ) -> Iterator[pd.DataFrame]: ...
    @overload
    def extract(
        self, template: str, fields: Any, *, chunksize: int | None = None, **options: Any
    ) -> pd.DataFrame | Iterator[pd.DataFrame]: ...

    @_front_door
    def extract(
        self,
        template: str,
        fields: Any,
        *,
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
        chunksize : int, optional
            Stream the result, as in :meth:`generate`.

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
        run = prepare(self._obj, _spec(template, options, fields=fields))
        return _sync(run, chunksize)

    @overload
    async def aextract(
        self, template: str, fields: Any, *, chunksize: None = None, **options: Any
    ) -> pd.DataFrame: ...
    @overload
    async def aextract(
        self, template: str, fields: Any, *, chunksize: int, **options: Any
    ) -> AsyncIterator[pd.DataFrame]: ...
    @overload
    async def aextract(
        self, template: str, fields: Any, *, chunksize: int | None = None, **options: Any
    ) -> pd.DataFrame | AsyncIterator[pd.DataFrame]: ...

    @_front_door
    async def aextract(
        self,
        template: str,
        fields: Any,
        *,
        chunksize: int | None = None,
        **options: Any,
    ) -> pd.DataFrame | AsyncIterator[pd.DataFrame]:
        """Coroutine version of :meth:`extract`.

        Parameters
        ----------
        template : str
            The prompt, with ``${column}`` placeholders (see :meth:`generate`).
        fields : list of str, dict, or pydantic model
            The keys of each object, as in :meth:`extract`.
        chunksize : int, optional
            Return an async iterator of finished frames, as in :meth:`agenerate`.

        Returns
        -------
        pandas.DataFrame or async iterator of pandas.DataFrame
            As in :meth:`extract`.

        Raises
        ------
        ConfigurationError, APIError, RowsFailedError
            As in :meth:`extract`.

        Examples
        --------
        >>> qa = await df.llm.aextract("Q/A in: ${text}", ["question", "answer"])  # doctest: +SKIP
        """
        run = prepare(self._obj, _spec(template, options, fields=fields))
        if chunksize is None:
            return await run.execute()
        return run.chunks(_chunksize(chunksize))

    @_front_door
    def estimate(self, template: str, *, fields: Any = None, **options: Any) -> pd.Series:
        """What :meth:`generate` (or :meth:`extract`, with ``fields``) would send and cost.

        Renders every prompt exactly as the run would and sends nothing; needs no API key.

        Parameters
        ----------
        template : str
            The prompt, with ``${column}`` placeholders (see :meth:`generate`).
        fields : optional
            Estimate :meth:`extract` with these fields instead of :meth:`generate`.
            ``max_tokens`` (in ``options``) bounds the completion tokens.

        Returns
        -------
        pandas.Series
            ``rows``, ``skipped_rows``, ``cached_rows`` (already in the cache for this exact
            call), ``duplicate_rows`` (sent once, shared), ``requests``, ``prompt_tokens``,
            ``completion_tokens`` (``None`` without ``max_tokens``), ``cost`` in USD
            (``None`` when the model's price is unknown: never a guess) and ``tokenizer``.
            With ``rows_per_request``, also ``rows_per_request`` (the rows a pack would hold),
            ``packed_requests``, ``packed_prompt_tokens``, ``packed_completion_tokens`` and
            ``packed_cost``: the same run with several rows per request, and the
            ``batch_rows_per_request``, ``batch_packed_*`` figures of the same with
            ``batch=True``. Also ``batch_cost`` (``batch=True``: the first row live, the rest
            at half price). ``.attrs["modes"]`` puts live, live packed, batch and batch
            packed (the packed ones with ``rows_per_request``) side by side: requests,
            tokens, cost and the expected time (live: from ``rpm``; a batch: within 24
            hours).

        Raises
        ------
        ConfigurationError
            A bad template, option or ``fields``.

        Examples
        --------
        >>> df.llm.estimate("Summarize: ${text}", max_tokens=200)  # doctest: +SKIP
        """
        output = None if fields is not None else "output"
        run = prepare(
            self._obj, _spec(template, options, output=output, fields=fields), sending=False
        )
        return with_batch_figures(_estimate(run.frame, run.template, run.plan), run.config.rpm)


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
