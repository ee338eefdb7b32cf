"""Tests for parrot_pandas._template: placeholders, the checks before any request, rendering."""

from __future__ import annotations

import inspect
from datetime import date

import numpy as np
import pandas as pd
import pytest

from parrot_pandas._template import PromptTemplate
from parrot_pandas.errors import ConfigurationError


def render_all(template: str, frame: pd.DataFrame) -> list[str | None]:
    return list(PromptTemplate(template).rows(frame))


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "columns"),
    [
        ("Summarize: ${text}", ("text",)),
        ("Summarize: $text", ("text",)),
        ("${a} and $b and ${a} again", ("a", "b")),
        ("${source url} from ${2024}", ("source url", "2024")),
        ("${naïve} ${a-b} ${x.y}", ("naïve", "a-b", "x.y")),
        ("costs $$5 and $$$$", ()),
        ("no placeholders at all", ()),
        ("", ()),
    ],
)
def test_placeholders_are_found_in_order_without_duplicates(text, columns):
    assert PromptTemplate(text).columns == columns


@pytest.mark.parametrize("bad", [None, 42, b"${text}", ["${text}"]])
def test_a_non_string_template_is_refused(bad):
    with pytest.raises(
        ConfigurationError, match=f"template must be a string.*{type(bad).__name__}"
    ):
        PromptTemplate(bad)


@pytest.mark.parametrize(
    ("text", "position"),
    [("price $5", 6), ("x ${} y", 2), ("trailing $", 9), ("$ at start", 0), ("${unclosed", 0)],
)
def test_a_stray_dollar_is_refused_with_its_position(text, position):
    with pytest.raises(ConfigurationError) as info:
        PromptTemplate(text)
    message = str(info.value)
    assert f"stray '$' at position {position}" in message
    assert "$$ for a literal dollar sign" in message
    assert text[position] == "$"


# -- check -----------------------------------------------------------------------------------


def test_check_names_missing_and_available_columns_and_the_closest_match():
    with pytest.raises(ConfigurationError) as info:
        PromptTemplate("${txt} by ${author}").check(pd.Index(["text", "title"]))
    message = str(info.value)
    assert "['txt', 'author']" in message
    assert "available columns: ['text', 'title']" in message
    assert "did you mean ${text} for ${txt}?" in message
    assert "for ${author}" not in message  # no close match, no hint


def test_check_accepts_present_columns_and_non_string_labels():
    PromptTemplate("${text} ${0} $title").check(pd.Index(["text", 0, "title"], dtype=object))


def test_check_refuses_a_column_label_that_appears_twice():
    with pytest.raises(ConfigurationError, match=r"column 'x' appears 2 times"):
        PromptTemplate("${x}").check(pd.Index(["x", "y", "x"]))


def test_check_ignores_duplicates_the_template_does_not_use():
    PromptTemplate("${y}").check(pd.Index(["x", "y", "x"]))


# -- rows ------------------------------------------------------------------------------------


def test_braced_bare_and_escaped_placeholders_render():
    frame = pd.DataFrame({"item": ["tea", "cake"], "price": [2.5, 3]})
    assert render_all("${item} costs $$$price, i.e. $$${price}", frame) == [
        "tea costs $2.5, i.e. $2.5",
        "cake costs $3.0, i.e. $3.0",
    ]


def test_column_names_with_spaces_and_punctuation():
    frame = pd.DataFrame({"source url": ["http://a"], "a-b": ["x"], "naïve": ["y"]})
    assert render_all("${source url} ${a-b} ${naïve}", frame) == ["http://a x y"]


def test_non_string_column_labels_are_named_by_their_str():
    frame = pd.DataFrame({0: ["zero"], 2024: ["year"], "text": ["t"]})
    assert render_all("${0}/${2024}/${text}", frame) == ["zero/year/t"]


def test_braces_in_the_template_and_in_values_are_literal():
    frame = pd.DataFrame({"x": ["{0} {y}"]})
    assert render_all('{"json": {0}} ${x} }{', frame) == ['{"json": {0}} {0} {y} }{']


def test_a_template_without_placeholders_repeats_once_per_row_and_unescapes_dollars():
    frame = pd.DataFrame({"a": [1, 2, 3]})
    assert render_all("Pay $$5.", frame) == ["Pay $5."] * 3


def test_values_are_rendered_with_str():
    when = pd.Timestamp("2024-01-02 03:04:05")
    frame = pd.DataFrame(
        {
            "int": [7],
            "float": [1.5],
            "bool": [True],
            "ts": [when],
            "date": [date(2024, 1, 2)],
            "list": [[1, "a"]],
            "dict": [{"k": 1}],
            "nullable": pd.array([5], dtype="Int64"),
            "cat": pd.Categorical(["red"]),
        }
    )
    template = " | ".join(f"${{{c}}}" for c in frame.columns)
    expected = " | ".join(
        ["7", "1.5", "True", str(when), "2024-01-02", "[1, 'a']", "{'k': 1}", "5", "red"]
    )
    assert render_all(template, frame) == [expected]


