"""Token counting: tiktoken when it is installed and can load, else four characters a token.

Tokens are counted with tiktoken when it is installed and its encoding file can be loaded;
otherwise with the approximation every part of parrot_pandas shares,
:func:`approximate_tokens` (``ceil(len(text) / 4)``). tiktoken downloads its encoding files
on first use; offline (a firewalled notebook, CI) that fails or hangs, so the load runs in a
background thread and is given :data:`_LOAD_TIMEOUT` seconds before the approximation is used.
To count exactly offline, put the encoding file in ``$TIKTOKEN_CACHE_DIR``.

This module imports nothing else of parrot_pandas: the plan, the scheduler and the estimate
all count with it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CHARS_PER_TOKEN",
    "Tokenizer",
    "approximate_tokens",
    "count_tokens",
    "message_tokens",
    "tokenizer",
    "tokenizer_name",
]

logger = logging.getLogger("parrot_pandas")

CHARS_PER_TOKEN = 4
# Seconds the first count waits for tiktoken to load an encoding. Loading from tiktoken's
# file cache takes well under a second; a download that has not finished by then is either
# impossible here (no network) or slow, and the load goes on in the background.
_LOAD_TIMEOUT = 3.0
_FALLBACK_ENCODING = "o200k_base"
# OpenAI's cookbook ("How to count tokens with tiktoken", section 6): every chat message is
# wrapped as <|start|>{role}\n{content}<|end|>\n, 3 tokens beyond role and content, a name
# costs 1 more, and every reply is primed with <|start|>assistant<|message|>, 3 tokens.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# The same cookbook (section 7) for tools on gpt-4o and gpt-4o-mini: 7 tokens open a function
# and 12 close the list. The server renders the parameters schema in its own compact form;
# counting its JSON text instead overcounts by a few tokens, the safe side for an estimate.
_TOOL_OVERHEAD = 7 + 12

_loads: dict[str, Future[Any]] = {}
_loads_lock = threading.Lock()
_names: dict[str, str] = {}


def approximate_tokens(text: str) -> int:
    """Tokens in ``text`` by the rule of thumb: four characters a token, rounded up.

    This is what parrot_pandas counts whenever tiktoken is not available, and what the
    scheduler reserves from a token-per-minute budget before the server reports usage.

    Examples
    --------
    >>> approximate_tokens("Summarize: tea")
    4
    >>> approximate_tokens("")
    0
    """
    return -(-len(text) // CHARS_PER_TOKEN)


def count_tokens(text: str, model: str) -> int:
    """Tokens in ``text`` as ``model``'s tokenizer counts them.

    Parameters
    ----------
    text : str
    model : str
        Picks the tiktoken encoding (``tiktoken.encoding_for_model``); models tiktoken does
        not know (Claude, Llama, ...) use ``o200k_base``, an approximation for them.

    Returns
    -------
    int
        The exact count when tiktoken is installed and its encoding loads, otherwise
        :func:`approximate_tokens` (see :func:`tokenizer_name`).

    Examples
    --------
    >>> count_tokens("Summarize: tea", "gpt-4o-mini")  # doctest: +SKIP
    4
    """
    return _count(text, _encoder(model))


def message_tokens(messages: Iterable[Mapping[str, Any]], model: str) -> int:
    """Prompt tokens of a list of chat messages, as the Chat Completions API counts them.

    With tiktoken, every message costs its role and content plus the 3 tokens of its chat
    wrapping (1 more for a ``name``), and the reply priming adds 3: OpenAI's documented
    accounting. Without tiktoken, the approximation of each message's content, with no
    overhead, which is what the scheduler reserves and local servers commonly report.

    Parameters
    ----------
    messages : iterable of dict
        ``{"role": ..., "content": ...}`` (optionally ``"name"``), as sent.
    model : str

    Returns
    -------
    int

    Examples
    --------
    >>> chat = [{"role": "user", "content": "Summarize: tea"}]
    >>> message_tokens(chat, "gpt-4o-mini")  # doctest: +SKIP
    11
    """
    return _count_messages(messages, _encoder(model))


def tokenizer_name(model: str) -> str:
    """How :func:`count_tokens` counts for ``model`` right now.

    Returns
    -------
    str
        ``"tiktoken:<encoding>"``, or ``"approximate: 4 characters a token"``.
    """
    return _describe(_encoder(model))


@dataclass(frozen=True)
class Tokenizer:
    """One model's counter, fixed while it is kept: a whole estimate counts every request
    with the same one, even if a slow tiktoken load finishes midway.

    ``encoder`` is the tiktoken encoding, or ``None`` for the approximation.
    """

    encoder: Any | None

    @property
    def name(self) -> str:
        """As :func:`tokenizer_name`."""
        return _describe(self.encoder)

    def count(self, text: str) -> int:
        """As :func:`count_tokens`."""
        return _count(text, self.encoder)

    def messages(self, messages: Iterable[Mapping[str, Any]]) -> int:
        """As :func:`message_tokens`."""
        return _count_messages(messages, self.encoder)

    def schema(self, schema: Mapping[str, Any], *, tool: bool) -> int:
        """Prompt tokens of a JSON Schema sent as a tool's parameters or a response format."""
        # Compact separators would count fewer characters, but the approximation must match
        # what the scheduler reserves (and local servers report): json.dumps' defaults.
        tokens = _count(json.dumps(schema), self.encoder)
        if tool and self.encoder is not None:
            tokens += _TOOL_OVERHEAD
        return tokens


