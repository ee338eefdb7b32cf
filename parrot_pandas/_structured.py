"""Fields -> JSON Schema, parsing and validation of answers, output dtypes.

``extract(..., fields=...)`` asks the model for ``{"items": [{field: value, ...}, ...]}``.
This module turns the user's ``fields`` into :class:`Fields`, compiled once per run: each
:class:`Field` knows its JSON Schema (valid for OpenAI's strict mode) and its output dtype,
and the set knows the instruction used for servers without a schema mode and the parser that
checks and coerces an answer, once. :func:`to_column` then only builds typed arrays from the
parsed values. Everything here is pure: no HTTP, no provider specifics.

Two kinds of bad answer are told apart, because only one of them is worth paying for again:

- an answer that breaks the JSON Schema sent (not JSON, wrong shape, a missing field, a
  string where a number belongs, a choice not offered) may come out right when asked again:
  a retryable :class:`StructuredOutputError`;
- a value the schema allows but the column cannot hold (an integer outside 64 bits, a number
  too large for a float, a date that does not exist or does not parse) would come back the
  same: a :class:`StructuredOutputError` whose verdict is ``Verdict("row", False,
  "invalid_value")``, which fails that row alone.
"""

from __future__ import annotations

import datetime
import enum
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Union, get_args, get_origin

import numpy as np
import pandas as pd

from parrot_pandas.errors import ConfigurationError, StructuredOutputError, Verdict

__all__ = [
    "INVALID_VALUE",
    "RESERVED_NAMES",
    "Field",
    "Fields",
    "dedupe_items",
    "items_schema",
    "normalize_fields",
    "output_dtypes",
    "parse_items",
    "schema_instructions",
    "to_column",
    "value_error",
]

#: Output column names the result frame uses itself, so no field may take them.
RESERVED_NAMES = frozenset({"llm_error"})

#: The verdict on a value the schema allows but its column cannot hold: asking again would
#: give the same value, so only that row fails, and at once.
INVALID_VALUE = Verdict("row", False, "invalid_value")

SUPPORTED_TYPES = (
    "str, int, float, bool, datetime.date, datetime.datetime, list[X] of one of these, "
    "Literal['a', 'b'], an Enum subclass, or Optional[X] / X | None of any of them"
)

_NONE_TYPE = type(None)
# ``X | None`` is a types.UnionType before Python 3.14 and a typing.Union from 3.14 on.
_UNION_ORIGINS = (Union, types.UnionType)
# datetime.datetime subclasses datetime.date: looked up by the exact class, never isinstance.
_SCALAR_KINDS = {
    str: "str",
    bool: "bool",
    int: "int",
    float: "float",
    datetime.date: "date",
    datetime.datetime: "datetime",
}
_SCALAR_SCHEMAS = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "date": {"type": "string", "format": "date"},
    "datetime": {"type": "string", "format": "date-time"},
}
_DESCRIPTIONS = {"date": "date (YYYY-MM-DD)", "datetime": "datetime (ISO 8601)"}
# Microseconds hold every date and time Python's datetime can (years 1 to 9999), so no parsed
# value is out of the column's range; pandas parses date strings to this unit by default.
_DATETIME_DTYPE = "datetime64[us]"
_DTYPES = {
    "str": "string",
    "int": "Int64",
    "float": "Float64",
    "bool": "boolean",
    "date": _DATETIME_DTYPE,
    "datetime": _DATETIME_DTYPE,
    "choice": "category",
    "list": "object",
}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_NOT_A_NUMBER = frozenset({"nan", "inf", "infinity"})
_SHOW_CHARS = 60
_EXCERPT_CHARS = 80
# Bounds the prose scan: answers are small, but a pathological one must not go quadratic.
_MAX_JSON_ATTEMPTS = 50


@dataclass(frozen=True)
class Field:
    """One field to extract: its name, type, JSON Schema and output dtype.

    Build these with :func:`normalize_fields` rather than by hand.

    Attributes
    ----------
    name : str
        The key in each extracted object and the name of the output column.
    annotation : Any
        The Python type as the user gave it (``int``, ``list[str]``, ``Literal["a", "b"]``, ...).
    schema : dict
        The field's JSON Schema (nullable fields allow ``null``).
    dtype : str
        The output column's pandas dtype: ``"string"``, ``"Int64"``, ``"Float64"``,
        ``"boolean"``, ``"datetime64[us]"`` (dates and datetimes), ``"category"`` (closed
        choices) or ``"object"`` (lists).
    nullable : bool
        Whether the field was declared ``Optional[...]`` / ``X | None``.
    choices : tuple or None
        The closed set of values of a ``Literal`` or ``Enum`` field (an Enum's values, not
        its members), else ``None``.
    kind : _Type
        The analysed type the parser is compiled from (worked out from ``annotation`` when
        not given); not part of equality.
    """

    name: str
    annotation: Any
    schema: dict = field(hash=False)
    dtype: str
    nullable: bool = False
    choices: tuple | None = None
    kind: _Type = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", _analyse(self.annotation, self.name)[0])

    @property
    def output_dtype(self) -> Any:
        """The column dtype as ``Series.astype`` takes it (a ``CategoricalDtype`` for choices)."""
        if self.dtype == "category":
            return pd.CategoricalDtype(categories=list(self.choices or ()))
        return self.dtype


