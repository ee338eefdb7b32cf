"""Several rows in one request, every answer checked by id (issue 13). Pure: nothing here sends.

The feed yields distinct jobs; a packer takes K of them into one request, built here by
:class:`PackedPlan`, and maps the answer back to the rows with :meth:`PackedPlan.check`. What
fails goes again in smaller packs (:func:`halve`), and ``rows_per_request="auto"`` picks K with
:func:`token_ceiling`, :func:`rate_target` and :class:`PackSizer`.

The packed prompt
-----------------
Shared and byte-stable first, row data last, so a provider's prompt cache can hold the prefix:

1. The system message: the user's ``system`` (if any), then the packing rules
   (:data:`RULES_GENERATE` or :data:`RULES_EXTRACT`, with :data:`RULE_TASK` when the template
   is factored out), then, for the ``json_object`` and ``prompt`` strategies, the packed answer
   schema as text (the other strategies send it as a tool or a response format).
2. The user message: the template's static part once, as ``<task>\\n{prefix}<row/>{suffix}\\n
   </task>``, where ``prefix`` and ``suffix`` are the template's text before its first and
   after its last placeholder (:func:`template_ends`). A template with neither is not factored.
3. Then each row, ``<row id="{i}">\\n{body}\\n</row>``, blocks separated by a blank line. The
   body is the row's rendered prompt without the prefix and suffix. ``<row``, ``</row``,
   ``<task`` and ``</task`` inside any text become ``&lt;row`` ... so a row cannot close its
   block or forge another row's id.

Ids are local to the request: ``1..K`` in the order of the prompts given. They are never the
cache key: a small number costs a token or two and is hard to copy wrong; a 64-digit hash is
neither.

The answer schema
-----------------
Asked through the run's structured strategy, ``{"rows": [{"id": int, ...}]}``: in ``generate``
each entry is ``{"id": i, "text": str}``; in ``extract`` it is ``{"id": i, "items": [...]}``,
whose ``items`` is the array of the unpacked schema (:attr:`Fields.schema`), the same typing.

Checking an answer (:meth:`PackedPlan.check`)
---------------------------------------------
Each sample (choice) of the answer is checked on its own; an entry is mapped by its id only,
never by its position, so a reordered answer maps correctly. A row gets nothing when its id:

- is missing (``"missing"``);
- appears twice with different answers (``"duplicate"``; identical copies collapse into one);
- is in an answer whose rows array never closes: cut off by the output limit (``"truncated"``,
  when the provider reported ``finish_reason`` length / ``stop_reason`` max_tokens, or gave
  no text), or broken JSON (``"invalid_answer"``);
- holds an answer that does not validate and may be right when asked again
  (``"invalid_answer"``).

Entries with an id no row has, or none at all, are counted (:attr:`PackResult.unknown`) and
dropped. A row's answer is the entry without its id, parsed by the run's own unpacked parser
(``RequestPlan.parse``), so its validation is exactly as strict as unpacked extraction, with
the same verdicts; a value that can never fit its column (``INVALID_VALUE``) is an unusable
answer, cached and failing its row at once, as unpacked.

Truncation: an answer whose rows array did not close maps no row at all, not even the
entries that closed before the cut. Each of them looks finished, but a second entry with the
same id and another answer may lie after the cut, and only the whole array shows that an id
came once; trusting the first copy would give a row another answer whenever the wrong copy
came first. A truncated answer means the pack's output did not fit, so its rows are re-asked
in halves anyway (the paid output of the closed entries is the price). An answer flagged
truncated whose array did close (the cut fell in the envelope's last brace) is read whole.

Re-asking (:func:`halve`)
-------------------------
The rows a pack of K failed go again in packs of at most ``K // 2`` rows, split evenly; a row
alone goes unpacked, the ordinary request path with its ordinary verdicts. Pack sizes strictly
shrink, so a row is asked packed at most ``log2(K)`` more times. A packed request that fails as
a whole with a ``row`` verdict (too long for the context, a content filter, a request too
large for the token limit) is split the same way (:meth:`PackResult.failed`): the culprit ends
up alone, and only it fails. Transient failures (5xx, a dropped connection) retry the same
pack, as they retry an unpacked request.

Several samples (``n > 1``)
---------------------------
The packed request asks ``n`` samples (choices); each is checked by id on its own, and a row
keeps the samples that mapped. A row that failed in any sample is re-asked (halving) for the
samples it still lacks. A row that mapped in every sample the server returned, when it returned
fewer than asked (it ignores ``n``), has no problem: it is asked for the rest at the same size,
as an unpacked row is. A provider without ``n`` (Anthropic) sends the pack once per sample.

Choosing K for ``"auto"``
-------------------------
``size = min(token ceiling, rate target, failure cap)``:

- :func:`token_ceiling`: the most rows whose packed request (shared prompt, each row's prompt,
  and each row's ``max_tokens`` of output plus its envelope) fits the model's context window,
  its output cap and the largest request the token budget admits, with a margin: it never packs
  beyond what the token budget allows.
- :func:`rate_target`: packing helps most when the request limit binds. With both limits known,
  twice the K at which the token limit starts to bind instead; only the request limit known:
  :data:`MAX_AUTO_ROWS`; no request limit: :data:`DEFAULT_AUTO_ROWS` (packing still pays the
  instructions once per request).
- :class:`PackSizer`: the observed failure rate, smoothed; it halves the cap when the smoothed
  share of unmapped rows passes :data:`SHRINK_ABOVE` or a pack overflowed (truncated, too long),
  and grows it back by a quarter after :data:`GROW_AFTER` clean packs in a row.

The cache key of a packed row
-----------------------------
The row's ordinary unpacked key, ``RequestPlan.key(prompt)``: the messages of the row asked
alone, the model, the request parameters as the user set them (the per-row ``max_tokens``,
not the packed one), the unpacked schema and the base URL. What is cached under it is the
answer in the unpacked form (``{"items": [...]}`` for extract, the text for generate), so a
run with any K, or none, reads it; changing K does not make finished rows look new, and
identical rows share one job (the feed dedupes them) and are sent once.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from ._tokens import approximate_tokens
from .errors import StructuredOutputError
from .providers import Call, Completion

if TYPE_CHECKING:
    from ._plan import RequestPlan
    from ._structured import Fields
    from ._template import PromptTemplate
    from ._tokens import Tokenizer

__all__ = [
    "ASSUMED_CONTEXT_WINDOW",
    "ASSUMED_ROW_OUTPUT",
    "DEFAULT_AUTO_ROWS",
    "ENVELOPE_TOKENS",
    "MAX_AUTO_ROWS",
    "PLACEHOLDER",
    "ROW_OUTPUT_OVERHEAD",
    "ROW_PROMPT_OVERHEAD",
    "PackLimits",
    "PackResult",
    "PackSizer",
    "PackedPlan",
    "RowAnswer",
    "SizerState",
    "halve",
    "packed_output",
    "packed_schema",
    "rate_target",
    "template_ends",
    "token_ceiling",
]

#: Stands for the row's text in the factored task.
PLACEHOLDER = "<row/>"

RULES_GENERATE = (
    'The user message holds several rows, each between <row id="N"> and </row>. Answer every '
    "row on its own, as if it were the only request: use that row's text alone, and never skip, "
    'merge or repeat a row. Reply with one JSON object {"rows": [...]} holding one entry per '
    'row, in any order: {"id": N, "text": "<your answer to row N>"}.'
)
RULES_EXTRACT = (
    'The user message holds several rows, each between <row id="N"> and </row>. Treat every '
    "row on its own, as if it were the only request: use that row's text alone, and never skip, "
    'merge or repeat a row. Reply with one JSON object {"rows": [...]} holding one entry per '
    'row, in any order: {"id": N, "items": [<every object found in row N>]}; use "items": [] '
    "for a row with none."
)
RULE_TASK = (
    "When a <task> block comes first, it is the same task for every row, and <row/> in it "
    "stands for the row's text."
)

#: Rows ``"auto"`` packs when nothing says more would help (no request limit is known).
DEFAULT_AUTO_ROWS = 10
#: The most rows ``"auto"`` ever packs: beyond it small gains cost answer quality.
MAX_AUTO_ROWS = 50
#: Output tokens per row beyond its answer: ``{"id": 12, "items": ...},`` and JSON escaping.
ROW_OUTPUT_OVERHEAD = 16
#: Output tokens of the envelope ``{"rows": [...]}`` and a model's stray whitespace.
ENVELOPE_TOKENS = 8
#: Prompt tokens of one row's block beyond its body (``<row id="12">`` ... ``</row>``).
ROW_PROMPT_OVERHEAD = 12
#: An answer's length when no ``max_tokens`` bounds it, for sizing only.
ASSUMED_ROW_OUTPUT = 256
#: A context window to assume when the model's is not known (small local models have 2-8k).
ASSUMED_CONTEXT_WINDOW = 4096

# Failure-rate controller (PackSizer): smoothing weight of one pack, the smoothed share of
# unmapped rows above which the cap halves, and the clean packs in a row that grow it back.
ALPHA = 0.3
SHRINK_ABOVE = 0.25
GROW_AFTER = 4

_TAG = re.compile(r"<(/?)(row|task)\b", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_OPEN_THINK = re.compile(r"<think>", re.IGNORECASE)
_ROWS_KEY = re.compile(r'"rows"\s*:\s*\[')
_ARRAY_OF_OBJECTS = re.compile(r"\[\s*\{")
_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
_MISSING = object()
_SHOW = 120

T = TypeVar("T")


# --------------------------------------------------------------------------- the request


def template_ends(template: PromptTemplate) -> tuple[str, str]:
    """The template's static text before its first and after its last placeholder.

    ``("", "")`` for a template without placeholders (every row is the same prompt, so there is
    nothing to pack). Found by rendering with a marker, so ``$$`` and repeated columns are
    read as the template reads them.

    Examples
    --------
    >>> from parrot_pandas._template import PromptTemplate
    >>> template_ends(PromptTemplate("Classify: ${review}\\nOne word."))
    ('Classify: ', '\\nOne word.')
    """
    if not template.columns:
        return "", ""
    marker = "\x00parrot-row\x00"
    text = template.render(dict.fromkeys(template.columns, marker))
    return text[: text.index(marker)], text[text.rindex(marker) + len(marker) :]


def packed_schema(fields: Fields | None) -> dict[str, Any]:
    """The JSON Schema of a packed answer: ``{"rows": [{"id": int, <answer>}]}``.

    ``<answer>`` is ``"text": string`` for ``generate`` (``fields`` ``None``), and for
    ``extract`` the unpacked answer's ``"items"`` array, with the same typing. Fits OpenAI's
    strict mode, as the unpacked schema does.
    """
    if fields is None:
        answer: dict[str, Any] = {"text": {"type": "string"}}
    else:
        answer = {"items": json.loads(json.dumps(fields.schema["properties"]["items"]))}
    row = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, **answer},
        "required": ["id", *answer],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"rows": {"type": "array", "items": row}},
        "required": ["rows"],
        "additionalProperties": False,
    }


def packed_output(rows: int, per_row: int) -> int:
    """Output tokens to allow a packed answer of ``rows`` rows of ``per_row`` tokens each."""
    return rows * (per_row + ROW_OUTPUT_OVERHEAD) + ENVELOPE_TOKENS


@dataclass(frozen=True)
class PackedPlan:
    """How K rows' prompts become one request, and its answer K rows' values.

    Parameters
    ----------
    plan : RequestPlan
        The run's plan: model, system message, request parameters, fields, and the parser
        every row's answer goes through (so packing validates exactly as unpacked does).
    prefix, suffix : str
        The template's static ends (:func:`template_ends`), sent once per request; ``""`` for
        none.
    strategy : str, optional
        How the packed answer is asked for; the plan's strategy by default. ``generate`` has
        none unpacked, so the packer must name one.

    Examples
    --------
    >>> packed = PackedPlan(plan, "Classify: ", "")  # doctest: +SKIP
    >>> call = packed.call(["Classify: good", "Classify: bad"], n=1)  # doctest: +SKIP
    >>> result = packed.check(texts, rows=2)  # doctest: +SKIP
    """

    plan: RequestPlan
    prefix: str = ""
    suffix: str = ""
    strategy: str | None = None

    def __post_init__(self) -> None:
        if self.strategy is None:
            object.__setattr__(self, "strategy", self.plan.strategy)
        if self.strategy is None:
            raise ValueError(
                "a packed request needs a structured strategy (tools, json_schema, ...)"
            )

    @property
    def generate(self) -> bool:
        """Whether rows are answered with free text (``generate``) rather than fields."""
        return self.plan.fields is None

    @cached_property
    def schema(self) -> dict[str, Any]:
        """The packed answer's JSON Schema (:func:`packed_schema`); shared, do not mutate."""
        return packed_schema(self.plan.fields)

    @cached_property
    def factored(self) -> bool:
        """Whether the template's static part is sent once as a ``<task>`` block."""
        return bool(self.prefix or self.suffix)

    @cached_property
    def system(self) -> str:
        """The system message: the user's, the packing rules, and the schema when it travels
        in the text. The same for every request of the run."""
        parts = [self.plan.config.system] if self.plan.config.system else []
        parts.append(RULES_GENERATE if self.generate else RULES_EXTRACT)
        if self.factored:
            parts[-1] += " " + RULE_TASK
        if self.strategy in ("json_object", "prompt"):
            schema = json.dumps(self.schema, ensure_ascii=False)
            parts.append(f"Answer with only a JSON object of this form: {schema}.")
        return "\n\n".join(parts)

    @cached_property
    def _task(self) -> str:
        return f"<task>\n{_escape(self.prefix)}{PLACEHOLDER}{_escape(self.suffix)}\n</task>"

    def messages(self, prompts: Sequence[str]) -> tuple[dict[str, str], ...]:
        """The chat messages asking for every prompt in ``prompts``, ids ``1..len(prompts)``."""
        prefix, suffix = self.prefix, self.suffix
        start, cut = len(prefix), len(suffix)
        # Prompts rendered from the run's template always carry its ends; any other prompt
        # is sent whole, without the task block, rather than cut wrongly.
        factored = self.factored and all(
            len(p) >= start + cut and p.startswith(prefix) and p.endswith(suffix) for p in prompts
        )
        blocks = [self._task] if factored else []
        for number, prompt in enumerate(prompts, 1):
            body = prompt[start : len(prompt) - cut] if factored else prompt
            blocks.append(f'<row id="{number}">\n{_escape(body)}\n</row>')
        return (
            {"role": "system", "content": self.system},
            {"role": "user", "content": "\n\n".join(blocks)},
        )

    def max_tokens(self, rows: int) -> int | None:
        """The output limit of a packed request: ``rows`` times the per-row ``max_tokens``
        plus each row's envelope; ``None`` when the user set none."""
        per_row = self.plan.config.max_output_tokens
        return packed_output(rows, per_row) if per_row is not None else None

    def call(self, prompts: Sequence[str], n: int = 1) -> Call:
        """The request asking ``n`` samples of the packed answer for ``prompts``."""
        return Call(
            model=self.plan.config.model,
            messages=self.messages(prompts),
            n=n,
            params=self._params(len(prompts)),
            schema=self.schema,
            strategy=self.strategy,
        )

    def _params(self, rows: int) -> Mapping[str, Any]:
        """The request parameters of a pack of ``rows`` rows, made once per size: the body
        encoder reuses the encoded parameters of a mapping it has seen (by identity)."""
        by_size: dict[int, Mapping[str, Any]] = self.__dict__.setdefault("_params_by_size", {})
        params = by_size.get(rows)
        if params is None:
            made = self.plan.config.request_params
            for name in ("max_tokens", "max_completion_tokens"):
                if made.get(name) is not None:
                    made[name] = packed_output(rows, int(made[name]))
            params = by_size[rows] = MappingProxyType(made)
        return params

    def cost(self, call: Call, prompt_ratio: float = 1.0) -> int:
        """Tokens a packed request counts against the limit on admission: its prompt (and the
        schema when sent as a parameter) plus ``n`` times its packed ``max_tokens``."""
        tokens = sum(approximate_tokens(m["content"]) for m in call.messages)
        if self.strategy in ("tools", "json_schema"):
            tokens += self._schema_tokens
        out = call.params.get("max_completion_tokens", call.params.get("max_tokens")) or 0
        return math.ceil(tokens * prompt_ratio) + call.n * int(out)

    @cached_property
    def _schema_tokens(self) -> int:
        return approximate_tokens(json.dumps(self.schema))

    def shared_tokens(self, counter: Tokenizer) -> int:
        """Prompt tokens every packed request pays once: system, task block, schema."""
        tokens = counter.messages(
            [{"role": "system", "content": self.system}, {"role": "user", "content": self._task}]
            if self.factored
            else [{"role": "system", "content": self.system}]
        )
        if self.strategy in ("tools", "json_schema"):
            tokens += counter.schema(self.schema, tool=self.strategy == "tools")
        return tokens

    def row_tokens(self, counter: Tokenizer, prompt: str) -> int:
        """Prompt tokens one row adds to a packed request (its block, tags included)."""
        body = prompt
        if self.factored and prompt.startswith(self.prefix) and prompt.endswith(self.suffix):
            body = prompt[len(self.prefix) : len(prompt) - len(self.suffix)]
        return counter.count(_escape(body)) + ROW_PROMPT_OVERHEAD

    def check(
        self,
        texts: Sequence[str | None],
        rows: int,
        *,
        truncated: Sequence[bool] = (),
    ) -> PackResult:
        """Map the samples of a packed answer to its ``rows`` rows, by id.

        Parameters
        ----------
        texts : sequence of str or None
            One text per sample (choice) of the answer, as the provider returned it; ``None``
            for a sample with no text (a truncated answer the provider kept nothing of).
        rows : int
            Rows in the request: ids ``1..rows``, in the order the prompts were given.
        truncated : sequence of bool, optional
            Per sample, whether the provider reported it cut off at the output limit.

        Returns
        -------
        PackResult
            Per row, in request order: its answers (text to cache, parsed value), its unusable
            answers, and why it must be asked again, if it must.
        """
        result = PackResult([RowAnswer() for _ in range(rows)])
        for index, text in enumerate(texts):
            cut = index < len(truncated) and bool(truncated[index])
            self._check_sample(text, cut, result)
        return result

    def read(self, completion: Completion, rows: int, want: int) -> PackResult:
        """Map a packed request's answer (a live response or a batch line's) to its rows.

        :meth:`check` on the usable texts (at most ``want``) and the samples cut off at the
        output limit; a sample the provider judged unusable for another reason (filtered,
        refused, no structure) fails every row with its reason, and an answer with no sample
        at all fails every row as ``invalid_answer``.
        """
        texts: list[str | None] = list(completion.texts[:want])
        cut = [False] * len(texts)
        others: list[StructuredOutputError] = []
        for problem in completion.problems:
            if problem.verdict.reason == "truncated":
                texts.append(None)
                cut.append(True)
            else:
                others.append(problem)
        result = self.check(texts, rows, truncated=cut)
        for problem in others:
            for row in result.rows:
                row.fail(problem.verdict.reason, problem.message)
        if not texts and not others:
            for row in result.rows:
                row.fail("invalid_answer", "the server returned no answer")
        return result

    def _check_sample(self, text: str | None, cut: bool, result: PackResult) -> None:
        entries = _entries(text)
        if entries is None:
            # The array never closed: a wrong copy of an id may be what was cut off.
            reason = "truncated" if cut else "invalid_answer"
            for number, row in enumerate(result.rows, 1):
                row.fail(reason, _UNSEEN[reason].format(number=number))
            return
        rows = len(result.rows)
        answers: dict[int, dict] = {}
        conflicts: set[int] = set()
        for entry in entries:
            number, answer = _split_id(entry)
            if number is None or not 1 <= number <= rows:
                result.unknown += 1
                continue
            if number in conflicts:
                continue
            seen = answers.get(number)
            if seen is None:
                answers[number] = answer
            elif not _same(seen, answer):
                # Two different answers for one row: neither can be trusted to be its own.
                conflicts.add(number)
                del answers[number]
        for number, row in enumerate(result.rows, 1):
            answer = answers.get(number)
            if answer is not None:
                self._read(answer, row)
            elif number in conflicts:
                row.fail("duplicate", f"id {number} came twice with different answers")
            else:
                row.fail("missing", _UNSEEN["missing"].format(number=number))

    def _read(self, answer: dict, row: RowAnswer) -> None:
        if self.generate:
            text = _text_of(answer)
            if text is None:
                row.fail("invalid_answer", f"no text in the row's entry: {_show(answer)}")
            else:
                row.answers.append((text, text))
            return
        text = json.dumps(answer, ensure_ascii=False)
        try:
            value = self.plan.parse(text)
        except StructuredOutputError as exc:
            if exc.verdict.retry:
                row.fail("invalid_answer", exc.message)
            else:
                row.unusable.append((text, exc))
            return
        row.answers.append((text, value))


