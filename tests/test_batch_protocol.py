"""The Batch API protocols, pure: lines, splitting, requests, batch objects, result lines, and
the prompt-cache builders, checked against the shapes the providers document."""

from __future__ import annotations

import json

import pytest

from parrot_pandas.errors import APIError, ConfigurationError, StructuredOutputError
from parrot_pandas.providers import AnthropicProvider, AzureOpenAIProvider, Call, OpenAIProvider
from parrot_pandas.providers._anthropic_batch import ANTHROPIC_LIMITS
from parrot_pandas.providers._azure_batch import AZURE_LIMITS
from parrot_pandas.providers._batch import (
    ENDPOINT_CALL,
    BatchLimits,
    BatchPart,
    BatchProblem,
    BatchStatus,
    LineResult,
    WireRequest,
    collect,
    endpoint_error,
    rejection,
    split,
)
from parrot_pandas.providers._openai_batch import OPENAI_LIMITS
from parrot_pandas.providers._prompt_cache import (
    CacheUsage,
    anthropic_cache_control,
    anthropic_min_tokens,
    prefix_key,
)

KEY = "sk-batch-secret-1234"
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {}}}},
}


def call(
    text: str = "name=Ada",
    *,
    model: str = "gpt-4o-mini",
    system: str | None = "Extract.",
    schema=None,
) -> Call:
    messages = ({"role": "system", "content": system},) if system else ()
    return Call(
        model,
        (*messages, {"role": "user", "content": text}),
        params={"max_tokens": 64},
        schema=schema,
        strategy="tools" if schema else None,
    )


def openai() -> OpenAIProvider:
    return OpenAIProvider("http://127.0.0.1:9/v1?tenant=a", KEY)


def anthropic() -> AnthropicProvider:
    return AnthropicProvider("http://127.0.0.1:9", KEY)


def azure() -> AzureOpenAIProvider:
    return AzureOpenAIProvider("https://res.openai.azure.com", KEY, api_version="2024-10-21")


# -- lines and requests ------------------------------------------------------------------------


def test_openai_line_is_the_documented_jsonl_request_with_the_live_body() -> None:
    provider = openai()
    line = json.loads(provider.batch().line("row-1", call()))
    assert line == {
        "custom_id": "row-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": dict(provider.build(call()).json),
    }


def test_openai_upload_create_and_status_requests() -> None:
    batch = openai().batch()
    (part,) = batch.parts([("a", call("x")), ("b", call("y"))])
    upload = batch.upload_request(part)
    assert upload.method == "POST"
    assert upload.url == "http://127.0.0.1:9/v1/files?tenant=a"
    assert upload.upload.fields == {"purpose": "batch"}
    assert upload.upload.content == part.lines[0] + b"\n" + part.lines[1] + b"\n"
    assert upload.upload.filename.endswith(".jsonl")
    # The multipart body sets its own Content-Type; the key still goes along.
    assert upload.headers == {"Authorization": f"Bearer {KEY}"}
    assert batch.uploaded_id({"id": "file-1", "object": "file"}) == "file-1"

    create = batch.create_request(part, "file-1", {"parrot_pandas": part.digest[:32]})
    assert create.method == "POST" and create.url == "http://127.0.0.1:9/v1/batches?tenant=a"
    assert create.json == {
        "input_file_id": "file-1",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"parrot_pandas": part.digest[:32]},
    }
    assert batch.retrieve_request("b 1").url == "http://127.0.0.1:9/v1/batches/b%201?tenant=a"
    assert batch.cancel_request("b1").url == "http://127.0.0.1:9/v1/batches/b1/cancel?tenant=a"
    assert batch.list_request("b9", 5).url == (
        "http://127.0.0.1:9/v1/batches?tenant=a&after=b9&limit=5"
    )
    status = BatchStatus("b1", "ended", "completed", results=("file-o", "file-e"))
    assert [r.url for r in batch.result_requests(status)] == [
        "http://127.0.0.1:9/v1/files/file-o/content?tenant=a",
        "http://127.0.0.1:9/v1/files/file-e/content?tenant=a",
    ]


