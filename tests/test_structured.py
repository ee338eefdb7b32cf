"""Tests for parrot_pandas._structured: fields, schema, parsing, coercion, dedupe, columns."""

from __future__ import annotations

import datetime as dt
import enum
import json
import pickle
import subprocess
import sys
import warnings
from typing import Annotated, Any, List, Literal, Optional, Union  # noqa: UP035

import numpy as np
import pandas as pd
import pytest

from parrot_pandas import _structured
from parrot_pandas._structured import (
    INVALID_VALUE,
    Field,
    Fields,
    dedupe_items,
    items_schema,
    normalize_fields,
    output_dtypes,
    parse_items,
    schema_instructions,
    to_column,
    value_error,
)
from parrot_pandas.errors import ConfigurationError, StructuredOutputError, Verdict


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
        (dt.date, {"type": "string", "format": "date"}, "datetime64[us]", False, None),
        (dt.datetime, {"type": "string", "format": "date-time"}, "datetime64[us]", False, None),
        (
            dt.date | None,
            {"type": ["string", "null"], "format": "date"},
            "datetime64[us]",
            True,
            None,
        ),
        (
            list[dt.date],
            {"type": "array", "items": {"type": "string", "format": "date"}},
            "object",
            False,
            None,
        ),
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


def test_fields_dedupe_parsed_objects_like_dedupe_items():
    fields = normalize_fields({"name": str, "year": int | None, "tags": list[str]})
    samples = [
        '[{"name": "a", "year": 1, "tags": ["x", "y"]}, {"name": "a", "year": null, "tags": []}]',
        '[{"tags": ["x", "y"], "year": "1", "name": "a"}, {"name": "a", "year": 1, "tags": ["y"]}]',
        '[{"name": "a", "year": null, "tags": []}]',
    ]
    items = [item for text in samples for item in fields.parse(text)]
    assert fields.dedupe(items) == dedupe_items(items)
    assert fields.dedupe(items) == [
        {"name": "a", "year": 1, "tags": ["x", "y"]},
        {"name": "a", "year": None, "tags": []},
        {"name": "a", "year": 1, "tags": ["y"]},
    ]
    assert fields.dedupe(items)[0] is items[0]
    assert fields.dedupe([]) == []


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


def test_to_column_builds_from_parsed_values_without_converting_them():
    fields = normalize_fields({"i": int, "b": bool, "c": Color, "t": list[int]})
    # numpy scalars are what pandas stores anyway: they go in as they are.
    assert to_column([np.int64(3), 4], fields[0]).tolist() == [3, 4]
    assert to_column([np.bool_(True), False], fields[1]).tolist() == [True, False]
    assert to_column(["red"], fields[2]).tolist() == ["red"]
    assert to_column([[1], [2, 3]], fields[3]).tolist() == [[1], [2, 3]]


@pytest.mark.parametrize(
    ("annotation", "values", "fragment"),
    [
        (int, [1, 2**63], "field 'x': 9223372036854775808 does not fit its Int64 column"),
        (int, [1.5], "field 'x': 1.5 does not fit its Int64 column"),
        (bool, [True, "no"], "field 'x': 'no' does not fit its boolean column"),
        (Color, ["red", "RED"], "field 'x': 'RED' does not fit its category column"),
        (Literal[1, 2], [3], "field 'x': 3 does not fit its category column"),
        (dt.date, [dt.date(2024, 1, 1), "soon"], "'soon' does not fit its datetime64[us] column"),
    ],
)
def test_to_column_refuses_a_value_its_column_cannot_hold(annotation, values, fragment):
    # Raw, unparsed values are no longer coerced a second time: one that does not fit is a
    # row error naming the field and the value, never a bare pandas exception.
    (f,) = normalize_fields({"x": annotation})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never silently NaN (pandas warns for categories)
        with pytest.raises(StructuredOutputError) as info:
            to_column(values, f)
    assert fragment in str(info.value)
    assert info.value.verdict == INVALID_VALUE


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


# --------------------------------------------------------------------------- compiled once


def test_normalize_fields_compiles_once_and_returns_compiled_fields_unchanged():
    fields = normalize_fields({"name": str, "year": int})
    assert isinstance(fields, Fields) and isinstance(fields, tuple)
    assert normalize_fields(fields) is fields
    assert fields.schema is fields.schema  # built once, then shared
    assert fields.schema == items_schema(fields)
    assert items_schema(fields) is not fields.schema  # the public function gives a copy
    assert fields.instructions == schema_instructions(fields)
    assert fields.dtypes == output_dtypes(fields)


