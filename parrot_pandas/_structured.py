"""Fields -> JSON Schema, parsing and validation of answers, output dtypes.

``extract(..., fields=...)`` asks the model for ``{"items": [{field: value, ...}, ...]}``.
This module turns the user's ``fields`` into :class:`Field` objects, builds the JSON Schema
sent to servers with native structured output (valid for OpenAI's strict mode), writes the
instruction used for servers without it, parses and coerces each answer, and builds the
typed output columns. Everything here is pure: no HTTP, no provider specifics.
"""

from __future__ import annotations

import enum
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

import numpy as np
import pandas as pd

from parrot_pandas.errors import ConfigurationError, StructuredOutputError

__all__ = [
    "RESERVED_NAMES",
    "Field",
    "dedupe_items",
    "items_schema",
    "normalize_fields",
    "output_dtypes",
    "parse_items",
    "schema_instructions",
    "to_column",
]

#: Output column names the result frame uses itself, so no field may take them.
RESERVED_NAMES = frozenset({"llm_error"})

SUPPORTED_TYPES = (
    "str, int, float, bool, list[X] of one of these, Literal['a', 'b'], an Enum subclass, "
    "or Optional[X] / X | None of any of them"
)

_NONE_TYPE = type(None)
# ``X | None`` is a types.UnionType before Python 3.14 and a typing.Union from 3.14 on.
_UNION_ORIGINS = (Union, types.UnionType)
_SCALAR_KINDS = {str: "str", bool: "bool", int: "int", float: "float"}
_JSON_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
_DTYPES = {
    "str": "string",
    "int": "Int64",
    "float": "Float64",
    "bool": "boolean",
    "choice": "category",
    "list": "object",
}
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
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
        ``"boolean"``, ``"category"`` (closed choices) or ``"object"`` (lists).
    nullable : bool
        Whether the field was declared ``Optional[...]`` / ``X | None``.
    choices : tuple or None
        The closed set of values of a ``Literal`` or ``Enum`` field (an Enum's values, not
        its members), else ``None``.
    """

    name: str
    annotation: Any
    schema: dict = field(hash=False)
    dtype: str
    nullable: bool = False
    choices: tuple | None = None


@dataclass(frozen=True)
class _Type:
    """What an annotation means once ``Optional`` is peeled off."""

    kind: str  # "str" | "int" | "float" | "bool" | "choice" | "list"
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
        return self.kind


# --------------------------------------------------------------------------- fields


def normalize_fields(fields: Any) -> tuple[Field, ...]:
    """Turn the ``fields`` a user passed to ``extract`` into a tuple of :class:`Field`.

    Parameters
    ----------
    fields : list of str, dict of str -> type, or pydantic.BaseModel subclass
        - a list or tuple of names: every field is a ``str``;
        - a dict mapping each name to ``str``, ``int``, ``float``, ``bool``, ``list[X]``
          (``X`` one of the former, a ``Literal`` or an ``Enum``), ``Literal["a", "b"]``,
          an ``enum.Enum`` subclass, or ``Optional[X]`` / ``X | None`` of any of these;
        - a pydantic ``BaseModel`` subclass (pydantic v2), whose fields follow the same
          rules and whose ``Field(description=...)`` is passed on to the model.

        A tuple of :class:`Field` is returned unchanged, so every function here accepts
        what this one returns.

    Returns
    -------
    tuple of Field
        In the order given.

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
    return tuple(result)


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
    return {"type": _JSON_TYPES[kind.kind]}


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
    fields = normalize_fields(fields)
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
    schema = json.dumps(items_schema(fields), ensure_ascii=False)
    return (
        f"Answer with only a JSON object of this form: {schema}. "
        'Put every object you find in "items"; use [] if there are none.'
    )


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
    fields : tuple of Field, or anything :func:`normalize_fields` accepts

    Returns
    -------
    list of dict
        One dict per object, with the fields' keys in order. Values are coerced: ints from
        ``"3"`` or ``3.0``; floats from ``"2.5"``; bools from ``true``/``false``,
        ``"yes"``/``"no"``, ``"true"``/``"false"``, ``1``/``0``; strings from numbers;
        lists from a single value (``"a"`` -> ``["a"]``); choices matched
        case-insensitively to their canonical value (an Enum's value, or member name).
        Optional fields that are null or missing become ``None``; extra keys are dropped.
        Keys are matched exactly first, then case-insensitively.

    Raises
    ------
    StructuredOutputError
        If the answer holds no JSON (``answer is not valid JSON: ...``), has the wrong
        shape, an item is not an object, a required field is missing or null, or a value
        cannot be coerced (``field 'year': expected int, got 'nineteen-ten'``).

    Examples
    --------
    >>> parse_items('```json\\n{"items": [{"name": "Ada", "year": "1815"}]}\\n```',
    ...             {"name": str, "year": int})
    [{'name': 'Ada', 'year': 1815}]
    >>> parse_items('[]', ["name"])
    []
    """
    fields = normalize_fields(fields)
    kinds = [_analyse(f.annotation, f.name)[0] for f in fields]
    value = _load_json(text)
    raw_items = _raw_items(value, fields)
    total = len(raw_items)
    items = []
    for position, raw in enumerate(raw_items):
        where = f" (item {position + 1} of {total})" if total > 1 else ""
        if not isinstance(raw, dict):
            raise StructuredOutputError(
                f"item {position + 1} of the answer is not a JSON object: {_show(raw)}"
            )
        items.append(_coerce_item(raw, fields, kinds, where))
    return items


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


def _raw_items(value: Any, fields: tuple[Field, ...]) -> list:
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        raise StructuredOutputError(
            f'answer is not a JSON object or array: {_show(value)}; expected {{"items": [...]}}'
        )
    names = {f.name for f in fields}
    folded = {f.name.casefold() for f in fields}
    if "items" in value:
        wrapped = value["items"]
        is_wrapper = "items" not in names or (
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
    if any(isinstance(k, str) and k.casefold() in folded for k in value):
        return [value]
    if len(value) == 1:
        # Models without a schema mode often pick their own wrapper key ("results",
        # "pairs"); one array under one key can only mean the items.
        (only,) = value.values()
        if isinstance(only, list):
            return only
    keys = ", ".join(repr(k) for k in list(value)[:10]) or "none"
    expected = ", ".join(repr(f.name) for f in fields)
    raise StructuredOutputError(
        f'answer is a JSON object without "items" or any of the fields {expected}; '
        f"its keys are {keys}"
    )


def _coerce_item(raw: dict, fields: tuple[Field, ...], kinds: list[_Type], where: str) -> dict:
    folded: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(key, str):
            folded.setdefault(key.casefold(), value)
    item = {}
    for f, kind in zip(fields, kinds, strict=True):
        value = raw.get(f.name, _MISSING)
        if value is _MISSING:
            value = folded.get(f.name.casefold(), _MISSING)
        if value is _MISSING or value is None:
            if f.nullable:
                item[f.name] = None
                continue
            if value is _MISSING:
                keys = ", ".join(repr(k) for k in list(raw)[:10]) or "none"
                raise StructuredOutputError(
                    f"field {f.name!r}: missing, expected {kind.describe()}{where}; "
                    f"the object's keys are {keys}"
                )
        item[f.name] = _coerce(value, kind, f"field {f.name!r}", where)
    return item


def _coerce(value: Any, kind: _Type, label: str, where: str = "") -> Any:
    result = _MISSING
    if value is None:
        pass
    elif kind.kind == "str":
        if isinstance(value, str):
            result = value
        elif isinstance(value, bool):
            result = "true" if value else "false"
        elif isinstance(value, (int, float)):
            result = str(value)
    elif kind.kind == "int":
        result = _to_int(value)
    elif kind.kind == "float":
        number = math.nan
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):
                number = float(value.strip())
        except (ValueError, OverflowError):
            pass
        if math.isfinite(number):
            result = number
    elif kind.kind == "bool":
        if isinstance(value, bool):
            result = value
        elif isinstance(value, int) and value in (0, 1):
            result = bool(value)
        elif isinstance(value, str):
            word = value.strip().casefold()
            result = True if word in _TRUE else False if word in _FALSE else _MISSING
    elif kind.kind == "choice":
        result = _to_choice(value, kind)
    elif kind.kind == "list":
        assert kind.item is not None
        if isinstance(value, list):
            result = [
                _coerce(v, kind.item, f"{label} element {i}", where) for i, v in enumerate(value)
            ]
        elif isinstance(value, (str, int, float)):
            result = [_coerce(value, kind.item, label, where)]
    if result is _MISSING:
        raise StructuredOutputError(
            f"{label}: expected {kind.describe()}, got {_show(value)}{where}"
        )
    return result


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _MISSING
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return _MISSING
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _MISSING


def _to_choice(value: Any, kind: _Type) -> Any:
    if isinstance(kind.choices[0], str):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return _MISSING
        text = (value if isinstance(value, str) else str(value)).strip()
        if text in kind.choices:
            return text
        folded = text.casefold()
        for choice in kind.choices:
            if choice.casefold() == folded:
                return choice
    else:
        number = _to_int(value)
        if number in kind.choices:
            return number
        if not isinstance(value, str):
            return _MISSING
        folded = value.strip().casefold()
    # ``names`` is empty for a Literal, so zip yields nothing there.
    for member_name, choice in zip(kind.names, kind.choices, strict=False):
        if member_name.casefold() == folded:
            return choice
    return _MISSING


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
    fields : tuple of Field, or anything :func:`normalize_fields` accepts

    Returns
    -------
    dict
        Field name -> ``"string"``, ``"Int64"``, ``"Float64"``, ``"boolean"``, ``"object"``
        (lists), or a :class:`pandas.CategoricalDtype` of the declared choices.

    Examples
    --------
    >>> from typing import Literal
    >>> dtypes = output_dtypes({"n": int, "label": Literal["spam", "ham"]})
    >>> dtypes["n"], list(dtypes["label"].categories)
    ('Int64', ['spam', 'ham'])
    """
    return {f.name: _dtype(f) for f in normalize_fields(fields)}


def _dtype(f: Field) -> Any:
    if f.dtype == "category":
        return pd.CategoricalDtype(categories=list(f.choices or ()))
    return f.dtype


def to_column(values: Sequence[Any], field: Field, index: Any = None) -> pd.Series:
    """Build one output column from Python values, missing values becoming NA.

    Parameters
    ----------
    values : sequence
        One value per output row, as :func:`parse_items` returns them; ``None``, ``NaN`` and
        ``pd.NA`` mean missing. Values are coerced again, so raw JSON values work too.
    field : Field
    index : pandas.Index or array-like, optional
        The output rows' index; a ``RangeIndex`` when omitted.

    Returns
    -------
    pandas.Series
        Named after the field, with the field's dtype. Missing values are ``<NA>`` in
        ``string``/``Int64``/``Float64``/``boolean`` columns, ``NaN`` in categorical ones and
        ``None`` in list (``object``) columns.

    Raises
    ------
    StructuredOutputError
        If a value cannot be coerced to the field's type.

    Examples
    --------
    >>> year = normalize_fields({"year": int})[0]
    >>> to_column([1815, None], year).tolist()
    [1815, <NA>]
    """
    kind, _ = _analyse(field.annotation, field.name)
    label = f"field {field.name!r}"
    cleaned = []
    for value in values:
        if isinstance(value, np.generic):
            # numpy scalars (np.int64, np.bool_) are not int/bool subclasses; unwrap them.
            value = value.item()
        cleaned.append(None if _is_missing(value) else _coerce(value, kind, label))
    dtype = _dtype(field)
    if field.dtype == "object":
        # An object array filled element-wise keeps each list whole; handing a list of
        # equal-length lists to numpy or pandas would build a 2-D array instead.
        data: Any = np.empty(len(cleaned), dtype=object)
        for position, value in enumerate(cleaned):
            data[position] = value
    elif field.dtype == "category":
        data = pd.Categorical(cleaned, dtype=dtype)
    else:
        data = pd.array(cleaned, dtype=dtype)
    return pd.Series(data, index=index, name=field.name, dtype=dtype)


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)
