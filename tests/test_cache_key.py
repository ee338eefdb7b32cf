"""Tests for parrot_pandas._cache_key: what a cache key holds, and what it must never hold."""

from __future__ import annotations

import hashlib

import pandas as pd
import pytest

from parrot_pandas._cache_key import answer_key_function, key_function, request_key

PAYLOAD = {
    "base_url": "https://api.openai.com/v1",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Summarize: naïve café ☕"}],
    "params": {"temperature": 0.2, "seed": 7},
    "schema": None,
    "strategy": "text",
}
MESSAGES = [{"role": "user", "content": "Summarize: naïve café ☕"}]
RUN = {
    "base_url": "https://api.example.com/v1",
    "model": "m",
    "params": {"temperature": 0},
    "schema": None,
    "provider": "openai",
}


# --------------------------------------------------------------------------- request_key


def test_request_key_ignores_dict_order():
    reordered = {
        "strategy": "text",
        "params": {"seed": 7, "temperature": 0.2},
        "schema": None,
        "messages": [{"content": "Summarize: naïve café ☕", "role": "user"}],
        "model": "gpt-4o-mini",
        "base_url": "https://api.openai.com/v1",
    }
    assert request_key(PAYLOAD) == request_key(reordered)


def test_request_key_is_sha256_of_canonical_json():
    canonical = (
        '{"base_url":"https://api.openai.com/v1","messages":[{"content":"Summarize: naïve café ☕",'
        '"role":"user"}],"model":"gpt-4o-mini","params":{"seed":7,"temperature":0.2},'
        '"schema":null,"strategy":"text"}'
    )
    assert request_key(PAYLOAD) == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"temperature": 0.3, "seed": 7}},
        {"params": {"temperature": 0.2}},
        {"model": "gpt-4o"},
        {"base_url": "http://localhost:8000/v1"},
        {"messages": [{"role": "user", "content": "Summarize: naive cafe"}]},
        {"schema": {"type": "object"}},
        {"strategy": "json_schema"},
    ],
)
def test_request_key_changes_with_anything_that_shapes_the_answer(change):
    assert request_key({**PAYLOAD, **change}) != request_key(PAYLOAD)


def test_request_key_hashes_lone_surrogates():
    assert len(request_key({"messages": ["broken \ud800 text"]})) == 64


@pytest.mark.parametrize(
    "payload",
    [
        {"api_key": "sk-secret"},
        {"params": {"OPENAI_API_KEY": "sk-secret"}},
        {"params": {"headers": {"Authorization": "Bearer sk-secret"}}},
        {"messages": [{"x-api-key": "sk-secret"}]},
        {"params": {"Proxy-Authorization": None}},
    ],
)
def test_request_key_rejects_credentials_without_echoing_them(payload):
    with pytest.raises(ValueError, match="credential") as info:
        request_key(payload)
    assert "sk-secret" not in str(info.value)


def test_request_key_allows_an_extracted_field_named_authorization():
    schema = {
        "type": "object",
        "properties": {"authorization": {"type": "string"}},
        "required": ["authorization"],
    }
    assert len(request_key({**PAYLOAD, "schema": schema})) == 64


# --------------------------------------------------------------------------- key_function


def test_key_function_matches_request_key_for_every_field_position():
    fixed = {
        "base_url": "http://h/v1",
        "model": "m",
        "params": {"b": 1, "a": [1, 2]},
        "schema": None,
    }
    for varying in ("aaa", "messages", "zzz", "params2"):
        key = key_function(fixed, varying)
        for value in (["x"], [{"role": "user", "content": "é \ud800"}], None, {"k": 1}):
            assert key(value) == request_key({**fixed, varying: value})


def test_key_function_rejects_credentials_in_the_fixed_part():
    with pytest.raises(ValueError, match="credential"):
        key_function({"params": {"api_key": "sk-x"}}, "messages")


# --------------------------------------------------------------------------- a run's keys


def test_an_openai_key_is_the_plain_payload_so_existing_caches_stay_valid():
    key = answer_key_function(**RUN)
    plain = {k: v for k, v in RUN.items() if k != "provider"}
    assert key(MESSAGES) == request_key({**plain, "messages": MESSAGES})


@pytest.mark.parametrize("provider", ["anthropic", "azure"])
def test_the_provider_is_in_the_key(provider):
    openai = answer_key_function(**RUN)(MESSAGES)
    other = answer_key_function(**{**RUN, "provider": provider})(MESSAGES)
    assert other != openai
    plain = {k: v for k, v in RUN.items() if k != "provider"}
    assert other == request_key({**plain, "provider": provider, "messages": MESSAGES})


@pytest.mark.parametrize(
    "url",
    [
        "https://me:s3cret@api.example.com/v1",
        "https://me@api.example.com/v1",
        "https://:s3cret@api.example.com/v1",
        "https://api.example.com/v1#fragment",
    ],
)
def test_user_and_password_are_stripped_from_the_url(url):
    assert answer_key_function(**{**RUN, "base_url": url})(MESSAGES) == answer_key_function(**RUN)(
        MESSAGES
    )


def test_the_port_path_and_query_of_the_url_stay_in_the_key():
    key = answer_key_function(**RUN)(MESSAGES)
    for url in (
        "https://api.example.com:8443/v1",
        "https://api.example.com/v2",
        "https://api.example.com/v1?api-version=2024-10-21",
        "https://other.example.com/v1",
    ):
        assert answer_key_function(**{**RUN, "base_url": url})(MESSAGES) != key


def test_a_strategy_fallback_keeps_the_cache(server_factory):
    # The server refuses tools, so the first run's setup request falls back to json_schema.
    # The second run starts again from tools: its keys must be the ones the answers were
    # cached under, so it sends nothing.
    server = server_factory(supports_tools=False)
    docs = pd.DataFrame({"text": [f"name=N{i}, year={1900 + i}" for i in range(6)]})
    first = docs.llm.extract("${text}", {"name": str, "year": int}, base_url=server.url)
    assert first.attrs["llm"]["strategy"] == "json_schema"
    assert server.stats()["ok"] == 6
    server.reset_stats()
    again = docs.llm.extract("${text}", {"name": str, "year": int}, base_url=server.url)
    assert again.attrs["llm"]["cached_rows"] == 6
    assert server.stats()["requests"] == 0
    pd.testing.assert_frame_equal(again, first, check_like=True, check_exact=True, obj="out")
