"""Tests for parrot_pandas.providers.openai: payloads, response parsing, errors, rate limits."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from parrot_pandas._config import RunConfig
from parrot_pandas._limits import LimitInfo
from parrot_pandas.errors import APIError, StructuredOutputError, Verdict
from parrot_pandas.providers import Call, Completion, OpenAIProvider, provider_for
from parrot_pandas.providers.anthropic import AnthropicProvider
from parrot_pandas.providers.azure import AzureOpenAIProvider
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
    completion = OpenAIProvider(URL).parse(call(n=4), body, headers())
    assert completion.texts == ("ok",)
    (refused,) = completion.problems  # the model's refusal is that row's, and final
    assert refused.verdict == Verdict("row", False, "refusal") and "I can't" in refused.message


def test_an_empty_string_answer_is_an_answer():
    assert OpenAIProvider(URL).parse(call(), response({"content": ""}), headers()).texts == ("",)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"id": "x"}, "{'id': 'x'}"),
        ({"choices": None}, "'choices': None"),  # vLLM under load
        ({"choices": "nope"}, "nope"),
        ([{"choices": []}], "[{'choices': []}]"),
    ],
)
def test_a_body_without_choices_is_a_structured_output_error(body, detail):
    with pytest.raises(StructuredOutputError, match="response has no 'choices'") as info:
        OpenAIProvider(URL).parse(call(), body, headers())
    assert detail in str(info.value)
    assert info.value.retryable


@pytest.mark.parametrize(
    ("body", "status", "verdict"),
    [
        # vLLM: a 200 whose body is the error, with the status inside.
        (
            {"error": {"message": "maximum context length is 2048", "code": 400}},
            400,
            Verdict("row", False, "context_length"),
        ),
        (
            {"error": {"message": "Incorrect API key", "code": "invalid_api_key"}},
            None,
            Verdict("run", False, "refused"),
        ),
        ({"error": {"message": "something broke"}}, None, Verdict("row", True, "transient")),
    ],
)
def test_a_200_whose_body_is_an_error_is_judged_like_that_error(body, status, verdict):
    with pytest.raises(APIError, match="answered 200 with an error") as info:
        OpenAIProvider(URL).parse(call(), body, headers(retry_after="2"))
    assert (info.value.status, info.value.verdict) == (status, verdict)
    assert info.value.limits.retry_after == 2.0


# -- finish_reason ------------------------------------------------------------------------------


def choice(finish: str, **message) -> dict:
    body = response({"content": "cut her", **message})
    body["choices"][0]["finish_reason"] = finish
    return body


@pytest.mark.parametrize(
    ("params", "fix"),
    [
        ({"max_tokens": 100}, "pass max_tokens=200 (twice the current 100)"),
        ({"max_completion_tokens": 64}, "pass max_completion_tokens=128 (twice the current 64)"),
        ({}, "no max_tokens was set"),
    ],
)
def test_an_answer_cut_at_max_tokens_is_a_row_error_that_says_what_to_raise(params, fix):
    completion = OpenAIProvider(URL).parse(call(params=params), choice("length"), headers())
    assert completion.texts == ()  # never a silent success
    (problem,) = completion.problems
    assert problem.verdict == Verdict("row", False, "truncated")
    assert "finish_reason 'length'" in problem.message and fix in problem.message


def test_a_structured_answer_cut_at_max_tokens_is_a_truncation_not_invalid_json():
    structured = call(schema=SCHEMA, strategy="json_schema", params={"max_tokens": 8})
    body = choice("length", content='{"items": [{"na')
    (problem,) = OpenAIProvider(URL).parse(structured, body, headers()).problems
    assert problem.verdict.reason == "truncated" and not problem.retryable


def test_an_answer_withheld_by_the_content_filter_is_the_rows_and_final():
    body = choice("content_filter", content=None)
    (problem,) = OpenAIProvider(URL).parse(call(), body, headers()).problems
    assert problem.verdict == Verdict("row", False, "content_filter")


@pytest.mark.parametrize("finish", ["stop", "tool_calls", "function_call", None])
def test_an_answer_that_ended_on_its_own_is_whole(finish):
    completion = OpenAIProvider(URL).parse(call(), choice(finish), headers())
    assert completion.texts == ("cut her",) and completion.problems == ()


@pytest.mark.parametrize(
    ("strategy", "scope"),
    [("tools", "strategy"), ("json_schema", "strategy"), ("json_object", "strategy"),
     ("prompt", "row")],
)  # fmt: skip
def test_a_structured_answer_with_no_json_at_all(strategy, scope):
    # A server that ignores the tool or response format answers in prose: with a parameter
    # sent, that is the strategy's verdict (the setup request falls back); without, the row's.
    body = response({"content": "Sure! Here you go."})
    structured = call(schema=SCHEMA, strategy=strategy)
    (problem,) = OpenAIProvider(URL).parse(structured, body, headers()).problems
    assert problem.verdict == Verdict(scope, True, "unstructured")
    assert OpenAIProvider(URL).parse(structured, response({"content": "[]"}), headers()).texts


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
    error = OpenAIProvider(URL).error(call(), 401, body, headers())
    assert isinstance(error, APIError)
    assert (error.status, error.code, error.retry_after) == (401, "invalid_api_key", None)
    assert error.message == "Incorrect API key provided: sk-proj-****abcd."
    assert str(error) == "HTTP 401: Incorrect API key provided: sk-proj-****abcd."
    assert not error.retryable


def test_error_without_a_code_uses_the_type():
    body = {"error": {"message": "slow down", "type": "requests", "code": None}}
    assert OpenAIProvider(URL).error(call(), 429, body, headers()).code == "requests"


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
    error = OpenAIProvider(URL).error(call(), 400, body, headers())
    assert (error.message, error.code, error.status) == (
        "maximum context length is 2048",
        "BadRequestError",
        400,
    )


def test_error_as_a_string_field():  # Ollama
    error = OpenAIProvider(URL).error(call(), 404, {"error": "model 'llama9' not found"}, headers())
    assert (error.message, error.code) == ("model 'llama9' not found", None)


def test_error_as_a_fastapi_detail():  # a base_url without /v1 on a FastAPI server
    assert (
        OpenAIProvider(URL).error(call(), 404, {"detail": "Not Found"}, headers()).message
        == "Not Found"
    )


def test_error_with_a_plain_text_body():
    error = OpenAIProvider(URL).error(call(), 502, "  <html>Bad Gateway</html>\n", headers())
    assert error.message == "<html>Bad Gateway</html>"
    assert error.retryable
    long = OpenAIProvider(URL).error(call(), 500, "x" * 2000, headers())
    assert len(long.message) == 500


@pytest.mark.parametrize("body", [None, "", {}, {"error": {}}, [1, 2], 42])
def test_error_without_a_message_says_so(body):
    error = OpenAIProvider(URL).error(call(), 503, body, headers())
    assert error.message == "the server answered HTTP 503 with no error message"
    assert error.status == 503


def test_error_carries_retry_after():
    assert OpenAIProvider(URL).error(call(), 429, {}, headers(retry_after="3")).retry_after == 3.0
    assert (
        OpenAIProvider(URL).error(call(), 429, {}, headers(retry_after_ms="250")).retry_after
        == 0.25
    )


# -- the verdict table --------------------------------------------------------------------------


def openai_error(message: str, type_: str = "invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


TOO_LARGE = (
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, "
    "Requested 45000. The input or output tokens must be reduced in order to run successfully. "
    "Visit https://platform.openai.com/account/rate-limits to learn more."
)
CONTEXT_WITH_FUNCTIONS = (
    "This model's maximum context length is 8192 tokens. However, your messages resulted in "
    "9000 tokens (8800 in the messages, 200 in the functions). Please reduce the length of the "
    "messages or functions."
)
LLAMA_CPP_CONTEXT = {
    "error": {
        "code": 400,
        "message": "request (4476 tokens) exceeds the available context size (4096 tokens), "
        "try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 4476,
        "n_ctx": 4096,
    }
}
TOOLS = {"schema": SCHEMA, "strategy": "tools"}
JSON_SCHEMA = {"schema": SCHEMA, "strategy": "json_schema"}

VERDICTS = [
    # (status, body, call, scope, retry, reason)
    (401, openai_error("Incorrect API key provided: sk-...abcd.", code="invalid_api_key"), {},
     "run", False, "refused"),
    (403, openai_error("Project does not have access to model `gpt-5`"), {},
     "run", False, "refused"),
    (404, openai_error("The model `gpt-9` does not exist or you do not have access to it.",
                       code="model_not_found"), {}, "run", False, "not_found"),
    (404, openai_error("Invalid URL (POST /v1/chat/completion)"), {}, "run", False, "not_found"),
    (404, {"detail": "Not Found"}, {}, "run", False, "not_found"),
    (429, openai_error("Rate limit reached for gpt-4o in organization org-abc on requests per "
                       "min (RPM): Limit 500, Used 500, Requested 1. Please try again in 120ms.",
                       "requests", code="rate_limit_exceeded"), {}, "row", True, "rate_limited"),
    (429, openai_error(TOO_LARGE, "tokens", code="rate_limit_exceeded"), {},
     "row", False, "request_too_large"),
    (429, openai_error("You exceeded your current quota, please check your plan and billing "
                       "details.", "insufficient_quota", code="insufficient_quota"), {},
     "run", False, "quota"),
    (429, openai_error("You exceeded your current quota", "insufficient_quota",
                       code="project_spend_limit_exceeded"), {}, "run", False, "quota"),
    (400, openai_error(CONTEXT_WITH_FUNCTIONS, param="messages", code="context_length_exceeded"),
     TOOLS, "row", False, "context_length"),
    (400, LLAMA_CPP_CONTEXT, TOOLS, "row", False, "context_length"),
    (400, openai_error("tools param requires --jinja flag"), TOOLS,
     "strategy", False, "unsupported_strategy"),
    (400, openai_error("Invalid parameter: 'response_format' of type 'json_schema' is not "
                       "supported with this model.", param="response_format"), JSON_SCHEMA,
     "strategy", False, "unsupported_strategy"),
    (400, {"error": "registry.ollama.ai/library/gemma:2b does not support tools"}, TOOLS,
     "strategy", False, "unsupported_strategy"),
    (422, {"detail": [{"loc": ["body", "response_format"], "msg": "extra fields not permitted"}]},
     JSON_SCHEMA, "strategy", False, "unsupported_strategy"),
    (500, openai_error("json_schema is not supported by this backend", "server_error"),
     JSON_SCHEMA, "strategy", False, "unsupported_strategy"),
    # The same words without a structured parameter sent are no strategy's business.
    (400, openai_error("tools param requires --jinja flag"), {}, "row", False, "rejected"),
    (500, openai_error("json_schema is not supported by this backend", "server_error"), {},
     "row", True, "transient"),
    (400, openai_error("Invalid 'temperature': decimal above maximum value.",
                       param="temperature", code="decimal_above_max_value"), {},
     "run", False, "bad_parameter"),
    (400, openai_error("Invalid 'messages[0].content': string too long.",
                       param="messages[0].content", code="string_above_max_length"), {},
     "row", False, "rejected"),
    (400, openai_error("something about this prompt"), {}, "row", False, "rejected"),
    (413, "Request Entity Too Large", {}, "row", False, "request_too_large"),
    (408, {}, {}, "row", True, "transient"),
    (409, {}, {}, "row", True, "transient"),
    (500, openai_error("The server had an error", "server_error"), {}, "row", True, "transient"),
    (503, "<html>Service Unavailable</html>", {}, "row", True, "transient"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "body", "kind", "scope", "retry", "reason"), VERDICTS)
def test_the_verdict_table(status, body, kind, scope, retry, reason):
    error = OpenAIProvider(URL).error(call(**kind), status, body, headers())
    assert error.verdict == Verdict(scope, retry, reason)
    assert error.retryable is retry


def test_a_context_length_400_that_mentions_functions_is_never_a_strategy_refusal():
    body = openai_error(CONTEXT_WITH_FUNCTIONS, param="messages", code=None)
    error = OpenAIProvider(URL).error(call(**TOOLS), 400, body, headers())
    assert error.verdict.scope == "row" and error.verdict.reason == "context_length"


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


# -- the body as sent: encoded from parts made once per shape (issue 12) -------------------------


@pytest.mark.parametrize(
    "provider",
    [
        OpenAIProvider("http://127.0.0.1:8080/v1", "k"),
        OpenAIProvider("https://api.openai.com/v1", "k"),  # with prompt_cache_key
        AnthropicProvider("https://api.anthropic.com", "k"),  # with cache_control
        AzureOpenAIProvider("https://r.openai.azure.com", "k", api_version="2024-10-21"),
    ],
    ids=["local", "openai", "anthropic", "azure"],
)
def test_encode_sends_the_bytes_json_dumps_would(provider):
    params = MappingProxyType({"temperature": 0, "extra_body": {"seed": 1}})
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    texts = ["hi", 'quotes " \\ and \n, \u00e9, \x00 and \U0001f600', "x" * 5000]
    for n in (1, 3):
        for strategy, shape in ((None, None), ("tools", schema), ("json_schema", schema)):
            for system in (None, "Be brief. " * 600):
                head = ({"role": "system", "content": system},) if system else ()
                for text in texts:
                    call = Call(
                        "m",
                        (*head, {"role": "user", "content": text}),
                        n=n,
                        params=params,
                        schema=shape,
                        strategy=strategy,
                    )
                    request = provider.build(call)
                    assert provider.encode(call) == (
                        request.url,
                        request.headers,
                        json.dumps(request.json).encode(),
                    )
    # One shape per (n, strategy, system): every text after the first reused its parts.
    assert len(provider._encoder._shapes) == 12
    assert None not in provider._encoder._shapes.values()


def test_encode_of_a_message_it_cannot_template_is_still_exact():
    provider = OpenAIProvider("http://127.0.0.1:8080/v1", "k")
    parts = [{"type": "text", "text": "hi"}]
    odd = ({"role": "user", "content": parts}, {"role": "user", "content": "a", "name": "x"})
    for messages in [(odd[0],), (odd[1],), ()]:
        call = Call("m", messages)
        assert provider.encode(call)[2] == json.dumps(provider.build(call).json).encode()
    assert provider._encoder._shapes == {}  # none of them was made a shape


def _headers(**values: str) -> CIMultiDictProxy:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in values.items()}))


def test_limits_repeated_by_the_next_response_are_not_read_again():
    provider = OpenAIProvider("http://127.0.0.1:8080/v1", "k")
    same = {"x_ratelimit_limit_requests": "60", "x_ratelimit_reset_requests": "1s"}
    first = provider.limits(_headers(**same))
    assert (first.limit_requests, first.reset_requests) == (60, 1.0)
    assert provider.limits(_headers(**same)) is first
    changed = provider.limits(_headers(**{**same, "x_ratelimit_reset_requests": "20ms"}))
    assert changed.reset_requests == 0.02
    # A retry-after is read every time: its HTTP-date form counts from the current time.
    again = provider.limits(_headers(**same, retry_after="2"))
    assert again.retry_after == 2.0 and again.limit_requests == 60
    assert provider.limits(_headers(**same)).retry_after is None
    # Plain dicts (hand-built headers) are matched case-insensitively for retry-after.
    assert provider.limits({"Retry-After": "3"}).retry_after == 3.0
    assert provider.limits(_headers()) == LimitInfo()