_UNSEEN = {
    "missing": "id {number} is missing from the answer",
    "truncated": "the answer was cut off at the output limit before its rows closed",
    "invalid_answer": "the answer's rows array is not valid JSON",
}


@dataclass
class RowAnswer:
    """What a packed answer gave one row (across its samples).

    Attributes
    ----------
    answers : list of (str, Any)
        Per sample that mapped: the answer in the unpacked form (what the cache stores under
        the row's own key) and its parsed value.
    unusable : list of (str, StructuredOutputError)
        Answers whose value the column can never hold (verdict ``invalid_value``): cached as
        raw text, and the row fails at once, as unpacked.
    problem : str or None
        Why the row must be asked again: ``"missing"``, ``"duplicate"``, ``"truncated"`` or
        ``"invalid_answer"`` (the first seen across samples); ``None`` when every sample
        mapped.
    detail : str
        The message behind ``problem``, for the log.
    """

    answers: list[tuple[str, Any]] = field(default_factory=list)
    unusable: list[tuple[str, StructuredOutputError]] = field(default_factory=list)
    problem: str | None = None
    detail: str = ""

    @property
    def reask(self) -> bool:
        """Whether the row goes again (in a smaller pack): it failed to map in some sample and
        has no answer that can never parse (which ends it, as unpacked)."""
        return self.problem is not None and not self.unusable

    def fail(self, problem: str, detail: str) -> None:
        if self.problem is None:
            self.problem, self.detail = problem, detail


