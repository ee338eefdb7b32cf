"""Tests for parrot_pandas._frame.explode: answers -> the output DataFrame."""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import numpy as np
import pandas as pd
import pytest

from parrot_pandas._frame import ERROR_COLUMN, explode
from parrot_pandas._structured import normalize_fields


@dataclass
class Outcome:
    values: list[Any] | None = None
    error: str | None = None


SUMMARY = normalize_fields({"summary": str})
NA = pd.NA


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {"text": ["t0", "t1", "t2", "t3"], "n": [0, 1, 2, 3]},
        index=pd.Index(["a", "b", "c", "d"], name="doc"),
    )


def generate(frame, outcome, *, with_errors=False):
    return explode(frame, outcome, SUMMARY, scalar=True, with_errors=with_errors)


def test_one_row_per_value_with_the_index_label_repeated(frame):
    outcome = [Outcome(["x"]), Outcome(["y1", "y2", "y3"]), Outcome(["z"]), Outcome([""])]
    out, errors = generate(frame, outcome)
    assert out.index.tolist() == ["a", "b", "b", "b", "c", "d"]
    assert out.index.name == "doc"
    assert out["summary"].tolist() == ["x", "y1", "y2", "y3", "z", ""]
    assert out["text"].tolist() == ["t0", "t1", "t1", "t1", "t2", "t3"]
    assert out["n"].tolist() == [0, 1, 1, 1, 2, 3]
    assert out["summary"].dtype == "string"
    assert errors.empty


def test_input_columns_first_and_the_input_untouched(frame):
    before = frame.copy()
    out, _ = generate(frame, [Outcome(["x", "y"])] * 4, with_errors=True)
    assert out.columns.tolist() == ["text", "n", "summary", ERROR_COLUMN]
    pd.testing.assert_frame_equal(frame, before)
    assert out.dtypes["n"] == frame.dtypes["n"]
    assert out.dtypes["text"] == frame.dtypes["text"]
    out.loc["a", "text"] = "changed"
    pd.testing.assert_frame_equal(frame, before)


@pytest.mark.parametrize(
    "missing",
    [None, Outcome(None), Outcome([]), Outcome(None, "boom")],
    ids=["skipped", "no-values", "empty", "failed"],
)
def test_a_row_without_answers_keeps_one_na_row(frame, missing):
    out, _ = generate(frame, [Outcome(["x"]), missing, Outcome(["z"]), Outcome(["w"])])
    assert out.index.tolist() == ["a", "b", "c", "d"]
    assert out["summary"].isna().tolist() == [False, True, False, False]
    assert out.loc["b", "text"] == "t1"


def test_failed_rows_give_the_error_column_and_the_errors_series(frame):
    outcome = [
        Outcome(["x", "x2"]),
        Outcome(None, "HTTP 400: too long"),
        None,
        Outcome(None, "timeout"),
    ]
    out, errors = generate(frame, outcome, with_errors=True)
    assert out[ERROR_COLUMN].tolist() == [NA, NA, "HTTP 400: too long", NA, "timeout"]
    assert out[ERROR_COLUMN].dtype == "string"
    assert errors.to_dict() == {"b": "HTTP 400: too long", "d": "timeout"}
    assert errors.name == ERROR_COLUMN
    assert errors.dtype == "string"
    assert errors.index.name == "doc"


def test_without_the_error_column_errors_are_still_reported(frame):
    out, errors = generate(frame, [Outcome(None, "bad")] + [Outcome(["ok"])] * 3)
    assert ERROR_COLUMN not in out.columns
    assert errors.to_dict() == {"a": "bad"}


def test_a_row_with_answers_has_no_error_even_if_one_was_recorded(frame):
    # Partial samples are kept by the scheduler; what counts here is that values exist.
    out, errors = generate(
        frame, [Outcome(["x"], "late")] + [Outcome(["ok"])] * 3, with_errors=True
    )
    assert out[ERROR_COLUMN].isna().all()
    assert errors.empty


def test_duplicate_index_labels_are_not_aligned(frame):
    dup = frame.set_axis(pd.Index(["k", "k", "j", "k"], name="doc"))
    outcome = [Outcome(["first"]), Outcome(["second", "third"]), None, Outcome(None, "e4")]
    out, errors = generate(dup, outcome, with_errors=True)
    assert out.index.tolist() == ["k", "k", "k", "j", "k"]
    assert out["summary"].tolist() == ["first", "second", "third", NA, NA]
    assert out["text"].tolist() == ["t0", "t1", "t1", "t2", "t3"]
    assert out[ERROR_COLUMN].tolist() == [NA, NA, NA, NA, "e4"]
    assert errors.index.tolist() == ["k"] and errors.tolist() == ["e4"]


def test_a_multiindex_is_kept(frame):
    multi = frame.set_axis(
        pd.MultiIndex.from_tuples([("x", 1), ("x", 2), ("y", 1), ("y", 1)], names=["grp", "i"])
    )
    out, errors = generate(multi, [Outcome(["a", "b"]), None, Outcome(["c"]), Outcome(None, "e")])
    assert isinstance(out.index, pd.MultiIndex)
    assert out.index.names == ["grp", "i"]
    assert out.index.tolist() == [("x", 1), ("x", 1), ("x", 2), ("y", 1), ("y", 1)]
    assert errors.index.tolist() == [("y", 1)]
    assert errors.index.names == ["grp", "i"]


def test_results_join_back_to_the_input(frame):
    out, _ = generate(frame, [Outcome(["x"]), Outcome(["y1", "y2"]), None, Outcome(["w"])])
    joined = frame[["n"]].join(out[["summary"]])
    assert joined["summary"].tolist() == ["x", "y1", "y2", NA, "w"]


