"""Token counting, the price table, and :func:`estimate`: what a run will cost before it runs.

Tokens are counted with tiktoken when it is installed and its encoding file can be loaded;
otherwise with the approximation every part of parrot_pandas shares,
:func:`approximate_tokens` (``ceil(len(text) / 4)``). tiktoken downloads its encoding files
on first use; offline (a firewalled notebook, CI) that fails or hangs, so the load runs in a
background thread and is given :data:`_LOAD_TIMEOUT` seconds before the approximation is used.
To count exactly offline, put the encoding file in ``$TIKTOKEN_CACHE_DIR``.

Prices are USD per million tokens, standard (not batch, not cached-input) rates. A model is
matched by its exact name, then as a dated snapshot of a listed model
(``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``); anything else has no price, and its cost is
``None``, never a guess. :func:`set_price` adds or overrides a price.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import pandas as pd

from ._cache import ResponseCache, open_cache
from .errors import ConfigurationError, StructuredOutputError

if TYPE_CHECKING:
    from ._plan import RequestPlan
    from ._template import PromptTemplate

__all__ = [
    "CHARS_PER_TOKEN",
    "PRICES",
    "Price",
    "approximate_tokens",
    "cost",
    "count_tokens",
    "estimate",
    "message_tokens",
    "price_of",
    "set_price",
    "tokenizer_name",
]

logger = logging.getLogger("parrot_pandas")

# --------------------------------------------------------------------------- counting

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
                name, _LOAD_TIMEOUT, CHARS_PER_TOKEN,
            )
        return None
    except Exception as exc:  # noqa: BLE001 - any failure to load means: approximate
        if first:
            logger.info(
                "tiktoken could not load %s (%s: %s); counting tokens as ceil(len / %d). "
                "Set TIKTOKEN_CACHE_DIR to a folder holding the encoding file to count offline.",
                name, type(exc).__name__, exc, CHARS_PER_TOKEN,
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


# --------------------------------------------------------------------------- prices


@dataclass(frozen=True)
class Price:
    """A model's price in USD per million tokens.

    Parameters
    ----------
    input : float
        Per million prompt (input) tokens.
    output : float
        Per million completion (output) tokens, reasoning tokens included.
    """

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for that many prompt and completion tokens."""
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


# USD per 1M tokens, standard tier, no batch or prompt-cache discount; Anthropic's Sonnet
# long-context rate (prompts over 200k tokens) is not modelled.
# OpenAI: https://openai.com/api/pricing (platform.openai.com/docs/pricing), read 2026-11-25 as
# quoted from that page in March 2026 (deploybase.ai/articles/openai-pricing) and cross-checked
# against aumiqx.com's April 2026 table. gpt-4o-2024-05-13, the first gpt-4o snapshot, kept
# its launch price.
# Anthropic: https://platform.claude.com/docs/en/about-claude/pricing ("Model pricing"), read
# 2026-11-25 as quoted in the synaps crate's pricing docs (verified 2026-10-10) and tokr's
# pricing.toml. Opus 4.5 and later cost a third of Opus 4 / 4.1.
_BUILTIN_PRICES: dict[str, Price] = {
    # OpenAI
    "gpt-5.4": Price(2.50, 15.00),
    "gpt-5.1": Price(1.25, 10.00),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4o-2024-05-13": Price(5.00, 15.00),
    "gpt-4o-mini": Price(0.15, 0.60),
    "o1": Price(15.00, 60.00),
    "o3": Price(2.00, 8.00),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    # Anthropic
    "claude-opus-4-5": Price(5.00, 25.00),
    "claude-opus-4-1": Price(15.00, 75.00),
    "claude-opus-4": Price(15.00, 75.00),
    "claude-opus-4-0": Price(15.00, 75.00),
    "claude-sonnet-4-5": Price(3.00, 15.00),
    "claude-sonnet-4": Price(3.00, 15.00),
    "claude-sonnet-4-0": Price(3.00, 15.00),
    "claude-haiku-4-5": Price(1.00, 5.00),
    "claude-3-7-sonnet": Price(3.00, 15.00),
    "claude-3-5-sonnet": Price(3.00, 15.00),
    "claude-3-5-haiku": Price(0.80, 4.00),
    "claude-3-opus": Price(15.00, 75.00),
    "claude-3-haiku": Price(0.25, 1.25),
}

