"""Tests for parrot_pandas.providers.openai: payloads, response parsing, errors, rate limits."""

from __future__ import annotations

import json

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from parrot_pandas._config import RunConfig
from parrot_pandas._limits import LimitInfo
from parrot_pandas.errors import APIError, StructuredOutputError
from parrot_pandas.providers import Call, Completion, OpenAIProvider, provider_for
from parrot_pandas.providers.openai import TOOL_NAME

KEY = "sk-test-0123456789abcdef"
URL = "http://127.0.0.1:8080/v1"
MESSAGES = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "object"}}},
    "required": ["items"],
}


def call(**kwargs) -> Call:
    kwargs.setdefault("model", "m")
    kwargs.setdefault("messages", MESSAGES)
    return Call(**kwargs)


def headers(**values: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def response(*messages: dict, usage: object = None) -> dict:
    body: dict = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": i, "message": {"role": "assistant", **m}, "finish_reason": "stop"}
            for i, m in enumerate(messages)
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


# -- build --------------------------------------------------------------------------------------


def test_build_a_plain_request():
    request = OpenAIProvider(URL + "/", KEY).build(call())
    assert request.url == URL + "/chat/completions"
    assert request.json == {"model": "m", "messages": list(MESSAGES)}
    assert request.headers["Content-Type"] == "application/json"
    json.dumps(request.json)  # the body is JSON as it is


@pytest.mark.parametrize(("n", "sent"), [(1, None), (2, 2), (5, 5)])
def test_n_is_sent_only_when_not_one(n, sent):
    assert OpenAIProvider(URL).build(call(n=n)).json.get("n") == sent


def test_params_pass_through_and_extra_body_is_merged():
    params = {
        "temperature": 0.2,
        "seed": 7,
        "stop": ["\n"],
        "extra_body": {"top_k": 3, "min_p": 0.1},
    }
    body = OpenAIProvider(URL).build(call(params=params)).json
    assert body == {
        "model": "m",
        "messages": list(MESSAGES),
        "temperature": 0.2,
        "seed": 7,
        "stop": ["\n"],
        "top_k": 3,
        "min_p": 0.1,
    }
    assert "extra_body" in params  # the caller's mapping is not consumed


def test_extra_body_wins_over_everything_else():
    body = (
        OpenAIProvider(URL)
        .build(call(params={"temperature": 1, "extra_body": {"temperature": 0}}))
        .json
    )
    assert body["temperature"] == 0


def test_authorization_only_with_a_key():
    assert OpenAIProvider(URL, KEY).build(call()).headers["Authorization"] == f"Bearer {KEY}"
    for key in (None, ""):
        assert "Authorization" not in OpenAIProvider(URL, key).build(call()).headers


def test_tools_strategy_forces_one_function_call():
    body = OpenAIProvider(URL).build(call(schema=SCHEMA, strategy="tools")).json
    (tool,) = body["tools"]
    assert tool["type"] == "function"
    assert tool["function"]["name"] == TOOL_NAME
    assert tool["function"]["parameters"] == SCHEMA
    assert body["tool_choice"] == {"type": "function", "function": {"name": TOOL_NAME}}
    assert "response_format" not in body


def test_json_schema_strategy_asks_for_a_strict_response_format():
    body = OpenAIProvider(URL).build(call(schema=SCHEMA, strategy="json_schema")).json
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": TOOL_NAME, "schema": SCHEMA, "strict": True},
    }
    assert "tools" not in body


def test_json_object_strategy():
    body = OpenAIProvider(URL).build(call(schema=SCHEMA, strategy="json_object")).json
    assert body["response_format"] == {"type": "json_object"}


@pytest.mark.parametrize("strategy", ["prompt", None])
def test_prompt_strategy_and_free_text_add_nothing(strategy):
    body = OpenAIProvider(URL).build(call(schema=SCHEMA, strategy=strategy)).json
    assert set(body) == {"model", "messages"}
    assert set(OpenAIProvider(URL).build(call(strategy="tools")).json) == {"model", "messages"}


def test_the_request_repr_never_shows_the_key_or_a_url_password():
    provider = OpenAIProvider("https://me:hunter2@proxy.local/v1", KEY)
    request = provider.build(call())
    for text in (repr(request), str(request), repr(provider)):
        assert KEY not in text and "hunter2" not in text
    assert "proxy.local/v1/chat/completions" in repr(request)