def test_an_empty_frame_returns_the_output_columns():
    empty = pd.DataFrame({"text": pd.Series([], dtype="string")})
    out, errors = explode(empty, [], SUMMARY, scalar=True, with_errors=True)
    assert out.columns.tolist() == ["text", "summary", ERROR_COLUMN]
    assert len(out) == 0 and errors.empty
    assert out["summary"].dtype == "string"
    assert out["text"].dtype == "string"


def test_extract_fields_get_their_dtypes():
    class Color(Enum):
        RED = "red"
        BLUE = "blue"

    fields = normalize_fields(
        {
            "name": str,
            "year": int,
            "score": float,
            "ok": bool,
            "tags": list[str],
            "kind": Literal["a", "b"],
            "color": Color,
        }
    )
    frame = pd.DataFrame({"text": ["one", "two", "three"]}, index=[10, 20, 30])
    first = {
        "name": "n",
        "year": 1815,
        "score": 0.5,
        "ok": True,
        "tags": ["x", "y"],
        "kind": "a",
        "color": "red",
    }
    partial = {"name": "m", "year": None}
    out, errors = explode(
        frame,
        [Outcome([first, partial]), Outcome([]), None],
        fields,
        scalar=False,
        with_errors=False,
    )
    assert out.index.tolist() == [10, 10, 20, 30]
    assert {c: str(out[c].dtype) for c in out.columns[1:]} == {
        "name": "string",
        "year": "Int64",
        "score": "Float64",
        "ok": "boolean",
        "tags": "object",
        "kind": "category",
        "color": "category",
    }
    assert out["year"].tolist() == [1815, NA, NA, NA]
    assert out["tags"].tolist() == [["x", "y"], None, None, None]
    assert out["kind"].cat.categories.tolist() == ["a", "b"]
    assert out["color"].tolist()[0] == "red"
    assert errors.empty


def test_extract_missing_keys_are_na():
    fields = normalize_fields(["question", "answer"])
    frame = pd.DataFrame({"text": ["doc"]})
    out, _ = explode(frame, [Outcome([{"question": "q"}])], fields, scalar=False, with_errors=False)
    assert out["question"].tolist() == ["q"]
    assert out["answer"].tolist() == [NA]


def test_the_same_outcome_shared_by_two_rows(frame):
    shared = Outcome(["same", "other"])
    out, _ = generate(frame, [shared, shared, Outcome(["z"]), None])
    assert out.index.tolist() == ["a", "a", "b", "b", "c", "d"]


def test_non_string_column_labels_and_a_range_index():
    frame = pd.DataFrame({0: ["a", "b"], 1: [1.5, np.nan]})
    out, _ = generate(frame, [Outcome(["x"]), None])
    assert out.columns.tolist() == [0, 1, "summary"]
    assert out.index.tolist() == [0, 1]


def test_an_outcome_of_the_wrong_length_is_refused(frame):
    with pytest.raises(ValueError, match="3 outcomes for 4 input rows"):
        generate(frame, [Outcome(["x"])] * 3)


# --------------------------------------------------------------------------- defence in depth
# The parser refuses what a column cannot hold; these values did not come from it (a cache
# entry from an older parser, a hand-built outcome). None may cost the frame.


def test_a_value_its_column_cannot_hold_fails_its_row_not_the_frame(frame):
    fields = normalize_fields({"year": int, "kind": Literal["a", "b"]})
    outcome = [
        Outcome([{"year": 1, "kind": "a"}]),
        Outcome([{"year": 2, "kind": "b"}, {"year": 12345678901234567890, "kind": "a"}]),
        Outcome([{"year": 3, "kind": "z"}]),
        Outcome([{"year": 4, "kind": "b"}]),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, errors = explode(frame, outcome, fields, scalar=False, with_errors=False)
    # One output row per input row: the bad rows keep one NA row with their error.
    assert out.index.tolist() == ["a", "b", "c", "d"]
    assert out["year"].dtype == "Int64"
    assert out["year"].tolist() == [1, NA, NA, 4]
    assert out["kind"].tolist()[::3] == ["a", "b"]
    assert out["kind"].isna().tolist() == [False, True, True, False]
    # The error column appears even though no row had failed before.
    assert out[ERROR_COLUMN].isna().tolist() == [True, False, False, True]
    assert errors.index.tolist() == ["b", "c"]
    assert errors["b"] == "field 'year': 12345678901234567890 does not fit its Int64 column"
    assert errors["c"] == "field 'kind': 'z' does not fit its category column"


def test_failed_rows_and_unfit_rows_are_reported_together(frame):
    fields = normalize_fields({"day": dt.date})
    outcome = [
        Outcome([{"day": dt.date(2024, 1, 2)}]),
        Outcome(None, "HTTP 400: too long"),
        Outcome([{"day": "not a date"}]),
        None,
    ]
    out, errors = explode(frame, outcome, fields, scalar=False, with_errors=True)
    assert out["day"].dtype == "datetime64[us]"
    assert out["day"].tolist()[0] == pd.Timestamp("2024-01-02")
    assert out[ERROR_COLUMN].tolist()[:2] == [NA, "HTTP 400: too long"]
    assert errors.index.tolist() == ["b", "c"]
    assert "'not a date' does not fit its datetime64[us] column" in errors["c"]


def test_an_extract_answer_that_is_not_an_object_fails_its_row(frame):
    fields = normalize_fields(["name"])
    outcome = [Outcome([{"name": "x"}]), Outcome(["just text"]), Outcome([]), None]
    out, errors = explode(frame, outcome, fields, scalar=False, with_errors=False)
    assert out["name"].tolist() == ["x", NA, NA, NA]
    assert errors.index.tolist() == ["b"]
    assert "not an object" in errors["b"] and "just text" in errors["b"]
