"""Token counting (tiktoken, and the fallback when it is missing or cannot load) and prices."""

from __future__ import annotations

import math
import sys
import threading
import time
import types

import pytest

from parrot_pandas import ConfigurationError
from parrot_pandas import _pricing as pricing
from parrot_pandas._pricing import (
    PRICES,
    Price,
    approximate_tokens,
    cost,
    count_tokens,
    message_tokens,
    price_of,
    set_price,
    tokenizer_name,
)


class FakeEncoding:
    """One token per whitespace-separated word; refuses special tokens like tiktoken's encode."""

    def __init__(self, name: str) -> None:
        self.name = name

    def encode(self, text: str) -> list[int]:
        if "<|endoftext|>" in text:
            raise ValueError("disallowed special token")
        return self.encode_ordinary(text)

    def encode_ordinary(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def fake_tiktoken(get_encoding=None) -> types.ModuleType:
    module = types.ModuleType("tiktoken")
    module.loads = []  # type: ignore[attr-defined]
    known = {"gpt-4o-mini": "o200k_base", "gpt-4": "cl100k_base"}

    def encoding_name_for_model(model: str) -> str:
        return known[model]  # KeyError for unknown models, as tiktoken does

    def default_get_encoding(name: str) -> FakeEncoding:
        module.loads.append(name)  # type: ignore[attr-defined]
        return FakeEncoding(name)

    module.encoding_name_for_model = encoding_name_for_model  # type: ignore[attr-defined]
    module.get_encoding = get_encoding or default_get_encoding  # type: ignore[attr-defined]
    return module


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch):
    # No test sees another's loaded encodings or user prices, nor the real tiktoken.
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    monkeypatch.setattr(pricing, "_user_prices", {})
    pricing._reset_tokenizers()
    yield
    pricing._reset_tokenizers()


# -- counting ------------------------------------------------------------------------------


def test_approximation_is_four_characters_a_token_rounded_up():
    assert [approximate_tokens("x" * k) for k in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_without_tiktoken_counts_are_the_approximation():
    assert count_tokens("Summarize: tea", "gpt-4o-mini") == 4
    assert tokenizer_name("gpt-4o-mini") == "approximate: 4 characters a token"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Summarize: tea"},
    ]
    # No per-message overhead: what the scheduler reserves and local servers report.
    assert message_tokens(messages, "gpt-4o-mini") == approximate_tokens("Be brief.") + 4


def test_with_tiktoken_counts_use_the_models_encoding(monkeypatch):
    module = fake_tiktoken()
    monkeypatch.setitem(sys.modules, "tiktoken", module)
    assert count_tokens("one two three", "gpt-4o-mini") == 3
    assert tokenizer_name("gpt-4") == "tiktoken:cl100k_base"
    # Unknown to tiktoken (a Claude model): o200k_base, loaded once and shared.
    assert tokenizer_name("claude-3-5-haiku") == "tiktoken:o200k_base"
    assert module.loads == ["o200k_base", "cl100k_base"]


def test_special_token_text_is_counted_as_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", fake_tiktoken())
    assert count_tokens("a <|endoftext|> b", "gpt-4o-mini") == 3


def test_message_tokens_add_openais_documented_overhead(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", fake_tiktoken())
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "summarize this tea", "name": "ann"},
    ]
    # reply priming 3; each message 3 + role + content; a name 1 more than its own tokens.
    expected = 3 + (3 + 1 + 2) + (3 + 1 + 3 + 1 + 1)
    assert message_tokens(messages, "gpt-4o-mini") == expected


def test_tiktoken_that_cannot_download_falls_back_and_is_not_retried(monkeypatch):
    calls = []

    def offline(name: str):
        calls.append(name)
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setitem(sys.modules, "tiktoken", fake_tiktoken(offline))
    started = time.perf_counter()
    assert count_tokens("x" * 10, "gpt-4o-mini") == 3
    assert count_tokens("x" * 10, "gpt-4o-mini") == 3
    assert time.perf_counter() - started < 1.0
    assert calls == ["o200k_base"]


def test_tiktoken_download_that_hangs_falls_back_after_the_timeout(monkeypatch):
    release = threading.Event()

    def stuck(name: str) -> FakeEncoding:
        release.wait(5)
        return FakeEncoding(name)

    monkeypatch.setitem(sys.modules, "tiktoken", fake_tiktoken(stuck))
    monkeypatch.setattr(pricing, "_LOAD_TIMEOUT", 0.05)
    started = time.perf_counter()
    assert count_tokens("one two three", "gpt-4o-mini") == 4  # ceil(13 / 4)
    # Later calls do not wait again...
    assert count_tokens("one two three", "gpt-4o-mini") == 4
    assert time.perf_counter() - started < 1.0
    # ...and use the encoding once it has arrived.
    release.set()
    deadline = time.monotonic() + 5
    while tokenizer_name("gpt-4o-mini") != "tiktoken:o200k_base":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert count_tokens("one two three", "gpt-4o-mini") == 3


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
    ["my-local-llama", "gpt-4o-mini-audio-preview", "gpt-4.1-turbo", "ft:gpt-4o-mini:acme::x1",
     "GPT-4O", "claude-opus-4-9", ""],
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