def tokenizer(model: str) -> Tokenizer:
    """``model``'s counter as it is right now (tiktoken's encoding, or the approximation)."""
    return Tokenizer(_encoder(model))


def _count(text: str, encoder: Any | None) -> int:
    if encoder is None:
        return approximate_tokens(text)
    # encode_ordinary: user text holding "<|endoftext|>" is text, not a special token.
    return len(encoder.encode_ordinary(text))


def _count_messages(messages: Iterable[Mapping[str, Any]], encoder: Any | None) -> int:
    if encoder is None:
        return sum(approximate_tokens(_content(m.get("content"))) for m in messages)
    total = _REPLY_PRIMING
    for message in messages:
        total += _TOKENS_PER_MESSAGE
        for key, value in message.items():
            total += _count(_content(value), encoder)
            if key == "name":
                total += _TOKENS_PER_NAME
    return total


def _describe(encoder: Any | None) -> str:
    if encoder is None:
        return f"approximate: {CHARS_PER_TOKEN} characters a token"
    return f"tiktoken:{encoder.name}"


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts
        return "".join(p.get("text") or "" for p in value if isinstance(p, Mapping))
    return "" if value is None else str(value)


def _encoder(model: str) -> Any | None:
    """The tiktoken encoding for ``model``, or ``None`` when it is not (yet) available."""
    try:
        import tiktoken
    except ImportError:
        return None
    name = _names.get(model)
    if name is None:
        try:
            name = tiktoken.encoding_name_for_model(model)
        except KeyError:
            name = _FALLBACK_ENCODING
        _names[model] = name
    with _loads_lock:
        load = _loads.get(name)
        first = load is None
        if first:
            load = _loads[name] = _start_load(tiktoken, name)
    try:
        # Only the first caller waits; later ones take the encoding once it has arrived.
        return load.result(timeout=_LOAD_TIMEOUT if first else 0)
    except FutureTimeout:
        if first:
            logger.info(
                "tiktoken is still loading %s after %.0fs (no network?); counting tokens as "
                "ceil(len / %d) meanwhile",
                name,
                _LOAD_TIMEOUT,
                CHARS_PER_TOKEN,
            )
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to load means: approximate
        if first:
            logger.info(
                "tiktoken could not load %s (%s: %s); counting tokens as ceil(len / %d). "
                "Set TIKTOKEN_CACHE_DIR to a folder holding the encoding file to count offline.",
                name,
                type(exc).__name__,
                exc,
                CHARS_PER_TOKEN,
            )
        return None


def _start_load(tiktoken: Any, name: str) -> Future[Any]:
    future: Future[Any] = Future()

    def load() -> None:
        try:
            future.set_result(tiktoken.get_encoding(name))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(exc)

    # A daemon thread: a download hanging on a dead network never blocks interpreter exit.
    threading.Thread(target=load, name=f"parrot_pandas-tiktoken-{name}", daemon=True).start()
    return future


def _reset_tokenizers() -> None:
    """Forget loaded encodings (for tests)."""
    with _loads_lock:
        _loads.clear()
    _names.clear()