@dataclass
class PackResult:
    """A packed answer, mapped: one :class:`RowAnswer` per row, in request order.

    Attributes
    ----------
    rows : list of RowAnswer
    unknown : int
        Entries dropped because their id matched no row (or they had none).
    """

    rows: list[RowAnswer]
    unknown: int = 0

    @classmethod
    def failed(cls, rows: int, reason: str, detail: str = "") -> PackResult:
        """A packed request that failed as a whole with a ``row`` verdict (``reason`` is the
        verdict's): every row is re-asked, in smaller packs, so the culprit ends up alone."""
        result = cls([RowAnswer() for _ in range(rows)])
        for row in result.rows:
            row.fail(reason, detail)
        return result

    @property
    def reasks(self) -> list[int]:
        """Positions (0-based) of the rows to ask again."""
        return [i for i, row in enumerate(self.rows) if row.reask]

    @property
    def reasons(self) -> Counter[str]:
        """Rows to ask again, by reason."""
        return Counter(row.problem for row in self.rows if row.reask)

    @property
    def mapped(self) -> int:
        """Row samples that mapped to an answer (usable or not)."""
        return sum(len(row.answers) + len(row.unusable) for row in self.rows)

    def summary(self) -> str:
        """One line for the log: what was re-asked and why."""
        reasons = self.reasons
        if reasons:
            why = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
            text = f"{sum(reasons.values())} of {len(self.rows)} rows asked again ({why})"
        else:
            text = f"all {len(self.rows)} rows answered"
        if self.unknown:
            entries = "entry" if self.unknown == 1 else "entries"
            text += f"; {self.unknown} {entries} with an unknown id dropped"
        return text


