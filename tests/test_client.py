"""Tests for parrot_pandas._client: HTTP answers and failures mapped to our results and errors.

aiohttp is mocked with aioresponses: no sockets, no real time.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import traceback
from types import SimpleNamespace

import aiohttp
import pytest
from aioresponses import aioresponses

from parrot_pandas._client import Client
from parrot_pandas.errors import APIConnectionError, APIError, StructuredOutputError, Verdict
from parrot_pandas.providers import Call, Completion, OpenAIProvider

KEY = "sk-test-0123456789abcdef"
BASE = "http://llm.test/v1"
URL = BASE + "/chat/completions"
CALL = Call(model="m", messages=({"role": "user", "content": "hi"},), params={"temperature": 0})
ANSWER = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates the ``stream_writer`` that aiohttp 3.14 requires
    (pnuckowski/aioresponses#289); a request that was fully sent only reads its output_size."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


_NEEDS_STREAM_WRITER = (
    "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters
)


@pytest.fixture
def mock():
    with aioresponses() as m:
        if _NEEDS_STREAM_WRITER:
            add = m.add

            def add_compatible(*args, **kwargs):
                kwargs.setdefault("response_class", _Response)
                return add(*args, **kwargs)

            m.add = add_compatible
        yield m


async def send(call: Call = CALL, *, secret: str | None = KEY, timeout: float = 5.0) -> Completion:
    async with Client(OpenAIProvider(BASE, KEY), timeout=timeout, secret=secret) as client:
        return await client.send(call)


async def failure(**kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        await send(**kwargs)
    return info.value


async def test_a_2xx_answer_is_a_completion(mock):
    mock.post(URL, payload=ANSWER, headers={"x-ratelimit-remaining-requests": "41"})
    completion = await send()
    assert completion.texts == ("hello",)
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 1)
    assert completion.limits.remaining_requests == 41


async def test_the_request_carries_the_payload_and_the_key(mock):
    mock.post(URL, payload=ANSWER)
    await send()
    (((method, url), (request,)),) = mock.requests.items()
    assert (method, str(url)) == ("POST", URL)
    # The body goes encoded (the provider's BodyEncoder), as json.dumps would write it.
    assert request.kwargs["headers"]["Content-Type"] == "application/json"
    assert json.loads(request.kwargs["data"]) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
    }
    assert request.kwargs["headers"]["Authorization"] == f"Bearer {KEY}"


async def test_a_session_serves_many_calls(mock):
    mock.post(URL, payload=ANSWER, repeat=True)
    async with Client(OpenAIProvider(BASE), secret=None) as client:
        results = await asyncio.gather(*(client.send(CALL) for _ in range(5)))
    assert [r.texts for r in results] == [("hello",)] * 5


async def test_send_needs_an_open_client():
    with pytest.raises(AssertionError, match="async with"):
        await Client(OpenAIProvider(BASE)).send(CALL)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (404, False),
        (408, True),
        (409, True),
        (429, True),
        (500, True),
        (503, True),
    ],
)
async def test_an_error_status_is_an_api_error(mock, status, retryable):
    body = {"error": {"message": f"failed with {status}", "type": "t", "code": f"c{status}"}}
    mock.post(URL, status=status, payload=body)
    error = await failure()
    assert type(error) is APIError
    assert (error.status, error.code) == (status, f"c{status}")
    assert error.message.startswith(f"failed with {status}")
    assert error.retryable is retryable
    assert str(error).startswith(f"HTTP {status}: failed with {status}")


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_a_run_level_refusal_shows_the_url_requested(mock, status):
    # A wrong base_url answers 404 (or a proxy's 401): the message says where the request went.
    mock.post(URL, status=status, payload={"error": {"message": "Invalid URL"}})
    error = await failure()
    assert error.verdict.scope == "run"
    assert error.message == f"Invalid URL (POST {URL})"


async def test_a_rows_own_error_does_not_repeat_the_url(mock):
    mock.post(URL, status=400, payload={"error": {"message": "odd prompt"}})
    assert (await failure()).message == "odd prompt"


async def test_a_429_carries_retry_after_and_limits(mock):
    mock.post(
        URL,
        status=429,
        payload={"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
        headers={
            "retry-after-ms": "1500",
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-reset-tokens": "20ms",
        },
    )
    error = await failure()
    assert error.retryable and error.code == "rate_limit_exceeded"
    assert error.retry_after == 1.5
    assert error.limits.limit_requests == 60
    assert error.limits.remaining_requests == 0
    assert error.limits.reset_requests == 360.0
    assert error.limits.reset_tokens == pytest.approx(0.02)
    assert error.limits.retry_after == 1.5


async def test_an_error_without_limit_headers_has_empty_limits(mock):
    mock.post(URL, status=500, body="Internal Server Error")
    error = await failure()
    assert error.message == "Internal Server Error"
    assert error.limits.empty


async def test_a_vllm_error_body(mock):
    mock.post(
        URL,
        status=400,
        payload={"object": "error", "message": "bad model", "type": "NotFoundError", "code": 404},
    )
    error = await failure()
    assert error.message.startswith("bad model") and error.code == "NotFoundError"
    assert error.verdict.reason == "not_found"


@pytest.mark.parametrize(
    "exception",
    [
        aiohttp.ClientConnectionError("Connection reset by peer"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
)
async def test_a_dropped_connection_is_an_api_connection_error(mock, exception):
    mock.post(URL, exception=exception)
    error = await failure()
    assert type(error) is APIConnectionError
    assert error.status is None and error.retryable
    assert type(exception).__name__ in error.message


@pytest.mark.parametrize("exception", [asyncio.TimeoutError(), aiohttp.ServerTimeoutError("read")])
async def test_a_timeout_is_an_api_connection_error(mock, exception):
    mock.post(URL, exception=exception)
    error = await failure(timeout=7.5)
    assert type(error) is APIConnectionError and error.retryable
    assert "no response within 7.5 s" in str(error)
    assert "timeout=" in str(error)


@pytest.mark.parametrize("body", ["<html>hi</html>", "", "[1, 2]", '"just a string"'])
async def test_a_2xx_without_a_json_object_is_an_api_connection_error(mock, body):
    mock.post(URL, status=200, body=body)
    error = await failure()
    assert type(error) is APIConnectionError and error.retryable
    assert "HTTP 200 with an unreadable body" in str(error)


async def test_a_2xx_without_choices_is_a_structured_output_error(mock):
    mock.post(URL, payload={"choices": None})
    with pytest.raises(StructuredOutputError):
        await send()


async def test_unusable_choices_come_back_as_problems(mock):
    body = {"choices": [{"message": {"content": "cut"}, "finish_reason": "length"}]}
    mock.post(URL, payload=body)
    completion = await send()
    assert completion.texts == () and completion.problems[0].verdict.reason == "truncated"


async def test_an_unreachable_server_is_the_runs_failure_after_retries():
    # Nothing listens on port 9: retried (the server may be starting), and then no row can
    # succeed, so the run stops instead of every row paying its own retries.
    async with Client(OpenAIProvider("http://127.0.0.1:9/v1"), timeout=5) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.send(CALL)
    assert info.value.verdict == Verdict("run", True, "unreachable")
    assert "(POST http://127.0.0.1:9/v1/chat/completions)" in info.value.message


# -- the key never leaks ------------------------------------------------------------------------


async def test_a_key_echoed_in_an_error_message_is_scrubbed(mock):
    mock.post(
        URL,
        status=401,
        payload={
            "error": {
                "message": f"Incorrect API key provided: {KEY}. Twice: {KEY}",
                "code": "invalid_api_key",
            }
        },
    )
    error = await failure()
    assert error.message == f"Incorrect API key provided: ***. Twice: *** (POST {URL})"
    assert_no_key(error)


async def test_a_key_echoed_in_a_plain_text_error_is_scrubbed(mock):
    mock.post(URL, status=403, body=f"forbidden for Bearer {KEY}")
    error = await failure()
    assert error.message == f"forbidden for Bearer *** (POST {URL})"
    assert_no_key(error)


async def test_a_key_in_a_connection_error_is_scrubbed(mock):
    mock.post(
        URL, exception=aiohttp.ClientConnectionError(f"proxy refused Authorization: Bearer {KEY}")
    )
    error = await failure()
    assert "Bearer ***" in error.message
    assert_no_key(error)


async def test_a_key_in_an_unreadable_2xx_body_is_scrubbed(mock):
    mock.post(URL, status=200, body=f"echo Authorization: Bearer {KEY}")
    assert_no_key(await failure())


async def test_a_key_in_a_200_error_body_is_scrubbed_in_any_letter_case(mock):
    # The leak: a 200 without choices whose error text echoes the key went out as is.
    message = f"Authentication failed for Bearer {KEY} (BEARER {KEY.upper()})"
    mock.post(URL, status=200, payload={"error": {"message": message}})
    error = await failure()
    assert error.message.endswith("Authentication failed for Bearer *** (BEARER ***)")
    assert_no_key(error)
    assert KEY.upper() not in str(error)


async def test_a_key_in_an_unusable_answer_is_scrubbed(mock):
    body = {"choices": [{"message": {"content": None, "refusal": f"no, {KEY}"}}]}
    mock.post(URL, payload=body)
    (problem,) = (await send()).problems
    assert KEY not in problem.message and "no, ***" in problem.message


async def test_a_secret_in_the_base_url_query_is_never_shown(mock):
    base = "http://llm.test/v1?api-key=query-secret-0123456789"
    url = base + "/chat/completions"
    provider = OpenAIProvider(base, KEY)
    mock.post(provider.build(CALL).url, exception=aiohttp.InvalidURL(url))
    async with Client(provider, timeout=5, secret=KEY) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.send(CALL)
    shown = "".join(traceback.format_exception(info.value))
    assert "query-secret-0123456789" not in shown
    assert "api-key=***" in info.value.message


async def test_without_a_secret_nothing_is_scrubbed(mock):
    mock.post(URL, status=400, payload={"error": {"message": "use *** carefully"}})
    assert (await failure(secret=None)).message == "use *** carefully"


def assert_no_key(error: APIError) -> None:
    shown = "".join(traceback.format_exception(error))  # what a notebook prints
    for text in (str(error), repr(error), error.message, *map(str, error.args), shown):
        assert KEY not in text


def test_a_serialized_request_does_not_need_the_key_in_its_repr():
    request = OpenAIProvider(BASE, KEY).build(CALL)
    assert KEY not in repr(request)
    assert KEY not in json.dumps(request.json)


def test_loopback_is_never_proxied_and_short_keys_are_not_scrubbed(monkeypatch):
    from parrot_pandas._client import Client
    from parrot_pandas.providers import OpenAIProvider

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = Client(OpenAIProvider("http://127.0.0.1:1/v1"), secret="x")
    assert client._proxy("http://127.0.0.1:1/v1/chat/completions") is None
    assert client._proxy("http://localhost:1/v1/chat/completions") is None
    assert (
        client._proxy("http://example.invalid/v1/chat/completions") == "http://proxy.invalid:3128"
    )
    assert client._scrub("maximum context") == "maximum context"
    long_key = Client(OpenAIProvider("http://127.0.0.1:1/v1"), secret="sk-long-secret")
    assert long_key._scrub("bad key sk-long-secret") == "bad key ***"