def test_azure_uses_its_own_paths_api_version_header_and_line_url() -> None:
    provider = azure()
    batch = provider.batch()
    line = json.loads(batch.line("t-0", call(model="my-batch-deployment")))
    assert line["url"] == "/chat/completions"
    assert line["body"]["model"] == "my-batch-deployment"
    (part,) = batch.parts([("t-0", call(model="my-batch-deployment"))])
    upload = batch.upload_request(part)
    assert upload.url == "https://res.openai.azure.com/openai/files?api-version=2024-10-21"
    assert upload.headers == {"api-key": KEY}
    create = batch.create_request(part, "file-1")
    assert create.url == "https://res.openai.azure.com/openai/batches?api-version=2024-10-21"
    assert create.json["endpoint"] == "/chat/completions"
    assert batch.list_request(None, 3).url == (
        "https://res.openai.azure.com/openai/batches?limit=3&api-version=2024-10-21"
    )


def test_anthropic_request_is_custom_id_and_params_inline() -> None:
    provider = anthropic()
    batch = provider.batch()
    one = call(model="claude-sonnet-4-5")
    assert json.loads(batch.line("r1", one)) == {
        "custom_id": "r1",
        "params": dict(provider.build(one).json),
    }
    (part,) = batch.parts([("r1", one), ("r2", call("y", model="claude-sonnet-4-5"))])
    assert batch.upload_request(part) is None
    create = batch.create_request(part)
    assert create.method == "POST" and create.url == "http://127.0.0.1:9/v1/messages/batches"
    body = json.loads(create.data)
    assert [r["custom_id"] for r in body["requests"]] == ["r1", "r2"]
    assert create.headers["x-api-key"] == KEY
    assert create.headers["anthropic-version"] == "2023-06-01"
    assert batch.list_request("m1", 2).url == (
        "http://127.0.0.1:9/v1/messages/batches?after_id=m1&limit=2"
    )
    assert batch.cancel_request("m1").url == "http://127.0.0.1:9/v1/messages/batches/m1/cancel"
    status = BatchStatus("m1", "ended", "completed", results=("https://x/results",))
    (results,) = batch.result_requests(status)
    assert results.url == "https://x/results" and results.headers["x-api-key"] == KEY


def test_anthropic_batch_base_url_keeps_a_gateway_query() -> None:
    batch = AnthropicProvider("https://gw.example/v1?tenant=a", KEY).batch()
    assert batch.retrieve_request("m1").url == (
        "https://gw.example/v1/messages/batches/m1?tenant=a"
    )


def test_wire_request_repr_never_shows_the_key() -> None:
    (part,) = openai().batch().parts([("a", call())])
    for request in (openai().batch().upload_request(part), openai().batch().retrieve_request("b")):
        assert KEY not in repr(request)
    request = WireRequest("GET", "https://u:hunter22@h/v1?api-key=zzz", {"api-key": KEY})
    assert "hunter22" not in repr(request) and "zzz" not in repr(request)


# -- splitting -----------------------------------------------------------------------------------


def test_documented_limits() -> None:
    assert OPENAI_LIMITS == BatchLimits(50_000, 200 * 1024**2)
    assert AZURE_LIMITS == BatchLimits(100_000, 200 * 1024**2)
    assert ANTHROPIC_LIMITS == BatchLimits(100_000, 256 * 1024**2)


def test_split_by_request_count_keeps_order_and_every_request() -> None:
    items = [(f"r{i}", call(f"row {i}")) for i in range(7)]
    parts = openai().batch().parts(items, BatchLimits(max_requests=3, max_bytes=10**9))
    assert [len(p) for p in parts] == [3, 3, 1]
    assert [cid for p in parts for cid in p.custom_ids] == [cid for cid, _ in items]


