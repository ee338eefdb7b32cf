"""The test server's Files and Batches endpoints: driven with plain aiohttp, with the official
SDKs (which proves the server speaks the real protocols), and with BatchClient end to end."""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from parrot_pandas._batch import BatchClient
from parrot_pandas.errors import APIError
from parrot_pandas.providers import AnthropicProvider, AzureOpenAIProvider, Call, OpenAIProvider
from parrot_pandas.providers._batch import BatchLimits
from parrot_pandas.providers._prompt_cache import CacheUsage
from parrot_pandas.testing import FakeServer
from parrot_pandas.testing._batches import FakeBatches

KEY = "sk-fake-batches-0123456789"
API_VERSION = "2024-10-21"
SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}}},
        }
    },
}

Factory = Callable[..., FakeServer]


@pytest.fixture
def srv(server_factory: Factory) -> FakeServer:
    return server_factory(api_key=KEY)


def fake(server: FakeServer) -> FakeBatches:
    return FakeBatches.of(server.app)


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def openai_lines(texts: list[str], *, url: str = "/v1/chat/completions", model: str = "m") -> bytes:
    return jsonl(
        [
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": url,
                "body": {"model": model, "messages": [{"role": "user", "content": text}]},
            }
            for i, text in enumerate(texts)
        ]
    )


# -- plain aiohttp -------------------------------------------------------------------------------