def test_parsing_answers_never_analyses_the_types_again(monkeypatch):
    calls = {"analyse": 0, "converter": 0}
    analyse, converter = _structured._analyse, _structured._converter

    def counted_analyse(*args):
        calls["analyse"] += 1
        return analyse(*args)

    def counted_converter(*args):
        calls["converter"] += 1
        return converter(*args)

    monkeypatch.setattr(_structured, "_analyse", counted_analyse)
    monkeypatch.setattr(_structured, "_converter", counted_converter)
    fields = normalize_fields({"name": str, "year": int | None, "tags": list[Color]})
    compiled = dict(calls)
    assert compiled["analyse"] >= 3 and compiled["converter"] == 0
    for year in range(200):
        answer = json.dumps({"items": [{"name": "Ada", "year": year, "tags": ["red"]}]})
        assert fields.parse(answer)[0]["year"] == year
        assert parse_items(answer, fields)[0]["year"] == year
    # The parser was built once (3 fields, one list element), the types never analysed again.
    assert calls == {"analyse": compiled["analyse"], "converter": 4}


def test_fields_pickle_without_their_compiled_parser():
    fields = normalize_fields({"name": str, "color": Color, "when": dt.date})
    fields.parse('{"name": "a", "color": "red", "when": "2024-01-02"}')  # compile it
    clone = pickle.loads(pickle.dumps(fields))
    assert isinstance(clone, Fields) and clone == fields
    assert "_parser" not in vars(clone)
    assert clone.parse('{"name": "a", "color": "RED", "when": "2024-01-02"}') == [
        {"name": "a", "color": "red", "when": dt.date(2024, 1, 2)}
    ]


def test_a_field_built_by_hand_still_knows_its_type():
    f = Field("x", int, {"type": "integer"}, "Int64")
    assert Fields([f]).parse('{"x": "7"}') == [{"x": 7}]


# --------------------------------------------------------------------------- verdicts


def _error(annotation: Any, raw: Any) -> StructuredOutputError:
    with pytest.raises(StructuredOutputError) as info:
        parse_items(json.dumps({"items": [{"x": raw}]}), {"x": annotation})
    return info.value


def test_a_broken_answer_may_be_asked_again():
    for text in ("nope", '{"items": "x"}', '[{"y": 1}]'):
        with pytest.raises(StructuredOutputError) as info:
            parse_items(text, {"x": int})
        assert info.value.verdict == Verdict("row", True, "invalid_answer")
    # A value of the wrong JSON type breaks the schema: a strict server would not send it.
    assert _error(int, "nineteen-ten").verdict.retry is True
    assert _error(Color, "blue").verdict.retry is True
    assert _error(dt.date, 20240102).verdict.retry is True


def test_a_value_its_column_cannot_hold_fails_the_row_without_retry():
    error = _error(int, 12345678901234567890)
    assert error.verdict == INVALID_VALUE == Verdict("row", False, "invalid_value")
    assert error.retryable is False
    assert str(error) == (
        "field 'x': 12345678901234567890 does not fit int: an Int64 column holds "
        "-9223372036854775808 to 9223372036854775807"
    )
    # The verdict survives pickling (Dask workers send errors back).
    assert pickle.loads(pickle.dumps(error)).verdict == INVALID_VALUE


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (INT64_MAX, INT64_MAX),
        (INT64_MIN, INT64_MIN),
        (str(INT64_MAX), INT64_MAX),
        (f" {INT64_MIN} ", INT64_MIN),
        (9.2e18, 9200000000000000000),
        (-9.2e18, -9200000000000000000),
    ],
)
def test_int64_boundaries_fit(raw, expected):
    (item,) = parse_items(json.dumps([{"x": raw}]), {"x": int})
    assert item["x"] == expected
    assert to_column([item["x"]], normalize_fields({"x": int})[0]).tolist() == [expected]