def test_split_by_bytes_counts_separators_and_the_envelope() -> None:
    lines = [(f"r{i}", b"x" * 9) for i in range(4)]  # 10 bytes each with its separator
    assert [len(p) for p in split(lines, BatchLimits(100, 20), model="m")] == [2, 2]
    assert [len(p) for p in split(lines, BatchLimits(100, 19), model="m")] == [1, 1, 1, 1]
    # Anthropic's {"requests":[...]} takes room in every batch.
    assert [len(p) for p in split(lines, BatchLimits(100, 35), model="m", overhead=15)] == [2, 2]
    assert [len(p) for p in split(lines, BatchLimits(100, 34), model="m", overhead=15)] == [
        1,
        1,
        1,
        1,
    ]
    parts = split(lines, BatchLimits(100, 20), model="m")
    assert all(p.size <= 20 for p in parts)


def test_anthropic_parts_fit_their_byte_limit_with_the_envelope() -> None:
    batch = anthropic().batch()
    items = [(f"r{i}", call(f"row {i}", model="claude-x")) for i in range(6)]
    one = len(batch.line("r0", items[0][1])) + 1
    parts = batch.parts(items, BatchLimits(100, 15 + 2 * one + 1))
    assert [len(p) for p in parts] == [2, 2, 2]
    for p in parts:
        assert len(batch.create_request(p).data) <= 15 + 2 * one + 1


def test_openai_splits_by_model_one_model_a_file() -> None:
    items = [("a", call(model="m1")), ("b", call(model="m2")), ("c", call(model="m1"))]
    parts = openai().batch().parts(items)
    assert [(p.model, p.custom_ids) for p in parts] == [("m1", ("a", "c")), ("m2", ("b",))]


def test_split_refuses_a_request_larger_than_a_batch() -> None:
    with pytest.raises(ConfigurationError, match="'big'.*batch=False"):
        split([("ok", b"x"), ("big", b"x" * 50)], BatchLimits(10, 20), model="m")


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "dot.ted", 7])
def test_split_refuses_custom_ids_a_provider_would_reject(bad) -> None:
    with pytest.raises(ConfigurationError, match="custom_id"):
        split([(bad, b"{}")], OPENAI_LIMITS, model="m")


def test_split_refuses_a_repeated_custom_id() -> None:
    with pytest.raises(ConfigurationError, match="twice"):
        split([("a", b"{}"), ("a", b"{}")], OPENAI_LIMITS, model="m")


def test_part_digest_names_what_is_submitted() -> None:
    a = BatchPart(("x", "y"), (b"1", b"2"), "m")
    assert a.digest == BatchPart(("x", "y"), (b"1", b"2"), "m").digest
    assert a.digest != BatchPart(("y", "x"), (b"2", b"1"), "m").digest
    assert a.digest != BatchPart(("x",), (b"12",), "m").digest  # boundaries count


# -- batch objects ---------------------------------------------------------------------------------


def openai_batch(status: str, **extra) -> dict:
    body = {
        "id": "batch_1",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": status,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": 1711471533,
        "expires_at": 1711557933,
        "request_counts": {"total": 100, "completed": 23, "failed": 1},
        "metadata": None,
    }
    body.update(extra)
    return body


@pytest.mark.parametrize(
    ("word", "state", "outcome"),
    [
        ("validating", "validating", None),
        ("in_progress", "running", None),
        ("finalizing", "running", None),
        ("cancelling", "cancelling", None),
        ("completed", "ended", "completed"),
        ("failed", "ended", "failed"),
        ("expired", "ended", "expired"),
        ("cancelled", "ended", "cancelled"),
    ],
)
def test_openai_statuses(word: str, state: str, outcome) -> None:
    status = openai().batch().read_status(openai_batch(word))
    assert (status.state, status.outcome, status.provider_status) == (state, outcome, word)
    assert (status.total, status.done, status.failed) == (100, 24, 1)
    assert status.created_at == 1711471533 and status.expires_at == 1711557933


