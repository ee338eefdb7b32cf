"""Tests for parrot_pandas._structured: fields, schema, parsing, coercion, dedupe, columns."""

from __future__ import annotations

import enum
import json
import pickle
import subprocess
import sys
from typing import Annotated, Any, List, Literal, Optional, Union  # noqa: UP035

import numpy as np
import pandas as pd
import pytest

from parrot_pandas._structured import (
    Field,
    dedupe_items,
    items_schema,
    normalize_fields,
    output_dtypes,
    parse_items,
    schema_instructions,
    to_column,
)
from parrot_pandas.errors import ConfigurationError, StructuredOutputError


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Size(enum.Enum):
    SMALL = "S"
    LARGE = "L"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mixed(enum.Enum):
    A = "a"
    B = 2


class Empty(enum.Enum):
    pass


# --------------------------------------------------------------------------- normalize_fields


@pytest.mark.parametrize(
    ("annotation", "schema", "dtype", "nullable", "choices"),
    [
        (str, {"type": "string"}, "string", False, None),
        (int, {"type": "integer"}, "Int64", False, None),
        (float, {"type": "number"}, "Float64", False, None),
        (bool, {"type": "boolean"}, "boolean", False, None),
        (list[str], {"type": "array", "items": {"type": "string"}}, "object", False, None),
        (List[int], {"type": "array", "items": {"type": "integer"}}, "object", False, None),  # noqa: UP006
        (
            list[Literal["a", "b"]],
            {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "object",
            False,
            None,
        ),
        (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}, "category", False, ("a", "b")),
        (Literal[1, 2], {"type": "integer", "enum": [1, 2]}, "category", False, (1, 2)),
        (Color, {"type": "string", "enum": ["red", "green"]}, "category", False, ("red", "green")),
        (Level, {"type": "integer", "enum": [1, 2]}, "category", False, (1, 2)),
        (Optional[int], {"type": ["integer", "null"]}, "Int64", True, None),  # noqa: UP045
        (int | None, {"type": ["integer", "null"]}, "Int64", True, None),
        (Union[None, str], {"type": ["string", "null"]}, "string", True, None),  # noqa: UP007
        (
            list[str] | None,
            {"type": ["array", "null"], "items": {"type": "string"}},
            "object",
            True,
            None,
        ),
        (
            Literal["a", "b"] | None,
            {"anyOf": [{"type": "string", "enum": ["a", "b"]}, {"type": "null"}]},
            "category",
            True,
            ("a", "b"),
        ),
        (
            Literal["a", None],
            {"anyOf": [{"type": "string", "enum": ["a"]}, {"type": "null"}]},
            "category",
            True,
            ("a",),
        ),
        (Annotated[int, "meta"], {"type": "integer"}, "Int64", False, None),
    ],
)
def test_normalize_fields_types(annotation, schema, dtype, nullable, choices):
    (f,) = normalize_fields({"x": annotation})
    assert f == Field("x", annotation, schema, dtype, nullable, choices)


def test_normalize_fields_list_of_names_are_strings_in_order():
    fields = normalize_fields(["question", "answer"])
    assert [f.name for f in fields] == ["question", "answer"]
    assert all(f.annotation is str and f.dtype == "string" for f in fields)
    assert normalize_fields(("a",))[0].name == "a"


