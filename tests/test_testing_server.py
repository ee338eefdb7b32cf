"""Tests of parrot_pandas.testing: the local OpenAI-compatible server used everywhere else."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from parrot_pandas.testing import FakeServer, ServerConfig
from parrot_pandas.testing._bucket import TokenBucket
from parrot_pandas.testing._openai import format_duration
from parrot_pandas.testing._server import make_app

ROOT = Path(__file__).resolve().parents[1]

PEOPLE = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "year": {"type": "integer"},
                    "height": {"type": ["number", "null"]},
                    "alive": {"type": "boolean"},
                },
            },
        }
    },
}
TEXT = "People:\nname=Ada, year=1815, height=1.65, alive=no, extra=1\nname=Alan, year=19x2\n"
EXPECTED = [
    {"name": "Ada", "year": 1815, "height": 1.65, "alive": False},
    {"name": "Alan", "year": "19x2"},  # not an integer: left a string for the client to reject
]


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def tool_request(**extra: Any) -> dict[str, Any]:
    tool = {"type": "function", "function": {"name": "record", "parameters": PEOPLE}}
    forced = {"type": "function", "function": {"name": "record"}}
    return chat(TEXT, tools=[tool], tool_choice=forced, **extra)


async def post(
    srv: FakeServer, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{srv.url}/chat/completions", json=body, headers=headers) as r:
            return r.status, r.headers, await r.json()


@pytest.fixture
async def srv():
    async with FakeServer() as server:
        yield server


# -- response shape and the echo model ------------------------------------------------------


async def test_chat_response_has_openai_shape(srv):
    status, headers, data = await post(srv, chat("hello there"))
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert data["id"].startswith("chatcmpl-")
    assert data["object"] == "chat.completion"
    assert isinstance(data["created"], int)
    assert data["model"] == "m"
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "echo: hello there"
    assert "tool_calls" not in choice["message"]
    usage = data["usage"]
    assert usage["prompt_tokens"] == math.ceil(len("hello there") / 4)
    assert usage["completion_tokens"] == math.ceil(len("echo: hello there") / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "x-ratelimit-limit-requests" not in headers  # no bucket configured, no headers


async def test_n_gives_alternating_answers_and_honor_n_false_gives_one(srv):
    _, _, data = await post(srv, chat("hi", n=3))
    contents = [c["message"]["content"] for c in data["choices"]]
    assert contents == ["echo: hi", "echo (alt): hi", "echo: hi"]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert data["usage"]["completion_tokens"] == sum(math.ceil(len(c) / 4) for c in contents)
    async with FakeServer(honor_n=False) as one:
        _, _, data = await post(one, chat("hi", n=3))
    assert len(data["choices"]) == 1


async def test_prompt_tokens_count_every_message_and_content_parts(srv):
    parts = [{"type": "text", "text": "abcde"}, {"type": "image_url", "image_url": {}}]
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "12345678"},
            {"role": "user", "content": parts},
        ],
    }
    _, _, data = await post(srv, body)
    assert data["usage"]["prompt_tokens"] == 2 + 2
    assert data["choices"][0]["message"]["content"] == "echo: abcde"


async def test_max_tokens_truncates_with_finish_reason_length(srv):
    _, _, data = await post(srv, chat("x" * 40, max_tokens=3))
    [choice] = data["choices"]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "echo: xxxxxx"  # 3 tokens of 4 characters
    assert data["usage"]["completion_tokens"] == 3


async def test_models_endpoint_lists_models():
    async with FakeServer(models=["a", "b"]) as srv, aiohttp.ClientSession() as session:
        async with session.get(f"{srv.url}/models") as r:
            data = await r.json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["a", "b"]
    assert all(m["object"] == "model" for m in data["data"])


# -- structured answers --------------------------------------------------------------------


async def test_forced_tool_call_returns_typed_items_in_arguments(srv):
    status, _, data = await post(srv, tool_request(n=2))
    assert status == 200
    for choice in data["choices"]:
        message = choice["message"]
        assert message["content"] is None
        # OpenAI ends a forced named function call with "stop", not "tool_calls".
        assert choice["finish_reason"] == "stop"
        [call] = message["tool_calls"]
        assert call["type"] == "function"
        assert call["id"].startswith("call_")
        assert call["function"]["name"] == "record"
        assert json.loads(call["function"]["arguments"]) == {"items": EXPECTED}
    first, second = (c["message"]["tool_calls"][0] for c in data["choices"])
    assert first["function"]["arguments"] == second["function"]["arguments"]
    schema_tokens = math.ceil(len(json.dumps(PEOPLE)) / 4)
    assert data["usage"]["prompt_tokens"] == math.ceil(len(TEXT) / 4) + schema_tokens


async def test_auto_tool_choice_calls_the_first_tool_with_finish_reason_tool_calls(srv):
    body = tool_request()
    del body["tool_choice"]
    _, _, data = await post(srv, body)
    [choice] = data["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "items": EXPECTED
    }


async def test_tool_choice_naming_a_missing_tool_is_a_400(srv):
    body = tool_request()
    body["tool_choice"] = {"type": "function", "function": {"name": "nope"}}
    status, _, data = await post(srv, body)
    assert status == 400
    assert data["error"]["param"] == "tool_choice"


async def test_json_schema_answers_in_content(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": PEOPLE}}
    _, _, data = await post(srv, chat(TEXT, response_format=fmt))
    [choice] = data["choices"]
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"]) == {"items": EXPECTED}


async def test_json_schema_with_refs_is_resolved(srv):
    schema = {
        "$defs": {"Person": PEOPLE["properties"]["items"]["items"]},
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Person"}}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": schema}}
    _, _, data = await post(srv, chat(TEXT, response_format=fmt))
    assert json.loads(data["choices"][0]["message"]["content"]) == {"items": EXPECTED}


async def test_json_object_reads_the_schema_from_the_system_prompt(srv):
    body = chat(TEXT, response_format={"type": "json_object"})
    system = f"Answer with JSON matching this schema: {json.dumps(PEOPLE)}"
    body["messages"].insert(0, {"role": "system", "content": system})
    _, _, data = await post(srv, body)
    assert json.loads(data["choices"][0]["message"]["content"]) == {"items": EXPECTED}


async def test_json_object_without_schema_keeps_every_key_as_a_string(srv):
    _, _, data = await post(srv, chat("a=1, b = x, y", response_format={"type": "json_object"}))
    assert json.loads(data["choices"][0]["message"]["content"]) == {
        "items": [{"a": "1", "b": "x, y"}]
    }


async def test_no_key_value_lines_give_empty_items(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": PEOPLE}}
    _, _, data = await post(srv, chat("nothing to see here", response_format=fmt))
    assert json.loads(data["choices"][0]["message"]["content"]) == {"items": []}


async def test_plain_prompt_mentioning_json_gets_a_fenced_block(srv):
    example = '{"items": [{"name": "...", "year": 0}]}'
    body = chat(f"Return JSON like {example}.\n{TEXT}", n=2)
    _, _, data = await post(srv, body)
    contents = {c["message"]["content"] for c in data["choices"]}
    assert len(contents) == 1  # every sample identical
    content = contents.pop()
    assert "```json\n" in content and not content.startswith("```")
    block = content.split("```json\n", 1)[1].split("\n```", 1)[0]
    # Types come from the example: the year is an integer, the unknown keys are dropped.
    assert json.loads(block) == {
        "items": [{"name": "Ada", "year": 1815}, {"name": "Alan", "year": "19x2"}]
    }


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "extra", "param"),
    [
        ("supports_tools", tool_request(), "tools"),
        (
            "supports_json_schema",
            {"response_format": {"type": "json_schema", "json_schema": {"schema": PEOPLE}}},
            "response_format",
        ),
        ("supports_json_object", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
async def test_unsupported_features_are_400s_naming_the_parameter(flag, extra, param):
    body = {**chat("x"), **extra}
    async with FakeServer(**{flag: False}) as srv:
        status, _, data = await post(srv, body)
        assert status == 400
        assert data["error"]["param"] == param
        assert data["error"]["type"] == "invalid_request_error"
        assert "not supported" in data["error"]["message"]
        assert srv.stats()["rejected"] == 1


async def test_wrong_or_missing_key_is_401_and_the_key_is_never_echoed():
    async with FakeServer(api_key="sk-right-key-123") as srv:
        status, _, data = await post(srv, chat(), {"Authorization": "Bearer sk-wrong-key-456"})
        assert status == 401
        assert data["error"]["code"] == "invalid_api_key"
        body = json.dumps(data)
        assert "wrong" not in body and "456" not in body and "sk-right" not in body
        status, _, data = await post(srv, chat())
        assert status == 401
        assert data["error"]["code"] == "invalid_api_key"
        status, _, _ = await post(srv, chat(), {"Authorization": "Bearer sk-right-key-123"})
        assert status == 200
        assert srv.stats()["requests"] == 3
    assert "sk-right" not in repr(srv)


async def test_unknown_model_is_404_model_not_found():
    async with FakeServer(models=["gpt-4o-mini"]) as srv:
        status, _, data = await post(srv, {**chat(), "model": "gpt-9"})
        assert status == 404
        assert data["error"]["code"] == "model_not_found"
        assert data["error"]["message"] == (
            "The model `gpt-9` does not exist or you do not have access to it."
        )
        status, _, _ = await post(srv, {**chat(), "model": "gpt-4o-mini"})
        assert status == 200


async def test_context_window_is_enforced_with_openais_message():
    async with FakeServer(context_window=10) as srv:
        status, _, data = await post(srv, chat("x" * 44))  # 11 tokens
        assert status == 400
        assert data["error"]["code"] == "context_length_exceeded"
        assert data["error"]["message"].startswith(
            "This model's maximum context length is 10 tokens. However, your messages "
            "resulted in 11 tokens."
        )
        status, _, data = await post(srv, chat("x" * 20, max_tokens=6))  # 5 + 6
        assert status == 400
        assert (
            "you requested 11 tokens (5 in the messages, 6 in the completion)"
            in (data["error"]["message"])
        )
        status, _, _ = await post(srv, chat("x" * 20, max_tokens=5))
        assert status == 200


async def test_bad_requests_get_openai_style_400s(srv):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{srv.url}/chat/completions", data=b"{not json") as r:
            assert r.status == 400
            assert "error" in await r.json()
        async with session.get(f"{srv.url}/nope") as r:
            assert r.status == 404
            assert (await r.json())["error"]["message"] == "Invalid URL (GET /v1/nope)"
    for body, param in [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        (chat(n=0), "n"),
        (chat(stream=True), "stream"),
    ]:
        status, _, data = await post(srv, body)
        assert (status, data["error"]["param"]) == (400, param)


# -- rate limits ----------------------------------------------------------------------------


def test_token_bucket_refills_with_a_fake_clock(fake_clock):
    clock = fake_clock
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=clock)
    assert bucket.level == 4.0
    assert bucket.try_acquire(3) == 0.0
    assert bucket.level == 1.0
    assert bucket.try_acquire(2) == pytest.approx(0.5)  # refused, nothing taken
    assert bucket.level == 1.0
    assert bucket.time_to_full() == pytest.approx(1.5)
    clock.now += 0.5
    assert bucket.try_acquire(2) == 0.0
    assert bucket.level == 0.0
    clock.now += 100
    assert bucket.level == 4.0  # capped at capacity
    assert bucket.wait_time(5) == math.inf
    assert bucket.time_to_full() == 0.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (18.642, "18.642s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
    ],
)
def test_durations_use_openais_format(seconds, text):
    assert format_duration(seconds) == text


async def test_429_carries_openai_message_and_every_header(fake_clock):
    clock = fake_clock
    async with FakeServer(rpm=60, tpm=6000, clock=clock) as srv:  # 1 request, 100 tokens
        status, headers, _ = await post(srv, chat("x" * 40))  # 10 tokens
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "60"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "1s"
        assert headers["x-ratelimit-limit-tokens"] == "6000"
        assert headers["x-ratelimit-remaining-tokens"] == "90"
        assert headers["x-ratelimit-reset-tokens"] == "100ms"

        clock.now += 0.25
        status, headers, data = await post(srv, chat("x" * 40))
        assert status == 429
        assert headers["retry-after-ms"] == "750"
        assert headers["retry-after"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "750ms"
        assert headers["x-ratelimit-remaining-tokens"] == "100"
        error = data["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert error["type"] == "requests"
        assert error["message"].startswith(
            "Rate limit reached for m in organization org-parrot on requests per min (RPM): "
            "Limit 60, Used 60, Requested 1. Please try again in 750ms."
        )

        clock.now += 0.75
        status, _, _ = await post(srv, chat("x" * 40))
        assert status == 200
        assert srv.stats()["rate_limited"] == 1 and srv.stats()["ok"] == 2


async def test_tokens_bucket_counts_max_tokens_and_rejects_oversized_requests(fake_clock):
    clock = fake_clock
    async with FakeServer(tpm=600, burst=5, clock=clock) as srv:  # 50 tokens
        status, headers, data = await post(srv, chat("x" * 40, max_tokens=30))  # costs 40
        assert status == 200
        assert headers["x-ratelimit-remaining-tokens"] == "10"
        assert "x-ratelimit-limit-requests" not in headers
        status, headers, data = await post(srv, chat("x" * 40, max_tokens=30))
        assert status == 429
        assert data["error"]["type"] == "tokens"
        assert headers["retry-after-ms"] == "3000"  # 30 missing tokens at 10 a second
        status, headers, data = await post(srv, chat("x" * 40, max_tokens=100))
        assert status == 429
        assert data["error"]["message"].startswith("Request too large for m")
        assert "retry-after" not in headers


async def test_tight_rpm_limits_a_burst_of_real_requests():
    async with FakeServer(rpm=600, burst=0.5) as srv:  # 5 at once, then one per 100 ms
        statuses = [(await post(srv, chat(str(i))))[0] for i in range(8)]
    assert statuses[:5] == [200] * 5
    assert 429 in statuses[5:]


# -- latency, faults and stats --------------------------------------------------------------


async def test_latency_and_max_in_flight():
    async with FakeServer(latency=0.2) as srv:
        start = time.perf_counter()
        results = await asyncio.gather(*(post(srv, chat(f"p{i % 2}")) for i in range(5)))
        elapsed = time.perf_counter() - start
        stats = srv.stats()
    assert all(status == 200 for status, _, _ in results)
    assert elapsed >= 0.2  # each answer waited its latency...
    assert stats["max_in_flight"] == 5  # ...all five at once (no upper time bound: noisy CI)
    assert stats["in_flight"] == 0
    assert stats["by_prompt"] == {"p0": 3, "p1": 2}


async def run_faulty(seed: int, count: int = 300) -> tuple[list[Any], dict[str, Any]]:
    fmt = {"type": "json_schema", "json_schema": {"name": "people", "schema": PEOPLE}}
    outcomes: list[Any] = []
    cfg = ServerConfig(fail_rate=0.2, drop_rate=0.1, malformed_rate=0.1, seed=seed)
    async with FakeServer(cfg) as srv, aiohttp.ClientSession() as session:
        for _ in range(count):
            try:
                async with session.post(
                    f"{srv.url}/chat/completions", json=chat(TEXT, response_format=fmt)
                ) as r:
                    data = await r.json()
                    if r.status != 200:
                        outcomes.append(r.status)
                        continue
                    try:
                        json.loads(data["choices"][0]["message"]["content"])
                        outcomes.append("ok")
                    except ValueError:
                        outcomes.append("malformed")
            except aiohttp.ClientConnectionError:
                outcomes.append("dropped")
        return outcomes, srv.stats()


async def test_fault_rates_are_seeded_and_roughly_right():
    outcomes, stats = await run_faulty(seed=7)
    count = len(outcomes)
    failed = outcomes.count(500) + outcomes.count(503)
    assert abs(outcomes.count(500) - outcomes.count(503)) <= 1  # they alternate
    assert stats["failed"] == failed and 0.12 * count < failed < 0.28 * count
    assert stats["dropped"] == outcomes.count("dropped")
    assert 0.04 * count < stats["dropped"] < 0.16 * count
    assert stats["malformed"] == outcomes.count("malformed")
    assert 0.04 * count < stats["malformed"] < 0.16 * count
    assert stats["ok"] == outcomes.count("ok") + outcomes.count("malformed")
    assert stats["requests"] == count
    again, _ = await run_faulty(seed=7)
    assert again == outcomes
    other, _ = await run_faulty(seed=8)
    assert other != outcomes


async def test_dropped_connection_is_a_client_disconnect_without_server_noise(caplog):
    caplog.set_level(logging.DEBUG)
    async with FakeServer(drop_rate=1.0) as srv:
        with pytest.raises(aiohttp.ClientConnectionError) as info:
            await post(srv, chat())
        assert srv.stats()["dropped"] == 1
    assert isinstance(info.value, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError))
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == []


async def test_failures_alternate_500_and_503_with_server_error_bodies():
    async with FakeServer(fail_rate=1.0, rpm=6000) as srv:
        results = [await post(srv, chat()) for _ in range(3)]
    assert [status for status, _, _ in results] == [500, 503, 500]
    for _, headers, data in results:
        assert data["error"]["type"] == "server_error"
        assert "x-ratelimit-remaining-requests" in headers


async def test_malformed_answers_are_invalid_json_in_tool_arguments():
    async with FakeServer(malformed_rate=1.0) as srv:
        _, _, data = await post(srv, tool_request())
        arguments = data["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
        with pytest.raises(ValueError):
            json.loads(arguments)
        assert arguments.startswith('{"items"')
        _, _, data = await post(srv, chat("plain"))  # malformed only touches structured answers
        assert data["choices"][0]["message"]["content"] == "echo: plain"
        assert srv.stats()["malformed"] == 1


async def test_stats_endpoints_and_reset(srv):
    await post(srv, chat("a"))
    await post(srv, chat("a"))
    async with aiohttp.ClientSession() as session:
        base = srv.url.removesuffix("/v1")
        async with session.get(f"{base}/_stats") as r:
            stats = await r.json()
        assert stats["requests"] == 2 and stats["ok"] == 2
        assert stats["by_prompt"] == {"a": 2}
        assert stats["prompt_tokens"] == 2
        async with session.post(f"{base}/_reset") as r:
            assert (await r.json())["ok"] == 2
    assert srv.stats()["requests"] == 0 and srv.stats()["by_prompt"] == {}
    await post(srv, chat("b"))
    srv.reset_stats()
    assert srv.stats()["ok"] == 0


# -- per-row faults -----------------------------------------------------------------------------

SECRET = "sk-fault-0123456789abcdef"


@pytest.fixture
async def faulty(fault_markers):
    async with FakeServer(faults=fault_markers) as server:
        yield server


async def test_a_row_without_a_marker_is_answered(faulty):
    status, _, data = await post(faulty, chat("an honest prompt"))
    assert status == 200 and data["choices"][0]["message"]["content"] == "echo: an honest prompt"
    assert faulty.stats()["faults"] == 0


async def test_content_filter_fault_withholds_the_answer(faulty):
    for body in (chat("please filterme"), tool_request(messages=[
            {"role": "user", "content": TEXT + " FILTERME"}])):  # fmt: skip
        status, _, data = await post(faulty, body)
        (choice,) = data["choices"]
        assert status == 200 and choice["finish_reason"] == "content_filter"
        assert choice["message"]["content"] is None and "tool_calls" not in choice["message"]


async def test_truncate_fault_cuts_free_text_and_structured_answers(faulty):
    status, _, data = await post(faulty, chat("CUTME please, a long enough answer"))
    (choice,) = data["choices"]
    assert status == 200 and choice["finish_reason"] == "length"
    assert "echo: CUTME please, a long enough answer".startswith(choice["message"]["content"])
    assert len(choice["message"]["content"]) < len("echo: CUTME please, a long enough answer")
    body = tool_request(messages=[{"role": "user", "content": TEXT + " CUTME"}])
    status, _, data = await post(faulty, body)
    (choice,) = data["choices"]
    arguments = choice["message"]["tool_calls"][0]["function"]["arguments"]
    assert choice["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(arguments)


@pytest.mark.parametrize(
    ("marker", "status", "error"),
    [
        ("LONGME", 400, {"code": "context_length_exceeded", "param": "messages"}),
        ("LLAMAME", 400, {"type": "exceed_context_size_error", "code": 400, "n_ctx": 4096}),
        ("BOOM", 500, {"type": "server_error"}),
        ("HUGE", 429, {"code": "rate_limit_exceeded", "type": "tokens"}),
        ("BROKE", 429, {"code": "insufficient_quota", "type": "insufficient_quota"}),
    ],
)
async def test_error_faults_have_their_servers_shapes(faulty, marker, status, error):
    for _ in range(3):  # every attempt, not once
        got, headers, data = await post(faulty, chat(f"row {marker}"))
        assert got == status
        assert error.items() <= data["error"].items()
        assert "retry-after" not in headers  # nothing to wait for
    assert faulty.stats()["faults"] == 3


async def test_the_context_length_fault_mentions_functions_as_openai_does(faulty):
    _, _, data = await post(faulty, chat("LONGME"))
    assert "in the functions" in data["error"]["message"]
    _, _, data = await post(faulty, chat("LLAMAME"))
    assert "exceeds the available context size" in data["error"]["message"]
    _, _, data = await post(faulty, chat("HUGE"))
    assert "Request too large" in data["error"]["message"]
    assert "Limit 30000, Requested 45000" in data["error"]["message"]


async def test_the_echo_key_fault_answers_200_with_the_key_in_two_cases(faulty):
    status, _, data = await post(
        faulty, chat("ECHOKEY"), headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert status == 200 and "choices" not in data
    assert SECRET in data["error"]["message"] and SECRET.upper() in data["error"]["message"]


@pytest.mark.parametrize(
    ("marker", "status", "kind"),
    [
        ("LONGME", 400, "invalid_request_error"),
        ("BOOM", 500, "api_error"),
        ("HUGE", 413, "request_too_large"),
        ("BROKE", 400, "invalid_request_error"),
    ],
)
async def test_error_faults_on_the_anthropic_route(faulty, marker, status, kind):
    body = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": marker}]}
    async with aiohttp.ClientSession() as session:
        headers = {"anthropic-version": "2023-06-01"}
        async with session.post(f"{faulty.origin}/v1/messages", json=body, headers=headers) as r:
            assert r.status == status
            assert (await r.json())["error"]["type"] == kind


async def test_answer_faults_on_the_anthropic_route(faulty):
    async with aiohttp.ClientSession() as session:
        headers = {"anthropic-version": "2023-06-01"}
        for marker, stop in (("FILTERME", "refusal"), ("CUTME to pieces", "max_tokens")):
            body = {
                "model": "m",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": marker}],
            }
            async with session.post(
                f"{faulty.origin}/v1/messages", json=body, headers=headers
            ) as r:
                assert (r.status, (await r.json())["stop_reason"]) == (200, stop)


def test_an_unknown_fault_is_refused():
    with pytest.raises(ValueError, match="unknown fault"):
        ServerConfig(faults={"X": "explode"})
    assert ServerConfig(faults={"X": "truncate"}) == ServerConfig(faults=[("X", "truncate")])


# -- construction, threads and the command line ---------------------------------------------


def test_config_validation_and_keyword_overrides():
    with pytest.raises(ValueError):
        ServerConfig(fail_rate=0.7, drop_rate=0.7)
    with pytest.raises(ValueError):
        ServerConfig(rpm=0)
    assert ServerConfig(models=["a"]).models == ("a",)
    assert "secret" not in repr(ServerConfig(api_key="secret"))
    srv = FakeServer(ServerConfig(latency=1.0), rpm=5)
    assert (srv.config.latency, srv.config.rpm) == (1.0, 5)
    with pytest.raises(RuntimeError):
        srv.url  # noqa: B018 - not started yet
    assert make_app(ServerConfig()).router is not None


def test_threaded_server_works_from_sync_code():
    with FakeServer(latency=0.01) as srv:
        request = urllib.request.Request(
            f"{srv.url}/chat/completions",
            data=json.dumps(chat("sync")).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            data = json.loads(r.read())
        assert data["choices"][0]["message"]["content"] == "echo: sync"
        assert srv.stats()["by_prompt"] == {"sync": 1}
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{srv.url}/models", timeout=2)


USER_TESTS = """
import urllib.request