@pytest.mark.parametrize(
    "text",
    [
        str(INT64_MAX + 1),
        str(INT64_MIN - 1),
        "12345678901234567890",
        f'"{INT64_MAX + 1}"',
        "1e19",
        "-1e19",
        "1e400",
        '"1e400"',
        "9" * 400,
    ],
)
def test_int64_boundaries_do_not_fit(text):
    with pytest.raises(StructuredOutputError) as info:
        parse_items('[{"x": ' + text + "}]", {"x": int})
    assert info.value.verdict == INVALID_VALUE
    assert str(info.value).startswith("field 'x': ")
    assert "does not fit int: an Int64 column holds" in str(info.value)
    assert len(str(info.value)) < 200  # the value is shortened


@pytest.mark.parametrize("text", ["1e400", "-1e400", str(10**400), '"1e999"'])
def test_numbers_beyond_a_float_do_not_fit(text):
    with pytest.raises(StructuredOutputError) as info:
        parse_items('[{"x": ' + text + "}]", {"x": float})
    assert info.value.verdict == INVALID_VALUE
    assert "does not fit float: a Float64 column holds finite numbers" in str(info.value)


@pytest.mark.parametrize("text", ["NaN", '"nan"', '"-Infinity"', '"inf"'])
def test_not_a_number_stays_a_broken_answer(text):
    for annotation in (int, float):
        with pytest.raises(StructuredOutputError) as info:
            parse_items('[{"x": ' + text + "}]", {"x": annotation})
        assert info.value.verdict.retry is True


# --------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("annotation", "raw", "expected"),
    [
        (dt.date, "2024-05-31", dt.date(2024, 5, 31)),
        (dt.date, " 0001-01-01 ", dt.date(1, 1, 1)),
        (dt.date, "9999-12-31", dt.date(9999, 12, 31)),
        (dt.date, "2024-05-31T23:30:00-05:00", dt.date(2024, 5, 31)),  # the date as written
        (dt.date, "2024-02-29", dt.date(2024, 2, 29)),
        (dt.datetime, "2024-05-31T14:30:00", dt.datetime(2024, 5, 31, 14, 30)),
        (dt.datetime, "2024-05-31 14:30", dt.datetime(2024, 5, 31, 14, 30)),
        (dt.datetime, "2024-05-31", dt.datetime(2024, 5, 31)),
        (dt.datetime, "2024-05-31T14:30:00.25Z", dt.datetime(2024, 5, 31, 14, 30, 0, 250000)),
        (dt.datetime, "2024-05-31T14:30:00+02:00", dt.datetime(2024, 5, 31, 12, 30)),
        (dt.datetime, "2024-01-01T01:00:00+05:00", dt.datetime(2023, 12, 31, 20, 0)),
        (dt.datetime, "9999-12-31T23:59:59.999999", dt.datetime(9999, 12, 31, 23, 59, 59, 999999)),
        (list[dt.date], ["2024-01-02", "2025-03-04"], [dt.date(2024, 1, 2), dt.date(2025, 3, 4)]),
        (list[dt.date], "2024-01-02", [dt.date(2024, 1, 2)]),
        (Optional[dt.datetime], None, None),  # noqa: UP045
    ],
)
def test_dates_are_parsed(annotation, raw, expected):
    (item,) = parse_items(json.dumps([{"x": raw}]), {"x": annotation})
    assert item["x"] == expected
    assert type(item["x"]) is type(expected)


@pytest.mark.parametrize(
    ("annotation", "raw", "reason"),
    [
        (dt.date, "next Tuesday", "not an ISO 8601 date"),
        (dt.date, "31/05/2024", "not an ISO 8601 date"),
        (dt.date, "2024-02-30", "no such date (day is out of range for month)"),
        (dt.date, "2023-02-29", "no such date"),
        (dt.date, "2024-13-01", "no such date (month must be in 1..12)"),
        (dt.datetime, "2024-05-31T25:00:00", "no such date"),
        (dt.datetime, "", "not an ISO 8601 date"),
        (dt.datetime, "yesterday at noon", "not an ISO 8601 date"),
    ],
)
def test_a_date_that_does_not_parse_is_a_value_error(annotation, raw, reason):
    error = _error(annotation, raw)
    assert error.verdict == INVALID_VALUE
    message = str(error)
    assert message.startswith(f"field 'x': {json.dumps(raw)[1:-1]!r} does not fit ")
    assert reason in message
    assert ("date (YYYY-MM-DD)" if annotation is dt.date else "datetime (ISO 8601)") in message


