"""Token counting: tiktoken, and the fallback when it is missing or cannot load."""

from __future__ import annotations

import sys
import threading
import time
import types

import pytest

from parrot_pandas import _tokens as tokens
from parrot_pandas._tokens import (
    approximate_tokens,
    count_tokens,
    message_tokens,
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


# No test sees another's loaded encodings, nor the real tiktoken (unless it puts in its own).
pytestmark = pytest.mark.usefixtures("no_tiktoken")


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
    monkeypatch.setattr(tokens, "_LOAD_TIMEOUT", 0.05)
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
