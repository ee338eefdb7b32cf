"""The scheduler's logic with a scripted client: no HTTP, no real waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from parrot_pandas._config import RunConfig
from parrot_pandas._events import Retry, RowsDone, RowsFailed, RowsSkipped, RunStats
from parrot_pandas._limits import LimitInfo, RateBudget
from parrot_pandas._plan import RequestPlan
from parrot_pandas._scheduler import Scheduler
from parrot_pandas.errors import APIConnectionError, APIError
from parrot_pandas.providers import Call, Completion
from parrot_pandas.providers.openai import OpenAIProvider


class ScriptedClient:
    """Answers `echo: <prompt>`; `script(prompt, attempt)` may return an exception to raise."""

    def __init__(
        self, script: Callable[[str, int], Exception | None] | None = None, delay: float = 0.0
    ):
        self.script = script or (lambda prompt, attempt: None)
        self.delay = delay
        self.sent: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.log: list[tuple[str, str]] = []

    async def send(self, call: Call) -> Completion:
        prompt = call.messages[-1]["content"]
        attempt = self.sent.count(prompt)
        self.sent.append(prompt)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.log.append(("start", prompt))
        try:
            await asyncio.sleep(self.delay)
            problem = self.script(prompt, attempt)
            if problem is not None:
                raise problem
            return Completion(
                texts=(f"echo: {prompt}",) * call.n, prompt_tokens=10, completion_tokens=5
            )
        finally:
            self.in_flight -= 1
            self.log.append(("end", prompt))


class RecordingBudget(RateBudget):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.pauses: list[float] = []

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        super().pause(seconds)


def _scheduler(client, budget=None, *, events=None, **options):
    config = RunConfig.from_options(base_url="http://127.0.0.1:1/v1", cache=False, **options)
    listeners = [events.append] if events is not None else []
    return Scheduler(
        RequestPlan(config), client, budget or RateBudget(), listeners=listeners, retry_factor=0.0
    )


def _values(outcome):
    return [None if job is None else (job.values, job.error) for job in outcome]


async def test_every_prompt_is_answered_in_order():
    client = ScriptedClient(delay=0.001)
    prompts = [f"p{i}" for i in range(50)]
    outcome = await _scheduler(client, max_concurrency=8).run(iter(prompts), rows=50)
    assert [job.values for job in outcome] == [[f"echo: p{i}"] for i in range(50)]
    assert client.max_in_flight <= 8


async def test_setup_request_goes_alone():
    client = ScriptedClient(delay=0.01)
    await _scheduler(client, max_concurrency=8).run(iter(["a", "b", "c", "d"]), rows=4)
    assert client.log[:2] == [("start", "a"), ("end", "a")]


async def test_transient_errors_are_retried_and_counted():
    def script(prompt, attempt):
        if prompt == "b" and attempt < 2:
            return APIError("overloaded", status=503)
        return None

    events: list = []
    outcome = await _scheduler(ScriptedClient(script), events=events).run(iter(["a", "b"]), rows=2)
    assert outcome[1].values == ["echo: b"]
    assert [e.attempt for e in events if isinstance(e, Retry)] == [1, 2]


async def test_row_failing_after_retries_does_not_stop_the_others():
    def script(prompt, attempt):
        return APIConnectionError("dropped") if prompt == "bad" else None

    events: list = []
    stats = RunStats()
    scheduler = _scheduler(ScriptedClient(script), events=events, max_retries=2)
    scheduler.listeners.append(stats)
    outcome = await scheduler.run(iter(["ok1", "bad", "ok2"]), rows=3)
    assert outcome[0].values == ["echo: ok1"] and outcome[2].values == ["echo: ok2"]
    assert outcome[1].error == "dropped" and outcome[1].values is None
    assert stats.facts["failed_rows"] == 1 and stats.facts["retries"] == 2
    assert stats.facts["requests"] == 2 + 3  # two good rows, three attempts at the bad one


async def test_non_retryable_row_error_is_not_retried():
    def script(prompt, attempt):
        return APIError("content filtered", status=400) if prompt == "b" else None

    client = ScriptedClient(script)
    outcome = await _scheduler(client).run(iter(["a", "b"]), rows=2)
    assert client.sent.count("b") == 1 and outcome[1].error == "HTTP 400: content filtered"


@pytest.mark.parametrize("status", [400, 401, 403, 404])
async def test_setup_request_refusal_fails_the_run_at_once(status):
    client = ScriptedClient(lambda p, a: APIError("no such thing", status=status))
    with pytest.raises(APIError, match="no such thing"):
        await _scheduler(client).run(iter(["a", "b", "c"]), rows=3)
    assert client.sent == ["a"]


async def test_key_refused_mid_run_stops_the_run():
    client = ScriptedClient(lambda p, a: APIError("key revoked", status=401) if p == "c" else None)
    with pytest.raises(APIError, match="key revoked"):
        await _scheduler(client, max_concurrency=1).run(iter("abcdef"), rows=6)
    assert "f" not in client.sent


async def test_429_pauses_the_shared_budget_for_the_announced_reset():
    # `20ms` is twenty milliseconds: the pause must not be twenty minutes.
    limits = LimitInfo(limit_requests=100, remaining_requests=0, reset_requests=0.02)

    def script(prompt, attempt):
        if prompt == "b" and attempt == 0:
            error = APIError("Rate limit reached", status=429)
            error.limits = limits
            return error
        return None

    budget = RecordingBudget()
    outcome = await _scheduler(ScriptedClient(script), budget).run(iter("abc"), rows=3)
    assert budget.pauses == [pytest.approx(0.02)]
    assert all(job.values for job in outcome)


async def test_429_without_headers_pauses_on_retry_after():
    def script(prompt, attempt):
        return (
            APIError("slow down", status=429, retry_after=0.05)
            if attempt == 0 and prompt == "b"
            else None
        )

    budget = RecordingBudget()
    await _scheduler(ScriptedClient(script), budget).run(iter("ab"), rows=2)
    assert budget.pauses == [pytest.approx(0.05)]


async def test_missing_prompts_are_skipped_and_duplicates_shared():
    events: list = []
    client = ScriptedClient()
    outcome = await _scheduler(client, events=events).run(iter(["x", None, "x", "y"]), rows=4)
    assert outcome[1] is None and outcome[0] is outcome[2]
    assert sorted(client.sent) == ["x", "y"]
    done = sum(e.rows for e in events if isinstance(e, RowsDone))
    skipped = sum(e.rows for e in events if isinstance(e, RowsSkipped))
    assert done == 3 and skipped == 1


async def test_duplicate_of_a_failed_row_is_reported_failed():
    events: list = []
    client = ScriptedClient(lambda p, a: APIError("bad", status=400) if p == "x" else None)
    prompts = ["y"] + ["x"] + [f"z{i}" for i in range(300)] + ["x"]  # past one lookup batch
    outcome = await _scheduler(client, events=events).run(iter(prompts), rows=len(prompts))
    assert outcome[1].error and outcome[-1] is outcome[1]
    assert sum(e.rows for e in events if isinstance(e, RowsFailed)) == 2


async def test_rows_are_rendered_lazily():
    consumed = 0

    def prompts():
        nonlocal consumed
        for i in range(5000):
            consumed += 1
            yield f"p{i}"

    seen_at_first_request: list[int] = []

    def script(prompt, attempt):
        if not seen_at_first_request:
            seen_at_first_request.append(consumed)
        return None

    await _scheduler(ScriptedClient(script), max_concurrency=4).run(prompts(), rows=5000)
    assert consumed == 5000
    assert seen_at_first_request[0] <= 300  # one cache-lookup batch, not the whole frame


async def test_concurrency_follows_littles_law():
    client = ScriptedClient(delay=0.05)
    budget = RateBudget(rpm=600)  # 10 requests/s at 98% headroom
    scheduler = _scheduler(client, budget, max_concurrency=50)
    await scheduler.run(iter(f"p{i}" for i in range(12)), rows=12)
    # rate 9.8/s x 0.05 s x 1.5 margin -> ceil(0.74) + 2 = 3 in flight, not 50.
    assert scheduler.facts()["concurrency"] == 3
    assert client.max_in_flight <= 3


async def test_samples_missing_from_a_short_answer_are_requested_again():
    class OneChoice(ScriptedClient):
        async def send(self, call):
            completion = await super().send(call)
            return Completion(texts=completion.texts[:1], prompt_tokens=1, completion_tokens=1)

    client = OneChoice()
    outcome = await _scheduler(client, n=3).run(iter(["a"]), rows=1)
    assert client.sent == ["a", "a", "a"] and outcome[0].values == ["echo: a"]


def test_provider_reads_openai_reset_durations():
    info = OpenAIProvider("http://x/v1").limits(
        {
            "x-ratelimit-reset-requests": "20ms",
            "x-ratelimit-reset-tokens": "6m0s",
            "x-ratelimit-remaining-tokens": "0",
        }
    )
    assert info.reset_requests == pytest.approx(0.02) and info.reset_tokens == 360
    assert info.wait_after_429() == 60  # capped: a 6-minute reset never freezes a run


async def test_auto_strategy_moves_on_when_the_server_ignores_it():
    class IgnoresTools(ScriptedClient):
        async def send(self, call):
            await super().send(call)
            self.strategies = getattr(self, "strategies", []) + [call.strategy]
            text = "Sure! Here you go." if call.strategy == "tools" else '{"items": [{"a": "1"}]}'
            return Completion(texts=(text,), prompt_tokens=1, completion_tokens=1)

    from parrot_pandas._structured import normalize_fields

    config = RunConfig.from_options(base_url="http://127.0.0.1:1/v1", cache=False)
    plan = RequestPlan(config, normalize_fields(["a"]), strategy="tools")
    client = IgnoresTools()
    scheduler = Scheduler(plan, client, RateBudget(), retry_factor=0.0)
    outcome = await scheduler.run(iter(["x", "y", "z"]), rows=3)
    assert [job.values for job in outcome] == [[{"a": "1"}]] * 3
    assert client.strategies == ["tools", "json_schema", "json_schema", "json_schema"]
    assert scheduler.facts()["strategy"] == "json_schema"