@dataclass(frozen=True)
class _Type:
    """What an annotation means once ``Optional`` is peeled off."""

    kind: str  # "str" | "int" | "float" | "bool" | "date" | "datetime" | "choice" | "list"
    item: _Type | None = None  # element type of a list
    choices: tuple = ()  # canonical values of a choice
    names: tuple = ()  # Enum member names, parallel to ``choices``, accepted as aliases

    def describe(self) -> str:
        if self.kind == "list":
            assert self.item is not None
            return f"list[{self.item.describe()}]"
        if self.kind == "choice":
            shown = ", ".join(repr(c) for c in self.choices[:10])
            more = f", ... ({len(self.choices)} choices)" if len(self.choices) > 10 else ""
            return f"one of {shown}{more}"
        return _DESCRIPTIONS.get(self.kind, self.kind)


class Fields(tuple):
    """The fields of one run, compiled once: schema, instruction, parser and dtypes.

    A tuple of :class:`Field` (it iterates, indexes and compares as one), built by
    :func:`normalize_fields`. What it derives is worked out on first use and kept, so a run
    analyses its types once, not once per answer.
    """

    def __new__(cls, fields: Iterable[Field] = ()) -> Fields:
        return super().__new__(cls, fields)

    def __reduce__(self) -> tuple[Any, ...]:
        # The compiled parser holds closures: rebuild it where the fields are unpickled.
        return (Fields, (tuple(self),))

    @cached_property
    def schema(self) -> dict:
        """The JSON Schema of an answer (see :func:`items_schema`); shared, do not mutate."""
        return _items_schema(self)

    @cached_property
    def instructions(self) -> str:
        """The instruction for servers without a schema mode (see :func:`schema_instructions`)."""
        schema = json.dumps(self.schema, ensure_ascii=False)
        return (
            f"Answer with only a JSON object of this form: {schema}. "
            'Put every object you find in "items"; use [] if there are none.'
        )

    @cached_property
    def dtypes(self) -> dict[str, Any]:
        """Field name -> output column dtype (see :func:`output_dtypes`)."""
        return {f.name: f.output_dtype for f in self}

    def parse(self, text: str) -> list[dict]:
        """Parse one answer into coerced objects (see :func:`parse_items`)."""
        return self._parser(text)

    def dedupe(self, items: Iterable[dict]) -> list[dict]:
        """Drop repeated parsed objects, keeping the first of each in order.

        :func:`dedupe_items` for objects from :meth:`parse`, cheaper: they all hold the
        fields' keys in order, and one field's values all have one type (or are ``None``),
        so the values alone tell objects apart.
        """
        seen: set = set()
        unique = []
        for item in items:
            key = tuple(tuple(v) if type(v) is list else v for v in item.values())
            if key not in seen:
                seen.add(key)
                unique.append(item)
        return unique

    @cached_property
    def _parser(self) -> _Parser:
        return _Parser(self)


# --------------------------------------------------------------------------- fields


