"""Prices: the built-in table, dated snapshots, user prices, and cost."""

from __future__ import annotations

import ast
import math
import pathlib

import pytest

from parrot_pandas import ConfigurationError
from parrot_pandas import _pricing as pricing
from parrot_pandas._pricing import PRICES, Price, cost, price_of, set_price


@pytest.fixture(autouse=True)
def _fresh_prices(monkeypatch: pytest.MonkeyPatch):
    # No test sees another's user prices.
    monkeypatch.setattr(pricing, "_user_prices", {})


def test_pricing_imports_nothing_above_it():
    # The price table sits at the bottom: the run and the estimate import it, never it them.
    source = pathlib.Path(pricing.__file__).read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    }
    assert imported <= {"errors"}


# -- prices --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
    ],
)
def test_price_by_exact_name_or_dated_snapshot(model, expected):
    assert price_of(model) == PRICES[expected]


def test_a_listed_snapshot_beats_its_base_model():
    assert price_of("gpt-4o-2024-05-13") == Price(5.0, 15.0)
    assert price_of("gpt-4o-2024-08-06") == PRICES["gpt-4o"]


@pytest.mark.parametrize(
    "model",
    [
        "my-local-llama",
        "gpt-4o-mini-audio-preview",
        "gpt-4.1-turbo",
        "ft:gpt-4o-mini:acme::x1",
        "GPT-4O",
        "claude-opus-4-9",
        "",
    ],
)
def test_unknown_models_have_no_price(model):
    # Never a guess: not a prefix match on another model's name.
    assert price_of(model) is None
    assert cost(model, 1000, 100) is None


def test_cost_in_usd():
    assert cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert cost("claude-3-5-haiku-20241022", 2_000, 500) == pytest.approx(0.0016 + 0.002)
    assert cost("gpt-4o-mini", 0, 0) == 0.0
    assert cost("gpt-4o-mini", 100, None) is None


def test_set_price_adds_and_overrides(monkeypatch):
    set_price("my-azure-gpt4o", 2.5, 10)
    assert price_of("my-azure-gpt4o") == Price(2.5, 10.0)
    assert price_of("my-azure-gpt4o-2025-01-01") == Price(2.5, 10.0)
    set_price("gpt-4o-mini", 0.1, 0.2)
    assert cost("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.1)
    assert PRICES["gpt-4o-mini"] == Price(0.15, 0.60)  # the built-in table is untouched
    set_price("llama3.1", 0, 0)
    assert cost("llama3.1", 10_000, 10_000) == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1, 1), "model"),
        ((None, 1, 1), "model"),
        (("m", -1, 1), "input price"),
        (("m", 1, math.nan), "output price"),
        (("m", "1", 1), "input price"),
        (("m", True, 1), "input price"),
    ],
)
def test_set_price_refuses_bad_values(args, message):
    with pytest.raises(ConfigurationError, match=message):
        set_price(*args)


def test_builtin_table_is_read_only_and_sane():
    with pytest.raises(TypeError):
        PRICES["gpt-4o"] = Price(0, 0)  # type: ignore[index]
    for model, price in PRICES.items():
        assert 0 < price.input <= price.output, model