PRICES: Mapping[str, Price] = MappingProxyType(_BUILTIN_PRICES)
"""The built-in price table (read-only); :func:`set_price` adds to or overrides it."""

_user_prices: dict[str, Price] = {}
# What may follow a listed name in a snapshot: a date (2024-07-18, 20241022), OpenAI's older
# MMDD (gpt-4-0613, gpt-3.5-turbo-0125), or Anthropic's moving "-latest" alias. Anything else
# (gpt-4.1-mini after gpt-4.1, claude-opus-4-5 after claude-opus-4) is another model.
_SNAPSHOT = re.compile(r"\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|latest")


def set_price(model: str, input_per_million: float, output_per_million: float) -> Price:
    """Set the price of ``model`` for this process, overriding the built-in table.

    Dated snapshots of ``model`` get the price too, unless they are listed themselves. Use it
    for a model the table lacks (an Azure deployment name, a fine-tune, a local model at 0)
    or when a provider changes its prices.

    Parameters
    ----------
    model : str
        The model name exactly as passed to ``model=``.
    input_per_million, output_per_million : float
        USD per million prompt / completion tokens.

    Returns
    -------
    Price

    Raises
    ------
    ConfigurationError
        If ``model`` is not a non-empty string or a price is not a finite number >= 0.

    Examples
    --------
    >>> import parrot_pandas
    >>> parrot_pandas.set_price("my-azure-gpt4o", 2.50, 10.00)  # doctest: +SKIP
    Price(input=2.5, output=10.0)
    """
    if not isinstance(model, str) or not model:
        raise ConfigurationError(f"model must be a non-empty string, got {model!r}")
    values = []
    for label, value in (("input", input_per_million), ("output", output_per_million)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigurationError(
                f"{label} price must be a finite number of USD per million tokens >= 0, "
                f"got {value!r}"
            )
        values.append(float(value))
    price = _user_prices[model] = Price(*values)
    return price


def price_of(model: str) -> Price | None:
    """The price of ``model``, or ``None`` when it is unknown.

    Looked up by exact name, then as a dated snapshot of a known model, the longest known
    name first (``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``, ``claude-3-5-haiku-latest`` ->
    ``claude-3-5-haiku``). Prices set with :func:`set_price` come before the built-in ones.

    Examples
    --------
    >>> price_of("gpt-4o-mini-2024-07-18")
    Price(input=0.15, output=0.6)
    >>> price_of("my-local-llama") is None
    True
    """
    table = {**_BUILTIN_PRICES, **_user_prices}
    found = table.get(model)
    if found is not None:
        return found
    for base in sorted(table, key=len, reverse=True):
        if model.startswith(base + "-") and _SNAPSHOT.fullmatch(model[len(base) + 1 :]):
            return table[base]
    return None


def cost(model: str, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
    """USD for a run's tokens, or ``None`` when the price or a token count is unknown.

    Examples
    --------
    >>> cost("gpt-4o-mini", 1_000_000, 1_000_000)
    0.75
    >>> cost("my-local-llama", 1_000, 100) is None
    True
    """
    price = price_of(model)
    if price is None or prompt_tokens is None or completion_tokens is None:
        return None
    return price.cost(prompt_tokens, completion_tokens)


# --------------------------------------------------------------------------- estimate

_LOOKUP_BATCH = 512


def estimate(frame: pd.DataFrame, template: PromptTemplate, plan: RequestPlan) -> pd.Series:
    """What running ``plan`` over ``frame`` will send and cost; nothing is sent.

    Every prompt is rendered with the run's own template and plan, identical prompts are
    counted once (by cache key, as the scheduler shares their answer), and the run's cache is
    read (never written or created) for this exact call.

    Parameters
    ----------
    frame : pandas.DataFrame
    template : PromptTemplate
        Already checked against ``frame``'s columns.
    plan : RequestPlan
        The run's plan: model, system message, ``n``, request parameters, fields and strategy.

    Returns
    -------
    pandas.Series
        Named ``"estimate"``, with:

        - ``model``
        - ``rows``: input rows; ``rows = skipped_rows + cached_rows + duplicate_rows + requests``
        - ``skipped_rows``: a template value is missing (NaN/None); not sent
        - ``cached_rows``: every sample of the row's answer is in the cache; no request
        - ``duplicate_rows``: the same prompt as an earlier uncached row, whose answer it shares
        - ``requests``: distinct prompts to send, one request each asking the missing samples
          (retries, and servers that ignore ``n``, add requests)
        - ``prompt_tokens``: of those requests, system message and schema included
        - ``completion_tokens``: the ceiling ``max_tokens`` (or ``max_completion_tokens``) x
          samples asked; ``None`` without one, as nothing bounds an answer's length
        - ``prompt_cost``: USD for the prompt tokens; ``None`` when the model's price is unknown
        - ``cost``: USD, an upper bound: prompt cost plus the completion ceiling; ``None`` when
          the price or ``completion_tokens`` is unknown
        - ``tokenizer``: how tokens were counted (tiktoken's encoding, or the approximation)
    """
    config = plan.config
    model = config.model
    n = config.n
    per_request = config.samples_per_request or n
    rows = skipped = requests = prompt_tokens = samples_asked = 0
    rows_by_key: dict[str, int] = {}
    cached_keys: set[str] = set()
    pending: list[tuple[str, str]] = []
    # One tokenizer for the whole estimate, even if a slow tiktoken load finishes midway.
    encoder = _encoder(model)
    structured = _structured_tokens(plan, encoder)
    cache = None if config.refresh else _existing_cache(config.cache)

    def settle(batch: list[tuple[str, str]]) -> None:
        nonlocal requests, prompt_tokens, samples_asked
        hits = cache.get_many([key for key, _ in batch], n) if cache is not None else {}
        for key, prompt in batch:
            have = _valid_samples(hits.get(key, {}), plan)
            if have >= n:
                cached_keys.add(key)
                continue
            # A provider without n (Anthropic) sends one request per missing sample.
            sends = -(-(n - have) // per_request)
            requests += sends
            samples_asked += n - have
            prompt_tokens += sends * (_count_messages(plan.messages(prompt), encoder) + structured)

    try:
        for prompt in template.rows(frame):
            rows += 1
            if prompt is None:
                skipped += 1
                continue
            key = plan.key(prompt)
            seen = rows_by_key.get(key)
            rows_by_key[key] = (seen or 0) + 1
            if seen is None:
                pending.append((key, prompt))
                if len(pending) >= _LOOKUP_BATCH:
                    settle(pending)
                    pending = []
        settle(pending)
    finally:
        if cache is not None:
            cache.close()

    cached_rows = sum(rows_by_key[key] for key in cached_keys)
    duplicate_rows = rows - skipped - cached_rows - requests
    max_out = config.max_output_tokens
    completion_tokens = samples_asked * max_out if max_out is not None else None
    price = price_of(model)
    facts: dict[str, Any] = {
        "model": model,
        "rows": rows,
        "skipped_rows": skipped,
        "cached_rows": cached_rows,
        "duplicate_rows": duplicate_rows,
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "prompt_cost": price.cost(prompt_tokens, 0) if price is not None else None,
        "cost": cost(model, prompt_tokens, completion_tokens),
        "tokenizer": _describe(encoder),
    }
    return pd.Series(facts, name="estimate", dtype=object)


def _structured_tokens(plan: RequestPlan, encoder: Any | None) -> int:
    """Prompt tokens a structured request adds beyond its messages (the schema it carries)."""
    if plan.schema is None or plan.strategy not in ("tools", "json_schema"):
        return 0  # free text, or the schema travels inside the messages already
    # Compact separators would count fewer characters, but the approximation must match what
    # the scheduler reserves (and local servers report): json.dumps' defaults.
    tokens = _count(json.dumps(plan.schema), encoder)
    if encoder is not None and plan.strategy == "tools":
        tokens += _TOOL_OVERHEAD
    return tokens


def _valid_samples(samples: Mapping[int, str], plan: RequestPlan) -> int:
    # As the scheduler does: a cached answer the current parser rejects is asked again.
    parse = plan.parse
    valid = 0
    for text in samples.values():
        try:
            parse(text)
        except StructuredOutputError:
            continue
        valid += 1
    return valid


def _existing_cache(setting: Any) -> ResponseCache | None:
    """The run's cache, read-only: an estimate never creates, migrates or writes one."""
    return open_cache(setting, readonly=True)