def normalize_fields(fields: Any) -> Fields:
    """Turn the ``fields`` a user passed to ``extract`` into compiled :class:`Fields`.

    Parameters
    ----------
    fields : list of str, dict of str -> type, or pydantic.BaseModel subclass
        - a list or tuple of names: every field is a ``str``;
        - a dict mapping each name to ``str``, ``int``, ``float``, ``bool``,
          ``datetime.date``, ``datetime.datetime``, ``list[X]`` (``X`` one of the former, a
          ``Literal`` or an ``Enum``), ``Literal["a", "b"]``, an ``enum.Enum`` subclass, or
          ``Optional[X]`` / ``X | None`` of any of these;
        - a pydantic ``BaseModel`` subclass (pydantic v2), whose fields follow the same
          rules and whose ``Field(description=...)`` is passed on to the model.

        :class:`Fields` are returned unchanged (and a tuple of :class:`Field` is compiled
        without analysing its types again), so every function here accepts what this one
        returns, at no cost.

    Returns
    -------
    Fields
        A tuple of :class:`Field` in the order given, compiled once.

    Raises
    ------
    ConfigurationError
        If ``fields`` is not one of the forms above, is empty, repeats a name, has a name
        that is not a non-empty string or is reserved (``llm_error``), or uses an
        unsupported type. The message names the problem and the fix.

    Examples
    --------
    >>> [f.name for f in normalize_fields(["question", "answer"])]
    ['question', 'answer']
    >>> year = normalize_fields({"name": str, "year": int | None})[1]
    >>> year.schema, year.dtype, year.nullable
    ({'type': ['integer', 'null']}, 'Int64', True)
    """
    if isinstance(fields, Fields):
        return fields
    if isinstance(fields, str):
        raise ConfigurationError(
            f"fields must be a list of names, a dict of name -> type or a pydantic model, "
            f"not a string; did you mean fields=[{fields!r}]?"
        )
    if _is_pydantic_model(fields):
        pairs = _pydantic_pairs(fields)
    elif isinstance(fields, Mapping):
        pairs = [(name, annotation, None) for name, annotation in fields.items()]
    elif isinstance(fields, (list, tuple)):
        pairs = []
        for position, entry in enumerate(fields):
            if isinstance(entry, Field):
                pairs.append((entry.name, entry, None))
            elif isinstance(entry, str):
                pairs.append((entry, str, None))
            else:
                raise ConfigurationError(
                    f"field names must be strings, got {_type_repr(entry)} at position "
                    f"{position}; to give each field a type, pass a dict such as "
                    "{'name': str, 'year': int}"
                )
    elif isinstance(fields, (set, frozenset)):
        raise ConfigurationError(
            "fields must be ordered, so that output columns come in a stable order; "
            f"pass a list instead of a set: fields={sorted(map(str, fields))!r}"
        )
    else:
        raise ConfigurationError(
            "fields must be a list of names (['question', 'answer']), a dict of name -> type "
            "({'name': str, 'year': int}) or a pydantic BaseModel subclass, "
            f"not {_type_repr(fields)}"
        )
    if not pairs:
        raise ConfigurationError(
            "fields is empty; name at least one field to extract, e.g. fields=['answer']"
        )

    result: list[Field] = []
    seen: set[str] = set()
    for name, annotation, description in pairs:
        _check_name(name)
        if name in seen:
            raise ConfigurationError(
                f"field {name!r} is given twice; each field must have a distinct name"
            )
        seen.add(name)
        if isinstance(annotation, Field):
            result.append(annotation)
        else:
            result.append(_make_field(name, annotation, description))
    return Fields(result)


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise ConfigurationError(
            f"field names must be strings, got {name!r} ({type(name).__name__})"
        )
    if not name.strip():
        raise ConfigurationError("field names must not be empty; give every field a name")
    if name in RESERVED_NAMES:
        raise ConfigurationError(
            f"field name {name!r} is reserved for the output frame's own column; "
            "rename the field (e.g. 'error')"
        )


def _make_field(name: str, annotation: Any, description: str | None) -> Field:
    kind, nullable = _analyse(annotation, name)
    schema = _type_schema(kind)
    if nullable:
        if kind.kind == "choice":
            # A type list next to "enum" would also need null in the enum; anyOf says
            # the same thing in the one form every strict-mode implementation accepts.
            schema = {"anyOf": [schema, {"type": "null"}]}
        else:
            schema = {**schema, "type": [schema["type"], "null"]}
    if description:
        schema["description"] = description
    return Field(
        name=name,
        annotation=annotation,
        schema=schema,
        dtype=_DTYPES[kind.kind],
        nullable=nullable,
        choices=kind.choices if kind.kind == "choice" else None,
        kind=kind,
    )


def _analyse(annotation: Any, name: str) -> tuple[_Type, bool]:
    """Return the annotation's type and whether it is nullable, or raise ConfigurationError."""
    annotation = _strip_annotated(annotation)
    origin = get_origin(annotation)
    if origin in _UNION_ORIGINS:
        args = get_args(annotation)
        rest = [a for a in args if a is not _NONE_TYPE]
        if len(rest) != 1 or len(rest) == len(args):
            raise _unsupported(name, annotation, "unions other than Optional[X] are not")
        inner, _ = _analyse(rest[0], name)
        return inner, True
    if origin is Literal:
        values = get_args(annotation)
        choices = tuple(v for v in values if v is not None)
        return _choice_type(choices, (), name, annotation), len(choices) < len(values)
    return _plain_type(annotation, name), False


def _plain_type(annotation: Any, name: str) -> _Type:
    if isinstance(annotation, type) and annotation in _SCALAR_KINDS:
        return _Type(_SCALAR_KINDS[annotation])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        members = list(annotation)
        return _choice_type(
            tuple(m.value for m in members), tuple(m.name for m in members), name, annotation
        )
    if get_origin(annotation) is list or annotation is list:
        args = get_args(annotation)
        if len(args) != 1:
            raise _unsupported(name, annotation, "give the element type: list[str], not list;")
        item, item_nullable = _analyse(args[0], name)
        if item_nullable or item.kind == "list":
            raise _unsupported(
                name, annotation, "list elements must be a plain str, int, float, bool or choice;"
            )
        return _Type("list", item=item)
    if isinstance(annotation, (str, typing.ForwardRef)):
        text = annotation if isinstance(annotation, str) else annotation.__forward_arg__
        raise ConfigurationError(
            f"field {name!r}: the type is the string {text!r}; pass the type itself "
            f"(e.g. {{{name!r}: int}}, not {{{name!r}: 'int'}})"
        )
    raise _unsupported(name, annotation)