def test_openai_results_are_the_output_and_error_files_once_ended() -> None:
    read = openai().batch().read_status
    body = {"output_file_id": "file-o", "error_file_id": "file-e"}
    assert read(openai_batch("completed", **body)).results == ("file-o", "file-e")
    assert read(openai_batch("completed", output_file_id="file-o")).results == ("file-o",)
    assert read(openai_batch("finalizing", **body)).results == ()


def test_openai_rejected_batch_carries_the_providers_reasons() -> None:
    errors = {
        "object": "list",
        "data": [
            {"code": "invalid_json_line", "line": 3, "message": "This line is not parseable."},
            {"code": "duplicate_custom_id", "line": 9, "message": "custom_id a is repeated."},
        ],
    }
    status = openai().batch().read_status(openai_batch("failed", errors=errors))
    assert status.problems == (
        BatchProblem("This line is not parseable.", "invalid_json_line", 3),
        BatchProblem("custom_id a is repeated.", "duplicate_custom_id", 9),
    )
    error = rejection(status)
    assert isinstance(error, APIError)
    assert (error.verdict.scope, error.verdict.retry) == ("run", False)
    assert "This line is not parseable. (line 3)" in str(error)
    assert error.code == "invalid_json_line"
    assert rejection(openai().batch().read_status(openai_batch("completed"))) is None


def test_a_full_token_queue_is_a_rejection_worth_retrying() -> None:
    message = "Enqueued token limit reached for gpt-4o-mini. Limit: 2,000,000 enqueued tokens."
    errors = {"data": [{"code": "token_limit_exceeded", "line": None, "message": message}]}
    error = rejection(openai().batch().read_status(openai_batch("failed", errors=errors)))
    assert error.verdict.scope == "run" and error.verdict.retry is True


def test_openai_list_page() -> None:
    batch = openai().batch()
    body = {"object": "list", "data": [openai_batch("completed"), openai_batch("in_progress")]}
    statuses, after = batch.read_list({**body, "has_more": True, "last_id": "batch_1"})
    assert len(statuses) == 2 and after == "batch_1"
    assert batch.read_list({**body, "has_more": False})[1] is None


def anthropic_batch(status: str, **extra) -> dict:
    body = {
        "id": "msgbatch_1",
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {
            "processing": 0,
            "succeeded": 95,
            "errored": 2,
            "canceled": 1,
            "expired": 2,
        },
        "ended_at": None,
        "created_at": "2024-09-24T18:37:24.100435Z",
        "expires_at": "2024-09-25T18:37:24.100435Z",
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": None,
    }
    body.update(extra)
    return body


def test_anthropic_statuses_counts_and_times() -> None:
    read = anthropic().batch().read_status
    running = read(anthropic_batch("in_progress"))
    assert (running.state, running.outcome, running.results) == ("running", None, ())
    assert running.created_at == pytest.approx(1727203044.100435)
    assert running.expires_at - running.created_at == pytest.approx(24 * 3600)
    assert read(anthropic_batch("canceling")).state == "cancelling"
    url = "https://api.anthropic.com/v1/messages/batches/msgbatch_1/results"
    ended = read(anthropic_batch("ended", results_url=url))
    assert (ended.state, ended.outcome, ended.results) == ("ended", "expired", (url,))
    assert (ended.total, ended.done, ended.failed) == (100, 100, 5)
    cancelled = read(anthropic_batch("ended", cancel_initiated_at="2024-09-24T19:00:00Z"))
    assert cancelled.outcome == "cancelled"
    counts = {"processing": 0, "succeeded": 3, "errored": 0, "canceled": 0, "expired": 0}
    assert read(anthropic_batch("ended", request_counts=counts)).outcome == "completed"


# -- result lines ----------------------------------------------------------------------------------