def test_provider_for_a_config():
    config = RunConfig.from_options(base_url=URL, api_key=KEY)
    provider = provider_for(config)
    assert isinstance(provider, OpenAIProvider)
    assert provider.build(call()).headers["Authorization"] == f"Bearer {KEY}"


# -- parse --------------------------------------------------------------------------------------


def test_parse_content_and_usage():
    body = response(
        {"content": "one"}, {"content": "two"}, usage={"prompt_tokens": 12, "completion_tokens": 5}
    )
    completion = OpenAIProvider(URL).parse(call(n=2), body, headers())
    assert completion == Completion(texts=("one", "two"), prompt_tokens=12, completion_tokens=5)


@pytest.mark.parametrize(
    "usage", [None, {}, "n/a", {"prompt_tokens": None, "completion_tokens": "x"}]
)
def test_parse_without_usable_usage_counts_zero(usage):
    body = response({"content": "x"})
    body["usage"] = usage
    completion = OpenAIProvider(URL).parse(call(), body, headers())
    assert (completion.texts, completion.prompt_tokens, completion.completion_tokens) == (
        ("x",),
        0,
        0,
    )


def test_parse_reads_rate_limit_headers():
    completion = OpenAIProvider(URL).parse(
        call(), response({"content": "x"}), headers(x_ratelimit_remaining_requests="9")
    )
    assert completion.limits.remaining_requests == 9


def test_parse_tool_call_arguments():
    arguments = '{"items": [{"q": "a"}]}'
    message = {
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": arguments},
            }
        ],
    }
    structured = call(schema=SCHEMA, strategy="tools")
    assert OpenAIProvider(URL).parse(structured, response(message), headers()).texts == (arguments,)


def test_parse_tool_call_arguments_sent_as_an_object():
    message = {
        "tool_calls": [{"function": {"name": TOOL_NAME, "arguments": {"items": [{"q": "a"}]}}}]
    }
    structured = call(schema=SCHEMA, strategy="tools")
    (text,) = OpenAIProvider(URL).parse(structured, response(message), headers()).texts
    assert json.loads(text) == {"items": [{"q": "a"}]}


def test_a_structured_call_falls_back_to_content_when_there_is_no_tool_call():
    structured = call(schema=SCHEMA, strategy="json_schema")
    body = response({"content": '{"items": []}', "tool_calls": []})
    assert OpenAIProvider(URL).parse(structured, body, headers()).texts == ('{"items": []}',)


def test_a_free_text_call_ignores_tool_calls():
    message = {"content": "plain", "tool_calls": [{"function": {"arguments": "{}"}}]}
    assert OpenAIProvider(URL).parse(call(), response(message), headers()).texts == ("plain",)


def test_parse_content_parts():
    parts = [
        {"type": "text", "text": "Hello, "},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": None},
        "junk",
        {"type": "text", "text": "world"},
    ]
    assert OpenAIProvider(URL).parse(call(), response({"content": parts}), headers()).texts == (
        "Hello, world",
    )


def test_choices_without_an_answer_are_left_out():
    body = response({"content": None, "refusal": "I can't"}, {"content": "ok"})
    body["choices"].append({"index": 2})
    body["choices"].append("junk")
    assert OpenAIProvider(URL).parse(call(n=4), body, headers()).texts == ("ok",)


def test_an_empty_string_answer_is_an_answer():
    assert OpenAIProvider(URL).parse(call(), response({"content": ""}), headers()).texts == ("",)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"id": "x"}, "{'id': 'x'}"),
        ({"choices": None}, "'choices': None"),  # vLLM under load
        ({"choices": "nope"}, "nope"),
        ([{"choices": []}], "[{'choices': []}]"),
        ({"error": {"message": "context too long"}}, "the server said: context too long"),
    ],
)
def test_a_body_without_choices_is_a_structured_output_error(body, detail):
    with pytest.raises(StructuredOutputError, match="response has no 'choices'") as info:
        OpenAIProvider(URL).parse(call(), body, headers())
    assert detail in str(info.value)
    assert info.value.retryable


# -- error --------------------------------------------------------------------------------------