def _choice_type(values: tuple, names: tuple, name: str, annotation: Any) -> _Type:
    if not values:
        raise _unsupported(name, annotation, "closed choices need at least one value;")
    all_str = all(isinstance(v, str) for v in values)
    all_int = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not (all_str or all_int):
        raise _unsupported(name, annotation, "closed choices must be all strings or all integers;")
    return _Type("choice", choices=values, names=names)


def _strip_annotated(annotation: Any) -> Any:
    while get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _unsupported(name: str, annotation: Any, reason: str = "") -> ConfigurationError:
    reason = f"{reason} " if reason else ""
    return ConfigurationError(
        f"field {name!r} has unsupported type {_type_repr(annotation)}; "
        f"{reason}supported types are {SUPPORTED_TYPES}"
    )


def _type_repr(obj: Any) -> str:
    if isinstance(obj, type) and get_origin(obj) is None:
        return obj.__qualname__
    if get_origin(obj) is not None or isinstance(obj, typing.TypeVar):
        return repr(obj).replace("typing.", "")
    return f"{obj!r} ({type(obj).__name__})"


def _is_pydantic_model(obj: Any) -> bool:
    if not (isinstance(obj, type) and hasattr(obj, "model_fields")):
        return False
    try:
        # Imported here so that pydantic stays optional: only a class that already looks
        # like a model costs the import, and pydantic is then loaded anyway.
        from pydantic import BaseModel
    except ImportError:  # pragma: no cover - a model class implies pydantic is importable
        return False
    return issubclass(obj, BaseModel)


def _pydantic_pairs(model: type) -> list[tuple[str, Any, str | None]]:
    pairs = []
    for name, info in model.model_fields.items():  # type: ignore[attr-defined]
        pairs.append((name, info.annotation, info.description))
    return pairs


# --------------------------------------------------------------------------- schema


def _type_schema(kind: _Type) -> dict:
    if kind.kind == "list":
        assert kind.item is not None
        return {"type": "array", "items": _type_schema(kind.item)}
    if kind.kind == "choice":
        json_type = "string" if isinstance(kind.choices[0], str) else "integer"
        return {"type": json_type, "enum": list(kind.choices)}
    return dict(_SCALAR_SCHEMAS[kind.kind])


def items_schema(fields: Any) -> dict:
    """Return the JSON Schema of an answer: ``{"items": [<object>, ...]}``.

    The schema fits OpenAI's strict structured outputs (and so the stricter servers that
    copy it): the root is an object, every object lists all its properties in ``required``
    and sets ``additionalProperties`` to false, and optional fields are nullable instead of
    absent.

    Parameters
    ----------
    fields : tuple of Field, or anything :func:`normalize_fields` accepts

    Returns
    -------
    dict
        A fresh JSON Schema dict; mutating it does not affect the fields.

    Examples
    --------
    >>> schema = items_schema(["answer"])
    >>> schema["properties"]["items"]["items"]
    {'type': 'object', 'properties': {'answer': {'type': 'string'}}, 'required': ['answer'], \
'additionalProperties': False}
    """
    return _items_schema(normalize_fields(fields))


def _items_schema(fields: Fields) -> dict:
    item = {
        "type": "object",
        "properties": {f.name: json.loads(json.dumps(f.schema)) for f in fields},
        "required": [f.name for f in fields],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": item}},
        "required": ["items"],
        "additionalProperties": False,
    }


def schema_instructions(fields: Any) -> str:
    """Return the instruction that asks for the answer's JSON, for servers without a schema mode.

    Parameters
    ----------
    fields : tuple of Field, or anything :func:`normalize_fields` accepts

    Returns
    -------
    str
        One short paragraph, to append to the prompt or the system message.

    Examples
    --------
    >>> print(schema_instructions(["answer"]))  # doctest: +ELLIPSIS
    Answer with only a JSON object of this form: {"type": "object", ...}. Put every object \
you find in "items"; use [] if there are none.
    """
    return normalize_fields(fields).instructions


# --------------------------------------------------------------------------- parsing


