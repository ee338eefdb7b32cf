"""Tests for parrot_pandas.providers.anthropic and the FakeServer's Anthropic Messages route.

Three layers: the provider alone (payloads, parsing, errors, rate-limit headers; no network),
the test server against Anthropic's official SDK (so the server is proven to speak the API),
and whole runs through ``df.llm`` against that server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import aiohttp
import pandas as pd
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from parrot_pandas._client import Client
from parrot_pandas._config import RunConfig
from parrot_pandas._plan import RequestPlan
from parrot_pandas._scheduler import Scheduler
from parrot_pandas._structured import items_schema, normalize_fields
from parrot_pandas.errors import (
    APIError,
    ConfigurationError,
    RowsFailedError,
    StructuredOutputError,
    Verdict,
)
from parrot_pandas.providers import AnthropicProvider, Call, provider_for
from parrot_pandas.providers.anthropic import (
    ANTHROPIC_VERSION,
    DEFAULT_MAX_TOKENS,
    parse_reset_time,
)
from parrot_pandas.providers.openai import TOOL_NAME
from parrot_pandas.testing import FakeServer

KEY = "sk-ant-test-0123456789abcdef"
URL = "http://127.0.0.1:8080"
MESSAGES = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
SCHEMA = items_schema(normalize_fields({"name": str, "year": int}))
PEOPLE = "name=Ada, year=1815\nname=Alan, year=1912"
ENVIRONMENT = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "PARROT_PANDAS_PROVIDER",
)


@pytest.fixture(autouse=True)
def _no_anthropic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def call(**kwargs) -> Call:
    kwargs.setdefault("model", "claude-3-5-haiku-latest")
    kwargs.setdefault("messages", MESSAGES)
    return Call(**kwargs)


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def message(*content: dict, stop: str = "end_turn", usage: object = None) -> dict:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-haiku-latest",
        "content": list(content),
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": usage if usage is not None else {"input_tokens": 7, "output_tokens": 3},
    }


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [PEOPLE, "name=Grace, year=1906", "nothing here"]},
        index=pd.Index(["a", "b", "c"], name="doc"),
    )


# -- build ---------------------------------------------------------------------------------------


def test_build_puts_system_on_top_and_the_key_in_x_api_key():
    request = AnthropicProvider(URL + "/", KEY).build(call())
    assert request.url == URL + "/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert "Authorization" not in request.headers
    assert request.json == {
        "model": "claude-3-5-haiku-latest",
        "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": DEFAULT_MAX_TOKENS,
    }
    json.dumps(request.json)


def test_a_base_url_with_v1_is_not_doubled():
    assert AnthropicProvider(URL + "/v1").build(call()).url == URL + "/v1/messages"


def test_no_key_no_header():
    assert "x-api-key" not in AnthropicProvider(URL).build(call()).headers


@pytest.mark.parametrize("n", [1, 2, 5])
def test_n_is_never_sent(n):
    # The API has no n (it refuses unknown fields): one request is one sample.
    assert "n" not in AnthropicProvider(URL).build(call(n=n)).json


def test_openai_named_parameters_are_translated():
    params = {
        "max_completion_tokens": 50,
        "stop": "\n\n",
        "user": "analyst-7",
        "temperature": 0.2,
        "top_k": 5,
        "extra_body": {"thinking": {"type": "disabled"}},
    }
    body = AnthropicProvider(URL).build(call(params=params)).json
    assert body["max_tokens"] == 50 and "max_completion_tokens" not in body
    assert body["stop_sequences"] == ["\n\n"] and "stop" not in body
    assert body["metadata"] == {"user_id": "analyst-7"} and "user" not in body
    assert (body["temperature"], body["top_k"]) == (0.2, 5)
    assert body["thinking"] == {"type": "disabled"} and "extra_body" not in body


def test_tools_strategy_forces_the_tool_by_name():
    body = AnthropicProvider(URL).build(call(schema=SCHEMA, strategy="tools")).json
    assert body["tools"] == [
        {
            "name": TOOL_NAME,
            "description": "Record every object found, as the items array.",
            "input_schema": SCHEMA,
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": TOOL_NAME}


def test_json_schema_strategy_uses_structured_outputs():
    body = AnthropicProvider(URL).build(call(schema=SCHEMA, strategy="json_schema")).json
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert "tools" not in body


@pytest.mark.parametrize("strategy", ["json_object", "prompt"])
def test_json_object_and_prompt_strategies_send_only_the_messages(strategy):
    # No JSON mode in the API: the plan has already put the schema in the system prompt.
    body = AnthropicProvider(URL).build(call(schema=SCHEMA, strategy=strategy)).json
    assert set(body) == {"model", "system", "messages", "max_tokens"}


def test_the_key_never_shows_in_a_repr():
    provider = AnthropicProvider("https://me:hunter2@proxy.local", KEY)
    request = provider.build(call())
    for text in (repr(provider), repr(request), str(request)):
        assert KEY not in text and "hunter2" not in text


# -- parse ---------------------------------------------------------------------------------------


def test_parse_text_blocks_and_usage():
    body = message({"type": "text", "text": "Hello"}, {"type": "text", "text": " there"})
    completion = AnthropicProvider(URL).parse(call(), body, headers())
    assert completion.texts == ("Hello there",)
    assert (completion.prompt_tokens, completion.completion_tokens) == (7, 3)


def test_prompt_tokens_include_the_prompt_cache():
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1000,
        "output_tokens": 4,
    }
    completion = AnthropicProvider(URL).parse(call(), message(usage=usage), headers())
    assert (completion.prompt_tokens, completion.completion_tokens) == (1110, 4)


def test_parse_tool_use_input_as_json_text():
    items = {"items": [{"name": "Ada", "year": 1815}]}
    body = message(
        {"type": "text", "text": "Recording."},
        {"type": "tool_use", "id": "toolu_1", "name": TOOL_NAME, "input": items},
        stop="tool_use",
    )
    completion = AnthropicProvider(URL).parse(call(schema=SCHEMA, strategy="tools"), body, {})
    assert json.loads(completion.texts[0]) == items


def test_a_structured_answer_in_text_is_read_from_the_text():
    body = message({"type": "text", "text": '{"items": []}'})
    completion = AnthropicProvider(URL).parse(call(schema=SCHEMA, strategy="json_schema"), body, {})
    assert completion.texts == ('{"items": []}',)


def test_free_text_ignores_thinking_and_tool_blocks():
    body = message(
        {"type": "thinking", "thinking": "hmm", "signature": "x"},
        {"type": "text", "text": "answer"},
        {"type": "tool_use", "id": "t", "name": "x", "input": {}},
    )
    assert AnthropicProvider(URL).parse(call(), body, {}).texts == ("answer",)


def test_an_empty_content_list_gives_no_answer():
    assert AnthropicProvider(URL).parse(call(), message(), {}).texts == ()


@pytest.mark.parametrize("body", [{"type": "message"}, {"content": None}, {"id": "msg_1"}])
def test_a_body_without_content_is_a_structured_output_error(body):
    with pytest.raises(StructuredOutputError, match="no 'content'") as info:
        AnthropicProvider(URL).parse(call(), body, {})
    assert info.value.retryable


def test_a_200_whose_body_is_an_error_is_judged_like_that_error():
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(APIError, match="Overloaded") as info:
        AnthropicProvider(URL).parse(call(), body, {})
    assert info.value.verdict == Verdict("row", True, "transient")


def test_a_refusal_is_the_rows_and_final():
    completion = AnthropicProvider(URL).parse(call(), message(stop="refusal"), {})
    (problem,) = completion.problems
    assert "declined" in problem.message and problem.verdict == Verdict("row", False, "refusal")


@pytest.mark.parametrize("kind", [{}, {"schema": SCHEMA, "strategy": "prompt"}])
def test_an_answer_cut_at_max_tokens_says_what_to_raise_it_to(kind):
    # Free text cut short is as wrong as cut JSON: a row error, never a silent success.
    body = message({"type": "text", "text": '{"items": [{"na'}, stop="max_tokens")
    completion = AnthropicProvider(URL).parse(call(params={"max_tokens": 50}, **kind), body, {})
    (problem,) = completion.problems
    assert completion.texts == () and problem.verdict == Verdict("row", False, "truncated")
    assert "pass max_tokens=100 (twice the current 50)" in problem.message


def test_without_max_tokens_the_default_is_the_one_to_raise():
    body = message({"type": "text", "text": "cut"}, stop="max_tokens")
    (problem,) = AnthropicProvider(URL).parse(call(), body, {}).problems
    assert f"max_tokens={2 * DEFAULT_MAX_TOKENS}" in problem.message


def test_an_answer_that_filled_the_context_window_is_truncated():
    body = message({"type": "text", "text": "cut"}, stop="model_context_window_exceeded")
    (problem,) = AnthropicProvider(URL).parse(call(), body, {}).problems
    assert problem.verdict == Verdict("row", False, "truncated")


@pytest.mark.parametrize(("strategy", "scope"), [("tools", "strategy"), ("json_object", "row")])
def test_a_structured_answer_with_no_json_at_all(strategy, scope):
    body = message({"type": "text", "text": "Sure! Here you go."})
    structured = call(schema=SCHEMA, strategy=strategy)
    (problem,) = AnthropicProvider(URL).parse(structured, body, {}).problems
    assert problem.verdict == Verdict(scope, True, "unstructured")


# -- errors and rate limits ----------------------------------------------------------------------


def test_error_in_anthropic_shape():
    body = {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
        "request_id": "req_1",
    }
    error = AnthropicProvider(URL).error(call(), 529, body, headers())
    assert isinstance(error, APIError)
    assert (error.status, error.code, error.message) == (529, "overloaded_error", "Overloaded")
    assert error.retryable  # 529 is in the retried 5xx range


def test_rate_limit_error_carries_retry_after():
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    error = AnthropicProvider(URL).error(call(), 429, body, headers(retry_after="7"))
    assert (error.code, error.retry_after, error.retryable) == ("rate_limit_error", 7.0, True)


def test_an_unreadable_error_body_still_gives_a_message():
    error = AnthropicProvider(URL).error(call(), 502, "<html>Bad gateway</html>", headers())
    assert "Bad gateway" in error.message


def anthropic_error(type_: str, message: str, **extra) -> dict:
    return {"type": "error", "error": {"type": type_, "message": message, **extra}}


TOOLS = {"schema": SCHEMA, "strategy": "tools"}

VERDICTS = [
    (401, anthropic_error("authentication_error", "invalid x-api-key"), {},
     "run", False, "refused"),
    (403, anthropic_error("permission_error", "Your API key does not have permission"), {},
     "run", False, "refused"),
    (402, anthropic_error("billing_error", "Payment required"), {}, "run", False, "quota"),
    (400, anthropic_error("invalid_request_error", "Your credit balance is too low to access "
                          "the Anthropic API. Please go to Plans & Billing to upgrade or "
                          "purchase credits."), {}, "run", False, "quota"),
    (429, anthropic_error("rate_limit_error", "You have reached your monthly spend limit",
                          details={"error_code": "enforced_spend_limit_reached"}), {},
     "run", False, "quota"),
    (404, anthropic_error("not_found_error", "model: claude-9"), {}, "run", False, "not_found"),
    (413, anthropic_error("request_too_large", "Request exceeds the maximum allowed number of "
                          "bytes."), {}, "row", False, "request_too_large"),
    (429, anthropic_error("rate_limit_error", "This request would exceed the rate limit"), {},
     "row", True, "rate_limited"),
    (400, anthropic_error("invalid_request_error", "prompt is too long: 210000 tokens > 200000 "
                          "maximum"), TOOLS, "row", False, "context_length"),
    (400, anthropic_error("invalid_request_error", "input length and `max_tokens` exceed "
                          "context limit: 199000 + 4096 > 200000, decrease input length or "
                          "`max_tokens` and try again"), {}, "row", False, "context_length"),
    (400, anthropic_error("invalid_request_error", "tools: tool use is not supported"), TOOLS,
     "strategy", False, "unsupported_strategy"),
    (400, anthropic_error("invalid_request_error", "output_config: Extra inputs are not "
                          "permitted"), {"schema": SCHEMA, "strategy": "json_schema"},
     "strategy", False, "unsupported_strategy"),
    (400, anthropic_error("invalid_request_error", "temperature: Input should be less than or "
                          "equal to 1"), {}, "run", False, "bad_parameter"),
    (400, anthropic_error("invalid_request_error", "messages.0.content: Input should be a valid "
                          "list"), {}, "row", False, "rejected"),
    (500, anthropic_error("api_error", "Internal server error"), {}, "row", True, "transient"),
    (529, anthropic_error("overloaded_error", "Overloaded"), {}, "row", True, "transient"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "body", "kind", "scope", "retry", "reason"), VERDICTS)
def test_the_verdict_table(status, body, kind, scope, retry, reason):
    error = AnthropicProvider(URL).error(call(**kind), status, body, headers())
    assert error.verdict == Verdict(scope, retry, reason)


def test_limits_read_rfc3339_resets_as_seconds_from_now():
    now = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    provider = AnthropicProvider(URL, clock=lambda: now)
    info = provider.limits(
        headers(
            anthropic_ratelimit_requests_limit="50",
            anthropic_ratelimit_requests_remaining="49",
            anthropic_ratelimit_requests_reset="2023-11-14T22:13:21Z",
            anthropic_ratelimit_tokens_limit="8000",
            anthropic_ratelimit_tokens_remaining="7000",
            anthropic_ratelimit_tokens_reset="2023-11-14T22:13:27.5Z",
            retry_after="3",
        )
    )
    assert (info.limit_requests, info.remaining_requests) == (50, 49)
    assert info.reset_requests == pytest.approx(1.0)
    assert (info.limit_tokens, info.remaining_tokens) == (8000, 7000)
    assert info.reset_tokens == pytest.approx(7.5)
    assert info.retry_after == 3.0


def test_the_tightest_token_limit_is_used():
    now = 1_700_000_000.0
    info = AnthropicProvider(URL, clock=lambda: now).limits(
        headers(
            anthropic_ratelimit_input_tokens_limit="30000",
            anthropic_ratelimit_input_tokens_remaining="29000",
            anthropic_ratelimit_input_tokens_reset="2023-11-14T22:13:22Z",
            anthropic_ratelimit_output_tokens_limit="8000",
            anthropic_ratelimit_output_tokens_remaining="0",
            anthropic_ratelimit_output_tokens_reset="2023-11-14T22:13:30Z",
        )
    )
    assert (info.limit_tokens, info.remaining_tokens) == (8000, 0)
    assert info.reset_tokens == pytest.approx(10.0)  # the reset of the exhausted bucket
    assert info.wait_after_429() == pytest.approx(10.0)


def test_no_or_unreadable_limit_headers_give_empty_limits():
    provider = AnthropicProvider(URL)
    assert provider.limits(headers()).empty
    junk = headers(
        anthropic_ratelimit_requests_limit="many",
        anthropic_ratelimit_requests_reset="6m0s",
        anthropic_ratelimit_tokens_reset="soon",
    )
    assert provider.limits(junk).empty


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1970-01-01T00:01:00Z", 30.0),
        ("1970-01-01T00:01:00z", 30.0),
        ("1970-01-01T00:00:40.123456789Z", 10.123456789),  # more digits than fromisoformat reads
        ("1970-01-01T01:01:00+01:00", 30.0),
        ("1970-01-01T00:01:00+0000", 30.0),
        ("1970-01-01T00:00:00Z", 0.0),  # in the past: no wait, never negative
    ],
)
def test_parse_reset_time(value, seconds):
    assert parse_reset_time(value, now=30.0) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "30", "6m0s", "1970-13-01T00:00:00Z", "tomorrow"])
def test_parse_reset_time_refuses_what_is_not_a_timestamp(value):
    assert parse_reset_time(value, now=0.0) is None


# -- configuration -------------------------------------------------------------------------------


def test_environment_as_anthropics_sdk_reads_it(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://gateway.example.com/anthropic/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-must-not-travel")
    config = RunConfig.from_options(provider="anthropic", model="claude-sonnet-4-5")
    assert config.provider == "anthropic"
    assert config.api_key == KEY  # never the OpenAI key
    assert config.base_url == "https://gateway.example.com/anthropic"
    assert isinstance(provider_for(config), AnthropicProvider)
    assert KEY not in repr(config)


def test_default_base_url_is_anthropics(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    config = RunConfig.from_options(provider="anthropic", model="claude-sonnet-4-5")
    assert config.base_url == "https://api.anthropic.com"
    assert provider_for(config).build(call()).url == "https://api.anthropic.com/v1/messages"


def test_a_claude_model_implies_anthropic(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    assert RunConfig.from_options(model="claude-3-5-haiku-latest").provider == "anthropic"


def test_a_base_url_or_an_explicit_provider_says_otherwise(monkeypatch):
    # An OpenAI-compatible gateway serving Claude models.
    gateway = RunConfig.from_options(model="claude-3-5-haiku", base_url="http://127.0.0.1:4000/v1")
    assert gateway.provider == "openai" and gateway.base_url.endswith("/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://gateway.example.com/v1")
    assert RunConfig.from_options(model="claude-x", provider="openai").provider == "openai"
    monkeypatch.setenv("PARROT_PANDAS_PROVIDER", "openai")
    assert RunConfig.from_options(model="claude-x").provider == "openai"
    # (provider="openai" on OpenAI's own URL is refused: see test_config.py.)


def test_a_missing_key_fails_before_any_request_naming_the_variable():
    with pytest.raises(ConfigurationError, match="ANTHROPIC_API_KEY") as info:
        RunConfig.from_options(model="claude-3-5-haiku-latest")
    assert "provider='openai'" in str(info.value)  # how to use a gateway instead
    # An estimate sends nothing and needs no key; a local server may need none either.
    RunConfig.from_options(model="claude-3-5-haiku-latest", need_key=False)
    RunConfig.from_options(provider="anthropic", model="m", base_url=URL)


def test_base_url_with_v1_is_forgiven():
    config = RunConfig.from_options(provider="anthropic", model="m", base_url=URL + "/v1/")
    assert config.base_url == URL


def test_max_tokens_defaults_and_translations_are_in_the_config():
    config = RunConfig.from_options(provider="anthropic", model="m", base_url=URL)
    assert config.request_params == {"max_tokens": DEFAULT_MAX_TOKENS}
    assert config.max_output_tokens == DEFAULT_MAX_TOKENS  # the budget counts it
    config = RunConfig.from_options(
        provider="anthropic", model="m", base_url=URL, max_completion_tokens=64
    )
    assert config.request_params == {"max_tokens": 64}
    with pytest.raises(ConfigurationError, match="not both"):
        RunConfig.from_options(
            provider="anthropic", model="m", base_url=URL, max_tokens=1, max_completion_tokens=2
        )


@pytest.mark.parametrize("name", ["seed", "presence_penalty", "logit_bias", "reasoning_effort"])
def test_openai_only_parameters_are_refused_before_any_request(name):
    with pytest.raises(ConfigurationError, match=f"{name} not supported.*extra_body"):
        RunConfig.from_options(provider="anthropic", model="m", base_url=URL, **{name: 1})


def test_one_sample_per_request():
    anthropic = RunConfig.from_options(provider="anthropic", model="m", base_url=URL)
    openai = RunConfig.from_options(model="m", base_url=URL + "/v1")
    assert (anthropic.samples_per_request, openai.samples_per_request) == (1, None)


def test_unknown_provider_names_the_valid_ones():
    with pytest.raises(ConfigurationError, match=r"did you mean 'anthropic'"):
        RunConfig.from_options(provider="antropic", base_url=URL)
    with pytest.raises(ConfigurationError, match="api_version= applies to provider='azure'"):
        RunConfig.from_options(provider="anthropic", base_url=URL, api_version="2024-10-21")


# -- the test server answers Anthropic's own SDK -------------------------------------------------


@pytest.fixture
def sdk_server() -> Iterator[FakeServer]:
    with FakeServer(api_key=KEY) as server:
        yield server


@pytest.fixture
def sdk(sdk_server: FakeServer):
    anthropic = pytest.importorskip("anthropic")
    return anthropic.Anthropic(base_url=sdk_server.origin, api_key=KEY, max_retries=0)


def test_sdk_messages_create_without_tools(sdk, sdk_server):
    response = sdk.messages.with_raw_response.create(
        model="claude-3-5-haiku-latest",
        max_tokens=100,
        system="be brief",
        messages=[{"role": "user", "content": "hello"}],
    )
    reply = response.parse()
    assert reply.type == "message" and reply.role == "assistant"
    assert [block.type for block in reply.content] == ["text"]
    assert reply.content[0].text == "echo: hello"
    assert reply.stop_reason == "end_turn"
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    assert response.headers["request-id"].startswith("req_")
    assert sdk_server.stats()["ok"] == 1


def test_sdk_messages_create_with_a_forced_tool(sdk):
    reply = sdk.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=200,
        messages=[{"role": "user", "content": PEOPLE}],
        tools=[{"name": "record", "description": "people", "input_schema": SCHEMA}],
        tool_choice={"type": "tool", "name": "record"},
    )
    (block,) = reply.content
    assert block.type == "tool_use" and block.name == "record" and block.id.startswith("toolu_")
    assert block.input == {"items": [{"name": "Ada", "year": 1815}, {"name": "Alan", "year": 1912}]}
    assert reply.stop_reason == "tool_use"


def test_sdk_messages_create_with_structured_outputs(sdk):
    reply = sdk.messages.create(
        model="claude-haiku-4-5",
        max_tokens=200,
        messages=[{"role": "user", "content": "name=Ada, year=1815"}],
        output_config={"format": {"type": "json_schema", "schema": SCHEMA}},
    )
    assert json.loads(reply.content[0].text) == {"items": [{"name": "Ada", "year": 1815}]}


def test_sdk_sees_anthropic_errors():
    anthropic = pytest.importorskip("anthropic")
    with FakeServer(api_key=KEY, fail_rate=1.0, models=["claude-known"]) as server:
        wrong = anthropic.Anthropic(base_url=server.origin, api_key="sk-wrong", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as info:
            wrong.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert info.value.body["error"]["type"] == "authentication_error"
        client = anthropic.Anthropic(base_url=server.origin, api_key=KEY, max_retries=0)
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        kwargs = dict(
            model="claude-known", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
        with pytest.raises(anthropic.InternalServerError) as first:
            client.messages.create(**kwargs)
        with pytest.raises(anthropic.OverloadedError) as second:
            client.messages.create(**kwargs)
        assert first.value.status_code == 500 and second.value.status_code == 529
        assert second.value.body["error"]["type"] == "overloaded_error"


def test_sdk_sees_a_429_with_retry_after_and_rate_limit_headers():
    anthropic = pytest.importorskip("anthropic")
    with FakeServer(rpm=60) as server:  # a bucket of one request
        client = anthropic.Anthropic(base_url=server.origin, api_key="x", max_retries=0)
        kwargs = dict(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        client.messages.create(**kwargs)
        with pytest.raises(anthropic.RateLimitError) as info:
            client.messages.create(**kwargs)
    response = info.value.response
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert parse_reset_time(response.headers["anthropic-ratelimit-requests-reset"], 0.0)


async def post_messages(server: FakeServer, body: object, **extra_headers: str):
    request_headers = {"x-api-key": KEY, "anthropic-version": ANTHROPIC_VERSION, **extra_headers}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.origin}/v1/messages", json=body, headers=request_headers
        ) as response:
            return response.status, await response.json()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens: Field"),
        ({"model": "m", "max_tokens": 5, "n": 2, "messages": []}, "n: Extra inputs"),
        (
            {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
            "top-level `system`",
        ),
    ],
)
async def test_the_route_refuses_what_the_api_refuses(body, message):
    async with FakeServer(api_key=KEY) as server:
        status, data = await post_messages(server, body)
    assert status == 400 and data["type"] == "error"
    assert data["error"]["type"] == "invalid_request_error" and message in data["error"]["message"]


async def test_the_route_needs_the_version_header_and_the_key():
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    async with FakeServer(api_key=KEY) as server:
        status, data = await post_messages(server, body, **{"anthropic-version": ""})
        assert status == 400 and "anthropic-version" in data["error"]["message"]
        status, data = await post_messages(server, body, **{"x-api-key": "sk-nope"})
        assert status == 401 and "sk-nope" not in json.dumps(data)


# -- whole runs through df.llm -------------------------------------------------------------------


def run_options(server: FakeServer, **options) -> dict:
    return {
        "provider": "anthropic",
        "model": "claude-3-5-haiku-latest",
        "base_url": server.origin,
        "api_key": KEY,
        "progress": False,
        **options,
    }


def test_generate_end_to_end(sdk_server):
    out = frame().llm.generate("${text}", system="Echo it.", **run_options(sdk_server))
    assert list(out["output"]) == [f"echo: {t}" for t in frame()["text"]]
    assert list(out.index) == ["a", "b", "c"]
    facts = out.attrs["llm"]
    assert facts["requests"] == 3 and facts["prompt_tokens"] > 0
    assert facts["cost"] is not None  # a Claude price is known


def test_n_samples_are_several_requests(sdk_server):
    out = frame().iloc[:2].llm.generate("${text}", n=2, **run_options(sdk_server))
    # Two requests per row, each one answer; the server alternates them, so two distinct rows.
    assert sdk_server.stats()["requests"] == 4
    assert list(out.index) == ["a", "a", "b", "b"]
    assert out["output"].str.startswith("echo (alt)").tolist() == [False, True, False, True]
    assert out.attrs["llm"]["requests"] == 4


def test_extract_with_a_forced_tool_is_typed(sdk_server):
    out = frame().llm.extract(
        "${text}", fields={"name": str, "year": int}, **run_options(sdk_server)
    )
    assert out.attrs["llm"]["strategy"] == "tools"
    assert list(out.index) == ["a", "a", "b", "c"]
    assert out["name"].tolist()[:3] == ["Ada", "Alan", "Grace"]
    assert str(out["year"].dtype) == "Int64" and out["year"].tolist()[:3] == [1815, 1912, 1906]
    assert out.loc["c", "name"] is pd.NA


@pytest.mark.parametrize("strategy", ["json_schema", "json_object", "prompt"])
def test_extract_with_every_other_strategy(sdk_server, strategy):
    out = frame().llm.extract(
        "${text}", fields={"name": str, "year": int}, structured=strategy, **run_options(sdk_server)
    )
    assert out["name"].tolist()[:3] == ["Ada", "Alan", "Grace"]
    assert out.attrs["llm"]["strategy"] == strategy


def test_auto_falls_back_when_tools_and_structured_outputs_are_refused(server_factory):
    server = server_factory(supports_tools=False, supports_json_schema=False)
    out = frame().llm.extract("${text}", fields={"name": str, "year": int}, **run_options(server))
    assert out.attrs["llm"]["strategy"] == "json_object"
    assert out["year"].tolist()[:3] == [1815, 1912, 1906]


def test_529_overloaded_is_retried(server_factory):
    server = server_factory(fail_rate=0.5, seed=3)
    out = frame().llm.generate("${text}", max_retries=10, **run_options(server))
    assert out["output"].notna().all()
    assert server.stats()["failed"] > 0 and out.attrs["llm"]["retries"] > 0


def test_a_bad_key_fails_at_once_without_showing_it(sdk_server, caplog):
    caplog.set_level(logging.DEBUG, logger="parrot_pandas")
    options = run_options(sdk_server, api_key="sk-ant-wrong-key-123456")
    with pytest.raises(APIError, match="invalid x-api-key") as info:
        frame().llm.generate("${text}", **options)
    assert info.value.status == 401 and sdk_server.stats()["requests"] == 1
    assert "sk-ant-wrong-key-123456" not in str(info.value) + caplog.text


def test_the_key_never_leaks(server_factory, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG, logger="parrot_pandas")
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)  # read from the environment, as the SDK does
    server = server_factory(api_key=KEY, context_window=500)
    cache = tmp_path / "cache.sqlite3"
    options = run_options(server, cache=str(cache), errors="coerce")
    del options["api_key"]
    long = pd.DataFrame({"text": ["x" * 4000]}, index=pd.Index(["long"], name="doc"))
    out = pd.concat([frame(), long]).llm.generate("${text}", max_tokens=20, **options)
    assert out.loc["long", "llm_error"].startswith("HTTP 400: prompt is too long")
    assert out["output"].notna().sum() == 3
    config = RunConfig.from_options(**options)
    seen = [caplog.text, repr(out.attrs), repr(config), repr(provider_for(config)), out.to_csv()]
    assert all(KEY not in text for text in seen)
    assert KEY.encode() not in cache.read_bytes()


def test_a_second_run_is_served_from_the_cache(sdk_server, tmp_path):
    options = run_options(sdk_server, cache=str(tmp_path / "c.sqlite3"))
    first = frame().llm.generate("${text}", **options)
    sent = sdk_server.stats()["requests"]
    second = frame().llm.generate("${text}", **options)
    assert sdk_server.stats()["requests"] == sent
    assert second.attrs["llm"]["cached_rows"] == 3
    pd.testing.assert_series_equal(first["output"], second["output"])


def test_row_errors_raise_with_the_partial_result(server_factory):
    server = server_factory(context_window=100)
    frame_ = pd.DataFrame({"text": ["short", "y" * 2000]})
    with pytest.raises(RowsFailedError) as info:
        frame_.llm.generate("${text}", max_tokens=10, **run_options(server))
    assert info.value.result.loc[0, "output"] == "echo: short"
    assert "prompt is too long" in info.value.errors[1]


# -- a 429 with Anthropic's headers pauses the whole budget (fake clock: no real waiting) --------


async def test_a_429_pauses_the_budget_for_retry_after(fake_clock, recording_budget):
    async with FakeServer(rpm=60, clock=fake_clock) as server:  # one request per second
        # Another client of the same key takes the only request the server has right now.
        status, _ = await post_messages(
            server, {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "q"}]}
        )
        assert status == 200
        config = RunConfig.from_options(**run_options(server, cache=False, max_concurrency=2), n=1)
        budget = recording_budget()
        start = fake_clock()
        async with Client(provider_for(config), secret=KEY) as client:
            scheduler = Scheduler(
                RequestPlan(config), client, budget, clock=fake_clock, sleep=fake_clock.sleep
            )
            outcome = await scheduler.run(iter(["a", "b", "c"]), rows=3)
        stats = server.stats()
    assert [job.values for job in outcome] == [["echo: a"], ["echo: b"], ["echo: c"]]
    assert stats["rate_limited"] >= 1
    assert budget.pauses[0] == pytest.approx(1.0)  # retry-after, in seconds
    assert budget.rpm == 60  # learnt from anthropic-ratelimit-requests-limit
    assert fake_clock() - start >= 1.0  # the run waited (on the fake clock), not hammered