def test_normalize_fields_is_idempotent_and_fields_are_hashable_and_picklable():
    fields = normalize_fields({"name": str, "color": Color, "tags": list[str] | None})
    assert normalize_fields(fields) == fields
    assert normalize_fields(list(fields)) == fields
    assert len({*fields}) == 3
    assert pickle.loads(pickle.dumps(fields)) == fields


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ("question", ["not a string", "fields=['question']"]),
        (42, ["list of names", "not 42"]),
        (None, ["list of names", "not None"]),
        (str, ["list of names", "not str"]),
        ({"b", "a"}, ["ordered", "fields=['a', 'b']"]),
        ([], ["empty", "at least one"]),
        ({}, ["empty"]),
        (["a", "a"], ["'a' is given twice"]),
        ([1], ["must be strings", "position 0"]),
        ([str], ["must be strings", "dict"]),
        ({1: str}, ["must be strings", "1 (int)"]),
        ([""], ["must not be empty"]),
        (["  "], ["must not be empty"]),
        (["llm_error"], ["'llm_error' is reserved", "rename"]),
        ({"llm_error": int}, ["reserved"]),
        ({"x": dict}, ["'x'", "unsupported type dict", "supported types are str, int"]),
        ({"x": None}, ["'x'", "unsupported type None", "supported"]),
        ({"x": Any}, ["'x'", "unsupported type", "supported"]),
        ({"x": int | str}, ["'x'", "int | str", "Optional[X]"]),
        ({"x": Union[int, str, None]}, ["'x'", "Optional[X]"]),  # noqa: UP007
        ({"x": list}, ["'x'", "list[str], not list"]),
        ({"x": list[int | None]}, ["'x'", "list elements"]),
        ({"x": list[list[str]]}, ["'x'", "list elements"]),
        ({"x": tuple[str]}, ["'x'", "unsupported type", "supported"]),
        ({"x": Literal["a", 1]}, ["'x'", "all strings or all integers"]),
        ({"x": Literal[True, False]}, ["'x'", "all strings or all integers"]),
        ({"x": Literal[None]}, ["'x'", "at least one value"]),
        ({"x": Mixed}, ["'x'", "Mixed", "all strings or all integers"]),
        ({"x": Empty}, ["'x'", "at least one value"]),
        ({"year": "int"}, ["'year'", "the string 'int'", "pass the type itself"]),
    ],
)
def test_normalize_fields_errors(fields, fragments):
    with pytest.raises(ConfigurationError) as info:
        normalize_fields(fields)
    for fragment in fragments:
        assert fragment in str(info.value)


# --------------------------------------------------------------------------- pydantic


def test_pydantic_model_fields():
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(description="full name")
        year: Optional[int] = None  # noqa: UP045
        color: Color
        tags: list[str]

    fields = normalize_fields(Person)
    assert [f.name for f in fields] == ["name", "year", "color", "tags"]
    assert fields[0].schema == {"type": "string", "description": "full name"}
    assert fields[1].nullable and fields[1].dtype == "Int64"
    assert fields[2].choices == ("red", "green")
    assert fields[3].dtype == "object"
    items = parse_items('{"name": "Ada", "color": "RED", "tags": "x"}', Person)
    assert items == [{"name": "Ada", "year": None, "color": "red", "tags": ["x"]}]


def test_pydantic_unsupported_and_reserved():
    pydantic = pytest.importorskip("pydantic")

    class Nested(pydantic.BaseModel):
        inner: dict[str, int]

    class Reserved(pydantic.BaseModel):
        llm_error: str

    with pytest.raises(ConfigurationError, match="'inner' has unsupported type"):
        normalize_fields(Nested)
    with pytest.raises(ConfigurationError, match="reserved"):
        normalize_fields(Reserved)