def parse_items(text: str, fields: Any) -> list[dict]:
    """Parse one answer into objects holding exactly the fields, coerced to their types.

    Parameters
    ----------
    text : str
        The model's answer. Accepted shapes: ``{"items": [...]}``, a bare JSON array of
        objects, or a single object with the field keys (one item); an object whose only
        key holds an array (``{"results": [...]}``) is read like ``"items"``. The JSON may
        sit in a fenced code block or in prose (the first balanced JSON object or array that
        parses is used); ``<think>...</think>`` blocks of reasoning models are ignored.
    fields : Fields, or anything :func:`normalize_fields` accepts
        Pass the compiled :class:`Fields` when parsing many answers: other forms are
        compiled on every call.

    Returns
    -------
    list of dict
        One dict per object, with the fields' keys in order. Values are coerced: ints from
        ``"3"`` or ``3.0``; floats from ``"2.5"``; bools from ``true``/``false``,
        ``"yes"``/``"no"``, ``"true"``/``"false"``, ``1``/``0``; strings from numbers;
        dates from ISO 8601 text (``"2024-05-31"``, a ``datetime.date``); datetimes from
        ISO 8601 text (a naive ``datetime.datetime``; one with an offset is converted to
        UTC); lists from a single value (``"a"`` -> ``["a"]``); choices matched
        case-insensitively to their canonical value (an Enum's value, or member name).
        Optional fields that are null or missing become ``None``; extra keys are dropped.
        Keys are matched exactly first, then case-insensitively. Every value fits its
        output column, so :func:`to_column` takes them as they are.

    Raises
    ------
    StructuredOutputError
        If the answer holds no JSON (``answer is not valid JSON: ...``), has the wrong
        shape, an item is not an object, a required field is missing or null, or a value
        is not of its type (``field 'year': expected int, got 'nineteen-ten'``): retryable.
        If a value is of its type but its column cannot hold it (an integer outside 64
        bits, a non-finite number, a date that does not parse or does not exist), the
        error's verdict is :data:`INVALID_VALUE` (``Verdict("row", False,
        "invalid_value")``): asking again would not help.

    Examples
    --------
    >>> parse_items('```json\\n{"items": [{"name": "Ada", "year": "1815"}]}\\n```',
    ...             {"name": str, "year": int})
    [{'name': 'Ada', 'year': 1815}]
    >>> parse_items('[]', ["name"])
    []
    """
    return normalize_fields(fields).parse(text)