# --------------------------------------------------------------------------- reading answers


def _escape(text: str) -> str:
    # Only the tags the format uses: a row cannot close its block or open another row's.
    return _TAG.sub(r"&lt;\1\2", text) if "<" in text else text


def _entries(text: str | None) -> list[Any] | None:
    """The rows array's entries, or ``None`` when no rows array closes in ``text``.

    Accepts ``{"rows": [...]}``, a bare array, or an object whose one key holds the array, in
    fences or prose; a reasoning model's ``<think>`` blocks are ignored. An array that stops
    being JSON before it closes (a cut, or a broken answer) is ``None`` too.
    """
    if not text:
        return None
    text = _THINK.sub("", text)
    unclosed = _OPEN_THINK.search(text)
    if unclosed is not None:
        text = text[: unclosed.start()]  # everything after an unclosed <think> is thinking
    try:
        value = json.loads(text)
    except ValueError:
        value = _MISSING
    if value is not _MISSING:
        entries = _rows_of(value)
        if entries is not None:
            return entries
    match = _ROWS_KEY.search(text) or _ARRAY_OF_OBJECTS.search(text)
    if match is None:
        return None
    return _scan(text, match.end() - 1 if match.re is _ROWS_KEY else match.start())


def _rows_of(value: Any) -> list | None:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        rows = value.get("rows", _MISSING)
        if isinstance(rows, list):
            return rows
        if rows is _MISSING and len(value) == 1:
            (only,) = value.values()
            if isinstance(only, list):
                return only
    return None