def chat_body(content: str = "echo: hi", finish: str = "stop", cached: int = 0) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish,
            }
        ],
        "usage": {
            "prompt_tokens": 2000,
            "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


CONTEXT_400 = {
    "error": {
        "message": "This model's maximum context length is 128000 tokens. However, you requested "
        "1000024 tokens (24 in the messages, 1000000 in the completion).",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}


def jsonl(*lines: dict) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def test_openai_result_lines_become_completions_and_errors_with_live_verdicts() -> None:
    provider = openai()
    calls = {cid: call() for cid in ("ok", "long", "flaky", "late", "stopped", "gone")}
    output = jsonl(
        {
            "id": "batch_req_1",
            "custom_id": "ok",
            "response": {"status_code": 200, "request_id": "r1", "body": chat_body(cached=1920)},
            "error": None,
        }
    )
    errors = (
        jsonl(
            {
                "id": "batch_req_2",
                "custom_id": "long",
                "response": {"status_code": 400, "request_id": "r2", "body": CONTEXT_400},
                "error": None,
            },
            {
                "id": "batch_req_3",
                "custom_id": "flaky",
                "response": {
                    "status_code": 500,
                    "request_id": "r3",
                    "body": {"error": {"message": "oops"}},
                },
                "error": None,
            },
            {
                "id": "batch_req_4",
                "custom_id": "late",
                "response": None,
                "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed.",
                },
            },
            {
                "id": "batch_req_5",
                "custom_id": "stopped",
                "response": None,
                "error": {"code": "batch_cancelled", "message": "The batch was cancelled."},
            },
            {"custom_id": "stranger", "response": None, "error": {"code": "batch_expired"}},
        )
        + b'{"custom_id": "gone", "respo\n'
    )
    batch = provider.batch()
    read = [*batch.read_results(output, calls), *batch.read_results(errors, calls)]
    assert {r.custom_id for r in read} == {"ok", "long", "flaky", "late", "stopped"}
    status = BatchStatus("batch_1", "ended", "completed")
    results = collect(status, read, list(calls))
    assert list(results) == list(calls)

    ok = results["ok"]
    assert ok.ok and ok.completion.texts == ("echo: hi",) and ok.completion.prompt_tokens == 2000
    assert ok.cache == CacheUsage(read=1920)

    long = results["long"].error
    live = provider.error(ENDPOINT_CALL, 400, CONTEXT_400, {})
    assert isinstance(long, APIError) and long.verdict == live.verdict
    assert (long.verdict.scope, long.verdict.retry) == ("row", False)
    assert "maximum context length" in long.message

    assert results["flaky"].error.verdict.retry is True
    for cid, code in (("late", "batch_expired"), ("stopped", "batch_cancelled")):
        error = results[cid].error
        assert (error.code, error.verdict.scope, error.verdict.retry) == (code, "row", True)
    gone = results["gone"].error  # a torn line: reported missing, worth resubmitting
    assert (gone.code, gone.verdict.retry) == ("batch_missing", True)


def test_an_unreadable_answer_line_is_worth_asking_again() -> None:
    line = {"custom_id": "a", "response": {"status_code": 200, "body": "<html>oops"}, "error": None}
    (result,) = openai().batch().read_results(jsonl(line), {"a": call()})
    assert (result.error.code, result.error.verdict.retry) == ("batch_unreadable", True)


def test_collect_fills_an_expired_or_cancelled_batch_and_keeps_the_first_result() -> None:
    first = LineResult("a", error=APIError("first"))
    second = LineResult("a", error=APIError("second"))
    results = collect(BatchStatus("b", "ended", "expired"), [first, second], ["a", "b"])
    assert results["a"] is first
    assert (results["b"].error.code, results["b"].error.verdict.retry) == ("batch_expired", True)
    cancelled = collect(BatchStatus("b", "ended", "cancelled"), [], ["z"])
    assert cancelled["z"].error.code == "batch_cancelled"


def message_body(*, stop: str = "end_turn", tool: bool = False, **usage) -> dict:
    block = (
        {"type": "tool_use", "id": "t1", "name": "record_items", "input": {"items": []}}
        if tool
        else {"type": "text", "text": "echo: hi"}
    )
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [block],
        "stop_reason": stop,
        "usage": {"input_tokens": 10, "output_tokens": 3, **usage},
    }


