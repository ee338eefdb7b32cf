"""Prompt caching: the request fields that ask for it, and the usage numbers that report it.

A provider caches the start of a prompt it has seen recently and bills it again at a tenth of
the price (Anthropic) or a half to a tenth (OpenAI), provided the start is byte for byte the
same. parrot_pandas keeps the shared part of every request first (system prompt, schema,
instructions) and the row last, so consecutive requests of a run share that prefix.

- OpenAI caches every prompt of 1,024 tokens or more by itself; ``prompt_cache_key`` routes
  requests with the same key to the same cache, raising the hit rate. :func:`prefix_key` is a
  stable hash of the shared prefix, so every request of a run (and of a re-run) carries the
  same key. Read back as ``usage.prompt_tokens_details.cached_tokens``.
- Anthropic caches only up to a block marked ``"cache_control": {"type": "ephemeral"}``, and
  only when that prefix reaches a per-model minimum (:func:`anthropic_min_tokens`); below it
  the marker is ignored without an error or a charge. :func:`anthropic_cache_control` marks the
  end of the shared prefix (tools, then system, in the API's cache order). Read back as
  ``usage.cache_read_input_tokens`` and ``usage.cache_creation_input_tokens``.

Every function here is pure and idempotent: applying one twice gives the same body.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .base import Call, usage_count

__all__ = [
    "ANTHROPIC_DEFAULT_MIN_TOKENS",
    "EPHEMERAL",
    "CacheUsage",
    "anthropic_cache_control",
    "anthropic_cache_usage",
    "anthropic_min_tokens",
    "openai_cache_usage",
    "prefix_key",
    "shared_prefix",
]

EPHEMERAL = {"type": "ephemeral"}

# Anthropic's minimum cacheable prefix, by model name prefix (first match wins), from its
# prompt-caching guide. Published tables disagree on some models (Sonnet 4.6: 1,024 or 2,048);
# the lower figure is kept, because a marker on a prefix below the minimum costs nothing.
_ANTHROPIC_MIN_TOKENS: tuple[tuple[str, int], ...] = (
    ("claude-opus-4-5", 4096),
    ("claude-opus-4-6", 4096),
    ("claude-opus-4-7", 4096),
    ("claude-haiku-4-5", 4096),
    ("claude-3-5-haiku", 2048),
    ("claude-3-haiku", 2048),
)
ANTHROPIC_DEFAULT_MIN_TOKENS = 1024


@dataclass(frozen=True)
class CacheUsage:
    """Prompt tokens a response read from the provider's prompt cache, and wrote to it.

    ``read`` tokens are billed at the cached price; ``written`` ones (Anthropic's cache
    creation) at its write price. Both are part of the response's prompt tokens.
    """

    read: int = 0
    written: int = 0

    def __add__(self, other: CacheUsage) -> CacheUsage:
        return CacheUsage(self.read + other.read, self.written + other.written)


def shared_prefix(call: Call) -> dict[str, Any]:
    """What every request of a run shares: model, every message but the last, and how the
    answer is asked for (schema and strategy). The last message is the row's."""
    return {
        "model": call.model,
        "messages": [dict(m) for m in call.messages[:-1]],
        "schema": call.schema,
        "strategy": call.strategy,
    }


def prefix_key(call: Call) -> str:
    """A stable name for ``call``'s shared prefix: OpenAI's ``prompt_cache_key``.

    The same template, model, system prompt and fields give the same key in every process;
    no row data goes into it.

    Examples
    --------
    >>> system = {"role": "system", "content": "Be brief."}
    >>> a = Call("m", (system, {"role": "user", "content": "row one"}))
    >>> b = Call("m", (system, {"role": "user", "content": "row two"}))
    >>> prefix_key(a) == prefix_key(b), prefix_key(a)[:7]
    (True, 'parrot-')
    """
    text = json.dumps(shared_prefix(call), sort_keys=True, separators=(",", ":"), default=str)
    return "parrot-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def openai_cache_usage(body: Any) -> CacheUsage:
    """``usage.prompt_tokens_details.cached_tokens`` of a Chat Completions body."""
    usage = body.get("usage") if isinstance(body, Mapping) else None
    details = usage.get("prompt_tokens_details") if isinstance(usage, Mapping) else None
    if not isinstance(details, Mapping):
        return CacheUsage()
    return CacheUsage(read=usage_count(details.get("cached_tokens")))


def anthropic_cache_usage(body: Any) -> CacheUsage:
    """``cache_read_input_tokens`` and ``cache_creation_input_tokens`` of a Messages body."""
    usage = body.get("usage") if isinstance(body, Mapping) else None
    if not isinstance(usage, Mapping):
        return CacheUsage()
    return CacheUsage(
        read=usage_count(usage.get("cache_read_input_tokens")),
        written=usage_count(usage.get("cache_creation_input_tokens")),
    )


def anthropic_min_tokens(model: str) -> int:
    """The shortest prefix, in tokens, that Anthropic caches for ``model``."""
    name = model.lower()
    for prefix, tokens in _ANTHROPIC_MIN_TOKENS:
        if name.startswith(prefix):
            return tokens
    return ANTHROPIC_DEFAULT_MIN_TOKENS


def _approximate(text: str) -> int:
    return -(-len(text) // 4)


def anthropic_cache_control(
    body: Mapping[str, Any],
    *,
    min_tokens: int | None = None,
    count: Callable[[str], int] = _approximate,
) -> dict[str, Any]:
    """A Messages request body with ``cache_control`` on the end of its shared prefix.

    The API caches in the order tools, system, messages. With a system prompt the marker goes
    on its last block (the system string becomes one text block), which caches tools and
    system together; without one, on the last tool. A body whose prefix is shorter than
    ``min_tokens``, that has neither, or that already carries a marker, is returned unchanged.

    Parameters
    ----------
    body : mapping
        A Messages API request body (``model``, ``system``, ``tools``, ``messages``, ...).
    min_tokens : int, optional
        The model's minimum (:func:`anthropic_min_tokens` of the body's model by default).
    count : callable
        Tokens in a text; four characters a token by default, which is enough: a marker on a
        prefix just below the minimum is ignored at no cost.

    Returns
    -------
    dict
        A new body; ``body`` is not changed.
    """
    out = dict(body)
    system = out.get("system")
    tools = out.get("tools")
    if _marked(system) or _marked(tools) or "cache_control" in out:
        return out
    if min_tokens is None:
        min_tokens = anthropic_min_tokens(str(out.get("model") or ""))
    prefix = count(json.dumps(tools, ensure_ascii=False)) if tools else 0
    if isinstance(system, str):
        prefix += count(system)
    elif isinstance(system, list):
        prefix += sum(count(str(b.get("text") or "")) for b in system if isinstance(b, Mapping))
    if prefix < min_tokens:
        return out
    if isinstance(system, str) and system:
        out["system"] = [{"type": "text", "text": system, "cache_control": dict(EPHEMERAL)}]
    elif isinstance(system, list) and system and isinstance(system[-1], Mapping):
        out["system"] = [*system[:-1], {**system[-1], "cache_control": dict(EPHEMERAL)}]
    elif isinstance(tools, list) and tools and isinstance(tools[-1], Mapping):
        out["tools"] = [*tools[:-1], {**tools[-1], "cache_control": dict(EPHEMERAL)}]
    return out


def _marked(blocks: Any) -> bool:
    return isinstance(blocks, list) and any(
        isinstance(b, Mapping) and "cache_control" in b for b in blocks
    )