def _scan(text: str, start: int) -> list[Any] | None:
    """The entries of the array opening at ``text[start] == "["`` (prose may follow it), or
    ``None`` if it does not close."""
    entries: list[Any] = []
    position, end = start + 1, len(text)
    while True:
        while position < end and text[position] in _WHITESPACE:
            position += 1
        if position < end and text[position] == "]":
            return entries
        try:
            entry, position = _DECODER.raw_decode(text, position)
        except ValueError:
            return None
        entries.append(entry)
        while position < end and text[position] in _WHITESPACE:
            position += 1
        if position < end and text[position] == ",":
            position += 1
        elif position < end and text[position] == "]":
            return entries
        else:
            return None


def _split_id(entry: Any) -> tuple[int | None, dict]:
    """An entry's id and its answer (the entry without the id)."""
    if not isinstance(entry, dict):
        return None, {}
    key = "id" if "id" in entry else next((k for k in entry if k.casefold() == "id"), None)
    if key is None:
        return None, {}
    answer = {k: v for k, v in entry.items() if k != key}
    return _as_id(entry[key]), answer


def _as_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _same(a: dict, b: dict) -> bool:
    # Compared as JSON text: Python's == says 1 == 1.0 == True.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _text_of(answer: dict) -> str | None:
    text = answer.get("text", _MISSING)
    if text is _MISSING:
        text = next((v for k, v in answer.items() if k.casefold() == "text"), None)
    return text if isinstance(text, str) else None


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