class _Parser:
    """An answer parser compiled from fields: one converter per field, built once."""

    def __init__(self, fields: Fields) -> None:
        self.names = frozenset(f.name for f in fields)
        self.folded_names = frozenset(f.name.casefold() for f in fields)
        self.expected = ", ".join(repr(f.name) for f in fields)
        # Per field: name, its case-folded form, converter, nullable, what is expected.
        self.slots = tuple(
            (f.name, f.name.casefold(), _converter(f.kind), f.nullable, f.kind.describe())
            for f in fields
        )

    def __call__(self, text: str) -> list[dict]:
        raw_items = self._raw_items(_load_json(text))
        total = len(raw_items)
        items = []
        for position, raw in enumerate(raw_items):
            if not isinstance(raw, dict):
                raise StructuredOutputError(
                    f"item {position + 1} of the answer is not a JSON object: {_show(raw)}"
                )
            items.append(self._item(raw, f" (item {position + 1} of {total})" if total > 1 else ""))
        return items

    def _item(self, raw: dict, where: str) -> dict:
        item = {}
        folded: dict[str, Any] | None = None
        for name, fold, convert, nullable, expected in self.slots:
            value = raw.get(name, _MISSING)
            if value is _MISSING:
                if folded is None:
                    # Built only when a key is not spelled exactly: most answers never need it.
                    folded = {}
                    for key, v in raw.items():
                        if isinstance(key, str):
                            folded.setdefault(key.casefold(), v)
                value = folded.get(fold, _MISSING)
            if value is None or value is _MISSING:
                if nullable:
                    item[name] = None
                    continue
                if value is _MISSING:
                    keys = ", ".join(repr(k) for k in list(raw)[:10]) or "none"
                    raise StructuredOutputError(
                        f"field {name!r}: missing, expected {expected}{where}; "
                        f"the object's keys are {keys}"
                    )
            try:
                item[name] = convert(value)
            except _Invalid as exc:
                raise exc.error(f"field {name!r}", where) from None
        return item

    def _raw_items(self, value: Any) -> list:
        if isinstance(value, list):
            return value
        if not isinstance(value, dict):
            raise StructuredOutputError(
                f'answer is not a JSON object or array: {_show(value)}; expected {{"items": [...]}}'
            )
        if "items" in value:
            wrapped = value["items"]
            is_wrapper = "items" not in self.names or (
                isinstance(wrapped, list)
                and (all(isinstance(v, dict) for v in wrapped) if wrapped else len(value) == 1)
            )
            if is_wrapper:
                if wrapped is None:
                    return []
                if not isinstance(wrapped, list):
                    raise StructuredOutputError(
                        f'"items" in the answer must be a JSON array, got {_show(wrapped)}'
                    )
                return wrapped
        folded = self.folded_names
        if any(isinstance(k, str) and k.casefold() in folded for k in value):
            return [value]
        if len(value) == 1:
            # Models without a schema mode often pick their own wrapper key ("results",
            # "pairs"); one array under one key can only mean the items.
            (only,) = value.values()
            if isinstance(only, list):
                return only
        keys = ", ".join(repr(k) for k in list(value)[:10]) or "none"
        raise StructuredOutputError(
            f'answer is a JSON object without "items" or any of the fields {self.expected}; '
            f"its keys are {keys}"
        )


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)```", re.DOTALL)
_OPEN = re.compile(r"[\[{]")
_MISSING = object()


def _load_json(text: Any) -> Any:
    if not isinstance(text, str):
        raise StructuredOutputError(f"answer is not text: {_show(text)}")
    stripped = _THINK.sub("", text).strip()
    if not stripped:
        raise StructuredOutputError("answer is empty; expected a JSON object")
    try:
        return json.loads(stripped)
    except ValueError as exc:
        error: ValueError = exc
    for match in _FENCE.finditer(stripped):
        try:
            return json.loads(match.group(1))
        except ValueError:
            continue
    found = _embedded_json(stripped)
    if found is not _MISSING:
        return found
    detail = (
        f"{error.msg} at line {error.lineno} column {error.colno}"
        if isinstance(error, json.JSONDecodeError)
        else str(error)
    )
    excerpt = stripped[:_EXCERPT_CHARS] + ("..." if len(stripped) > _EXCERPT_CHARS else "")
    raise StructuredOutputError(
        f"answer is not valid JSON: {detail}; the answer starts {excerpt!r}"
    )


def _embedded_json(text: str) -> Any:
    """Return the first balanced JSON value in prose that looks like an answer."""
    first = _MISSING
    position = 0
    for _ in range(_MAX_JSON_ATTEMPTS):
        match = _OPEN.search(text, position)
        if match is None:
            break
        start = match.start()
        end = _balanced_end(text, start)
        if end is None:
            # An unclosed bracket is usually a truncated answer (max_tokens): the objects
            # inside it would parse, and returning them would hide the loss instead of
            # retrying.
            break
        position = end + 1
        try:
            value = json.loads(text[start : end + 1])
        except ValueError:
            # Skip the whole broken structure rather than descend into it: its first inner
            # object would parse, and answering with it alone would silently drop the rest.
            continue
        if isinstance(value, dict) or (
            isinstance(value, list) and all(isinstance(v, dict) for v in value)
        ):
            return value
        if first is _MISSING:
            # Keep scanning: prose like "I found [2] pairs" precedes the real JSON.
            first = value
    return first


def _balanced_end(text: str, start: int) -> int | None:
    depth = 0
    in_string = False
    escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index
    return None


class _Invalid(Exception):
    """A value a converter refused: not of its type, or (with a reason) not fit for its column."""

    def __init__(self, value: Any, expected: str, reason: str | None = None) -> None:
        super().__init__(value, expected, reason)
        self.value = value
        self.expected = expected
        self.reason = reason
        self.path = ""  # " element 2" when inside a list

    def error(self, label: str, where: str) -> StructuredOutputError:
        label += self.path
        if self.reason is None:
            return StructuredOutputError(
                f"{label}: expected {self.expected}, got {_show(self.value)}{where}"
            )
        return StructuredOutputError(
            f"{label}: {_show(self.value)} does not fit {self.expected}: {self.reason}{where}",
            verdict=INVALID_VALUE,
        )


_Converter = Callable[[Any], Any]


def _converter(kind: _Type) -> _Converter:
    """The function that checks and coerces one value of ``kind``, raising ``_Invalid``."""
    return _CONVERTER_BUILDERS[kind.kind](kind)


def _str_converter(kind: _Type) -> _Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        raise _Invalid(value, "str")

    return convert


def _int_converter(kind: _Type) -> _Converter:
    def convert(value: Any) -> Any:
        number = value if type(value) is int else _as_int(value)
        if number is _MISSING:
            raise _Invalid(value, "int")
        if _INT64_MIN <= number <= _INT64_MAX:
            return number
        raise _Invalid(value, "int", _INT_RANGE)

    return convert


_INT_RANGE = f"an Int64 column holds {_INT64_MIN} to {_INT64_MAX}"
_FLOAT_RANGE = "a Float64 column holds finite numbers up to about 1.8e308"


def _as_int(value: Any) -> Any:
    """``value`` as a Python int (possibly beyond 64 bits; infinity as ``inf``), or _MISSING."""
    if isinstance(value, bool):
        return _MISSING
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return _MISSING
            if text.lstrip("+-").casefold() in _NOT_A_NUMBER:
                return _MISSING
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        if math.isinf(value):
            # JSON Schema's "integer" is any number without a fraction, so 1e400 is one: a
            # value the schema allows that no 64-bit column holds.
            return _INT64_MAX + 1 if value > 0 else _INT64_MIN - 1
    return _MISSING


def _float_converter(kind: _Type) -> _Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            raise _Invalid(value, "float")
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:
                raise _Invalid(value, "float", _FLOAT_RANGE) from None
            if math.isfinite(number):
                return number
            if math.isnan(number):
                raise _Invalid(value, "float")  # NaN is not JSON: a broken answer
            raise _Invalid(value, "float", _FLOAT_RANGE)
        if isinstance(value, str):
            text = value.strip()
            try:
                number = float(text)
            except ValueError:
                raise _Invalid(value, "float") from None
            if math.isfinite(number):
                return number
            if text.lstrip("+-").casefold() in _NOT_A_NUMBER:
                raise _Invalid(value, "float")
            raise _Invalid(value, "float", _FLOAT_RANGE)
        raise _Invalid(value, "float")

    return convert


def _bool_converter(kind: _Type) -> _Converter:
    def convert(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            word = value.strip().casefold()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        raise _Invalid(value, "bool")

    return convert


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _date_converter(kind: _Type) -> _Converter:
    expected = kind.describe()

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            raise _Invalid(value, expected)
        text = value.strip()
        try:
            if _ISO_DATE.fullmatch(text):
                return datetime.date.fromisoformat(text)
            # A date with a time: the date as written, in the answer's own time zone.
            return _parse_datetime(text).date()
        except ValueError as exc:
            raise _Invalid(value, expected, _date_reason(exc)) from None

    return convert


def _datetime_converter(kind: _Type) -> _Converter:
    expected = kind.describe()

    def convert(value: Any) -> Any:
        if not isinstance(value, str):
            raise _Invalid(value, expected)
        try:
            moment = _parse_datetime(value.strip())
        except ValueError as exc:
            raise _Invalid(value, expected, _date_reason(exc)) from None
        if moment.tzinfo is not None:
            # One column holds one kind of time: instants with an offset become naive UTC.
            moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return moment

    return convert


def _parse_datetime(text: str) -> datetime.datetime:
    if not _ISO_DATE.match(text):
        raise ValueError("not ISO 8601")
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"  # Python 3.10's fromisoformat does not read "Z"
    # Nor a fraction of other than 3 or 6 digits ("14:30:00.25"): pad or cut it to 6.
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    return datetime.datetime.fromisoformat(text)


_FRACTION = re.compile(r"(?<=\d\d:\d\d:\d\d)[.,](\d+)")


def _date_reason(exc: ValueError) -> str:
    detail = str(exc)
    if "out of range" in detail or "must be in" in detail:
        return f"no such date ({detail})"
    return "not an ISO 8601 date such as 2024-05-31 or 2024-05-31T14:30:00"


def _choice_converter(kind: _Type) -> _Converter:
    expected = kind.describe()
    # Canonical value, then its case-folded spelling, then an Enum member's name.
    if isinstance(kind.choices[0], str):
        lookup: dict[Any, Any] = {c.casefold(): c for c in reversed(kind.choices)}
    else:
        lookup = {}
    # ``names`` is empty for a Literal, so zip yields nothing there.
    for member_name, choice in zip(kind.names, kind.choices, strict=False):
        lookup.setdefault(member_name.casefold(), choice)

    if isinstance(kind.choices[0], str):
        exact = frozenset(kind.choices)

        def convert(value: Any) -> Any:
            if isinstance(value, str):
                if value in exact:
                    return value
                text = value.strip()
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                text = str(value)
            else:
                raise _Invalid(value, expected)
            if text in exact:
                return text
            found = lookup.get(text.casefold(), _MISSING)
            if found is _MISSING:
                raise _Invalid(value, expected)
            return found

        return convert

    numbers = frozenset(kind.choices)

    def convert_number(value: Any) -> Any:
        number = _as_int(value)
        if number is not _MISSING and number in numbers:
            return number
        if isinstance(value, str):
            found = lookup.get(value.strip().casefold(), _MISSING)
            if found is not _MISSING:
                return found
        raise _Invalid(value, expected)

    return convert_number


def _list_converter(kind: _Type) -> _Converter:
    assert kind.item is not None
    convert_item = _converter(kind.item)
    expected = kind.describe()

    def convert(value: Any) -> Any:
        if isinstance(value, list):
            result = []
            for position, element in enumerate(value):
                try:
                    result.append(convert_item(element))
                except _Invalid as exc:
                    exc.path = f" element {position}{exc.path}"
                    raise
            return result
        if isinstance(value, (str, int, float)):
            return [convert_item(value)]
        raise _Invalid(value, expected)

    return convert


_CONVERTER_BUILDERS: dict[str, Callable[[_Type], _Converter]] = {
    "str": _str_converter,
    "int": _int_converter,
    "float": _float_converter,
    "bool": _bool_converter,
    "date": _date_converter,
    "datetime": _datetime_converter,
    "choice": _choice_converter,
    "list": _list_converter,
}


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


# --------------------------------------------------------------------------- output


def dedupe_items(items: Iterable[dict]) -> list[dict]:
    """Drop repeated objects, keeping the first of each in order.

    Two objects are the same when they hold equal values under equal keys; lists and nested
    dicts are compared by value.

    Parameters
    ----------
    items : iterable of dict

    Returns
    -------
    list of dict

    Examples
    --------
    >>> dedupe_items([{"a": 1, "t": ["x"]}, {"a": 2, "t": []}, {"t": ["x"], "a": 1}])
    [{'a': 1, 't': ['x']}, {'a': 2, 't': []}]
    """
    seen: set = set()
    unique = []
    for item in items:
        key = _freeze(item)
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return ("dict", frozenset((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return ("list", tuple(_freeze(v) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    # The type is part of the key because 1 == 1.0 == True would otherwise merge.
    return (type(value).__name__, value)


def output_dtypes(fields: Any) -> dict[str, Any]:
    """Return each field's output column dtype, usable in ``Series.astype``.

    Parameters
    ----------
    fields : Fields, or anything :func:`normalize_fields` accepts

    Returns
    -------
    dict
        Field name -> ``"string"``, ``"Int64"``, ``"Float64"``, ``"boolean"``,
        ``"datetime64[us]"``, ``"object"`` (lists), or a :class:`pandas.CategoricalDtype` of
        the declared choices.

    Examples
    --------
    >>> from typing import Literal
    >>> dtypes = output_dtypes({"n": int, "label": Literal["spam", "ham"]})
    >>> dtypes["n"], list(dtypes["label"].categories)
    ('Int64', ['spam', 'ham'])
    """
    return dict(normalize_fields(fields).dtypes)


def to_column(values: Sequence[Any], field: Field, index: Any = None) -> pd.Series:
    """Build one output column from parsed values, missing values becoming NA.

    Parameters
    ----------
    values : sequence
        One value per output row, as :func:`parse_items` returns them (already checked and
        coerced: nothing is converted here); ``None``, ``NaN`` and ``pd.NA`` mean missing.
    field : Field
    index : pandas.Index or array-like, optional
        The output rows' index; a ``RangeIndex`` when omitted.

    Returns
    -------
    pandas.Series
        Named after the field, with the field's dtype. Missing values are ``<NA>`` in
        ``string``/``Int64``/``Float64``/``boolean`` columns, ``NaT`` in datetime ones,
        ``NaN`` in categorical ones and ``None`` in list (``object``) columns.

    Raises
    ------
    StructuredOutputError
        With the :data:`INVALID_VALUE` verdict, naming the field and the first value its
        column cannot hold, if a value did not come from the parser and does not fit.

    Examples
    --------
    >>> year = normalize_fields({"year": int})[0]
    >>> to_column([1815, None], year).tolist()
    [1815, <NA>]
    """
    dtype = field.output_dtype
    try:
        data = _array(values, field, dtype)
    except _BUILD_ERRORS as exc:
        bad = next((v for v in values if value_error(v, field) is not None), _MISSING)
        shown = _show(bad) if bad is not _MISSING else "a value"
        raise StructuredOutputError(
            f"field {field.name!r}: {shown} does not fit its {dtype} column", verdict=INVALID_VALUE
        ) from exc
    return pd.Series(data, index=index, name=field.name, dtype=dtype)


def value_error(value: Any, field: Field) -> str | None:
    """Why ``value`` cannot go into ``field``'s output column, or ``None`` when it can.

    The slow, one-value check behind :func:`to_column`'s error and the frame's defence
    against values that did not come from the parser.
    """
    dtype = field.output_dtype
    try:
        _array([value], field, dtype)
    except _BUILD_ERRORS:
        return f"field {field.name!r}: {_show(value)} does not fit its {dtype} column"
    return None


# What pandas raises when a value does not fit a dtype (OutOfBoundsDatetime is a ValueError).
_BUILD_ERRORS = (TypeError, ValueError, OverflowError)


def _array(values: Sequence[Any], field: Field, dtype: Any) -> Any:
    if field.dtype == "object":
        # An object array filled element-wise keeps each list whole; handing a list of
        # equal-length lists to numpy or pandas would build a 2-D array instead.
        data = np.empty(len(values), dtype=object)
        for position, value in enumerate(values):
            data[position] = None if _is_missing(value) else value
        return data
    if field.dtype == "category":
        # pandas turns a value outside the categories into NaN without a word: refuse it.
        allowed = set(field.choices or ())
        for value in values:
            if not _is_missing(value) and value not in allowed:
                raise ValueError(f"{value!r} is not one of the categories")
        return pd.Categorical(values, dtype=dtype)
    # An integer beyond 64 bits makes numpy warn on its way to pandas' TypeError: the error
    # is what we report, the warning would only repeat it on stderr.
    with np.errstate(invalid="ignore", over="ignore"):
        return pd.array(values, dtype=dtype)


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)