@pytest.mark.parametrize(
    "missing",
    [None, np.nan, float("nan"), pd.NA, pd.NaT],
    ids=["None", "np.nan", "float-nan", "pd.NA", "NaT"],
)
def test_a_row_with_a_missing_value_yields_none(missing):
    frame = pd.DataFrame({"a": ["x", missing, "z"], "b": ["1", "2", "3"]}, dtype=object)
    assert render_all("${a}-${b}", frame) == ["x-1", None, "z-3"]


def test_missing_values_in_typed_columns_yield_none():
    frame = pd.DataFrame(
        {
            "s": pd.array(["a", None, "c", "d"], dtype="string"),
            "i": pd.array([1, 2, None, 4], dtype="Int64"),
            "t": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", None]),
        }
    )
    assert render_all("${s}", frame) == ["a", None, "c", "d"]
    assert render_all("${s}${i}${t}", frame) == ["a12024-01-01 00:00:00", None, None, None]


def test_a_missing_value_in_a_column_the_template_does_not_use_is_ignored():
    frame = pd.DataFrame({"used": ["x", "y"], "unused": [None, np.nan]})
    assert render_all("${used}", frame) == ["x", "y"]


def test_empty_strings_and_zeros_are_values_not_missing():
    frame = pd.DataFrame({"s": ["", "a"], "n": [0, 0.0]})
    assert render_all("[${s}|${n}]", frame) == ["[|0.0]", "[a|0.0]"]


def test_rows_refuses_a_missing_column():
    rows = PromptTemplate("${nope}").rows(pd.DataFrame({"text": ["a"]}))
    with pytest.raises(ConfigurationError, match="'nope'"):
        next(rows)


def test_rows_refuses_a_duplicated_column_label_used_in_the_template():
    frame = pd.DataFrame([["a", "b", "c"]], columns=["x", "y", "x"])
    with pytest.raises(ConfigurationError, match="'x' appears 2 times"):
        list(PromptTemplate("${x}").rows(frame))
    assert list(PromptTemplate("${y}").rows(frame)) == ["b"]


def test_labels_that_collide_as_strings_count_as_duplicates():
    frame = pd.DataFrame([["int", "str"]], columns=pd.Index([1, "1"], dtype=object))
    with pytest.raises(ConfigurationError, match="'1' appears 2 times"):
        list(PromptTemplate("${1}").rows(frame))


def test_rows_keep_input_order_with_any_index():
    frame = pd.DataFrame(
        {"a": ["p", "q", "r"]},
        index=pd.MultiIndex.from_tuples([("z", 2), ("z", 2), ("a", 1)]),
    )
    assert render_all("${a}", frame) == ["p", "q", "r"]


def test_rows_of_an_empty_frame():
    assert render_all("${a}", pd.DataFrame({"a": pd.Series([], dtype=object)})) == []
    assert render_all("static", pd.DataFrame({"a": []})) == []


def test_rows_span_several_blocks_in_order(monkeypatch):
    monkeypatch.setattr("parrot_pandas._template._BLOCK", 3)
    values = [f"v{i}" if i % 4 else None for i in range(10)]
    frame = pd.DataFrame({"a": values})
    assert render_all("<${a}>", frame) == [None if v is None else f"<{v}>" for v in values]


def test_rows_is_lazy():
    rendered: list[int] = []

    class Loud:
        def __init__(self, i: int) -> None:
            self.i = i

        def __str__(self) -> str:
            rendered.append(self.i)
            return f"#{self.i}"

    frame = pd.DataFrame({"a": [Loud(i) for i in range(5)]})
    rows = PromptTemplate("${a}").rows(frame)
    assert inspect.isgenerator(rows)
    assert rendered == []  # nothing happens before the first prompt is asked for
    assert next(rows) == "#0"
    assert rendered == [0]
    assert next(rows) == "#1"
    assert rendered == [0, 1]


def test_rows_do_not_modify_the_frame():
    frame = pd.DataFrame({"a": ["x", None], "b": [1, 2]})
    before = frame.copy()
    list(PromptTemplate("${a} ${b}").rows(frame))
    pd.testing.assert_frame_equal(frame, before)


def test_render_substitutes_str_of_each_value():
    template = PromptTemplate("${a} + $b = $$${c}")
    assert template.render({"a": 1, "b": 2.5, "c": [3], "unused": 0}) == "1 + 2.5 = $[3]"
    with pytest.raises(KeyError):
        template.render({"a": 1})