def test_importing_structured_does_not_import_pydantic():
    code = (
        "import sys, parrot_pandas._structured as s; "
        "s.normalize_fields({'a': int}); print('pydantic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- schema


def _objects(schema: Any):
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            yield schema
        for value in schema.values():
            yield from _objects(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _objects(value)


ALL_TYPES = {
    "s": str,
    "i": int,
    "f": float,
    "b": bool,
    "tags": list[str],
    "opt": Optional[float],  # noqa: UP045
    "lit": Literal["x", "y"],
    "optlit": Literal["x"] | None,
    "color": Color,
    "level": Level,
    "optlist": list[Color] | None,
}


def test_items_schema_shape():
    schema = items_schema(["question", "answer"])
    assert schema == {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                    "required": ["question", "answer"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["items"],
        "additionalProperties": False,
    }


def test_items_schema_is_strict_everywhere():
    schema = items_schema(ALL_TYPES)
    objects = list(_objects(schema))
    assert len(objects) == 2
    for obj in objects:
        assert obj["type"] == "object"
        assert obj["additionalProperties"] is False
        assert obj["required"] == list(obj["properties"])
    for prop in schema["properties"]["items"]["items"]["properties"].values():
        for sub in prop.get("anyOf", [prop]):
            if "enum" in sub:
                assert sub["type"] in ("string", "integer")
    json.dumps(schema)  # JSON-serialisable, no Python-only values


def test_items_schema_is_a_fresh_copy():
    fields = normalize_fields({"tags": list[str]})
    schema = items_schema(fields)
    schema["properties"]["items"]["items"]["properties"]["tags"]["items"]["type"] = "bogus"
    assert fields[0].schema == {"type": "array", "items": {"type": "string"}}


def test_schema_instructions_embed_the_schema():
    text = schema_instructions({"year": int})
    assert text.startswith("Answer with only a JSON object of this form: {")
    assert text.endswith('Put every object you find in "items"; use [] if there are none.')
    embedded = text.removeprefix("Answer with only a JSON object of this form: ").split(". Put")[0]
    assert json.loads(embedded) == items_schema({"year": int})


# --------------------------------------------------------------------------- parse_items: shapes

QA = ["question", "answer"]
ONE = {"question": "q1", "answer": "a1"}
TWO = {"question": "q2", "answer": "a2"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"items": [{"question": "q1", "answer": "a1"}]}', [ONE]),
        ('{"items": []}', []),
        ('{"items": null}', []),
        ('[{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]', [ONE, TWO]),
        ("[]", []),
        ('{"question": "q1", "answer": "a1"}', [ONE]),
        ('{"results": [{"question": "q1", "answer": "a1"}]}', [ONE]),
        ('```json\n{"items": [{"question": "q1", "answer": "a1"}]}\n```', [ONE]),
        ('```\n[{"question": "q1", "answer": "a1"}]\n```', [ONE]),
        ('Sure! Here it is:\n```json\n{"question": "q1", "answer": "a1"}\n```\nEnjoy.', [ONE]),
        ('Here you go: {"items": [{"question": "q1", "answer": "a1"}]} Hope it helps!', [ONE]),
        ('I found [1] pair: [{"question": "q1", "answer": "a1"}]', [ONE]),
        ('Bad {start here} then {"question": "q1", "answer": "a1"}', [ONE]),
        (
            '<think>maybe {"question": "no"}?</think>\n'
            '{"items": [{"question": "q1", "answer": "a1"}]}',
            [ONE],
        ),
        (
            '{"question": "q}1{", "answer": "a1 \\" ]"} trailing',
            [{"question": "q}1{", "answer": 'a1 " ]'}],
        ),
        ('  \n{"items": [{"question": "q1", "answer": "a1", "extra": 1}]}\n', [ONE]),
        ('{"items": [{"Question": "q1", "ANSWER": "a1"}]}', [ONE]),
    ],
)
def test_parse_items_shapes(text, expected):
    assert parse_items(text, QA) == expected


def test_parse_items_keys_in_field_order():
    (item,) = parse_items('{"answer": "a", "question": "q"}', QA)
    assert list(item) == ["question", "answer"]


def test_parse_items_exact_key_wins_over_case_insensitive():
    assert parse_items('{"Answer": "x", "answer": "y", "question": "q"}', QA) == [
        {"question": "q", "answer": "y"}
    ]


def test_field_named_items():
    fields = {"order": int, "items": list[str]}
    assert parse_items('{"order": 1, "items": ["a", "b"]}', fields) == [
        {"order": 1, "items": ["a", "b"]}
    ]
    assert parse_items('{"items": [{"order": 1, "items": ["a"]}]}', fields) == [
        {"order": 1, "items": ["a"]}
    ]
    assert parse_items('{"items": []}', fields) == []
    assert parse_items('{"order": 2, "items": []}', fields) == [{"order": 2, "items": []}]


# --------------------------------------------------------------------------- parse_items: coercion


@pytest.mark.parametrize(
    ("annotation", "raw", "expected"),
    [
        (int, 3, 3),
        (int, 3.0, 3),
        (int, "3", 3),
        (int, " -3 ", -3),
        (int, "3.0", 3),
        (int, "1e3", 1000),
        (float, 2.5, 2.5),
        (float, 2, 2.0),
        (float, "2.5", 2.5),
        (float, " -1e-3", -0.001),
        (bool, True, True),
        (bool, False, False),
        (bool, "yes", True),
        (bool, "No", False),
        (bool, "TRUE", True),
        (bool, "false", False),
        (bool, 1, True),
        (bool, 0, False),
        (str, "x", "x"),
        (str, 3, "3"),
        (str, 2.5, "2.5"),
        (str, True, "true"),
        (list[str], ["a", "b"], ["a", "b"]),
        (list[str], "a", ["a"]),
        (list[str], [], []),
        (list[str], [1, "b"], ["1", "b"]),
        (list[int], ["1", 2.0], [1, 2]),
        (list[int], 5, [5]),
        (list[Color], ["Red", "GREEN"], ["red", "green"]),
        (Literal["spam", "ham"], "SPAM", "spam"),
        (Literal["spam", "ham"], " ham ", "ham"),
        (Literal["1", "2"], 1, "1"),
        (Literal[1, 2], "2", 2),
        (Literal[1, 2], 2.0, 2),
        (Color, "Green", "green"),
        (Color, "RED", "red"),
        (Size, "s", "S"),
        (Size, "large", "L"),
        (Level, 2, 2),
        (Level, "high", 2),
        (Optional[int], None, None),  # noqa: UP045
        (Optional[int], "7", 7),  # noqa: UP045
        (Literal["a"] | None, None, None),
        (Literal["a"] | None, "A", "a"),
        (list[str] | None, None, None),
    ],
)
def test_parse_items_coercion(annotation, raw, expected):
    (item,) = parse_items(json.dumps({"items": [{"x": raw}]}), {"x": annotation})
    assert item["x"] == expected
    assert type(item["x"]) is type(expected)


def test_optional_missing_is_none():
    assert parse_items('{"items": [{"a": "x"}]}', {"a": str, "b": Optional[int]}) == [  # noqa: UP045
        {"a": "x", "b": None}
    ]


@pytest.mark.parametrize(
    ("annotation", "raw", "message"),
    [
        (int, "nineteen-ten", "field 'x': expected int, got 'nineteen-ten'"),
        (int, 3.5, "field 'x': expected int, got 3.5"),
        (int, "3.5", "field 'x': expected int, got '3.5'"),
        (int, True, "field 'x': expected int, got true"),
        (int, None, "field 'x': expected int, got null"),
        (int, [1], "field 'x': expected int, got [1]"),
        (float, "abc", "field 'x': expected float, got 'abc'"),
        (float, "nan", "field 'x': expected float, got 'nan'"),
        (float, False, "field 'x': expected float, got false"),
        (bool, "maybe", "field 'x': expected bool, got 'maybe'"),
        (bool, 2, "field 'x': expected bool, got 2"),
        (str, {"a": 1}, "field 'x': expected str, got {\"a\": 1}"),
        (str, ["a"], "field 'x': expected str, got [\"a\"]"),
        (str, None, "field 'x': expected str, got null"),
        (list[str], {"a": 1}, "field 'x': expected list[str], got {\"a\": 1}"),
        (list[str], None, "field 'x': expected list[str], got null"),
        (list[int], [1, "b"], "field 'x' element 1: expected int, got 'b'"),
        (Literal["a", "b"], "c", "field 'x': expected one of 'a', 'b', got 'c'"),
        (Literal["a", "b"], True, "field 'x': expected one of 'a', 'b', got true"),
        (Literal[1, 2], 3, "field 'x': expected one of 1, 2, got 3"),
        (Color, "blue", "field 'x': expected one of 'red', 'green', got 'blue'"),
        (Level, "medium", "field 'x': expected one of 1, 2, got 'medium'"),
    ],
)
def test_parse_items_coercion_errors(annotation, raw, message):
    with pytest.raises(StructuredOutputError) as info:
        parse_items(json.dumps({"items": [{"x": raw}]}), {"x": annotation})
    assert str(info.value) == message


def test_error_truncates_long_values():
    with pytest.raises(StructuredOutputError) as info:
        parse_items(json.dumps([{"x": "y" * 500}]), {"x": int})
    message = str(info.value)
    assert message.startswith("field 'x': expected int, got 'yyy")
    assert message.endswith("...")
    assert len(message) < 120


def test_error_names_the_item_when_several():
    text = json.dumps([{"x": 1}, {"x": "two"}, {"x": 3}])
    with pytest.raises(StructuredOutputError, match=r"got 'two' \(item 2 of 3\)"):
        parse_items(text, {"x": int})


def test_many_choices_are_abbreviated():
    choices = Literal["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9", "c10", "c11"]
    with pytest.raises(StructuredOutputError, match=r"'c9', \.\.\. \(12 choices\), got 'zz'"):
        parse_items('[{"x": "zz"}]', {"x": choices})


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["answer is empty"]),
        ("   ", ["answer is empty"]),
        ("<think>hmm</think>", ["answer is empty"]),
        ("Sorry, I cannot help with that.", ["answer is not valid JSON", "Sorry, I cannot"]),
        (
            '{"items": [{"question": "q1", "answer": "a1"}, {"question": "q2", "ans',
            ["answer is not valid JSON", "line 1"],
        ),
        ('{"items": [{"question": "q1", "answer": "a1"},]}', ["answer is not valid JSON"]),
        (
            'Here: {"items": [{"question": "q1", "answer": "a1"}, {"question": "q2",}]}',
            ["answer is not valid JSON", "Here: "],
        ),
        ('"just a string"', ["not a JSON object or array", "'just a string'"]),
        ("42", ["not a JSON object or array"]),
        ('{"foo": 1, "bar": 2}', ['without "items"', "'question', 'answer'", "'foo', 'bar'"]),
        ("{}", ['without "items"']),
        ('{"items": "q1"}', ['"items" in the answer must be a JSON array', "'q1'"]),
        ('{"items": ["q1"]}', ["item 1 of the answer is not a JSON object: 'q1'"]),
        ("[1, 2]", ["item 1 of the answer is not a JSON object: 1"]),
        ('[{"question": "q1"}]', ["field 'answer': missing, expected str", "'question'"]),
        ('[{"question": "q1", "answer": null}]', ["field 'answer': expected str, got null"]),
    ],
)
def test_parse_items_errors(text, fragments):
    with pytest.raises(StructuredOutputError) as info:
        parse_items(text, QA)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_invalid_json_excerpt_is_short():
    with pytest.raises(StructuredOutputError) as info:
        parse_items("no json here " * 100, QA)
    assert len(str(info.value)) < 200


