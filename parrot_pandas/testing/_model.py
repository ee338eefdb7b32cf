"""The answer model behind every protocol, and how it reads a request.

One predictable "model" answers all three dialects:

- Plain requests get the *echo model*: choice ``i`` answers ``"echo: <last user message>"``
  when ``i`` is even and ``"echo (alt): <last user message>"`` when it is odd.
- Structured requests get ``{"items": [...]}``: every line of the last user message that
  contains ``=`` becomes one object of its comma-separated ``key=value`` pairs, keeping the keys
  the item schema declares and converting values to the declared types.

Here too: what a request asks for once its dialect has read it (:class:`Plan`, :class:`Job`),
reading item schemas (from a tool, a response format, or JSON in the prompt's text), and the
token count every route uses.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

__all__ = [
    "Job",
    "Plan",
    "answer_texts",
    "count_tokens",
    "item_properties",
    "json_body",
    "last_user_text",
    "message_text",
    "props_from_prompt",
]


def count_tokens(text: str) -> int:
    # The approximation clients use without tiktoken: four characters a token.
    return -(-len(text) // 4)


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The request's prompt: its last user message's text (what answers and faults key on)."""
    return next(
        (message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )


def _resolve(node: Any, root: Mapping[str, Any]) -> Any:
    """Follow a local ``$ref`` (``#/$defs/Item``), as pydantic-made schemas use."""
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not (isinstance(ref, str) and ref.startswith("#/")):
        return node
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part) if isinstance(target, dict) else None
    return target


def item_properties(schema: Any) -> dict[str, Any] | None:
    """``schema.properties.items.items.properties``, the fields of one extracted object."""
    if not isinstance(schema, dict):
        return None
    node: Any = schema
    for key in ("properties", "items", "items", "properties"):
        node = _resolve(node, schema)
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return None
    return node if isinstance(node, dict) else None


def _json_type(prop: Any) -> str | None:
    if not isinstance(prop, dict):
        return None
    kind = prop.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind is None and isinstance(prop.get("anyOf"), list):
        kind = next((_json_type(p) for p in prop["anyOf"] if _json_type(p) != "null"), None)
    return kind if isinstance(kind, str) else None


_EXAMPLE_TYPES = {bool: "boolean", int: "integer", float: "number"}


def _schema_in_text(text: str) -> dict[str, Any] | None:
    """Item properties from a JSON Schema, or a JSON example, embedded in a prompt."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    # A handful of attempts: prompts are short and the format block comes first.
    for _ in range(20):
        if start < 0:
            return None
        try:
            obj, _end = decoder.raw_decode(text, start)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            props = item_properties(obj)
            if props is None and isinstance(obj.get("properties"), dict):
                props = obj["properties"]
            example = obj.get("items")
            if props is None and isinstance(example, list) and example:
                if isinstance(example[0], dict):
                    props = {
                        k: {"type": _EXAMPLE_TYPES.get(type(v), "string")}
                        for k, v in example[0].items()
                    }
            if props is not None:
                return props
        start = text.find("{", start + 1)
    return None


def _convert(value: str, prop: Any) -> Any:
    kind = _json_type(prop)
    try:
        if kind == "integer":
            return int(value)
        if kind == "number":
            return float(value)
    except ValueError:
        # Left a string on purpose: clients get to exercise their type validation.
        return value
    if kind == "boolean":
        low = value.lower()
        if low in ("true", "yes"):
            return True
        if low in ("false", "no"):
            return False
    return value


def _parse_items(text: str, props: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One object per line holding ``key=value`` pairs; keys the schema lacks are dropped."""
    items = []
    for line in text.splitlines():
        if "=" not in line:
            continue
        raw: dict[str, str] = {}
        last = None
        for segment in line.split(","):
            key, eq, value = segment.partition("=")
            words = key.split()
            if not eq or not words:
                if last is not None:  # a comma inside a value: "name=Lovelace, Ada"
                    raw[last] += "," + segment
                continue
            last = words[-1]  # the last word before "=", so "Extract: name=Ada" gives "name"
            raw[last] = value
        if props is None:
            obj = {k: v.strip() for k, v in raw.items()}
        else:
            obj = {k: _convert(v.strip(), props[k]) for k, v in raw.items() if k in props}
        if obj:
            items.append(obj)
    return items


async def json_body(request: web.Request) -> dict[str, Any] | None:
    """The request's JSON object, or ``None`` when the body is not one."""
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a request is to be answered, decided by its dialect from the request's shape."""

    kind: str  # "echo", "tool", "json" (content), "fenced" (prose around a ```json block)
    props: dict[str, Any] | None
    schemas: Sequence[Any]  # counted into prompt tokens
    tool: str | None = None
    finish: str = "stop"

    @property
    def structured(self) -> bool:
        return self.kind != "echo"


@dataclasses.dataclass(frozen=True)
class Job:
    """One request, read from whichever protocol it came in."""

    model: str
    prompt: str  # the last user message: what the echo and extract models answer
    prompt_tokens: int
    max_out: int
    n: int
    plan: Plan
    # Anthropic has no n: alternate the echo model's answers across repeated requests instead.
    rotate: bool = False
    fault: str | None = None  # one of _faults.ANSWER_FAULTS: the answer is spoilt on the way out


def props_from_prompt(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Item properties from the JSON Schema or example a request's messages carry, if any."""
    # System messages first: that is where clients describe the output format.
    ordered = sorted(messages, key=lambda m: m.get("role") != "system")
    for m in ordered:
        if m.get("role") in ("system", "user"):
            props = _schema_in_text(message_text(m.get("content")))
            if props is not None:
                return props
    return None


def answer_texts(plan: Plan, prompt: str, n: int, malformed: bool, start: int = 0) -> list[str]:
    """The model's ``n`` answer texts: echoes (alternating from ``start``) or extracted JSON.

    ``malformed`` cuts a structured answer in half (the server drew that fault).
    """
    if plan.structured:
        text = json.dumps({"items": _parse_items(prompt, plan.props)}, ensure_ascii=False)
        if malformed:
            text = text[: max(1, len(text) // 2)]  # a prefix of an object is never JSON
        if plan.kind == "fenced":
            text = f"Here is the JSON you asked for:\n```json\n{text}\n```\nHope this helps!"
        return [text] * n
    return [f"echo{' (alt)' if i % 2 else ''}: {prompt}" for i in range(start, start + n)]
