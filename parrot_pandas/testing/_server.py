"""A deterministic local LLM server for tests, benchmarks and offline quickstarts.

``FakeServer`` speaks three protocols, each with its API's own response, error and rate-limit
header shapes:

- OpenAI: ``POST /v1/chat/completions`` (``x-ratelimit-*`` headers, durations like ``6m0s``);
- Anthropic Messages: ``POST /v1/messages`` (``x-api-key``, ``anthropic-version``, top-level
  ``system``, required ``max_tokens``, ``tool_use`` blocks, ``anthropic-ratelimit-*`` headers
  with RFC 3339 resets, ``{"type": "error", ...}`` bodies, 529 ``overloaded_error``);
- Azure OpenAI: ``POST /openai/deployments/{deployment}/chat/completions?api-version=...``
  (``api-key`` header, the deployment as the model, Azure's 401/404/429 bodies and its
  ``content_filter`` 400).

Behind them is one predictable "model":

- Plain requests get the *echo model*: choice ``i`` answers ``"echo: <last user message>"``
  when ``i`` is even and ``"echo (alt): <last user message>"`` when it is odd, so ``n=3``
  gives two distinct answers. Anthropic has no ``n``: there the answers alternate across
  repeated requests for the same message instead.
- Structured requests (a tool call, ``response_format`` ``json_schema`` / ``json_object``,
  Anthropic's ``output_config.format``, or a prompt that asks for JSON) get
  ``{"items": [...]}``: every line of the last user message that contains ``=`` becomes one
  object of its comma-separated ``key=value`` pairs (``name=Ada, year=1815``), keeping the keys
  the item schema declares and converting values to the declared types.

On top of that it can be slow (``latency``), rate limited (``rpm`` / ``tpm`` token buckets),
and unreliable (``fail_rate``, ``drop_rate``, ``malformed_rate``, drawn from a seeded
generator), and it counts what happened (``stats()``, or ``GET /_stats`` from another process).
``faults`` fails chosen rows the way real servers do, every time they are asked: a marker word
in the prompt picks the fault (a content filter, a truncation, a context-length 400, a
persistent 500, a request too large for the rate limit, a quota gone, a 200 echoing the key;
see :data:`FAULTS`).

Examples
--------
>>> from parrot_pandas.testing import FakeServer
>>> with FakeServer(latency=0.05, rpm=600) as srv:  # doctest: +SKIP
...     out = df.llm.generate("Summarize: ${text}", base_url=srv.url, api_key="x")
...     srv.stats()["ok"]
>>> with FakeServer() as srv:  # doctest: +SKIP
...     out = df.llm.generate("${text}", provider="anthropic", base_url=srv.origin, api_key="x")

From a shell (prints the base URL once it listens, serves until SIGTERM / Ctrl-C)::

    python -m parrot_pandas.testing --port 0 --latency 0.2 --rpm 1200
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import hmac
import itertools
import json
import math
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web

from ._packing import PackedModel, check_pack_faults

__all__ = ["FAULTS", "FakeServer", "ServerConfig", "TokenBucket", "main", "make_app"]

Clock = Callable[[], float]

_RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."

# The faults ServerConfig.faults can put on a row, each as the protocol's real servers send it.
FAULTS = {
    "content_filter": "200 whose answer the content filter withheld (finish_reason "
    "'content_filter'; Anthropic: stop_reason 'refusal')",
    "truncate": "200 whose answer is cut in half at max_tokens (finish_reason 'length'; "
    "Anthropic: stop_reason 'max_tokens'), free text or structured",
    "context_length": "OpenAI's 400 context_length_exceeded, whose text mentions 'functions' "
    "(Anthropic: 'prompt is too long')",
    "exceed_context": "llama.cpp's 400 exceed_context_size_error ('the request exceeds the "
    "available context size')",
    "server_error": "a 500 for that row, every time",
    "too_large": "OpenAI's 429 'Request too large ... Limit 30000, Requested 45000' with no "
    "retry-after (Anthropic: 413 request_too_large)",
    "insufficient_quota": "OpenAI's 429 insufficient_quota (Anthropic: 400 'Your credit "
    "balance is too low')",
    "echo_key": "200 without an answer whose error message echoes the key it was sent, as "
    "given and upper-cased",
}
# Faults that still answer 200 with a (spoilt) answer; the others are error responses.
_ANSWER_FAULTS = frozenset({"content_filter", "truncate"})


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a :class:`FakeServer` behaves. Every field has a harmless default.

    Parameters
    ----------
    latency : float
        Seconds to wait before answering each admitted request.
    latency_jitter : float
        Fraction in ``[0, 1]``: each wait is drawn uniformly from
        ``latency * (1 ± latency_jitter)`` (seeded, so runs repeat).
    rpm, tpm : float, optional
        Requests / tokens per minute, enforced with :class:`TokenBucket` s. A request costs
        ``prompt_tokens + (max_tokens or max_completion_tokens or 0)`` tokens at admission.
    burst : float
        Bucket capacity in seconds of rate: the buckets hold ``rpm / 60 * burst`` requests
        and ``tpm / 60 * burst`` tokens (at least 1).
    fail_rate, drop_rate, malformed_rate : float
        Probabilities, per admitted request, of answering 500/503 (alternately), of closing
        the connection without a response, and (structured requests only) of answering
        truncated, invalid JSON. Their sum must not exceed 1.
    seed : int
        Seed of the generator behind faults and jitter.
    api_key : str, optional
        When set, requests must carry it, each route as its API does: ``Authorization: Bearer``
        (OpenAI), ``x-api-key`` (Anthropic) or ``api-key`` (Azure). Never echoed.
    models : sequence of str, optional
        Model names the server accepts (others get 404 ``model_not_found``); ``None`` accepts
        any model.
    context_window : int, optional
        Rejects requests whose prompt tokens plus ``max_tokens`` exceed it (400
        ``context_length_exceeded``).
    honor_n : bool
        Return ``n`` choices; when ``False`` always one, as some servers do.
    supports_tools, supports_json_schema, supports_json_object : bool
        When ``False``, requests using ``tools`` / ``response_format`` of that type get a 400
        naming the parameter, as servers without that feature do. On the Anthropic route,
        ``supports_json_schema`` governs ``output_config.format``.
    filtered : sequence of str
        Azure route only: a prompt containing any of these words (any case) is refused by the
        "content filter", Azure's 400 with code ``content_filter``.
    faults : mapping of str to str
        Marker word -> fault (a key of :data:`FAULTS`): a request whose last user message
        contains the word (any case) gets that fault, on every route and every attempt, e.g.
        ``faults={"FILTERME": "content_filter", "BOOM": "server_error"}``. Counted in
        ``stats()["faults"]``.
    pack_faults : mapping of str to float
        Packed requests (several rows, each in a ``<row id="N">`` block) are always answered
        row by row; these spoil the answers at the given rates: ``drop``, ``duplicate``,
        ``unknown``, ``reorder`` and ``truncate`` (see ``_fake_packing.PACK_FAULTS``).
    """

    latency: float = 0.0
    latency_jitter: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    burst: float = 1.0
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    seed: int = 0
    api_key: str | None = dataclasses.field(default=None, repr=False)
    models: tuple[str, ...] | None = None
    context_window: int | None = None
    honor_n: bool = True
    supports_tools: bool = True
    supports_json_schema: bool = True
    supports_json_object: bool = True
    filtered: tuple[str, ...] = ()
    faults: Mapping[str, str] | tuple[tuple[str, str], ...] = ()
    pack_faults: Mapping[str, float] | tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        faults = dict(self.faults.items() if isinstance(self.faults, Mapping) else self.faults)
        unknown = sorted(set(faults.values()) - set(FAULTS))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; the faults are {sorted(FAULTS)}")
        # Kept as pairs: the config stays hashable and comparable.
        object.__setattr__(self, "faults", tuple(faults.items()))
        object.__setattr__(self, "pack_faults", check_pack_faults(self.pack_faults))
        if isinstance(self.filtered, str):
            object.__setattr__(self, "filtered", (self.filtered,))
        else:
            object.__setattr__(self, "filtered", tuple(self.filtered or ()))
        if isinstance(self.models, str):
            object.__setattr__(self, "models", (self.models,))
        elif self.models is not None:
            object.__setattr__(self, "models", tuple(self.models))
        if self.latency < 0 or not 0 <= self.latency_jitter <= 1:
            raise ValueError("latency must be >= 0 and latency_jitter in [0, 1]")
        for name in ("rpm", "tpm", "context_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if self.burst <= 0:
            raise ValueError(f"burst must be positive, got {self.burst!r}")
        rates = (self.fail_rate, self.drop_rate, self.malformed_rate)
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError(
                "fail_rate, drop_rate and malformed_rate must be in [0, 1] and sum to <= 1"
            )


class TokenBucket:
    """A token bucket: the server-side admission control behind ``rpm`` and ``tpm``.

    The bucket holds at most ``capacity`` tokens and refills continuously at ``rate`` tokens
    per second; it starts full. A request costing ``c`` is admitted when the level is at
    least ``c``, which then drops by ``c``; otherwise it must wait ``(c - level) / rate``
    seconds. A cost above ``capacity`` never fits.

    Parameters
    ----------
    rate : float
        Tokens added per second.
    capacity : float
        Maximum level.
    clock : callable, default time.monotonic
        Returns the current time in seconds; inject a fake one to test without sleeping.

    Examples
    --------
    >>> now = [0.0]
    >>> bucket = TokenBucket(rate=1.0, capacity=2.0, clock=lambda: now[0])
    >>> bucket.try_acquire(2), bucket.try_acquire(1)
    (0.0, 1.0)
    >>> now[0] = 1.0
    >>> bucket.try_acquire(1)
    0.0
    """

    def __init__(self, rate: float, capacity: float, *, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._level

    @property
    def level(self) -> float:
        """Tokens available now."""
        return self._refill()

    def wait_time(self, cost: float) -> float:
        """Seconds until ``cost`` fits: ``0.0`` if it fits now, ``inf`` if it never will."""
        level = self._refill()
        if cost <= level:
            return 0.0
        if cost > self.capacity:
            return math.inf
        return (cost - level) / self.rate

    def take(self, cost: float) -> None:
        """Remove ``cost`` tokens unconditionally (after :meth:`wait_time` said it fits)."""
        self._refill()
        self._level -= cost

    def try_acquire(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if they fit and return ``0.0``; else return the wait, take none."""
        wait = self.wait_time(cost)
        if wait == 0.0:
            self._level -= cost
        return wait

    def time_to_full(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self._refill()) / self.rate


def _format_duration(seconds: float) -> str:
    """OpenAI's duration format (Go's): ``20ms``, ``1.5s``, ``6m0s``, ``1h0m0s``."""
    # Rounded up to the millisecond: a client that waits this long is then sure to fit.
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    head = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{head}{secs}s"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _tokens(text: str) -> int:
    # The approximation clients use without tiktoken: four characters a token.
    return -(-len(text) // 4)


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def _error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


# ---------------------------------------------------------------------------------------
# Structured answers
# ---------------------------------------------------------------------------------------


def _resolve(node: Any, root: Mapping[str, Any]) -> Any:
    """Follow a local ``$ref`` (``#/$defs/Item``), as pydantic-made schemas use."""
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not (isinstance(ref, str) and ref.startswith("#/")):
        return node
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part) if isinstance(target, dict) else None
    return target


def _item_properties(schema: Any) -> dict[str, Any] | None:
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
            props = _item_properties(obj)
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


# ---------------------------------------------------------------------------------------
# Protocols: how each API shapes its answers, errors and rate-limit headers
# ---------------------------------------------------------------------------------------

Buckets = Sequence[tuple[str, float, TokenBucket]]


@dataclasses.dataclass(frozen=True)
class _Job:
    """One request, read from whichever protocol it came in."""

    model: str
    prompt: str  # the last user message: what the echo and extract models answer
    prompt_tokens: int
    max_out: int
    n: int
    plan: _Plan
    # Anthropic has no n: alternate the echo model's answers across repeated requests instead.
    rotate: bool = False
    fault: str | None = None  # one of _ANSWER_FAULTS: the answer is spoilt on the way out


class _OpenAIDialect:
    """OpenAI's response, error and ``x-ratelimit-*`` header shapes."""

    def screen(self, filtered: Sequence[str], texts: Sequence[str]) -> web.Response | None:
        return None  # only Azure runs a content filter

    def limit_headers(self, buckets: Buckets) -> dict[str, str]:
        headers = {}
        for kind, limit, bucket in buckets:
            headers[f"x-ratelimit-limit-{kind}"] = _number(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(int(bucket.level))
            headers[f"x-ratelimit-reset-{kind}"] = _format_duration(bucket.time_to_full())
        return headers

    def rate_limited(
        self,
        model: str,
        kind: str,
        limit: float,
        bucket: TokenBucket,
        requested: int,
        wait: float,
        headers: dict[str, str],
    ) -> web.Response:
        unit = "RPM" if kind == "requests" else "TPM"
        where = f"for {model} in organization org-parrot on {kind} per min ({unit})"
        if math.isinf(wait):
            # No retry-after: waiting never helps, as with OpenAI's own "too large" 429.
            message = (
                f"Request too large {where}: Limit {_number(limit)}, Requested {requested}. "
                "The input or output tokens must be reduced in order to run successfully. "
                f"(This server's bucket holds tpm / 60 * burst = {_number(bucket.capacity)} "
                "tokens; raise burst to admit larger requests.)"
            )
        else:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            headers["retry-after"] = str(math.ceil(wait))
            used = limit - int(bucket.level)
            message = (
                f"Rate limit reached {where}: Limit {_number(limit)}, Used {_number(used)}, "
                f"Requested {requested}. "
                f"Please try again in {_format_duration(wait)}. {_RATE_LIMIT_DOCS}"
            )
        return _error(429, message, kind, code="rate_limit_exceeded", headers=headers)

    def server_error(self, count: int, headers: dict[str, str]) -> web.Response:
        if count % 2:
            message = "The server had an error while processing your request. Sorry about that!"
            return _error(500, message, "server_error", headers=headers)
        message = "The engine is currently overloaded, please try again later."
        return _error(503, message, "server_error", headers=headers)

    def fault(self, name: str, model: str, prompt_tokens: int, key: str) -> web.Response:
        """The error response of fault ``name`` (see :data:`FAULTS`)."""
        if name == "context_length":
            message = (
                f"This model's maximum context length is 8192 tokens. However, your messages "
                f"resulted in {8192 + prompt_tokens} tokens ({8000 + prompt_tokens} in the "
                "messages, 192 in the functions). Please reduce the length of the messages or "
                "functions."
            )
            return _error(400, message, param="messages", code="context_length_exceeded")
        if name == "exceed_context":
            n_ctx = 4096
            body = {
                "error": {
                    "code": 400,
                    "message": f"request ({n_ctx + prompt_tokens} tokens) exceeds the available "
                    f"context size ({n_ctx} tokens), try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": n_ctx + prompt_tokens,
                    "n_ctx": n_ctx,
                }
            }
            return web.json_response(body, status=400)
        if name == "server_error":
            message = "The server had an error while processing your request. Sorry about that!"
            return _error(500, message, "server_error")
        if name == "too_large":
            message = (
                f"Request too large for {model} in organization org-parrot on tokens per min "
                "(TPM): Limit 30000, Requested 45000. The input or output tokens must be "
                f"reduced in order to run successfully. {_RATE_LIMIT_DOCS}"
            )
            return _error(429, message, "tokens", code="rate_limit_exceeded")
        if name == "insufficient_quota":
            message = (
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
            return _error(429, message, "insufficient_quota", code="insufficient_quota")
        # echo_key: a proxy answering 200 with an error that repeats what it was sent.
        message = f"Authentication failed for Bearer {key} (BEARER {key.upper()})"
        return web.json_response({"error": {"message": message}}, status=200)

    def render(
        self, job: _Job, answers: list[str], ids: Iterator[int]
    ) -> tuple[dict[str, Any], int]:
        plan = job.plan
        choices, completion_tokens = [], 0
        call_id = f"call_parrot{next(ids)}"
        for i, answer in enumerate(answers):
            finish = plan.finish
            if job.max_out and _tokens(answer) > job.max_out:
                answer, finish = answer[: job.max_out * 4], "length"
            elif job.fault == "truncate":
                answer, finish = answer[: max(1, len(answer) // 2)], "length"
            completion_tokens += _tokens(answer)
            message: dict[str, Any] = {"role": "assistant", "content": answer, "refusal": None}
            if job.fault == "content_filter":
                message["content"], finish = None, "content_filter"
            elif plan.kind == "tool":
                call = {"name": plan.tool, "arguments": answer}
                message["content"] = None
                message["tool_calls"] = [
                    {"id": f"{call_id}_{i}", "type": "function", "function": call}
                ]
            choices.append(
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
            )
        payload = {
            "id": f"chatcmpl-parrot{next(ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": job.prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_parrot",
        }
        return payload, completion_tokens


_OPENAI = _OpenAIDialect()

_NO_FILTER = {"filtered": False, "severity": "safe"}
_FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


class _AzureDialect(_OpenAIDialect):
    """Azure OpenAI: OpenAI's bodies, Azure's own 401/404/429 errors, headers and content filter."""

    def __init__(self, api_version: str) -> None:
        self.api_version = api_version

    @staticmethod
    def error(
        status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response(
            {"error": {"code": code, "message": message}}, status=status, headers=headers
        )

    def screen(self, filtered: Sequence[str], texts: Sequence[str]) -> web.Response | None:
        lowered = [t.lower() for t in texts]
        if not any(word.lower() in t for word in filtered for t in lowered):
            return None
        results = {c: dict(_NO_FILTER) for c in _FILTER_CATEGORIES}
        results["violence"] = {"filtered": True, "severity": "high"}
        body = {
            "error": {
                "message": (
                    "The response was filtered due to the prompt triggering Azure OpenAI's content "
                    "management policy. Please modify your prompt and retry. To learn more about "
                    "our content filtering policies please read our documentation: "
                    "https://go.microsoft.com/fwlink/?linkid=2198766"
                ),
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": results,
                },
            }
        }
        return web.json_response(body, status=400)

    def limit_headers(self, buckets: Buckets) -> dict[str, str]:
        # Azure announces what is left, not the limit nor its reset.
        return {
            f"x-ratelimit-remaining-{kind}": str(int(bucket.level)) for kind, _, bucket in buckets
        }

    def rate_limited(
        self,
        model: str,
        kind: str,
        limit: float,
        bucket: TokenBucket,
        requested: int,
        wait: float,
        headers: dict[str, str],
    ) -> web.Response:
        what = "call" if kind == "requests" else "token"
        where = (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
            f"{self.api_version} have exceeded {what} rate limit of your current OpenAI S0 "
            "pricing tier."
        )
        if math.isinf(wait):
            message = f"{where} This request asks for {requested} tokens, more than ever fit."
        else:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            headers["retry-after"] = str(math.ceil(wait))
            message = (
                f"{where} Please retry after {math.ceil(wait)} seconds. Please go here: "
                "https://aka.ms/oai/quotaincrease if you would like to further increase the "
                "default rate limit."
            )
        return self.error(429, "429", message, headers)

    def render(
        self, job: _Job, answers: list[str], ids: Iterator[int]
    ) -> tuple[dict[str, Any], int]:
        payload, completion_tokens = super().render(job, answers, ids)
        clean = {c: dict(_NO_FILTER) for c in _FILTER_CATEGORIES}
        payload["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": clean}]
        for choice in payload["choices"]:
            choice["content_filter_results"] = clean
            if choice["finish_reason"] == "content_filter":
                flagged = {**clean, "violence": {"filtered": True, "severity": "high"}}
                choice["content_filter_results"] = flagged
        return payload, completion_tokens


class _AnthropicDialect:
    """The Anthropic Messages API's response, error and ``anthropic-ratelimit-*`` shapes."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def error(
        self,
        status: int,
        type_: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        request_id = f"req_parrot{next(self._ids)}"
        body = {"type": "error", "error": {"type": type_, "message": message}}
        body["request_id"] = request_id
        return web.json_response(
            body, status=status, headers={**(headers or {}), "request-id": request_id}
        )

    def limit_headers(self, buckets: Buckets) -> dict[str, str]:
        # Every response of the API names its request.
        headers = {"request-id": f"req_parrot{next(self._ids)}"}
        now = time.time()
        for kind, limit, bucket in buckets:
            # This server has one token bucket; Anthropic announces input, output and the
            # tightest of them ("tokens"): all three carry it here.
            names = ("requests",) if kind == "requests" else _ANTHROPIC_TOKEN_KINDS
            for name in names:
                prefix = f"anthropic-ratelimit-{name}-"
                headers[prefix + "limit"] = _number(limit)
                headers[prefix + "remaining"] = str(int(bucket.level))
                headers[prefix + "reset"] = _rfc3339(now + bucket.time_to_full())
        return headers

    def rate_limited(
        self,
        model: str,
        kind: str,
        limit: float,
        bucket: TokenBucket,
        requested: int,
        wait: float,
        headers: dict[str, str],
    ) -> web.Response:
        unit = "requests" if kind == "requests" else "input tokens"
        message = (
            f"This request would exceed the rate limit for your organization (org-parrot) of "
            f"{_number(limit)} {unit} per minute. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits."
        )
        if math.isinf(wait):
            message += f" (This request needs {requested}; the limit never admits it.)"
        else:
            headers["retry-after"] = str(math.ceil(wait))
        return self.error(429, "rate_limit_error", message, headers)

    def server_error(self, count: int, headers: dict[str, str]) -> web.Response:
        if count % 2:
            return self.error(500, "api_error", "Internal server error", headers)
        return self.error(529, "overloaded_error", "Overloaded", headers)

    def fault(self, name: str, model: str, prompt_tokens: int, key: str) -> web.Response:
        """The error response of fault ``name`` (see :data:`FAULTS`)."""
        invalid = "invalid_request_error"
        if name in ("context_length", "exceed_context"):
            message = f"prompt is too long: {200_000 + prompt_tokens} tokens > 200000 maximum"
            return self.error(400, invalid, message)
        if name == "server_error":
            return self.error(500, "api_error", "Internal server error")
        if name == "too_large":
            message = "Request exceeds the maximum allowed number of bytes."
            return self.error(413, "request_too_large", message)
        if name == "insufficient_quota":
            message = (
                "Your credit balance is too low to access the Anthropic API. Please go to "
                "Plans & Billing to upgrade or purchase credits."
            )
            return self.error(400, invalid, message)
        message = f"invalid x-api-key {key} ({key.upper()})"
        body = {"type": "error", "error": {"type": "authentication_error", "message": message}}
        return web.json_response(body, status=200)

    def render(
        self, job: _Job, answers: list[str], ids: Iterator[int]
    ) -> tuple[dict[str, Any], int]:
        (answer,) = answers  # one answer per request: the API has no n
        plan = job.plan
        stop = plan.finish
        if job.max_out and _tokens(answer) > job.max_out:
            answer, stop = answer[: job.max_out * 4], "max_tokens"
        elif job.fault == "truncate":
            answer, stop = answer[: max(1, len(answer) // 2)], "max_tokens"
        completion_tokens = _tokens(answer)
        number = next(ids)
        if plan.kind == "tool":
            try:
                tool_input = json.loads(answer)
            except ValueError:
                # A malformed answer: tool input is always an object, so break its shape.
                tool_input = {"items": answer}
            block = {
                "type": "tool_use",
                "id": f"toolu_parrot{number}",
                "name": plan.tool,
                "input": tool_input if stop != "max_tokens" else {},
            }
        else:
            block = {"type": "text", "text": answer}
        content = [block]
        if job.fault == "content_filter":
            content, stop = [], "refusal"
        payload = {
            "id": f"msg_parrot{number}",
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": job.prompt_tokens, "output_tokens": completion_tokens},
        }
        return payload, completion_tokens


_ANTHROPIC = _AnthropicDialect()
_ANTHROPIC_TOKEN_KINDS = ("tokens", "input-tokens", "output-tokens")
# Top-level fields the Messages API accepts; any other is refused, as the API does.
_ANTHROPIC_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
        "temperature", "top_p", "top_k", "tools", "tool_choice", "service_tier", "thinking",
        "output_config", "container", "mcp_servers", "inference_geo", "cache_control",
    }
)  # fmt: skip


def _rfc3339(when: float) -> str:
    """Anthropic's reset format, rounded up to the second: ``2025-01-01T12:00:31Z``."""
    stamp = datetime.datetime.fromtimestamp(math.ceil(when), tz=datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------


class _Stats:
    """Counters shared by the loop thread (writes) and any caller thread (snapshots)."""

    _FIELDS = (
        "requests", "ok", "rate_limited", "failed", "dropped", "malformed", "rejected",
        "faults", "prompt_tokens", "completion_tokens", "packed", "ids_dropped",
        "ids_duplicated", "ids_unknown", "packs_reordered", "packs_truncated",
    )  # fmt: skip

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            for name in self._FIELDS:
                setattr(self, name, 0)
            self.by_prompt: Counter[str] = Counter()
            self.max_in_flight = self.in_flight

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snap: dict[str, Any] = {name: getattr(self, name) for name in self._FIELDS}
            snap.update(
                by_prompt=Counter(self.by_prompt),
                in_flight=self.in_flight,
                max_in_flight=self.max_in_flight,
            )
        return snap


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _ChatServer:
    """The request handlers and their state; one per application."""

    def __init__(self, config: ServerConfig, clock: Clock) -> None:
        self.config = config
        self.stats = _Stats()
        self._faults = random.Random(config.seed)
        # A separate stream, so turning jitter on does not change which requests fail.
        self._jitter = random.Random(f"{config.seed}-jitter")
        self._ids = itertools.count(1)
        self._failures = 0
        self._answered: Counter[str] = Counter()  # per prompt, for rotating answers
        self._buckets: list[tuple[str, float, TokenBucket]] = []
        for kind, per_minute in (("requests", config.rpm), ("tokens", config.tpm)):
            if per_minute is not None:
                rate = per_minute / 60.0
                bucket = TokenBucket(rate, max(1.0, rate * config.burst), clock=clock)
                self._buckets.append((kind, per_minute, bucket))
        self._key = config.api_key.encode() if config.api_key else None
        self._auth = f"Bearer {config.api_key}".encode() if config.api_key else None
        self._fault_rate = config.fail_rate + config.drop_rate + config.malformed_rate
        self._row_faults = [(word.lower(), fault) for word, fault in config.faults]
        self._packed = PackedModel(config.pack_faults, config.seed, self.stats.add)

    # -- small endpoints ----------------------------------------------------------------

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self._auth is None:
            return None
        given = request.headers.get("Authorization")
        if given is None:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        elif hmac.compare_digest(given.encode(), self._auth):
            return None
        else:
            # OpenAI echoes a masked key here; we echo nothing, so no log ever holds it.
            message = "Incorrect API key provided. Check the key you passed to this server."
        return _error(401, message, code="invalid_api_key")

    def _key_matches(self, request: web.Request, header: str) -> bool | None:
        """Whether ``header`` holds the key: ``None`` when it is missing (and one is needed)."""
        if self._key is None:
            return True
        given = request.headers.get(header)
        if given is None:
            return None
        return hmac.compare_digest(given.encode(), self._key)

    def _row_fault(self, prompt: str) -> str | None:
        """The fault a prompt's marker word asks for, if any."""
        if self._row_faults:
            lowered = prompt.lower()
            for word, fault in self._row_faults:
                if word in lowered:
                    return fault
        return None

    def _faulted(
        self, request: web.Request, dialect: Any, fault: str, model: str, prompt_tokens: int
    ) -> web.Response:
        # The key as this request carried it, for the fault that echoes it.
        given = (
            request.headers.get("x-api-key")
            or request.headers.get("api-key")
            or request.headers.get("Authorization", "").removeprefix("Bearer ")
            or "<no key>"
        )
        self.stats.add(faults=1, failed=int(fault == "server_error"))
        return dialect.fault(fault, model, prompt_tokens, given)

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        names = self.config.models or ("parrot-echo",)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "parrot"} for m in names]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def reset_stats(self, request: web.Request) -> web.Response:
        snap = self.stats.snapshot()
        self.stats.reset()
        return web.json_response(snap)

    async def not_found(self, request: web.Request) -> web.Response:
        message = f"Invalid URL ({request.method} {request.path})"
        return _error(404, message)

    # -- the three routes -----------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: the OpenAI protocol."""
        return await self._counted(request, self._chat)

    async def azure_chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /openai/deployments/{deployment}/chat/completions?api-version=``: Azure."""
        return await self._counted(request, self._azure_chat)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages``: the Anthropic Messages API."""
        return await self._counted(request, self._messages)

    async def _counted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        stats = self.stats
        with stats.lock:
            stats.requests += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            response = await handler(request)
            if response.status >= 400 and response.status not in (429, 500, 503, 529):
                stats.add(rejected=1)
            return response
        finally:
            with stats.lock:
                stats.in_flight -= 1

    # -- OpenAI and Azure -------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._check_auth(request)) is not None:
            return denied
        body = await _json_body(request)
        if body is None:
            return _error(400, "We could not parse the JSON body of your request.")
        return await self._chat_body(request, body, _OPENAI)

    async def _azure_chat(self, request: web.Request) -> web.StreamResponse:
        api_version = request.query.get("api-version")
        if not api_version:
            return _AzureDialect.error(404, "404", "Resource not found")
        if not self._key_matches(request, "api-key"):
            message = (
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                "to provide a valid key for an active subscription and use a correct regional "
                "API endpoint for your resource."
            )
            return _AzureDialect.error(401, "401", message)
        deployment = request.match_info["deployment"]
        if self.config.models is not None and deployment not in self.config.models:
            message = (
                "The API deployment for this resource does not exist. If you created the "
                "deployment within the last 5 minutes, please wait a moment and try again."
            )
            return _AzureDialect.error(404, "DeploymentNotFound", message)
        body = await _json_body(request)
        if body is None:
            return _error(400, "We could not parse the JSON body of your request.")
        # The deployment decides the model; Azure ignores a `model` in the body.
        return await self._chat_body(
            request, {**body, "model": deployment}, _AzureDialect(api_version)
        )

    async def _chat_body(
        self, request: web.Request, body: dict[str, Any], dialect: _OpenAIDialect
    ) -> web.StreamResponse:
        cfg = self.config
        problem = self._validate(body)
        if problem is not None:
            return problem
        model = body["model"]
        messages = body["messages"]
        n = body.get("n") or 1
        max_out = body.get("max_tokens") or body.get("max_completion_tokens") or 0

        plan = self._plan(body, messages)
        if isinstance(plan, web.Response):
            return plan
        texts = [_text(m.get("content")) for m in messages]
        refused = dialect.screen(cfg.filtered, texts)
        if refused is not None:
            return refused
        prompt = next(
            (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        prompt_tokens = sum(_tokens(t) for t in texts)
        for schema in plan.schemas:
            prompt_tokens += _tokens(json.dumps(schema))
        fault = self._row_fault(prompt)
        if fault is not None and fault not in _ANSWER_FAULTS:
            return self._faulted(request, dialect, fault, model, prompt_tokens)

        if cfg.context_window is not None and prompt_tokens + max_out > cfg.context_window:
            if max_out:
                detail = (
                    f"However, you requested {prompt_tokens + max_out} tokens ({prompt_tokens} "
                    f"in the messages, {max_out} in the completion). Please reduce the length "
                    "of the messages or completion."
                )
            else:
                detail = (
                    f"However, your messages resulted in {prompt_tokens} tokens. Please reduce "
                    "the length of the messages."
                )
            message = f"This model's maximum context length is {cfg.context_window} tokens. "
            return _error(400, message + detail, param="messages", code="context_length_exceeded")
        job = _Job(model, prompt, prompt_tokens, max_out, n, plan, fault=fault)
        return await self._serve(request, dialect, job)

    def _validate(self, body: dict[str, Any]) -> web.Response | None:
        cfg = self.config
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "[] is too short - 'messages'", param="messages")
        if not all(isinstance(m, dict) for m in messages):
            return _error(400, "Each message must be an object.", param="messages")
        if cfg.models is not None and model not in cfg.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return _error(404, message, code="model_not_found")
        if body.get("stream"):
            return _error(400, "stream is not supported by this server", param="stream")
        for name, low in (("n", 1), ("max_tokens", 1), ("max_completion_tokens", 1)):
            value = body.get(name)
            if value is not None and (type(value) is not int or value < low):
                message = f"Invalid '{name}': expected an integer >= {low}, got {value!r}."
                return _error(400, message, param=name, code="invalid_value")
        return None

    def _plan(self, body: dict[str, Any], messages: list[dict[str, Any]]) -> _Plan | web.Response:
        """Decide how to answer: echo text, a tool call, JSON content, or fenced JSON."""
        cfg = self.config
        tools = body.get("tools")
        fmt = body.get("response_format")
        functions = [t.get("function") or {} for t in tools or () if isinstance(t, dict)]
        # Tool schemas are prompt tokens even when the model is told not to call them.
        schemas = [f["parameters"] for f in functions if f.get("parameters")]
        if tools:
            if not cfg.supports_tools:
                return _error(400, "tools is not supported by this server", param="tools")
            choice = body.get("tool_choice")
            if choice != "none":
                forced = choice.get("function") if isinstance(choice, dict) else None
                forced = forced.get("name") if isinstance(forced, dict) else None
                if forced is None:
                    chosen = functions[0] if functions else {}
                else:
                    chosen = next((f for f in functions if f.get("name") == forced), None)
                    if chosen is None:
                        message = (
                            f"Invalid value for 'tool_choice': 'tool_choice' refers to '{forced}' "
                            "that is not present in the 'tools' parameter."
                        )
                        return _error(400, message, param="tool_choice", code="invalid_value")
                props = _item_properties(chosen.get("parameters"))
                # OpenAI answers a forced named function with finish_reason "stop", not
                # "tool_calls"; clients must not rely on the latter.
                finish = "stop" if forced else "tool_calls"
                return _Plan("tool", props, schemas, chosen.get("name"), finish)
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            kind = fmt.get("type")
            supported = {
                "json_schema": cfg.supports_json_schema,
                "json_object": cfg.supports_json_object,
            }
            if supported.get(kind) is False:
                message = f"response_format of type '{kind}' is not supported by this server"
                return _error(400, message, param="response_format")
            if kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                schemas += [schema] if schema else []
                return _Plan("json", _item_properties(schema), schemas)
            if kind == "json_object":
                return _Plan("json", self._props_from_prompt(messages), schemas)
            message = (
                f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', "
                "and 'text'."
            )
            return _error(400, message, param="response_format.type", code="invalid_value")
        texts = [_text(m.get("content")) for m in messages if m.get("role") in ("system", "user")]
        if any("json" in t.lower() for t in texts):
            return _Plan("fenced", self._props_from_prompt(messages), schemas)
        return _Plan("echo", None, schemas)

    @staticmethod
    def _props_from_prompt(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
        # System messages first: that is where clients describe the output format.
        ordered = sorted(messages, key=lambda m: m.get("role") != "system")
        for m in ordered:
            if m.get("role") in ("system", "user"):
                props = _schema_in_text(_text(m.get("content")))
                if props is not None:
                    return props
        return None

    # -- Anthropic ------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        error = _ANTHROPIC.error
        matches = self._key_matches(request, "x-api-key")
        if matches is None:
            # The API also takes the key as a bearer token (Anthropic's newer SDKs send it so).
            matches = (
                self._check_auth(request) is None if "Authorization" in request.headers else None
            )
        if matches is None:
            return error(401, "authentication_error", "x-api-key header is required")
        if not matches:
            return error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        body = await _json_body(request)
        if body is None:
            message = "There was an error parsing the body of your request as JSON."
            return error(400, "invalid_request_error", message)
        problem = self._validate_messages(body)
        if problem is not None:
            return problem
        model, messages, max_out = body["model"], body["messages"], body["max_tokens"]
        system = _text(body.get("system"))
        plan = self._messages_plan(body, system, messages)
        if isinstance(plan, web.Response):
            return plan
        prompt = next(
            (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        prompt_tokens = _tokens(system) + sum(_tokens(_text(m.get("content"))) for m in messages)
        for schema in plan.schemas:
            prompt_tokens += _tokens(json.dumps(schema))
        fault = self._row_fault(prompt)
        if fault is not None and fault not in _ANSWER_FAULTS:
            return self._faulted(request, _ANTHROPIC, fault, model, prompt_tokens)
        window = cfg.context_window
        if window is not None and prompt_tokens > window:
            message = f"prompt is too long: {prompt_tokens} tokens > {window} maximum"
            return error(400, "invalid_request_error", message)
        if window is not None and prompt_tokens + max_out > window:
            message = (
                f"input length and `max_tokens` exceed context limit: {prompt_tokens} + "
                f"{max_out} > {window}, decrease input length or `max_tokens` and try again"
            )
            return error(400, "invalid_request_error", message)
        job = _Job(model, prompt, prompt_tokens, max_out, 1, plan, rotate=True, fault=fault)
        return await self._serve(request, _ANTHROPIC, job)

    def _validate_messages(self, body: Any) -> web.Response | None:
        def invalid(message: str) -> web.Response:
            return _ANTHROPIC.error(400, "invalid_request_error", message)

        if not isinstance(body, dict):
            return invalid("The request body must be a JSON object.")
        for name in body:
            if name not in _ANTHROPIC_FIELDS:
                return invalid(f"{name}: Extra inputs are not permitted")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return invalid("model: Field required")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return invalid("max_tokens: Field required")
        if type(max_tokens) is not int or max_tokens < 1:
            return invalid(f"max_tokens: Input should be an integer >= 1, got {max_tokens!r}")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return invalid("messages: at least one message is required")
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "system":
                return invalid(
                    'messages: Unexpected role "system". The Messages API accepts a top-level '
                    '`system` parameter, not "system" as an input message role.'
                )
            if role not in ("user", "assistant"):
                return invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if body.get("stream"):
            return invalid("stream: streaming is not supported by this server")
        if self.config.models is not None and model not in self.config.models:
            return _ANTHROPIC.error(404, "not_found_error", f"model: {model}")
        return None

    def _messages_plan(
        self, body: dict[str, Any], system: str, messages: list[dict[str, Any]]
    ) -> _Plan | web.Response:
        """Decide how to answer a Messages request: echo, a tool_use block, or JSON text."""

        def invalid(message: str) -> web.Response:
            return _ANTHROPIC.error(400, "invalid_request_error", message)

        cfg = self.config
        tools = body.get("tools") or []
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            return invalid("tools: Input should be a list of tool objects")
        for i, tool in enumerate(tools):
            if not isinstance(tool.get("input_schema"), dict):
                return invalid(f"tools.{i}.input_schema: Field required")
        schemas = [t["input_schema"] for t in tools]
        choice = body.get("tool_choice") or {"type": "auto"}
        if tools and choice.get("type") != "none":
            if not cfg.supports_tools:
                return invalid("tools: tool use is not supported by this server")
            if choice.get("type") == "tool":
                chosen = next((t for t in tools if t.get("name") == choice.get("name")), None)
                if chosen is None:
                    return invalid(f"tool_choice: Tool '{choice.get('name')}' not found in tools")
            else:  # "auto" or "any": this model always uses the first tool
                chosen = tools[0]
            props = _item_properties(chosen["input_schema"])
            return _Plan("tool", props, schemas, chosen.get("name"), "tool_use")
        output = body.get("output_config")
        fmt = output.get("format") if isinstance(output, dict) else None
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
                return invalid("output_config.format.type: Input should be 'json_schema'")
            if not cfg.supports_json_schema:
                return invalid(
                    "output_config.format: json_schema structured outputs are not supported by "
                    "this server"
                )
            schema = fmt.get("schema")
            schemas += [schema] if schema else []
            return _Plan("json", _item_properties(schema), schemas, finish="end_turn")
        chat = [{"role": "system", "content": system}, *messages]
        texts = [system] + [_text(m.get("content")) for m in messages if m.get("role") == "user"]
        if any("json" in t.lower() for t in texts):
            return _Plan("fenced", self._props_from_prompt(chat), schemas, finish="end_turn")
        return _Plan("echo", None, schemas, finish="end_turn")

    # -- what every protocol shares: limits, latency, faults, the answer ---------------------

    async def _serve(self, request: web.Request, dialect: Any, job: _Job) -> web.StreamResponse:
        cfg = self.config
        refused = self._admit(dialect, job.model, job.prompt_tokens + job.max_out)
        if refused is not None:
            return refused
        headers = dialect.limit_headers(self._buckets)

        # Drawn at admission, in arrival order, so a sequential client sees a fixed sequence.
        draw = self._faults.random() if self._fault_rate else 1.0
        if cfg.latency:
            delay = cfg.latency
            if cfg.latency_jitter:
                delay *= 1 + cfg.latency_jitter * (2 * self._jitter.random() - 1)
            await asyncio.sleep(delay)

        if draw < cfg.fail_rate:
            self.stats.add(failed=1)
            self._failures += 1
            return dialect.server_error(self._failures, headers)
        if draw < cfg.fail_rate + cfg.drop_rate:
            self.stats.add(dropped=1)
            if request.transport is not None:
                request.transport.close()
            # Never sent: aiohttp's write to the closing transport fails, and it treats
            # that as a client disconnect (no traceback logged).
            return web.Response(status=204)
        plan = job.plan
        malformed = plan.structured and draw < cfg.fail_rate + cfg.drop_rate + cfg.malformed_rate

        start = self._answered[job.prompt] if job.rotate else 0
        packed = self._packed.answer(job, malformed, start, self._row_answers)
        if packed is None:
            answers = self._answers(plan, job.prompt, job.n, malformed, start)
        else:
            answers, job = packed
        payload, completion_tokens = dialect.render(job, answers, self._ids)
        with self.stats.lock:
            self.stats.ok += 1
            self.stats.faults += job.fault is not None
            self.stats.malformed += malformed
            self.stats.prompt_tokens += job.prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self.stats.by_prompt[job.prompt] += 1
        if job.rotate:
            self._answered[job.prompt] += 1
        return web.json_response(payload, headers=headers)

    def _admit(self, dialect: Any, model: str, cost: int) -> web.Response | None:
        """Take from every bucket if the request fits all of them, else a 429."""
        if not self._buckets:
            return None
        costs = {"requests": 1, "tokens": cost}
        waits = [(b.wait_time(costs[kind]), kind, limit, b) for kind, limit, b in self._buckets]
        wait, kind, limit, bucket = max(waits, key=lambda w: w[0])
        if wait == 0.0:
            for kind_, _limit, b in self._buckets:
                b.take(costs[kind_])
            return None
        self.stats.add(rate_limited=1)
        headers = dialect.limit_headers(self._buckets)
        return dialect.rate_limited(model, kind, limit, bucket, costs[kind], wait, headers)

    def _answers(
        self, plan: _Plan, prompt: str, n: int, malformed: bool, start: int = 0
    ) -> list[str]:
        """The model's answer texts: echoes (alternating from ``start``) or extracted JSON."""
        n = n if self.config.honor_n else 1
        if plan.structured:
            text = json.dumps({"items": _parse_items(prompt, plan.props)}, ensure_ascii=False)
            if malformed:
                text = text[: max(1, len(text) // 2)]  # a prefix of an object is never JSON
            if plan.kind == "fenced":
                text = f"Here is the JSON you asked for:\n```json\n{text}\n```\nHope this helps!"
            return [text] * n
        return [f"echo{' (alt)' if i % 2 else ''}: {prompt}" for i in range(start, start + n)]

    def _row_answers(
        self, prompt: str, props: dict[str, Any] | None, n: int, start: int
    ) -> list[str]:
        """One row of a packed request, answered as if it came alone (echo without props)."""
        plan = _Plan("echo" if props is None else "json", props, ())
        return self._answers(plan, prompt, n, False, start)


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


@dataclasses.dataclass(frozen=True)
class _Plan:
    kind: str  # "echo", "tool", "json" (content), "fenced" (prose around a ```json block)
    props: dict[str, Any] | None
    schemas: Sequence[Any]  # counted into prompt tokens
    tool: str | None = None
    finish: str = "stop"

    @property
    def structured(self) -> bool:
        return self.kind != "echo"


_STATE = web.AppKey("parrot_fake_server", _ChatServer)


def make_app(
    config: ServerConfig | None = None, *, clock: Clock = time.monotonic
) -> web.Application:
    """Build the fake server's aiohttp application, for embedding in your own runner.

    Parameters
    ----------
    config : ServerConfig, optional
        The behaviour; defaults to ``ServerConfig()`` (fast, unlimited, reliable).
    clock : callable, default time.monotonic
        Time source of the rate-limit buckets.

    Returns
    -------
    aiohttp.web.Application
        Routes ``GET /v1/models``, ``POST /v1/chat/completions`` (OpenAI),
        ``POST /v1/messages`` (Anthropic),
        ``POST /openai/deployments/{deployment}/chat/completions`` (Azure OpenAI),
        ``GET /_stats`` and ``POST /_reset`` (returns the stats as they were, then zeroes them).

    Examples
    --------
    >>> app = make_app(ServerConfig(rpm=60))
    >>> # aiohttp.web.run_app(app, port=8000)
    """
    server = _ChatServer(config or ServerConfig(), clock)
    # Prompts are whole documents: allow bodies far beyond aiohttp's 1 MiB default.
    app = web.Application(client_max_size=64 * 1024**2)
    app[_STATE] = server
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/v1/messages", server.messages)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", server.azure_chat)
    app.router.add_get("/_stats", server.get_stats)
    app.router.add_post("/_reset", server.reset_stats)
    app.router.add_route("*", "/{tail:.*}", server.not_found)
    return app


class FakeServer:
    """A local OpenAI, Anthropic and Azure OpenAI server, run in a thread or on the current loop.

    Parameters
    ----------
    config : ServerConfig, optional
        The behaviour. Keyword arguments named like :class:`ServerConfig` fields build or
        override it: ``FakeServer(latency=0.2, rpm=1200)``.
    host : str, default "127.0.0.1"
    port : int, default 0
        0 picks a free port; read it back from :attr:`url` once started.
    clock : callable, default time.monotonic
        Time source of the rate-limit buckets.
    **fields
        :class:`ServerConfig` fields.

    Examples
    --------
    From synchronous code, the server runs in its own event loop in a daemon thread:

    >>> with FakeServer(rpm=600) as srv:  # doctest: +SKIP
    ...     out = df.llm.generate("${text}", base_url=srv.url, api_key="x")
    ...     print(srv.stats()["ok"])

    From async code (an async test), it runs on the current loop:

    >>> async with FakeServer(latency=0.1) as srv:  # doctest: +SKIP
    ...     ...
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        /,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
        **fields: Any,
    ) -> None:
        if config is None:
            config = ServerConfig(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        self.config = config
        self.host = host
        self.port = port
        self.app = make_app(config, clock=clock)
        self._server = self.app[_STATE]
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = self.url if self._runner is not None else "not started"
        return f"FakeServer({where}, {self.config!r})"

    @property
    def url(self) -> str:
        """The OpenAI base URL clients use, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.origin}/v1"

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``: the Anthropic base URL (Anthropic's SDK takes it without
        ``/v1``) and the Azure endpoint (``AZURE_OPENAI_ENDPOINT``)."""
        if self._runner is None:
            raise RuntimeError("the server is not running; use `with FakeServer() as srv:`")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, safe to call from any thread.

        Returns
        -------
        dict
            ``requests`` (every POST to a chat route: OpenAI, Anthropic or Azure), ``ok``
            (200s, malformed ones included), ``rate_limited`` (429s), ``failed`` (injected
            5xx), ``dropped``, ``malformed``, ``rejected`` (other 4xx), ``faults`` (responses
            spoilt by ``ServerConfig.faults``, whatever their status), ``by_prompt`` (a
            ``Counter``: last user message -> 200 answers), ``in_flight``, ``max_in_flight``
            (peak concurrent requests in the handler), ``prompt_tokens`` and
            ``completion_tokens`` (of 200s); for packed requests, ``packed`` (answered row by
            row) and the pack faults done: ``ids_dropped``, ``ids_duplicated``,
            ``ids_unknown``, ``packs_reordered``, ``packs_truncated``.
        """
        return self._server.stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (rate-limit buckets and the fault sequence carry on)."""
        self._server.stats.reset()

    async def _astart(self) -> None:
        if self._runner is not None:
            raise RuntimeError("a FakeServer runs once; create a new one to serve again")
        # A short shutdown_timeout: in-flight requests of a test that ended are not worth
        # the 60 s aiohttp would wait for them.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeServer:
        await self._astart()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._astop()

    def start(self) -> FakeServer:
        """Start serving from a daemon thread with its own event loop; returns ``self``."""
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._astop())
            # Handlers still sleeping (a client that went away) must end before the loop closes,
            # or Python reports each as "Task was destroyed but it is pending" at exit.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="parrot-fake-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop the thread started by :meth:`start` (idempotent)."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = self._loop = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parrot_pandas.testing",
        description="Serve a deterministic OpenAI-compatible API for tests and benchmarks. "
        "Prints the base URL on one line once listening; stops on SIGTERM or Ctrl-C.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--latency-jitter", type=float, default=0.0, help="fraction of latency")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute limit")
    p.add_argument("--tpm", type=float, default=None, help="tokens per minute limit")
    p.add_argument("--burst", type=float, default=1.0, help="bucket size, in seconds of rate")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of 500/503 answers")
    p.add_argument("--drop-rate", type=float, default=0.0, help="share of dropped connections")
    p.add_argument("--malformed-rate", type=float, default=0.0, help="share of invalid JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="require this bearer key")
    p.add_argument("--models", nargs="+", default=None, help="accepted model names")
    p.add_argument("--context-window", type=int, default=None, help="max prompt+completion")
    yes_no = argparse.BooleanOptionalAction
    p.add_argument("--honor-n", action=yes_no, default=True)
    p.add_argument("--supports-tools", action=yes_no, default=True)
    p.add_argument("--supports-json-schema", action=yes_no, default=True)
    p.add_argument("--supports-json-object", action=yes_no, default=True)
    p.add_argument("--filtered", nargs="+", default=(), help="words Azure's filter refuses")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="WORD=FAULT",
        help=f"fail prompts containing WORD with FAULT, one of {', '.join(sorted(FAULTS))}",
    )
    return p


async def _serve(server: FakeServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
    async with server:
        print(server.url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server from the command line (``python -m parrot_pandas.testing --help``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status, 0 after SIGTERM or Ctrl-C.
    """
    args = vars(_parser().parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    args["faults"] = dict(pair.partition("=")[::2] for pair in args.pop("fault"))
    server = FakeServer(ServerConfig(**args), host=host, port=port)
    try:
        asyncio.run(_serve(server))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