import pandas as pd
import pytest

import parrot_pandas  # noqa: F401
from parrot_pandas.testing import ServerConfig

URLS = []


def test_default_server(fake_server):
    frame = pd.DataFrame({"text": ["hi"]})
    out = frame.llm.generate("${text}", base_url=fake_server.url, api_key="x", cache=False)
    assert list(out["output"]) == ["echo: hi"]
    URLS.append(fake_server.url)


def test_factory(fake_server_factory):
    limited = fake_server_factory(rpm=600, models=["m"])
    slow = fake_server_factory(ServerConfig(latency=0.01), api_key="k")
    assert (limited.config.rpm, limited.config.models) == (600, ("m",))
    assert (slow.config.latency, slow.config.api_key) == (0.01, "k")
    assert limited.url != slow.url
    URLS.extend([limited.url, slow.url])


def test_every_server_stopped_after_its_test():
    assert len(URLS) == 3
    for url in URLS:
        with pytest.raises(OSError):
            urllib.request.urlopen(url + "/models", timeout=2)
"""


@pytest.mark.slow
def test_pytest_plugin_gives_a_users_tests_servers_and_stops_them(tmp_path):
    # A user's project: one line in conftest.py enables the fixtures.
    (tmp_path / "conftest.py").write_text(
        'pytest_plugins = ["parrot_pandas.testing.pytest_plugin"]\n'
    )
    (tmp_path / "test_user.py").write_text(textwrap.dedent(USER_TESTS))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


def test_cli_prints_the_url_and_serves_until_terminated():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "parrot_pandas.testing", "--port", "0", "--models", "m1", "m2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with urllib.request.urlopen(f"{url}/models", timeout=5) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["m1", "m2"]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr


# --- the oracle imports nothing of the client -------------------------------------------

KIT = "parrot_pandas.testing"


def imported_names(source: str, module: str) -> set[str]:
    """Every name ``source`` (the code of ``module``) imports, as a dotted path from the top:
    ``import a.b`` gives ``a.b``, ``from a import b`` gives ``a.b``, relative imports resolved."""
    package = module.rsplit(".", 1)[0]  # a package's own code is "<package>.__init__"
    names = set()
    for node in ast.walk(ast.parse(source)):  # nested imports too: in functions, TYPE_CHECKING
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if node.module else anchor
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def client_imports(source: str, module: str) -> set[str]:
    """What ``source`` imports from parrot_pandas outside the test kit."""
    return {
        name
        for name in imported_names(source, module)
        if (name == "parrot_pandas" or name.startswith("parrot_pandas."))
        and not (name == KIT or name.startswith(KIT + "."))
    }


@pytest.mark.parametrize(
    ("source", "module", "bad"),
    [
        ("from .. import errors", f"{KIT}._openai", {"parrot_pandas.errors"}),
        ("from ..errors import APIError", f"{KIT}._server", {"parrot_pandas.errors.APIError"}),
        (
            "from .._limits import TokenBucket",
            f"{KIT}._bucket",
            {"parrot_pandas._limits.TokenBucket"},
        ),
        ("from . import _config", f"{KIT}.__init__", set()),
        ("from .. import _cache", f"{KIT}.__init__", {"parrot_pandas._cache"}),
        ("import parrot_pandas", f"{KIT}._model", {"parrot_pandas"}),
        ("import parrot_pandas._cache as c", f"{KIT}._model", {"parrot_pandas._cache"}),
        (
            "def f():\n    from parrot_pandas import _secrets",
            f"{KIT}._faults",
            {"parrot_pandas._secrets"},
        ),
        (
            "if TYPE_CHECKING:\n    from ..providers import Call",
            f"{KIT}._azure",
            {"parrot_pandas.providers.Call"},
        ),
        ("from ._model import Job\nfrom . import _openai", f"{KIT}._server", set()),
        ("from parrot_pandas.testing._model import Job\nimport aiohttp", f"{KIT}._server", set()),
    ],
)
def test_the_import_walk_sees_client_imports(source, module, bad):
    # The check below is only as good as this walk: it must see every spelling.
    assert client_imports(source, module) == bad


def test_the_test_kit_imports_no_client_code():
    # The server is the oracle the client is tested against: it must not share the client's
    # code (not even its errors), or a client bug could hide in both at once.
    kit = ROOT / "parrot_pandas" / "testing"
    files = sorted(kit.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "_server.py", "_openai.py", "_faults.py"}
    inside: set[str] = set()
    for path in files:
        module = f"{KIT}.{path.stem}"
        source = path.read_text(encoding="utf-8")
        assert client_imports(source, module) == set(), path.name
        inside |= {
            ".".join(name.split(".")[:3])  # the kit's module it names
            for name in imported_names(source, module)
            if name.startswith(KIT + ".")
        }
    # The walk saw the modules import one another, so it did read the imports.
    assert {f"{KIT}._model", f"{KIT}._openai", f"{KIT}._config", f"{KIT}._server"} <= inside
