"""The price table and what tokens cost.

Prices are USD per million tokens, standard (not batch, not cached-input) rates. A model is
matched by its exact name, then as a dated snapshot of a listed model
(``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``); anything else has no price, and its cost is
``None``, never a guess. :func:`set_price` adds or overrides a price.

Token counting is in ``_tokens``, and ``estimate`` beside the run in ``_estimate``: this
module imports nothing of parrot_pandas but its errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import ConfigurationError

__all__ = [
    "BATCH_DISCOUNT",
    "PRICES",
    "Price",
    "batch_cost",
    "cache_price_factors",
    "cost",
    "price_of",
    "set_price",
]

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


# OpenAI's, Azure's and Anthropic's Batch APIs bill input and output at half the live price
# (OpenAI and Anthropic pricing pages, "Batch API": 50% off).
BATCH_DISCOUNT = 0.5


def batch_cost(
    model: str, prompt_tokens: int | None, completion_tokens: int | None
) -> float | None:
    """USD for tokens answered through a Batch API: :func:`cost` at :data:`BATCH_DISCOUNT`.

    Examples
    --------
    >>> batch_cost("gpt-4o-mini", 1_000_000, 1_000_000)
    0.375
    """
    live = cost(model, prompt_tokens, completion_tokens)
    return None if live is None else live * BATCH_DISCOUNT


# What a prompt-cache read and write cost, as a share of the input price. Anthropic: reads
# 0.1x, 5-minute writes 1.25x (pricing page, "Prompt caching"). OpenAI: cached input is at
# least half off (gpt-4o family 0.5x; newer models bill less, so this is never an understatement).
_CACHE_FACTORS = {"anthropic": (0.1, 1.25)}
_DEFAULT_CACHE_FACTORS = (0.5, 1.0)


def cache_price_factors(provider: str) -> tuple[float, float]:
    """``(read, write)``: a cached prompt token's price as a share of the input price.

    Examples
    --------
    >>> cache_price_factors("anthropic")
    (0.1, 1.25)
    """
    return _CACHE_FACTORS.get(provider, _DEFAULT_CACHE_FACTORS)