def test_a_bad_date_inside_a_list_names_its_element():
    error = _error(list[dt.date], ["2024-01-01", "2024-99-01"])
    assert str(error).startswith("field 'x' element 1: '2024-99-01' does not fit date")
    assert error.verdict == INVALID_VALUE


def test_a_value_that_breaks_the_schema_inside_a_list_names_its_element():
    error = _error(list[int], [1, 2, 2**70])
    assert str(error).startswith("field 'x' element 2: 1180591620717411303424 does not fit int")
    assert error.verdict == INVALID_VALUE
    error = _error(list[Level], [1, "medium"])
    assert str(error) == "field 'x' element 1: expected one of 1, 2, got 'medium'"
    assert error.verdict.retry is True


def test_date_columns_are_datetime64():
    fields = normalize_fields({"day": dt.date, "at": dt.datetime | None})
    items = fields.parse(
        '[{"day": "2024-05-31", "at": "2024-05-31T10:00:00Z"}, {"day": "0001-01-01", "at": null}]'
    )
    day = to_column([i["day"] for i in items], fields[0])
    at = to_column([i["at"] for i in items], fields[1])
    assert day.dtype == at.dtype == "datetime64[us]"
    assert day.tolist() == [pd.Timestamp("2024-05-31"), pd.Timestamp("0001-01-01")]
    assert at.tolist()[0] == pd.Timestamp("2024-05-31 10:00") and at.isna().tolist() == [
        False,
        True,
    ]


def test_value_error_explains_or_passes():
    (f,) = normalize_fields({"x": int})
    assert value_error(5, f) is None
    assert value_error(None, f) is None
    assert value_error(2**64, f) == "field 'x': 18446744073709551616 does not fit its Int64 column"


# --------------------------------------------------------------------------- end to end


def test_a_value_that_does_not_fit_fails_its_row_not_the_run(server):
    # The fake server answers each "key=value" line of the prompt as one object, so this row's
    # answer holds an integer beyond 64 bits (issue 11: it used to end in OverflowError after
    # every request was paid for).
    df = pd.DataFrame(
        {"t": ["a=1", "a=2", "a=12345678901234567890", "a=4", "a=5"]},
        index=pd.Index(list("vwxyz"), name="id"),
    )
    out = df.llm.extract("${t}", {"a": int}, errors="coerce", base_url=server.url)
    assert out.index.tolist() == list("vwxyz")
    assert out["a"].dtype == "Int64"
    assert out["a"].tolist() == [1, 2, pd.NA, 4, 5]
    assert out["llm_error"].isna().tolist() == [True, True, False, True, True]
    message = out.loc["x", "llm_error"]
    assert "field 'a'" in message and "12345678901234567890" in message and "int" in message
    assert out.attrs["llm"]["failed_rows"] == 1
    assert out.attrs["llm"]["strategy"] == "tools"


def test_a_date_that_does_not_exist_fails_its_row_and_raises_with_the_rest(server):
    df = pd.DataFrame({"t": ["d=2024-02-28", "d=2024-02-30", "d=2024-03-01"]})
    with pytest.raises(Exception) as info:
        df.llm.extract("${t}", {"d": dt.date}, base_url=server.url)
    from parrot_pandas import RowsFailedError

    assert isinstance(info.value, RowsFailedError)
    assert info.value.errors.index.tolist() == [1]
    assert "no such date" in info.value.errors[1]
    result = info.value.result
    assert result["d"].dtype == "datetime64[us]"
    assert result["d"].tolist()[::2] == [pd.Timestamp("2024-02-28"), pd.Timestamp("2024-03-01")]


def test_a_run_analyses_its_types_once_not_once_per_answer(server, monkeypatch):
    calls = 0
    analyse = _structured._analyse

    def counted(*args):
        nonlocal calls
        calls += 1
        return analyse(*args)

    monkeypatch.setattr(_structured, "_analyse", counted)
    counts = []
    for rows in (2, 40):
        calls = 0
        df = pd.DataFrame({"t": [f"name=n{i}, year={i}" for i in range(rows)]})
        out = df.llm.extract("${t}", {"name": str, "year": int}, base_url=server.url, cache=False)
        assert out["year"].tolist() == list(range(rows))
        counts.append(calls)
    assert counts[0] == counts[1] <= 4
