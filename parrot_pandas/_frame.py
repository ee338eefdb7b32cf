"""Answers -> the exploded output DataFrame: input columns first, index labels kept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ._structured import Field, to_column

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
        ``values`` (the row's distinct answers) and ``error`` (its message, or ``None``).
    fields : tuple of Field
        The output columns.
    scalar : bool
        ``True`` when each answer is one value (``generate``: it fills ``fields[0]``),
        ``False`` when it is a dict of field values (``extract``).
    with_errors : bool
        Add the ``llm_error`` column (failed rows' messages, NA elsewhere).

    Returns
    -------
    (pandas.DataFrame, pandas.Series)
        The frame, and the failed rows' messages indexed by their input labels.
        A row with no answer (skipped, failed, or nothing extracted) keeps one output row
        with NA in the output columns, so no input row disappears.

    Raises
    ------
    ValueError
        If ``outcome`` does not have one entry per input row.
    """
    if len(outcome) != len(frame):
        # A short outcome would silently shift every answer onto the wrong input row.
        raise ValueError(f"{len(outcome)} outcomes for {len(frame)} input rows")
    counts = np.ones(len(frame), dtype=np.intp)
    answers: list[Any] = []
    messages: list[str | None] = []
    failed: list[int] = []
    for position, job in enumerate(outcome):
        values = job.values if job is not None else None
        if values:
            counts[position] = len(values)
            answers.extend(values)
            messages.extend([None] * len(values))
            continue
        answers.append(None)
        error = job.error if job is not None else None
        messages.append(error)
        if error is not None:
            failed.append(position)
    out = frame.take(np.repeat(np.arange(len(frame)), counts))
    for f in fields:
        column = answers if scalar else [a.get(f.name) if a is not None else None for a in answers]
        # `.array` assigns by position: duplicate index labels must not be aligned.
        out[f.name] = to_column(column, f).array
    if with_errors:
        out[ERROR_COLUMN] = pd.array(messages, dtype="string")
    errors = pd.Series(
        [outcome[p].error for p in failed],  # type: ignore[union-attr]
        index=frame.index[failed],
        dtype="string",
        name=ERROR_COLUMN,
    )
    return out, errors
