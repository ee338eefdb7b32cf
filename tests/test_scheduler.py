"""The scheduler's logic with a scripted client: no HTTP, and virtual time (the fake clock)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from parrot_pandas._cache import ResponseCache
from parrot_pandas._config import RunConfig
from parrot_pandas._events import Retry, RowsDone, RowsFailed, RowsSkipped, RunStats
from parrot_pandas._limits import LimitInfo, RateBudget
from parrot_pandas._plan import RequestPlan
from parrot_pandas._scheduler import _SETUP_TRIES, Scheduler
from parrot_pandas._structured import normalize_fields
from parrot_pandas.errors import (
    RATE_LIMITED,
    APIConnectionError,
    APIError,
    StructuredOutputError,
    Verdict,
)
from parrot_pandas.providers import Call, Completion
from parrot_pandas.providers.base import (
    ROW_FILTERED,
    ROW_TOO_LARGE,
    RUN_QUOTA,
    UNSUPPORTED_STRATEGY,
    no_structure,
    truncated,
)
from parrot_pandas.providers.openai import OpenAIProvider

Script = Callable[[str, int], "Exception | Completion | None"]


class ScriptedClient:
    """Answers `echo: <prompt>`; `script(prompt, attempt)` may return an exception to raise or
    a Completion to return instead. `delay` seconds pass on the fake clock per request."""

    def __init__(self, script: Script | None = None, delay: float = 0.0, clock=None):
        self.script = script or (lambda prompt, attempt: None)
        self.delay = delay
        self.clock = clock
        self.sent: list[str] = []
        self.strategies: list[str | None] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.log: list[tuple[str, str]] = []

    async def send(self, call: Call) -> Completion:
        prompt = call.messages[-1]["content"]
        attempt = self.sent.count(prompt)
        self.sent.append(prompt)
        self.strategies.append(call.strategy)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.log.append(("start", prompt))
        try:
            if self.delay:
                await self.clock.sleep(self.delay)
            else:
                await asyncio.sleep(0)
            outcome = self.script(prompt, attempt)
            if isinstance(outcome, Exception):
                raise outcome
            if isinstance(outcome, Completion):
                return outcome
            return Completion(
                texts=(f"echo: {prompt}",) * call.n, prompt_tokens=10, completion_tokens=5
            )
        finally:
            self.in_flight -= 1
            self.log.append(("end", prompt))


@pytest.fixture
def make(fake_clock):
    """A scheduler on the fake clock: make(client, budget=None, events=None, **options)."""

    def build(client, budget=None, *, events=None, fields=None, strategy="tools", **options):
        options.setdefault("cache", False)
        config = RunConfig.from_options(base_url="http://127.0.0.1:1/v1", **options)
        listeners = [events.append] if events is not None else []
        plan = RequestPlan(config)
        if fields is not None:
            plan = RequestPlan(config, normalize_fields(fields), strategy=strategy)
        cache = options["cache"]
        return Scheduler(
            plan,
            client,
            budget or RateBudget(clock=fake_clock, sleep=fake_clock.sleep),
            cache=ResponseCache(cache) if cache else None,
            listeners=listeners,
            clock=fake_clock,
            sleep=fake_clock.sleep,
        )

    return build


def _values(outcome):
    return [None if job is None else (job.values, job.error) for job in outcome]


def failing(prompt: str, error: Exception) -> Script:
    return lambda p, a: error if p == prompt else None


async def test_every_prompt_is_answered_in_order(make, fake_clock):
    client = ScriptedClient(delay=0.001, clock=fake_clock)
    prompts = [f"p{i}" for i in range(50)]
    outcome = await make(client, max_concurrency=8).run(iter(prompts), rows=50)
    assert [job.values for job in outcome] == [[f"echo: p{i}"] for i in range(50)]
    assert client.max_in_flight <= 8


async def test_setup_request_goes_alone(make, fake_clock):
    client = ScriptedClient(delay=0.01, clock=fake_clock)
    await make(client, max_concurrency=8).run(iter(["a", "b", "c", "d"]), rows=4)
    assert client.log[:2] == [("start", "a"), ("end", "a")]


async def test_transient_errors_are_retried_and_counted(make, fake_clock):
    def script(prompt, attempt):
        return APIError("overloaded", status=503) if prompt == "b" and attempt < 2 else None

    events: list = []
    outcome = await make(ScriptedClient(script), events=events).run(iter(["a", "b"]), rows=2)
    assert outcome[1].values == ["echo: b"]
    retries = [e for e in events if isinstance(e, Retry)]
    assert [e.attempt for e in retries] == [1, 2]
    # The backoff waited on the injected sleep: full jitter under 0.5 s, then under 1 s.
    assert [e.wait for e in retries] == fake_clock.slept
    assert 0 <= retries[0].wait <= 0.5 and 0 <= retries[1].wait <= 1.0


async def test_row_failing_after_retries_does_not_stop_the_others(make):
    events: list = []
    stats = RunStats()
    client = ScriptedClient(failing("bad", APIConnectionError("dropped")))
    scheduler = make(client, events=events, max_retries=2)
    scheduler.listeners.append(stats)
    outcome = await scheduler.run(iter(["ok1", "bad", "ok2"]), rows=3)
    assert outcome[0].values == ["echo: ok1"] and outcome[2].values == ["echo: ok2"]
    assert outcome[1].error == "dropped" and outcome[1].values is None
    assert stats.facts["failed_rows"] == 1 and stats.facts["retries"] == 2
    assert stats.facts["requests"] == 2 + 3  # two good rows, three attempts at the bad one


async def test_non_retryable_row_error_is_not_retried(make):
    client = ScriptedClient(failing("b", APIError("content filtered", status=400)))
    outcome = await make(client).run(iter(["a", "b"]), rows=2)
    assert client.sent.count("b") == 1 and outcome[1].error == "HTTP 400: content filtered"


# -- every decision comes from the error's own verdict ------------------------------------------


@pytest.mark.parametrize(
    ("verdict", "sent"),
    [
        (Verdict("row", False, "said_no"), 1),  # a 503 the provider says will repeat
        (Verdict("row", True, "said_yes"), 3),  # a 400 the provider says may change
    ],
)
async def test_only_the_verdict_decides_a_retry(make, verdict, sent):
    status = 503 if not verdict.retry else 400
    client = ScriptedClient(failing("b", APIError("no", status=status, verdict=verdict)))
    await make(client, max_retries=2).run(iter(["a", "b"]), rows=2)
    assert client.sent.count("b") == sent


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_setup_request_refusal_fails_the_run_at_once(make, status):
    client = ScriptedClient(lambda p, a: APIError("no such thing", status=status))
    with pytest.raises(APIError, match="no such thing"):
        await make(client).run(iter(["a", "b", "c"]), rows=3)
    assert client.sent == ["a"]


async def test_a_row_verdict_on_the_setup_request_makes_the_next_row_the_setup(make, fake_clock):
    # The old rule failed the run on any 400 of the first row not matching a list of patterns.
    client = ScriptedClient(failing("a", APIError("this prompt is odd", status=400)), 0.01)
    client.clock = fake_clock
    outcome = await make(client, max_concurrency=8).run(iter("abcd"), rows=4)
    assert outcome[0].error == "HTTP 400: this prompt is odd"
    assert [job.values for job in outcome[1:]] == [["echo: b"], ["echo: c"], ["echo: d"]]
    # "b" went alone too: it was the setup request once "a" had failed.
    assert client.log[:4] == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]


async def test_a_persistent_5xx_on_the_setup_row_fails_only_that_row(make):
    client = ScriptedClient(failing("a", APIError("boom", status=500)))
    outcome = await make(client, max_retries=2).run(iter("abc"), rows=3)
    assert outcome[0].error == "HTTP 500: boom" and client.sent.count("a") == 3
    assert [job.values for job in outcome[1:]] == [["echo: b"], ["echo: c"]]


async def test_setup_stops_the_run_after_repeated_row_failures(make):
    client = ScriptedClient(lambda p, a: APIError("boom", status=500))
    with pytest.raises(APIError, match=f"the first {_SETUP_TRIES} rows sent all failed") as info:
        await make(client, max_retries=1).run(iter("abcdefgh"), rows=8)
    assert "boom" in str(info.value) and info.value.verdict.scope == "run"
    assert client.sent == ["a", "a", "b", "b", "c", "c"]  # never the other five rows


async def test_three_failed_rows_with_none_left_are_just_failed_rows(make):
    client = ScriptedClient(lambda p, a: APIError("boom", status=500))
    outcome = await make(client, max_retries=0).run(iter("abc"), rows=3)
    assert [job.error for job in outcome] == ["HTTP 500: boom"] * 3  # nothing left to save


async def test_a_run_verdict_mid_run_stops_the_run(make):
    quota = APIError("You exceeded your current quota", status=429, verdict=RUN_QUOTA)
    client = ScriptedClient(failing("c", quota))
    with pytest.raises(APIError, match="quota"):
        await make(client, max_concurrency=1).run(iter("abcdef"), rows=6)
    assert client.sent == ["a", "b", "c"]  # not retried, and nothing after it


async def test_key_refused_mid_run_stops_the_run(make):
    client = ScriptedClient(failing("c", APIError("key revoked", status=401)))
    with pytest.raises(APIError, match="key revoked"):
        await make(client, max_concurrency=1).run(iter("abcdef"), rows=6)
    assert "f" not in client.sent


async def test_429_pauses_the_shared_budget_for_the_announced_reset(make, recording_budget):
    # `20ms` is twenty milliseconds: the pause must not be twenty minutes.
    limits = LimitInfo(limit_requests=100, remaining_requests=0, reset_requests=0.02)

    def script(prompt, attempt):
        if prompt == "b" and attempt == 0:
            error = APIError("Rate limit reached", status=429)
            error.limits = limits
            return error
        return None

    budget = recording_budget()
    outcome = await make(ScriptedClient(script), budget).run(iter("abc"), rows=3)
    assert budget.pauses == [pytest.approx(0.02)]
    assert all(job.values for job in outcome)


async def test_429_without_headers_pauses_on_retry_after(make, recording_budget):
    def script(prompt, attempt):
        if attempt == 0 and prompt == "b":
            return APIError("slow down", status=429, retry_after=0.05)
        return None

    budget = recording_budget()
    await make(ScriptedClient(script), budget).run(iter("ab"), rows=2)
    assert budget.pauses == [pytest.approx(0.05)]


async def test_a_429_with_nothing_to_go_by_pauses_for_the_one_default(make, recording_budget):
    client = ScriptedClient(lambda p, a: APIError("busy", status=429) if a == 0 else None)
    budget = recording_budget()
    await make(client, budget).run(iter("a"), rows=1)
    assert budget.pauses == [1.0]


async def test_a_request_too_large_costs_one_request_and_pauses_no_one(make, recording_budget):
    too_large = APIError("Request too large", status=429, verdict=ROW_TOO_LARGE)
    client = ScriptedClient(failing("b", too_large))
    budget = recording_budget()
    outcome = await make(client, budget).run(iter("abc"), rows=3)
    assert client.sent.count("b") == 1 and outcome[1].error == "HTTP 429: Request too large"
    assert budget.pauses == []
    assert RATE_LIMITED.retry and not ROW_TOO_LARGE.retry


# -- answers the provider judged unusable -------------------------------------------------------


def _unusable(problem: StructuredOutputError) -> Completion:
    return Completion(texts=(), prompt_tokens=3, completion_tokens=3, problems=(problem,))


def _cut() -> StructuredOutputError:
    return truncated(Call("m", (), params={"max_tokens": 16}), "finish_reason 'length'")


async def test_a_truncated_answer_fails_its_row_once_and_is_not_cached(make, tmp_path):
    path = tmp_path / "cache.sqlite3"
    client = ScriptedClient(lambda p, a: _unusable(_cut()) if p == "b" else None)
    outcome = await make(client, cache=str(path)).run(iter("abc"), rows=3)
    assert client.sent.count("b") == 1
    assert "max_tokens=32 (twice the current 16)" in outcome[1].error
    with ResponseCache(path) as cache:
        keys = [job.key for job in outcome]
        assert set(cache.get_many(keys)) == {outcome[0].key, outcome[2].key}


async def test_partial_samples_are_kept_when_the_rest_is_cut(make):
    def script(prompt, attempt):
        return Completion(texts=("one", "two"), problems=(_cut(),))

    client = ScriptedClient(script)
    outcome = await make(client, n=3).run(iter("a"), rows=1)
    assert outcome[0].values == ["one", "two"] and outcome[0].error is None
    assert client.sent == ["a"]  # the cut third sample is not paid for again


@pytest.mark.parametrize(
    "problem",
    [
        _cut(),
        StructuredOutputError("withheld", verdict=ROW_FILTERED),
        APIError("This model's maximum context length is 10", status=400),
    ],
    ids=["truncated", "content_filter", "context_length"],
)
async def test_what_the_first_answer_holds_never_moves_the_strategy(make, problem):
    def script(prompt, attempt):
        if prompt != "x":
            return Completion(texts=('{"items": [{"a": "1"}]}',))
        return problem if isinstance(problem, APIError) else _unusable(problem)

    client = ScriptedClient(script)
    scheduler = make(client, fields=["a"], structured="auto")
    outcome = await scheduler.run(iter(["x", "y", "z"]), rows=3)
    assert outcome[0].error and not outcome[1].error and not outcome[2].error
    assert set(client.strategies) == {"tools"} and scheduler.facts()["strategy"] == "tools"
    assert client.sent.count("x") == 1


async def test_auto_strategy_moves_on_when_the_server_ignores_it(make):
    def script(prompt, attempt):
        # What the provider makes of an answer with no JSON at all to a forced tool call.
        if client.strategies[-1] == "tools":
            return _unusable(no_structure(Call("m", (), strategy="tools"), sends_parameter=True))
        return Completion(texts=('{"items": [{"a": "1"}]}',), prompt_tokens=1)

    client = ScriptedClient(script)
    scheduler = make(client, fields=["a"], structured="auto")
    outcome = await scheduler.run(iter(["x", "y", "z"]), rows=3)
    assert [job.values for job in outcome] == [[{"a": "1"}]] * 3
    assert client.strategies == ["tools", "json_schema", "json_schema", "json_schema"]
    assert scheduler.facts()["strategy"] == "json_schema"


async def test_auto_strategy_moves_on_when_the_server_refuses_it(make):
    refused = APIError("tools is not supported", status=400, verdict=UNSUPPORTED_STRATEGY)

    def script(prompt, attempt):
        if client.strategies[-1] in ("tools", "json_schema"):
            return refused
        return Completion(texts=('{"items": []}',))

    client = ScriptedClient(script)
    scheduler = make(client, fields=["a"], structured="auto")
    await scheduler.run(iter(["x", "y"]), rows=2)
    assert client.strategies == ["tools", "json_schema", "json_object", "json_object"]


async def test_a_fixed_strategy_the_server_refuses_fails_the_run_naming_auto(make):
    refused = APIError("tools is not supported", status=400, verdict=UNSUPPORTED_STRATEGY)
    client = ScriptedClient(lambda p, a: refused)
    with pytest.raises(APIError, match='structured="auto"') as info:
        await make(client, fields=["a"], structured="tools").run(iter(["x", "y"]), rows=2)
    assert "tools is not supported" in str(info.value) and client.sent == ["x"]


async def test_a_strategy_verdict_after_the_setup_is_that_rows_problem(make):
    ignored = no_structure(Call("m", (), strategy="tools"), sends_parameter=True)
    answer = Completion(texts=('{"items": []}',))
    client = ScriptedClient(lambda p, a: _unusable(ignored) if p == "y" else answer)
    scheduler = make(client, fields=["a"], max_retries=1)
    outcome = await scheduler.run(iter(["x", "y", "z"]), rows=3)
    assert outcome[1].error and not outcome[2].error
    assert client.sent.count("y") == 2  # retried (the model may comply), and tools stays
    assert set(client.strategies) == {"tools"}


async def test_a_value_that_never_fits_fails_without_retry_but_its_answer_is_cached(make, tmp_path):
    never = Verdict("row", False, "invalid_value")

    def parse(text: str) -> str:
        if "bad" in text:
            raise StructuredOutputError("field 'a': out of range", verdict=never)
        return text

    path = tmp_path / "cache.sqlite3"
    client = ScriptedClient()
    scheduler = make(client, cache=str(path))
    scheduler.plan.__dict__["parse"] = parse  # the parser's own verdict, as _structured gives it
    outcome = await scheduler.run(iter(["ok", "bad"]), rows=2)
    assert outcome[1].error == "field 'a': out of range" and client.sent.count("bad") == 1
    with ResponseCache(path) as cache:
        # The raw answer is kept, so a fixed parser reads it on a re-run without paying.
        assert cache.get_many([outcome[1].key]) == {outcome[1].key: {0: "echo: bad"}}


async def test_invalid_json_is_retried(make):
    def script(prompt, attempt):
        text = '{"items": [' if attempt == 0 else '{"items": [{"a": "1"}]}'
        return Completion(texts=(text,))

    client = ScriptedClient(script)
    outcome = await make(client, fields=["a"]).run(iter(["x"]), rows=1)
    assert outcome[0].values == [{"a": "1"}] and client.sent == ["x", "x"]


# -- bookkeeping ---------------------------------------------------------------------------------


async def test_missing_prompts_are_skipped_and_duplicates_shared(make):
    events: list = []
    client = ScriptedClient()
    outcome = await make(client, events=events).run(iter(["x", None, "x", "y"]), rows=4)
    assert outcome[1] is None and outcome[0] is outcome[2]
    assert sorted(client.sent) == ["x", "y"]
    done = sum(e.rows for e in events if isinstance(e, RowsDone))
    skipped = sum(e.rows for e in events if isinstance(e, RowsSkipped))
    assert done == 3 and skipped == 1


async def test_duplicate_of_a_failed_row_is_reported_failed(make):
    events: list = []
    client = ScriptedClient(failing("x", APIError("bad", status=400)))
    prompts = ["y"] + ["x"] + [f"z{i}" for i in range(300)] + ["x"]  # past one lookup batch
    outcome = await make(client, events=events).run(iter(prompts), rows=len(prompts))
    assert outcome[1].error and outcome[-1] is outcome[1]
    assert sum(e.rows for e in events if isinstance(e, RowsFailed)) == 2


async def test_rows_are_rendered_lazily(make):
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

    await make(ScriptedClient(script), max_concurrency=4).run(prompts(), rows=5000)
    assert consumed == 5000
    assert seen_at_first_request[0] <= 300  # one cache-lookup batch, not the whole frame


async def test_concurrency_follows_littles_law(make, fake_clock):
    client = ScriptedClient(delay=0.05, clock=fake_clock)
    budget = RateBudget(rpm=600, clock=fake_clock, sleep=fake_clock.sleep)  # 9.8 requests/s
    scheduler = make(client, budget, max_concurrency=50)
    await scheduler.run(iter(f"p{i}" for i in range(12)), rows=12)
    # rate 9.8/s x 0.05 s x 1.5 margin -> ceil(0.74) + 2 = 3 in flight, not 50.
    assert scheduler.facts()["concurrency"] == 3
    assert 2 <= client.max_in_flight <= 3


async def test_workers_are_capped_by_the_rows(make):
    tasks_seen: list[int] = []

    def script(prompt, attempt):
        tasks_seen.append(len(asyncio.all_tasks()))
        return None

    scheduler = make(ScriptedClient(script), max_concurrency=1_000_000)
    outcome = await scheduler.run(iter("abc"), rows=3)
    assert all(job.values for job in outcome)
    assert max(tasks_seen) <= 5  # the test, the run, three workers: not a million tasks


async def test_samples_missing_from_a_short_answer_are_requested_again(make):
    class OneChoice(ScriptedClient):
        async def send(self, call):
            completion = await super().send(call)
            return Completion(texts=completion.texts[:1], prompt_tokens=1, completion_tokens=1)

    client = OneChoice()
    outcome = await make(client, n=3).run(iter(["a"]), rows=1)
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


async def test_an_error_after_retries_does_not_carry_the_first_failure_as_its_context(make):
    # The first try is awaited outside the retry policy; calling the policy inside that
    # except block chained every later error to the first ("During handling of the above
    # exception, another exception occurred"), shown to the user with a run-scope error.
    def script(prompt: str, attempt: int) -> Exception | None:
        if attempt == 0:
            return APIConnectionError("dropped once")
        return APIError("invalid key", status=401, verdict=Verdict("run", False, "auth"))

    with pytest.raises(APIError, match="invalid key") as info:
        await make(ScriptedClient(script), max_retries=2).run(iter(["a"]), rows=1)
    assert info.value.__context__ is None