def test_error_in_openai_shape():
    body = {
        "error": {
            "message": "Incorrect API key provided: sk-proj-****abcd.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    error = OpenAIProvider(URL).error(401, body, headers())
    assert isinstance(error, APIError)
    assert (error.status, error.code, error.retry_after) == (401, "invalid_api_key", None)
    assert error.message == "Incorrect API key provided: sk-proj-****abcd."
    assert str(error) == "HTTP 401: Incorrect API key provided: sk-proj-****abcd."
    assert not error.retryable


def test_error_without_a_code_uses_the_type():
    body = {"error": {"message": "slow down", "type": "requests", "code": None}}
    assert OpenAIProvider(URL).error(429, body, headers()).code == "requests"


@pytest.mark.parametrize(
    "body",
    [
        # vLLM before and after it moved to OpenAI's shape: `code` is the HTTP status there.
        {
            "object": "error",
            "message": "maximum context length is 2048",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        },
        {
            "error": {
                "message": "maximum context length is 2048",
                "type": "BadRequestError",
                "code": 400,
            }
        },
    ],
)
def test_error_in_vllm_shape(body):
    error = OpenAIProvider(URL).error(400, body, headers())
    assert (error.message, error.code, error.status) == (
        "maximum context length is 2048",
        "BadRequestError",
        400,
    )


def test_error_as_a_string_field():  # Ollama
    error = OpenAIProvider(URL).error(404, {"error": "model 'llama9' not found"}, headers())
    assert (error.message, error.code) == ("model 'llama9' not found", None)


def test_error_as_a_fastapi_detail():  # a base_url without /v1 on a FastAPI server
    assert OpenAIProvider(URL).error(404, {"detail": "Not Found"}, headers()).message == "Not Found"


def test_error_with_a_plain_text_body():
    error = OpenAIProvider(URL).error(502, "  <html>Bad Gateway</html>\n", headers())
    assert error.message == "<html>Bad Gateway</html>"
    assert error.retryable
    long = OpenAIProvider(URL).error(500, "x" * 2000, headers())
    assert len(long.message) == 500


@pytest.mark.parametrize("body", [None, "", {}, {"error": {}}, [1, 2], 42])
def test_error_without_a_message_says_so(body):
    error = OpenAIProvider(URL).error(503, body, headers())
    assert error.message == "the server answered HTTP 503 with no error message"
    assert error.status == 503


def test_error_carries_retry_after():
    assert OpenAIProvider(URL).error(429, {}, headers(retry_after="3")).retry_after == 3.0
    assert OpenAIProvider(URL).error(429, {}, headers(retry_after_ms="250")).retry_after == 0.25


# -- limits ---------------------------------------------------------------------------------------


def test_limits_from_openai_headers():
    info = OpenAIProvider(URL).limits(
        headers(
            x_ratelimit_limit_requests="500",
            x_ratelimit_limit_tokens="200000",
            x_ratelimit_remaining_requests="499",
            x_ratelimit_remaining_tokens="199000",
            x_ratelimit_reset_requests="20ms",
            x_ratelimit_reset_tokens="6m0s",
        )
    )
    assert info == LimitInfo(
        limit_requests=500,
        limit_tokens=200000,
        remaining_requests=499,
        remaining_tokens=199000,
        reset_requests=pytest.approx(0.02),
        reset_tokens=360.0,
    )


def test_limits_are_read_whatever_the_header_case():
    info = OpenAIProvider(URL).limits(
        headers(**{"X-RateLimit-Reset-Tokens": "1.5s", "Retry-After-Ms": "20"})
    )
    assert info.reset_tokens == 1.5
    assert info.retry_after == pytest.approx(0.02)


def test_retry_after_ms_wins_over_retry_after():
    assert (
        OpenAIProvider(URL).limits(headers(retry_after="2", retry_after_ms="1500")).retry_after
        == 1.5
    )


def test_no_limit_headers_give_empty_limits():
    assert OpenAIProvider(URL).limits(headers(content_type="application/json")).empty


@pytest.mark.parametrize("junk", ["", "abc", "nan", "inf", "-inf", "1e999", "6 minutes"])
def test_unreadable_limit_headers_are_ignored(junk):
    info = OpenAIProvider(URL).limits(
        headers(x_ratelimit_limit_requests=junk, x_ratelimit_reset_tokens=junk, retry_after=junk)
    )
    assert info.limit_requests is None
    assert info.reset_tokens is None


def test_fractional_counts_are_truncated():
    assert (
        OpenAIProvider(URL).limits(headers(x_ratelimit_remaining_tokens="12.7")).remaining_tokens
        == 12
    )