def anthropic_error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def test_anthropic_results_of_every_type() -> None:
    provider = anthropic()
    structured = call(model="claude-x", schema=SCHEMA)
    calls = {
        "ok": call(model="claude-x"),
        "cut": structured,
        "bad": call(model="claude-x"),
        "busy": call(model="claude-x"),
        "late": call(model="claude-x"),
        "stopped": call(model="claude-x"),
    }
    text = jsonl(
        {
            "custom_id": "ok",
            "result": {
                "type": "succeeded",
                "message": message_body(
                    cache_read_input_tokens=4000, cache_creation_input_tokens=0
                ),
            },
        },
        {
            "custom_id": "cut",
            "result": {"type": "succeeded", "message": message_body(stop="max_tokens", tool=True)},
        },
        {
            "custom_id": "bad",
            "result": {
                "type": "errored",
                "error": anthropic_error(
                    "invalid_request_error", "prompt is too long: 300000 tokens > 200000 maximum"
                ),
            },
        },
        {
            "custom_id": "busy",
            "result": {
                "type": "errored",
                "error": anthropic_error("overloaded_error", "Overloaded"),
            },
        },
        {"custom_id": "late", "result": {"type": "expired"}},
        {"custom_id": "stopped", "result": {"type": "canceled"}},
    )
    results = collect(
        BatchStatus("m", "ended", "expired"),
        provider.batch().read_results(text, calls),
        list(calls),
    )
    ok = results["ok"]
    assert ok.completion.texts == ("echo: hi",)
    assert ok.completion.prompt_tokens == 10 + 4000  # the provider's parse counts cached input
    assert ok.cache == CacheUsage(read=4000)

    # A structured answer cut at max_tokens: the error, and verdict, a live answer gets.
    cut = results["cut"].error
    (live,) = provider.parse(structured, message_body(stop="max_tokens", tool=True), {}).problems
    assert isinstance(cut, StructuredOutputError) and cut.verdict == live.verdict

    bad = results["bad"].error
    assert bad.status == 400 and (bad.verdict.scope, bad.verdict.retry) == ("row", False)
    too_long = anthropic_error(
        "invalid_request_error", "prompt is too long: 300000 tokens > 200000 maximum"
    )
    assert bad.verdict == provider.error(ENDPOINT_CALL, 400, too_long, {}).verdict
    assert "prompt is too long" in bad.message
    busy = results["busy"].error
    assert busy.status == 529 and busy.verdict.retry is True
    assert (results["late"].error.code, results["late"].error.verdict.retry) == (
        "batch_expired",
        True,
    )
    stopped = results["stopped"].error
    assert (stopped.code, stopped.verdict.retry) == ("batch_cancelled", True)


def test_endpoint_errors_refuse_the_batch_not_a_row() -> None:
    too_large = endpoint_error(APIError("File is too large", status=400))
    assert (too_large.verdict.scope, too_large.verdict.retry) == ("run", False)
    limited = endpoint_error(APIError("slow down", status=429))
    assert limited.verdict.retry is True
    assert endpoint_error(APIError("bad key", status=401)).verdict.scope == "run"
    error = openai().batch().error(400, {"error": {"message": "File is too large"}}, {})
    assert error.verdict.scope == "run" and "File is too large" in error.message


# -- prompt caching --------------------------------------------------------------------------------


def test_prefix_key_is_stable_for_the_shared_prefix_only() -> None:
    assert prefix_key(call("row one")) == prefix_key(call("row two"))
    assert prefix_key(call(system="Other.")) != prefix_key(call())
    assert prefix_key(call(model="gpt-4o")) != prefix_key(call())
    assert prefix_key(call(schema=SCHEMA)) != prefix_key(call())
    assert "row one" not in prefix_key(call("row one"))


