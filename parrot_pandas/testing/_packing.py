"""The test server's packed answers: several rows in one request, answered and spoilt on purpose.

It imports nothing of the client: the server is an independent oracle, and it reads the
packed format as the client's design note (``parrot_pandas/_packing.py``) states it, not
through its code.

A request is packed when its last user message holds ``<row id="N">`` blocks and its answer
schema (a tool's parameters, a response format, or the JSON Schema in the system text) is
``{"rows": [{"id": ..., ...}]}``. Each row's prompt is rebuilt (the ``<task>`` block with its
``<row/>`` replaced by the row's text, unescaped) and answered by the server's own unpacked
model, so a packed row gets exactly the answer it would get alone: the echo model's text
(``generate``, entries ``{"id", "text"}``) or its ``key=value`` objects (``extract``, entries
``{"id", "items"}``). Then the faults of :data:`PACK_FAULTS` are applied, each at its rate,
drawn from a seeded generator.

A wrong answer always comes as a second copy of an id whose right answer is also there (before
or after it): a lone wrong answer under the right id is a model answering wrongly, which no id
check can see, so it is not a packing fault.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["PACK_FAULTS", "PackedModel", "check_pack_faults"]

#: What ``ServerConfig.pack_faults`` can do to a packed answer; each maps to a probability.
PACK_FAULTS = {
    "drop": "per row: its entry is left out",
    "duplicate": "per row: a second entry with its id and a wrong answer, before or after the "
    "right one",
    "unknown": "per answer: an extra entry whose id no row has, holding another row's answer",
    "reorder": "per answer: the entries shuffled",
    "truncate": "per request: the answer cut at a random point, finish_reason 'length' "
    "(Anthropic: stop_reason 'max_tokens')",
}

RowModel = Callable[[str, "dict[str, Any] | None", int, int], list[str]]

_ROW = re.compile(r'<row id="(\d+)">\n(.*?)\n</row>', re.DOTALL)
_TASK = re.compile(r"\A<task>\n(.*?)\n</task>", re.DOTALL)
_ESCAPED = re.compile(r"&lt;(/?)(row|task)\b", re.IGNORECASE)
_PLACEHOLDER = "<row/>"


def check_pack_faults(faults: Any) -> tuple[tuple[str, float], ...]:
    """``ServerConfig.pack_faults`` as sorted pairs (hashable); ``ValueError`` if unknown or
    not a probability."""
    pairs = dict(faults.items() if isinstance(faults, Mapping) else faults or ())
    unknown = sorted(set(pairs) - set(PACK_FAULTS))
    if unknown:
        raise ValueError(f"unknown pack fault(s) {unknown}; they are {sorted(PACK_FAULTS)}")
    for name, rate in pairs.items():
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"pack fault {name!r} must be a probability in [0, 1], got {rate!r}")
    return tuple(sorted((name, float(rate)) for name, rate in pairs.items()))


class PackedModel:
    """Answers packed requests for a server, with its configured faults.

    Parameters
    ----------
    faults : pairs of (str, float)
        Fault name (a key of :data:`PACK_FAULTS`) -> probability.
    seed : int
        Seed of the generator the faults are drawn from.
    count : callable
        Receives counters (``packed``, ``ids_dropped``, ``ids_duplicated``, ``ids_unknown``,
        ``packs_reordered``, ``packs_truncated``) as keyword arguments.
    """

    def __init__(
        self, faults: Any, seed: int, count: Callable[..., None] = lambda **_: None
    ) -> None:
        self.rates = dict(check_pack_faults(faults))
        self._random = random.Random(f"{seed}-packing")
        self._count = count

    def answer(self, job: Any, malformed: bool, start: int, row_model: RowModel) -> Any:
        """The answers to ``job`` if it is packed, else ``None``.

        Parameters
        ----------
        job : the server's request record
            Its ``prompt`` (the last user message), ``n``, ``max_out`` and ``plan`` (``kind``,
            ``schemas``, ``props``) are read.
        malformed : bool
            The server drew its malformed fault: the answer is cut short, finish_reason stop.
        start : int
            Which echo answer comes first (Anthropic rotates them across repeated requests).
        row_model : callable
            ``(prompt, item_props, n, start) -> texts``: the server's unpacked answers to one
            prompt; ``item_props`` ``None`` asks the echo model.

        Returns
        -------
        (list of str, job) or None
            The answer texts, one per sample, and the job to render them with (its ``max_out``
            lowered when the answer is to be truncated, so the protocol cuts it as a server at
            its output limit does).
        """
        plan = job.plan
        if plan.kind == "echo" or "<row id=" not in job.prompt:
            return None
        row = _row_schema(plan.schemas, plan.props)
        rows = _rows(job.prompt)
        if row is None or not rows:
            return None
        properties = row.get("properties") if isinstance(row.get("properties"), dict) else {}
        extract = "items" in properties
        props = _dig(properties, "items", "items", "properties") if extract else None
        answers = {
            number: row_model(prompt, (props or {}) if extract else None, job.n, start)
            for number, prompt in rows
        }
        samples = min(len(texts) for texts in answers.values())
        texts = []
        for sample in range(samples):
            entries = []
            for number, _prompt in rows:
                text = answers[number][sample]
                if extract:
                    entries.append({"id": number, "items": json.loads(text)["items"]})
                else:
                    entries.append({"id": number, "text": text})
            text = json.dumps({"rows": self._spoil(entries, extract)}, ensure_ascii=False)
            if malformed:
                text = text[: max(1, len(text) // 2)]
            if plan.kind == "fenced":
                text = f"Here is the JSON you asked for:\n```json\n{text}\n```\nHope this helps!"
            texts.append(text)
        self._count(packed=1)
        if texts and self._draw("truncate"):
            # Cut where a server at its output limit would: the protocol's own max_tokens rule.
            longest = max(-(-len(t) // 4) for t in texts)
            limit = max(1, math.floor(longest * self._random.uniform(0.2, 0.9)))
            if not job.max_out or limit < job.max_out:
                job = dataclasses.replace(job, max_out=limit)
                self._count(packs_truncated=1)
        return texts, job

    def _draw(self, fault: str) -> bool:
        rate = self.rates.get(fault, 0.0)
        return rate > 0 and self._random.random() < rate

    def _spoil(self, entries: list[dict], extract: bool) -> list[dict]:
        right = list(entries)
        out: list[dict] = []
        dropped = duplicated = 0
        for entry in right:
            if self._draw("drop"):
                dropped += 1
                continue
            out.append(entry)
            if self._draw("duplicate"):
                duplicated += 1
                wrong = {"id": entry["id"], **_wrong(entry, right, extract)}
                # Before or after the right one: a checker that keeps the first (or the last)
                # copy is caught either way.
                out.insert(len(out) - 1 if self._random.random() < 0.5 else len(out), wrong)
        unknown = 0
        if right and self._draw("unknown"):
            unknown = 1
            copied = dict(self._random.choice(right))
            copied["id"] = len(right) + 1 + self._random.randrange(3)
            out.insert(self._random.randrange(len(out) + 1), copied)
        if self._draw("reorder"):
            self._random.shuffle(out)
            self._count(packs_reordered=1)
        if dropped or duplicated or unknown:
            self._count(ids_dropped=dropped, ids_duplicated=duplicated, ids_unknown=unknown)
        return out


def _wrong(entry: dict, entries: list[dict], extract: bool) -> dict:
    """An answer that differs from ``entry``'s: another row's when that differs, else made up."""
    key = "items" if extract else "text"
    for other in entries:
        if other[key] != entry[key]:
            return {key: other[key]}
    if not extract:
        return {"text": f"not the answer to row {entry['id']}"}
    return {"items": [] if entry["items"] else [{"wrong": "answer"}]}


def _rows(prompt: str) -> list[tuple[int, str]]:
    """Each row's id and its whole prompt, rebuilt from the task block and the row's text."""
    task = _TASK.match(prompt)
    prefix = suffix = ""
    if task is not None:
        prefix, _, suffix = task.group(1).partition(_PLACEHOLDER)
    return [
        (int(number), _unescape(prefix) + _unescape(body) + _unescape(suffix))
        for number, body in _ROW.findall(prompt)
    ]


def _unescape(text: str) -> str:
    return _ESCAPED.sub(r"<\1\2", text)


def _row_schema(schemas: Any, props: Any) -> dict | None:
    """The schema of one entry of ``{"rows": [...]}``, from the schemas the request carried
    or (schema in the prompt) the properties the server read from its text."""
    for schema in schemas or ():
        row = _dig(schema, "properties", "rows", "items")
        if isinstance(row, dict):
            return row
    row = _dig(props, "rows", "items")
    return row if isinstance(row, dict) else None


def _dig(node: Any, *keys: str) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node
