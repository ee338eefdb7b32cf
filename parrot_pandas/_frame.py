"""Answers -> the exploded output DataFrame: input columns first, index labels kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ._structured import Field, to_column, value_error
from .errors import StructuredOutputError

__all__ = ["ERROR_COLUMN", "explode"]

ERROR_COLUMN = "llm_error"


class _Outcome(Protocol):
    values: list[Any] | None
    error: str | None


def explode(
    frame: pd.DataFrame,
    outcome: Sequence[_Outcome | None],
    fields: tuple[Field, ...],
    *,
    scalar: bool,
    with_errors: bool,
) -> tuple[pd.DataFrame, pd.Series]:
    """Build the result: one output row per answer, like ``DataFrame.explode``.

    Parameters
    ----------
    frame : pandas.DataFrame
        The input; never modified.
    outcome : sequence
        Per input row: ``None`` (skipped: a template value was missing) or an object with
        ``values`` (the row's distinct answers, as the parser returned them) and ``error``
        (its message, or ``None``).
    fields : tuple of Field
        The output columns.
    scalar : bool
        ``True`` when each answer is one value (``generate``: it fills ``fields[0]``),
        ``False`` when it is a dict of field values (``extract``).
    with_errors : bool
        Add the ``llm_error`` column (failed rows' messages, NA elsewhere). It is added
        anyway when a row's answer turns out not to fit its columns (below).

    Returns
    -------
    (pandas.DataFrame, pandas.Series)
        The frame, and the failed rows' messages indexed by their input labels.
        A row with no answer (skipped, failed, or nothing extracted) keeps one output row
        with NA in the output columns, so no input row disappears. A row whose answer holds
        a value its column cannot hold (which the parser should have refused) becomes a
        failed row with that value named in its error: one bad answer never costs the
        frame.

    Raises
    ------
    ValueError
        If ``outcome`` does not have one entry per input row.
    """
    if len(outcome) != len(frame):
        # A short outcome would silently shift every answer onto the wrong input row.
        raise ValueError(f"{len(outcome)} outcomes for {len(frame)} input rows")
    rows = _Rows(outcome)
    try:
        columns = rows.columns(fields, scalar)
    except _UNFIT:
        # The slow path, taken only when something slipped past the parser: find the rows
        # whose answers do not fit, fail them, and build the columns from the rest.
        outcome = [_screened(job, fields, scalar) for job in outcome]
        rows = _Rows(outcome)
        columns = rows.columns(fields, scalar)
        with_errors = with_errors or bool(rows.failed)
    out = frame.take(np.repeat(np.arange(len(frame)), rows.counts))
    for name, column in columns.items():
        # `.array` assigns by position: duplicate index labels must not be aligned.
        out[name] = column.array
    if with_errors:
        out[ERROR_COLUMN] = pd.array(rows.messages, dtype="string")
    errors = pd.Series(
        [outcome[p].error for p in rows.failed],  # type: ignore[union-attr]
        index=frame.index[rows.failed],
        dtype="string",
        name=ERROR_COLUMN,
    )
    return out, errors


# What building a column from answers can raise: a value that does not fit (to_column's
# verdict) or, for ``extract``, an answer that is not an object at all.
_UNFIT = (StructuredOutputError, AttributeError, TypeError)


class _Rows:
    """The outcome flattened: one entry per output row."""

    def __init__(self, outcome: Sequence[_Outcome | None]) -> None:
        self.counts = np.ones(len(outcome), dtype=np.intp)
        self.answers: list[Any] = []
        self.messages: list[str | None] = []
        self.failed: list[int] = []
        for position, job in enumerate(outcome):
            values = job.values if job is not None else None
            if values:
                self.counts[position] = len(values)
                self.answers.extend(values)
                self.messages.extend([None] * len(values))
                continue
            self.answers.append(None)
            error = job.error if job is not None else None
            self.messages.append(error)
            if error is not None:
                self.failed.append(position)

    def columns(self, fields: Sequence[Field], scalar: bool) -> dict[str, pd.Series]:
        answers = self.answers
        result = {}
        for f in fields:
            column = (
                answers if scalar else [a.get(f.name) if a is not None else None for a in answers]
            )
            result[f.name] = to_column(column, f)
        return result


@dataclass
class _Failed:
    values: list[Any] | None
    error: str | None


def _screened(job: _Outcome | None, fields: Sequence[Field], scalar: bool) -> _Outcome | None:
    """The row as it is, or failed with the reason its first unfit answer does not fit."""
    if job is None or not job.values:
        return job
    for answer in job.values:
        problem = _problem(answer, fields, scalar)
        if problem is not None:
            return _Failed(None, problem)
    return job


def _problem(answer: Any, fields: Sequence[Field], scalar: bool) -> str | None:
    if scalar:
        return value_error(answer, fields[0])
    if not isinstance(answer, dict):
        return f"the answer is not an object of fields: {answer!r:.60}"
    for f in fields:
        problem = value_error(answer.get(f.name), f)
        if problem is not None:
            return problem
    return None