def test_structured_output_error_is_retryable():
    with pytest.raises(StructuredOutputError) as info:
        parse_items("nope", QA)
    assert info.value.retryable is True


def test_pathological_prose_is_bounded():
    text = "[x " * 2000 + '{"question": "q", "answer": "a"}'
    with pytest.raises(StructuredOutputError):
        parse_items(text, QA)
    text = "[x] " * 2000 + '{"question": "q", "answer": "a"}'
    with pytest.raises(StructuredOutputError):  # gives up after a bounded number of attempts
        parse_items(text, QA)


# --------------------------------------------------------------------------- dedupe


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        ([], []),
        ([{"a": 1}, {"a": 1}], [{"a": 1}]),
        ([{"a": 1}, {"a": 2}, {"a": 1}], [{"a": 1}, {"a": 2}]),
        ([{"a": 1, "b": 2}, {"b": 2, "a": 1}], [{"a": 1, "b": 2}]),
        (
            [{"t": ["x", "y"]}, {"t": ["x", "y"]}, {"t": ["y", "x"]}],
            [{"t": ["x", "y"]}, {"t": ["y", "x"]}],
        ),
        ([{"t": {"k": [1]}}, {"t": {"k": [1]}}], [{"t": {"k": [1]}}]),
        ([{"a": 1}, {"a": 1.0}, {"a": True}], [{"a": 1}, {"a": 1.0}, {"a": True}]),
        ([{"a": None}, {"a": None}], [{"a": None}]),
    ],
)
def test_dedupe_items(items, expected):
    result = dedupe_items(iter(items))
    assert result == expected
    assert [type(i["a"]) for i in result if "a" in i] == [
        type(i["a"]) for i in expected if "a" in i
    ]