def test_openai_sends_prompt_cache_key_to_openai_only() -> None:
    one = call()
    # Live requests carry it too: build applies with_prompt_cache (issue 14, phase B).
    built = OpenAIProvider("https://api.openai.com/v1", KEY).build(one).json
    assert built["prompt_cache_key"] == prefix_key(one)
    body = dict(openai().build(one).json)
    assert "prompt_cache_key" not in body
    vendor = OpenAIProvider("https://api.openai.com/v1", KEY).with_prompt_cache(one, body)
    assert vendor["prompt_cache_key"] == prefix_key(one)
    assert OpenAIProvider("https://api.openai.com/v1").with_prompt_cache(one, vendor) == vendor
    # A compatible server (vLLM, llama.cpp) may refuse a field it does not know.
    assert "prompt_cache_key" not in openai().with_prompt_cache(one, body)
    assert "prompt_cache_key" not in azure().with_prompt_cache(one, body)
    line = json.loads(OpenAIProvider("https://api.openai.com/v1", KEY).batch().line("a", one))
    assert line["body"]["prompt_cache_key"] == prefix_key(one)


def test_anthropic_cache_control_marks_a_long_enough_prefix() -> None:
    long_system = "Rules. " * 800  # about 1,400 tokens
    body = {
        "model": "claude-sonnet-4-5",
        "system": long_system,
        "messages": [{"role": "user", "content": "x"}],
    }
    marked = anthropic_cache_control(body)
    assert marked["system"] == [
        {"type": "text", "text": long_system, "cache_control": {"type": "ephemeral"}}
    ]
    assert body["system"] == long_system  # not changed in place
    assert anthropic_cache_control(marked) == marked  # idempotent
    # Haiku 4.5 caches from 4,096 tokens: the same prefix is left alone.
    assert anthropic_cache_control({**body, "model": "claude-haiku-4-5"}) == {
        **body,
        "model": "claude-haiku-4-5",
    }
    short = {**body, "system": "Be brief."}
    assert anthropic_cache_control(short) == short


def test_anthropic_cache_control_on_the_last_tool_without_a_system_prompt() -> None:
    tools = [
        {"name": "a", "input_schema": {"type": "object"}},
        {"name": "b", "input_schema": {"type": "object", "description": "d" * 8000}},
    ]
    marked = anthropic_cache_control({"model": "claude-x", "tools": tools, "messages": []})
    assert "cache_control" not in marked["tools"][0]
    assert marked["tools"][1]["cache_control"] == {"type": "ephemeral"}


def test_anthropic_minimum_cacheable_lengths() -> None:
    assert anthropic_min_tokens("claude-opus-4-5-20251101") == 4096
    assert anthropic_min_tokens("claude-haiku-4-5") == 4096
    assert anthropic_min_tokens("claude-3-5-haiku-20241022") == 2048
    assert anthropic_min_tokens("claude-3-haiku-20240307") == 2048
    assert anthropic_min_tokens("claude-sonnet-4-5") == 1024
    assert anthropic_min_tokens("some-future-model") == 1024


def test_anthropic_batch_lines_carry_the_cache_marker() -> None:
    provider = anthropic()
    long = call(model="claude-sonnet-4-5", system="Rules. " * 800)
    params = json.loads(provider.batch().line("r1", long))["params"]
    assert params["system"][-1]["cache_control"] == {"type": "ephemeral"}


def test_cache_usage_readers() -> None:
    assert openai().cache_usage(chat_body(cached=1024)) == CacheUsage(read=1024)
    assert openai().cache_usage({"usage": {"prompt_tokens": 5}}) == CacheUsage()
    assert openai().cache_usage("not a body") == CacheUsage()
    body = message_body(cache_read_input_tokens=7, cache_creation_input_tokens=9)
    assert anthropic().cache_usage(body) == CacheUsage(read=7, written=9)
    assert CacheUsage(1, 2) + CacheUsage(3, 4) == CacheUsage(4, 6)