# --------------------------------------------------------------------------- re-asking


def halve(failed: Sequence[T], size: int) -> list[list[T]]:
    """The rows a pack of ``size`` rows failed, regrouped for the next try.

    Packs of at most ``size // 2`` rows, as even as possible, in order; a group of one goes
    unpacked (the ordinary request path). Sizes strictly shrink, so halving ends.

    Examples
    --------
    >>> halve(["a", "b", "c"], 20)
    [['a', 'b', 'c']]
    >>> halve(list(range(18)), 20)
    [[0, 1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    >>> halve(["a", "b"], 2)
    [['a'], ['b']]
    """
    if not failed:
        return []
    most = max(1, size // 2)
    groups = -(-len(failed) // most)
    base, extra = divmod(len(failed), groups)
    packs, start = [], 0
    for index in range(groups):
        length = base + (index < extra)
        packs.append(list(failed[start : start + length]))
        start += length
    return packs


# --------------------------------------------------------------------------- choosing K


@dataclass(frozen=True)
class PackLimits:
    """What bounds one packed request, in tokens; ``None`` for a bound not known.

    Parameters
    ----------
    context_window : int, optional
        The model's context: prompt plus output of one request.
    max_output_tokens : int, optional
        The most output the model gives in one answer.
    request_tokens : float, optional
        The largest request the token-per-minute budget admits (its bucket's capacity).
    margin : float
        The share of each bound used: token counts are estimates.
    """

    context_window: int | None = None
    max_output_tokens: int | None = None
    request_tokens: float | None = None
    margin: float = 0.9


def token_ceiling(
    limits: PackLimits,
    *,
    shared: int,
    row_prompt: float,
    row_output: int | None,
    n: int = 1,
    most: int = MAX_AUTO_ROWS,
) -> int:
    """The most rows one packed request can hold within every token bound (1 to ``most``).

    Parameters
    ----------
    limits : PackLimits
    shared : int
        Prompt tokens every packed request pays once (:meth:`PackedPlan.shared_tokens`).
    row_prompt : float
        Prompt tokens a row adds (:meth:`PackedPlan.row_tokens`; a typical row's).
    row_output : int or None
        Output tokens a row's answer may take (its ``max_tokens``); ``None`` when unbounded,
        then :data:`ASSUMED_ROW_OUTPUT`.
    n : int
        Samples per request: each is a whole packed answer within the token budget.
    most : int
        The ceiling when no bound binds.

    Examples
    --------
    >>> token_ceiling(PackLimits(context_window=4096), shared=300, row_prompt=40, row_output=20)
    44
    """
    per_row_out = (ASSUMED_ROW_OUTPUT if row_output is None else row_output) + ROW_OUTPUT_OVERHEAD
    bounds = [float(most)]
    if limits.context_window is not None:
        room = limits.margin * limits.context_window - shared - ENVELOPE_TOKENS
        bounds.append(room / (row_prompt + per_row_out))
    if limits.max_output_tokens is not None:
        room = limits.margin * limits.max_output_tokens - ENVELOPE_TOKENS
        bounds.append(room / per_row_out)
    if limits.request_tokens is not None:
        room = limits.margin * limits.request_tokens - shared - n * ENVELOPE_TOKENS
        bounds.append(room / (row_prompt + n * per_row_out))
    return max(1, min(most, math.floor(min(bounds))))


def rate_target(
    rpm: float | None,
    tpm: float | None,
    *,
    shared: int,
    row_prompt: float,
    row_output: int | None,
    n: int = 1,
    default: int = DEFAULT_AUTO_ROWS,
    most: int = MAX_AUTO_ROWS,
) -> int:
    """Rows per request that the rate limits make worth packing.

    At K rows a request costs ``shared + K * per_row`` tokens. Up to the K where
    ``rpm * tokens(K) = tpm`` the request limit binds and every row more in a request is a row
    more per minute; past it the token limit binds and packing saves only the shared prompt.
    The target is twice that K (the limits a server announces move), at least ``default`` and
    at most ``most``.

    Examples
    --------
    >>> rate_target(500, None, shared=300, row_prompt=40, row_output=20)
    50
    >>> rate_target(500, 400_000, shared=300, row_prompt=40, row_output=20)
    13
    >>> rate_target(None, 200_000, shared=300, row_prompt=40, row_output=20)
    10
    """
    if rpm is None:
        return default  # no request limit: packing pays the instructions once, no more
    if tpm is None:
        return most  # only the request limit: it binds at any K
    per_row = row_prompt + n * (
        (ASSUMED_ROW_OUTPUT if row_output is None else row_output) + ROW_OUTPUT_OVERHEAD
    )
    meet = (tpm / rpm - shared - n * ENVELOPE_TOKENS) / per_row
    return max(default, min(most, math.ceil(2 * meet)))


@dataclass
class SizerState:
    """What :class:`PackSizer` has learned: its cap on rows per pack, the smoothed share of
    rows that did not map, and the clean packs in a row since the cap last changed."""

    cap: int = MAX_AUTO_ROWS
    failure_rate: float = 0.0
    clean: int = 0


class PackSizer:
    """Rows per request for ``rows_per_request="auto"``: the least of the token ceiling, the
    rate target and a cap learned from failures.

    The cap starts out of the way (:data:`MAX_AUTO_ROWS`). Each pack reports how many of its
    row samples mapped (:meth:`observe`); the smoothed share that did not (weight
    :data:`ALPHA` per pack) above :data:`SHRINK_ABOVE` halves the size, as does a pack that
    overflowed (a truncated answer, a prompt too long) at once; :data:`GROW_AFTER` clean packs
    in a row grow the cap back by a quarter. Ids lost at random are re-asked, not shrunk for:
    only a rate above the threshold says the model loses track at this size. A pack smaller
    than half the current size (a re-ask) says little about it and never shrinks the cap, but
    an overflow always does.

    Parameters
    ----------
    target : int
        The rate target (:func:`rate_target`), or the user's N.
    ceiling : int, optional
        The token ceiling (:func:`token_ceiling`); ``None`` for none.
    state : SizerState, optional
        What was learned so far (injected by tests, or carried between chunks).
    """

    def __init__(
        self, target: int, ceiling: int | None = None, *, state: SizerState | None = None
    ) -> None:
        self.target = max(1, target)
        self.ceiling = ceiling
        self.state = state if state is not None else SizerState()

    def retarget(self, target: int | None = None, ceiling: int | None = None) -> None:
        """Take new rate or token facts (the limits a server announced)."""
        if target is not None:
            self.target = max(1, target)
        if ceiling is not None:
            self.ceiling = ceiling

    @property
    def _limit(self) -> int:
        limit = self.target if self.ceiling is None else min(self.target, self.ceiling)
        return max(1, limit)

    @property
    def size(self) -> int:
        """Rows the next fresh pack should hold."""
        return max(1, min(self._limit, self.state.cap))

    def observe(self, asked: int, mapped: int, *, oversized: bool = False) -> None:
        """Learn from one packed answer.

        Parameters
        ----------
        asked : int
            Row samples asked (rows times samples).
        mapped : int
            Of those, the ones that mapped to an answer.
        oversized : bool
            The pack overflowed: its answer was truncated at the output limit, or its request
            was too long for the context or the token budget.
        """
        if asked < 2:
            return  # a single row is not a pack
        state, size = self.state, self.size
        share = 1.0 - min(mapped, asked) / asked
        state.failure_rate += ALPHA * (share - state.failure_rate)
        if oversized:
            self._shrink(min(size, asked))
        elif state.failure_rate > SHRINK_ABOVE and 2 * asked > size:
            self._shrink(size)
        elif share == 0.0:
            state.clean += 1
            if state.clean >= GROW_AFTER and state.cap < self._limit:
                state.cap += max(1, state.cap // 4)
                state.clean = 0
        else:
            state.clean = 0

    def _shrink(self, size: int) -> None:
        state = self.state
        state.cap = max(1, size // 2)
        # A fresh start at the new size: the old failures were the old size's.
        state.failure_rate = 0.0
        state.clean = 0