def test_dedupe_keeps_first_object_identity():
    first, second = {"a": [1]}, {"a": [1]}
    (kept,) = dedupe_items([first, second])
    assert kept is first


# --------------------------------------------------------------------------- dtypes and columns


def test_output_dtypes():
    dtypes = output_dtypes(ALL_TYPES)
    assert {k: v for k, v in dtypes.items() if isinstance(v, str)} == {
        "s": "string",
        "i": "Int64",
        "f": "Float64",
        "b": "boolean",
        "tags": "object",
        "opt": "Float64",
        "optlist": "object",
    }
    assert dtypes["lit"] == pd.CategoricalDtype(["x", "y"])
    assert dtypes["optlit"] == pd.CategoricalDtype(["x"])
    assert dtypes["color"] == pd.CategoricalDtype(["red", "green"])
    assert dtypes["level"] == pd.CategoricalDtype([1, 2])
    for dtype in dtypes.values():
        pd.Series([None], dtype=object).astype(dtype)


@pytest.mark.parametrize(
    ("annotation", "values", "expected"),
    [
        (str, ["a", None], ["a", pd.NA]),
        (int, [1, None], [1, pd.NA]),
        (float, [1.5, None], [1.5, pd.NA]),
        (bool, [True, None], [True, pd.NA]),
        (Literal["x", "y"], ["y", None], ["y", np.nan]),
        (Level, [2, None], [2, np.nan]),
        (list[str], [["a", "b"], None], [["a", "b"], None]),
        (list[str], [["a", "b"], ["c", "d"]], [["a", "b"], ["c", "d"]]),
        (list[str], [[], []], [[], []]),
    ],
)
def test_to_column(annotation, values, expected):
    f = normalize_fields({"x": annotation})[0]
    series = to_column(values, f, index=pd.Index([10, 10], name="row"))
    assert series.name == "x"
    assert series.dtype == output_dtypes([f])["x"]
    assert series.index.tolist() == [10, 10] and series.index.name == "row"
    assert series.isna().tolist() == [v is None or v is pd.NA or v is np.nan for v in expected]
    assert series.dropna().tolist() == [
        v for v in expected if not pd.api.types.is_scalar(v) or not pd.isna(v)
    ]


