"""Fault injection: the random faults drawn at the configured rates, and the per-row faults.

Two kinds, both chosen here and rendered by each protocol dialect in its API's own shapes:

- Random faults, per admitted request, drawn from a generator seeded with ``ServerConfig.seed``
  (so runs repeat): ``fail_rate`` (500/503 alternately), ``drop_rate`` (the connection closed
  without a response) and ``malformed_rate`` (structured requests only: truncated JSON).
- Per-row faults (``ServerConfig.faults``): a marker word in the prompt picks one of
  :data:`FAULTS`, on every route and every attempt, as real servers fail such a row every time
  it is asked.

The faults of packed requests (several rows in one) live in ``_packing.py``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ._config import ServerConfig

__all__ = ["ANSWER_FAULTS", "FAULTS", "Faults", "given_key"]

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
ANSWER_FAULTS = frozenset({"content_filter", "truncate"})


class Faults:
    """The faults one server injects, in the order its requests arrive.

    Parameters
    ----------
    config : ServerConfig
        Its ``fail_rate``, ``drop_rate``, ``malformed_rate``, ``seed`` and ``faults``.
    """

    def __init__(self, config: ServerConfig) -> None:
        self._rates = (config.fail_rate, config.drop_rate, config.malformed_rate)
        self._random = random.Random(config.seed)
        self._failures = 0
        self._row_faults = [(word.lower(), fault) for word, fault in config.faults]

    def draw(self) -> str | None:
        """The random fault of the next admitted request: ``"fail"``, ``"drop"``,
        ``"malformed"`` or ``None`` (one draw per request, while any rate is set)."""
        fail, drop, malformed = self._rates
        if not fail + drop + malformed:
            return None
        draw = self._random.random()
        if draw < fail:
            return "fail"
        if draw < fail + drop:
            return "drop"
        if draw < fail + drop + malformed:
            return "malformed"
        return None

    def failure(self) -> int:
        """Count one injected server error and return the count (odd: 500, even: 503)."""
        self._failures += 1
        return self._failures

    def row_fault(self, prompt: str) -> str | None:
        """The fault a prompt's marker word asks for, if any."""
        if self._row_faults:
            lowered = prompt.lower()
            for word, fault in self._row_faults:
                if word in lowered:
                    return fault
        return None


def given_key(request: web.Request) -> str:
    """The key as this request carried it, for the fault that echoes it (``echo_key``)."""
    return (
        request.headers.get("x-api-key")
        or request.headers.get("api-key")
        or request.headers.get("Authorization", "").removeprefix("Bearer ")
        or "<no key>"
    )