async def test_openai_batch_moves_through_its_statuses_on_the_fake_clock(srv: FakeServer) -> None:
    batches = fake(srv)
    batches.step = 60
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field(
            "file", openai_lines(["hi 0", "hi 1 BATCH_FAIL", "hi 2"]), filename="in.jsonl"
        )
        async with http.post(f"{srv.url}/files", data=form) as r:
            assert r.status == 200
            file = await r.json()
        assert (file["object"], file["purpose"], file["filename"]) == ("file", "batch", "in.jsonl")
        create = {
            "input_file_id": file["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"run": "one"},
        }
        async with http.post(f"{srv.url}/batches", json=create) as r:
            batch = await r.json()
        assert (batch["object"], batch["status"], batch["metadata"]) == (
            "batch",
            "validating",
            {"run": "one"},
        )
        assert batch["expires_at"] - batch["created_at"] == 24 * 3600

        async def status() -> dict:
            async with http.get(f"{srv.url}/batches/{batch['id']}") as r:
                return await r.json()

        seen = [(await status())["status"]]
        for _ in range(4):
            batches.advance(60)
            body = await status()
            seen.append((body["status"], body["request_counts"]["completed"]))
        assert seen == [
            "validating",
            ("in_progress", 0),
            ("in_progress", 2),  # the lines ran: two answered, one failed
            ("finalizing", 2),
            ("completed", 2),
        ]
        assert body["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        assert body["completed_at"] is not None and body["in_progress_at"] is not None

        async with http.get(f"{srv.url}/files/{body['output_file_id']}/content") as r:
            output = [json.loads(line) for line in (await r.read()).splitlines()]
        async with http.get(f"{srv.url}/files/{body['error_file_id']}/content") as r:
            errors = [json.loads(line) for line in (await r.read()).splitlines()]
    answers = {line["custom_id"]: line for line in output}
    assert set(answers) == {"r0", "r2"}
    line = answers["r0"]
    assert line["error"] is None and line["response"]["status_code"] == 200
    assert line["id"].startswith("batch_req_") and line["response"]["request_id"]
    assert line["response"]["body"]["choices"][0]["message"]["content"] == "echo: hi 0"
    (failed,) = errors
    assert failed["custom_id"] == "r1" and failed["error"] is None
    assert failed["response"]["status_code"] == 500
    assert failed["response"]["body"]["error"]["type"] == "server_error"


async def test_lines_per_step_feeds_the_progress_counts(srv: FakeServer) -> None:
    batches = fake(srv)
    batches.step, batches.lines_per_step = 10, 2
    provider = OpenAIProvider(srv.url, KEY)
    async with BatchClient(provider, secret=KEY) as client:
        (part,) = client.protocol.parts([(f"r{i}", chat(f"row {i}")) for i in range(5)])
        status = await client.submit(part)
        done = []
        for _ in range(6):
            batches.advance(10)
            status = await client.retrieve(status.id)
            done.append((status.provider_status, status.done, status.total))
    assert done == [
        ("in_progress", 0, 5),
        ("in_progress", 2, 5),
        ("in_progress", 4, 5),
        ("in_progress", 5, 5),
        ("finalizing", 5, 5),
        ("completed", 5, 5),
    ]


async def test_batch_endpoints_need_the_key(srv: FakeServer) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{srv.url}/batches", headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
            assert KEY not in await r.text()
        async with http.get(f"{srv.origin}/v1/messages/batches", headers={"x-api-key": KEY}) as r:
            assert r.status == 400  # anthropic-version is required
        async with http.get(f"{srv.origin}/openai/batches", headers={"api-key": KEY}) as r:
            assert r.status == 404  # Azure needs its api-version


# -- the official SDKs -----------------------------------------------------------------------------


def test_openai_sdk_files_and_batches(srv: FakeServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url, api_key=KEY)
    file = client.files.create(file=("in.jsonl", openai_lines(["a", "b"])), purpose="batch")
    assert file.purpose == "batch" and file.bytes > 0
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 0)
    output = client.files.content(batch.output_file_id).text.splitlines()
    contents = sorted(
        json.loads(line)["response"]["body"]["choices"][0]["message"]["content"] for line in output
    )
    assert contents == ["echo: a", "echo: b"]
    assert batch.id in [b.id for b in client.batches.list()]
    assert client.files.retrieve(file.id).id == file.id

    fake(srv).step = 3600
    held = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert client.batches.cancel(held.id).status == "cancelling"
    fake(srv).advance(3600)
    cancelled = client.batches.retrieve(held.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None


def test_openai_sdk_sees_a_rejected_batch(srv: FakeServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url, api_key=KEY)
    text = openai_lines(["a"]) + b"not json\n" + openai_lines(["b"], url="/v1/embeddings")
    file = client.files.create(file=("in.jsonl", text), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("invalid_json_line", 2),
        ("url_mismatch", 3),
    ]


def test_anthropic_sdk_message_batches(srv: FakeServer) -> None:
    anthropic = pytest.importorskip("anthropic")
    fake(srv).step = 60
    client = anthropic.Anthropic(base_url=srv.origin, api_key=KEY)

    def request(custom_id: str, text: str) -> dict:
        params = {
            "model": "claude-x",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": text}],
        }
        return {"custom_id": custom_id, "params": params}

    batch = client.messages.batches.create(
        requests=[request("a", "hello"), request("b", "BATCH_FAIL"), request("c", "BATCH_EXPIRE")]
    )
    assert batch.processing_status == "in_progress"
    assert batch.request_counts.processing == 3
    fake(srv).advance(60)
    batch = client.messages.batches.retrieve(batch.id)
    # Every request counts as processing until the whole batch has ended.
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 3
    fake(srv).advance(24 * 3600)
    batch = client.messages.batches.retrieve(batch.id)
    assert batch.processing_status == "ended" and batch.results_url
    counts = batch.request_counts
    assert (counts.succeeded, counts.errored, counts.expired, counts.processing) == (1, 1, 1, 0)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert (
        results["a"].type == "succeeded" and results["a"].message.content[0].text == "echo: hello"
    )
    assert results["b"].type == "errored" and results["b"].error.error.type == "api_error"
    assert results["c"].type == "expired"
    assert batch.id in [b.id for b in client.messages.batches.list()]

    held = client.messages.batches.create(requests=[request("z", "later")])
    assert client.messages.batches.cancel(held.id).processing_status == "canceling"
    fake(srv).advance(60)
    ended = client.messages.batches.retrieve(held.id)
    assert ended.processing_status == "ended" and ended.cancel_initiated_at is not None
    assert [r.result.type for r in client.messages.batches.results(held.id)] == ["canceled"]


def test_anthropic_sdk_create_is_validated_at_once(srv: FakeServer) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.Anthropic(base_url=srv.origin, api_key=KEY)
    params = {"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        client.messages.batches.create(requests=[{"custom_id": "has space", "params": params}])
    with pytest.raises(anthropic.BadRequestError, match="not unique"):
        client.messages.batches.create(
            requests=[{"custom_id": "a", "params": params}, {"custom_id": "a", "params": params}]
        )


def test_azure_sdk_global_batch(srv: FakeServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.AzureOpenAI(azure_endpoint=srv.origin, api_key=KEY, api_version=API_VERSION)
    text = openai_lines(["from azure"], url="/chat/completions", model="batch-deployment")
    file = client.files.create(file=("in.jsonl", text), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/chat/completions", completion_window="24h"
    )
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    (line,) = client.files.content(batch.output_file_id).text.splitlines()
    body = json.loads(line)["response"]["body"]
    assert body["model"] == "batch-deployment"
    assert body["choices"][0]["message"]["content"] == "echo: from azure"
    assert "content_filter_results" in body["choices"][0]  # Azure's own answer shape


# -- BatchClient end to end ------------------------------------------------------------------------


def chat(text: str, *, model: str = "m", system: str | None = None, schema=None) -> Call:
    messages = ({"role": "system", "content": system},) if system else ()
    return Call(
        model,
        (*messages, {"role": "user", "content": text}),
        params={"max_tokens": 200},
        schema=schema,
        strategy="tools" if schema else None,
    )


def provider_for(name: str, server: FakeServer):
    if name == "openai":
        return OpenAIProvider(server.url, KEY)
    if name == "azure":
        return AzureOpenAIProvider(server.origin, KEY, api_version=API_VERSION)
    return AnthropicProvider(server.origin, KEY)


PROVIDERS = ["openai", "azure", "anthropic"]


async def run_batches(client: BatchClient, items: list[tuple[str, Call]], **kwargs):
    """Submit ``items`` (split as the protocol does), retrieve each batch once, read results."""
    results = {}
    parts = client.protocol.parts(items, **kwargs)
    calls = dict(items)
    for part in parts:
        status = await client.submit(part)
        status = await client.retrieve(status.id)
        assert status.ended, status
        results.update(await client.results(status, {cid: calls[cid] for cid in part.custom_ids}))
    return parts, results


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_clean_batch(srv: FakeServer, name: str) -> None:
    items = [(f"row-{i}", chat(f"text {i}")) for i in range(4)]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        parts, results = await run_batches(client, items)
    assert len(parts) == 1
    assert list(results) == [cid for cid, _ in items]
    assert [r.completion.texts for r in results.values()] == [
        (f"echo: text {i}",) for i in range(4)
    ]
    assert all(r.completion.prompt_tokens > 0 for r in results.values())
    assert fake(srv).stats()["batches"] == 1


@pytest.mark.parametrize("name", PROVIDERS)
async def test_structured_answers_come_back_through_the_providers_parse(
    srv: FakeServer, name: str
) -> None:
    items = [("ada", chat("name=Ada", schema=SCHEMA)), ("alan", chat("name=Alan", schema=SCHEMA))]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        _, results = await run_batches(client, items)
    assert [json.loads(r.completion.texts[0]) for r in results.values()] == [
        {"items": [{"name": "Ada"}]},
        {"items": [{"name": "Alan"}]},
    ]


@pytest.mark.parametrize("name", PROVIDERS)
async def test_failed_lines_are_retryable_and_succeed_when_resubmitted(
    srv: FakeServer, name: str
) -> None:
    items = [("ok", chat("fine")), ("flaky", chat("BATCH_FAIL once"))]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        _, first = await run_batches(client, items)
        assert first["ok"].ok
        error = first["flaky"].error
        assert isinstance(error, APIError) and error.status == 500
        assert (error.verdict.scope, error.verdict.retry) == ("row", True)
        _, again = await run_batches(client, [("flaky", items[1][1])])
    assert again["flaky"].completion.texts == ("echo: BATCH_FAIL once",)
    assert fake(srv).stats()["batches"] == 2


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_an_expired_batch_keeps_what_ran(srv: FakeServer, name: str) -> None:
    batches = fake(srv)
    items = [("done", chat("quick")), ("stuck", chat("BATCH_EXPIRE me"))]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        (part,) = client.protocol.parts(items)
        status = await client.submit(part)
        status = await client.retrieve(status.id)
        assert not status.ended  # one line never runs: the batch waits for it
        batches.advance(24 * 3600)
        status = await client.retrieve(status.id)
        assert (status.state, status.outcome) == ("ended", "expired")
        results = await client.results(status, items)
        assert results["done"].completion.texts == ("echo: quick",)
        stuck = results["stuck"].error
        assert (stuck.code, stuck.verdict.scope, stuck.verdict.retry) == (
            "batch_expired",
            "row",
            True,
        )
        _, again = await run_batches(client, [("stuck", items[1][1])])
    assert again["stuck"].ok


@pytest.mark.parametrize("name", ["openai", "anthropic"])
async def test_steps_due_before_the_window_closed_still_happened(
    srv: FakeServer, name: str
) -> None:
    fake(srv).step = 60
    items = [("a", chat("one")), ("b", chat("two"))]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        (part,) = client.protocol.parts(items)
        status = await client.submit(part)
        fake(srv).advance(48 * 3600)  # nobody looked for two days
        status = await client.retrieve(status.id)
        assert (status.state, status.outcome) == ("ended", "completed")
        results = await client.results(status, items)
    assert all(r.ok for r in results.values())


async def test_azure_does_not_expire_a_long_batch(srv: FakeServer) -> None:
    items = [("stuck", chat("BATCH_EXPIRE me"))]
    async with BatchClient(provider_for("azure", srv), secret=KEY) as client:
        (part,) = client.protocol.parts(items)
        status = await client.submit(part)
        fake(srv).advance(48 * 3600)
        status = await client.retrieve(status.id)
    assert status.provider_status == "in_progress"


@pytest.mark.parametrize("name", PROVIDERS)
async def test_cancel_keeps_nothing_unrun(srv: FakeServer, name: str) -> None:
    batches = fake(srv)
    batches.step = 600
    items = [(f"r{i}", chat(f"row {i}")) for i in range(3)]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        (part,) = client.protocol.parts(items)
        status = await client.submit(part)
        cancelling = await client.cancel(status.id)
        assert cancelling.state == "cancelling"
        batches.advance(600)
        status = await client.retrieve(status.id)
        assert (status.state, status.outcome) == ("ended", "cancelled")
        results = await client.results(status, items)
    assert {r.error.code for r in results.values()} == {"batch_cancelled"}
    assert all(r.error.verdict.retry for r in results.values())
    assert batches.stats()["cancels"] == 1


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_batch_split_by_the_limits(srv: FakeServer, name: str) -> None:
    items = [(f"r{i}", chat(f"row {i}")) for i in range(5)]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        parts, results = await run_batches(client, items, limits=BatchLimits(2, 10**6))
    assert [len(p) for p in parts] == [2, 2, 1]
    assert fake(srv).stats()["batches"] == 3
    assert [r.completion.texts[0] for r in results.values()] == [f"echo: row {i}" for i in range(5)]


@pytest.mark.parametrize("name", ["openai", "azure"])
async def test_a_rejected_batch_fails_the_call_with_the_providers_reasons(
    srv: FakeServer, name: str
) -> None:
    fake(srv).max_requests = 2
    items = [(f"r{i}", chat(f"row {i}")) for i in range(3)]
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        (part,) = client.protocol.parts(items)  # the client's own limits are larger
        status = await client.submit(part)
        with pytest.raises(APIError, match="too_many_tasks") as caught:
            await client.retrieve(status.id)
    assert (caught.value.verdict.scope, caught.value.verdict.retry) == ("run", False)


async def test_anthropic_refuses_an_oversized_batch_at_create(srv: FakeServer) -> None:
    fake(srv).max_requests = 2
    items = [(f"r{i}", chat(f"row {i}")) for i in range(3)]
    async with BatchClient(provider_for("anthropic", srv), secret=KEY) as client:
        (part,) = client.protocol.parts(items)
        with pytest.raises(APIError, match="at most 2 requests") as caught:
            await client.submit(part)
    assert caught.value.status == 400 and caught.value.verdict.scope == "run"
    assert fake(srv).stats()["batches"] == 0


async def test_a_file_too_large_is_refused_at_upload(srv: FakeServer) -> None:
    fake(srv).max_bytes = 100
    items = [("big", chat("x" * 200))]
    async with BatchClient(provider_for("openai", srv), secret=KEY) as client:
        (part,) = client.protocol.parts(items)
        with pytest.raises(APIError, match="too large") as caught:
            await client.submit(part)
    assert (caught.value.verdict.scope, caught.value.verdict.retry) == ("run", False)
    assert fake(srv).stats()["batches"] == 0


@pytest.mark.parametrize("name", PROVIDERS)
async def test_a_context_length_line_fails_its_row_without_retry(
    server_factory: Factory, name: str
) -> None:
    server = server_factory(api_key=KEY, context_window=300)
    items = [("short", chat("hi")), ("long", chat("word " * 100))]
    async with BatchClient(provider_for(name, server), secret=KEY) as client:
        _, results = await run_batches(client, items)
    assert results["short"].ok
    error = results["long"].error
    assert error.status == 400
    assert (error.verdict.scope, error.verdict.retry) == ("row", False)


async def test_rate_limited_lines_wait_for_a_later_step(server_factory: Factory) -> None:
    now = [0.0]
    server = server_factory(api_key=KEY, rpm=60, burst=2, clock=lambda: now[0])
    items = [(f"r{i}", chat(f"row {i}")) for i in range(4)]
    async with BatchClient(provider_for("openai", server), secret=KEY) as client:
        (part,) = client.protocol.parts(items)
        status = await client.submit(part)
        status = await client.retrieve(status.id)
        assert (status.provider_status, status.done) == ("in_progress", 2)
        now[0] += 2.0  # the server's bucket refills two requests
        status = await client.retrieve(status.id)
        assert status.provider_status == "completed"
        results = await client.results(status, items)
    assert all(r.ok for r in results.values())


@pytest.mark.parametrize("name", PROVIDERS)
async def test_list_batches_pages_newest_first(srv: FakeServer, name: str) -> None:
    async with BatchClient(provider_for(name, srv), secret=KEY) as client:
        ids = []
        for i in range(3):
            (part,) = client.protocol.parts([(f"r{i}", chat(f"row {i}"))])
            ids.append((await client.submit(part)).id)
        listed = [status.id async for status in client.list_batches(page_size=1)]
    assert listed == ids[::-1]


async def test_a_wrong_key_fails_the_run(srv: FakeServer) -> None:
    async with BatchClient(
        OpenAIProvider(srv.url, "sk-wrong-key-000000"), secret="sk-wrong-key-000000"
    ) as client:
        (part,) = client.protocol.parts([("a", chat("x"))])
        with pytest.raises(APIError) as caught:
            await client.submit(part)
    assert caught.value.status == 401 and caught.value.verdict.scope == "run"


async def test_the_key_is_scrubbed_from_batch_errors() -> None:
    # A server that echoes the key back, in another letter case, as some gateways do.
    async def echo(request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "")
        message = f"bad request for {given.upper()}"
        return web.json_response({"error": {"message": message}}, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        provider = OpenAIProvider(f"http://127.0.0.1:{port}/v1", KEY)
        async with BatchClient(provider, secret=KEY) as client:
            with pytest.raises(APIError) as caught:
                await client.retrieve("b1")
    finally:
        await runner.cleanup()
    assert KEY.upper() not in str(caught.value) and KEY not in str(caught.value)
    assert "***" in str(caught.value)


# -- cached tokens ---------------------------------------------------------------------------------


LONG_SYSTEM = "Follow these house rules carefully. " * 130  # 1,170 tokens: cacheable


async def post(url: str, body: dict, headers: dict) -> dict:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def test_openai_answers_report_cached_tokens_for_a_repeated_prefix(srv: FakeServer) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}

    def body(row: str) -> dict:
        system = {"role": "system", "content": LONG_SYSTEM}
        return {"model": "m", "messages": [system, {"role": "user", "content": row}]}

    first = await post(f"{srv.url}/chat/completions", body("row one"), auth)
    second = await post(f"{srv.url}/chat/completions", body("row two"), auth)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == -(-len(LONG_SYSTEM) // 4)
    assert cached < second["usage"]["prompt_tokens"]
    # A short prefix is never cached.
    short = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(2):
        answer = await post(f"{srv.url}/chat/completions", short, auth)
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_anthropic_answers_report_cache_writes_then_reads(srv: FakeServer) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    system = [{"type": "text", "text": LONG_SYSTEM, "cache_control": {"type": "ephemeral"}}]

    def body(row: str, marked: bool = True) -> dict:
        return {
            "model": "claude-x",
            "max_tokens": 50,
            "system": system if marked else LONG_SYSTEM,
            "messages": [{"role": "user", "content": row}],
        }

    unmarked = await post(f"{srv.origin}/v1/messages", body("row zero", marked=False), headers)
    first = await post(f"{srv.origin}/v1/messages", body("row one"), headers)
    second = await post(f"{srv.origin}/v1/messages", body("row two"), headers)
    prefix = -(-len(LONG_SYSTEM) // 4)
    assert unmarked["usage"]["cache_creation_input_tokens"] == 0  # no marker, no cache
    assert first["usage"]["cache_creation_input_tokens"] == prefix
    assert first["usage"]["cache_read_input_tokens"] == 0
    assert second["usage"]["cache_read_input_tokens"] == prefix
    assert second["usage"]["cache_creation_input_tokens"] == 0
    # Uncached and cached input still add up to the whole prompt.
    total = second["usage"]["input_tokens"] + second["usage"]["cache_read_input_tokens"]
    assert total == unmarked["usage"]["input_tokens"]


@pytest.mark.parametrize("name", ["anthropic", "openai"])
async def test_a_cold_batch_reads_nothing_a_warmed_one_reads_it_all(
    srv: FakeServer, name: str
) -> None:
    provider = provider_for(name, srv)

    def items(system: str) -> list[tuple[str, Call]]:
        return [(f"r{i}", chat(f"row {i}", model="claude-x", system=system)) for i in range(3)]

    def cached(results) -> list[CacheUsage]:
        return [r.cache for r in results.values()]

    cold_prefix, warm_prefix = LONG_SYSTEM + " Cold.", LONG_SYSTEM + " Warm."
    async with BatchClient(provider, secret=KEY) as client:
        _, cold = await run_batches(client, items(cold_prefix))
        # A second batch created after the first one ran finds the prefix cached.
        _, later = await run_batches(client, items(cold_prefix))

        # One live request before the batch warms the cache for all of its lines.
        (warm_call,) = [c for _, c in items(warm_prefix)][:1]
        request = provider.build(warm_call)
        body = provider.with_prompt_cache(warm_call, dict(request.json))
        await post(request.url, body, dict(request.headers))
        _, warm = await run_batches(client, items(warm_prefix))

    tokens = -(-len(cold_prefix) // 4)
    assert all(c.read == 0 for c in cached(cold))
    assert all(c.read == tokens for c in cached(later))
    assert all(c.read == -(-len(warm_prefix) // 4) for c in cached(warm))
    if name == "anthropic":
        assert all(c.written == tokens for c in cached(cold))  # every cold line pays the write