@pytest.mark.parametrize("annotation", [str, int, float, bool, Color, list[str], Optional[int]])  # noqa: UP045
def test_to_column_all_missing_and_empty(annotation):
    f = normalize_fields({"x": annotation})[0]
    missing = to_column([None, np.nan, pd.NA], f)
    assert missing.isna().all() and len(missing) == 3
    assert missing.dtype == output_dtypes([f])["x"]
    empty = to_column([], f)
    assert len(empty) == 0 and empty.dtype == output_dtypes([f])["x"]
    assert isinstance(empty.index, pd.RangeIndex)


def test_to_column_coerces_raw_and_numpy_values():
    fields = normalize_fields({"i": int, "b": bool, "c": Color, "t": list[int]})
    assert to_column(["3", np.int64(4)], fields[0]).tolist() == [3, 4]
    assert to_column([np.bool_(True), "no"], fields[1]).tolist() == [True, False]
    assert to_column(["RED"], fields[2]).tolist() == ["red"]
    assert to_column([["1"], "2"], fields[3]).tolist() == [[1], [2]]
    with pytest.raises(StructuredOutputError, match="field 'i': expected int"):
        to_column(["x"], fields[0])


def test_to_column_round_trips_through_a_frame():
    fields = normalize_fields({"name": str, "year": int | None, "tags": list[str]})
    items = parse_items(
        '{"items": [{"name": "Ada", "year": "1815", "tags": "math"}, '
        '{"name": "Bob", "year": null, "tags": []}]}',
        fields,
    )
    index = pd.Index(["r1", "r1"])
    frame = pd.DataFrame({f.name: to_column([i[f.name] for i in items], f, index) for f in fields})
    assert frame.dtypes.astype(str).tolist() == ["string", "Int64", "object"]
    assert frame.loc["r1", "year"].tolist() == [1815, pd.NA]
    assert frame["tags"].tolist() == [["math"], []]
