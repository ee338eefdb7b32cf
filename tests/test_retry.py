"""The one retry declaration: each decision from the error's own verdict, on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from parrot_pandas._retry import RetryPolicy
from parrot_pandas.errors import APIError, StructuredOutputError, Verdict


def failing_then_ok(errors: list[Exception]):
    calls: list[int] = []

    async def attempt(value: str) -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return value

    return attempt, calls


async def test_a_retryable_failure_is_sent_again_after_a_jittered_wait(fake_clock):
    attempt, calls = failing_then_ok([APIError("busy", status=503)] * 3)
    seen: list[tuple[int, float]] = []
    policy = RetryPolicy(tries=5, factor=0.5, max_wait=1.5, sleep=fake_clock.sleep)
    result = await policy.call(attempt, "ok", on_retry=lambda n, wait, exc: seen.append((n, wait)))
    assert result == "ok" and len(calls) == 4
    assert [n for n, _ in seen] == [1, 2, 3]
    bounds = [0.5, 1.0, 1.5]  # factor * 2**k, capped at max_wait
    assert all(0 <= wait <= bound for (_, wait), bound in zip(seen, bounds, strict=True))
    assert fake_clock.slept == [wait for _, wait in seen]


@pytest.mark.parametrize(
    "error",
    [
        APIError("bad key", status=401),
        APIError("503 the provider says will repeat", status=503, verdict=Verdict("row", False)),
        StructuredOutputError("cut", verdict=Verdict("row", False, "truncated")),
    ],
)
async def test_a_failure_that_will_repeat_costs_one_attempt(fake_clock, error):
    attempt, calls = failing_then_ok([error])
    with pytest.raises(type(error)):
        await RetryPolicy(tries=7, sleep=fake_clock.sleep).call(attempt, "x")
    assert len(calls) == 1 and fake_clock.slept == []


async def test_the_last_try_gives_up(fake_clock):
    attempt, calls = failing_then_ok([APIError("busy", status=500)] * 10)
    with pytest.raises(APIError):
        await RetryPolicy(tries=3, sleep=fake_clock.sleep).call(attempt, "x")
    assert len(calls) == 3


async def test_a_strategy_verdict_gives_up_at_once_on_the_setup_request_only(fake_clock):
    ignored = StructuredOutputError("no JSON", verdict=Verdict("strategy", True, "unstructured"))
    policy = RetryPolicy(tries=3, sleep=fake_clock.sleep)
    attempt, calls = failing_then_ok([ignored] * 3)
    with pytest.raises(StructuredOutputError):
        await policy.call(attempt, "x", setup=True)
    assert len(calls) == 1
    attempt, calls = failing_then_ok([ignored])
    assert await policy.call(attempt, "x") == "x" and len(calls) == 2


async def test_nothing_but_verdict_carrying_errors_is_caught(fake_clock):
    async def cancelled(_: str) -> str:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await RetryPolicy(sleep=fake_clock.sleep).call(cancelled, "x")
    assert fake_clock.slept == []


async def test_a_first_try_made_by_the_caller_counts_as_try_one(fake_clock):
    # The scheduler awaits a request's first try itself and hands a failure over as `failed`.
    attempt, calls = failing_then_ok([APIError("busy", status=500)] * 10)
    seen: list[int] = []
    policy = RetryPolicy(tries=3, sleep=fake_clock.sleep)
    with pytest.raises(APIError):
        await policy.call(
            attempt, "x", failed=APIError("busy", status=500), on_retry=lambda n, *_: seen.append(n)
        )
    assert len(calls) == 2 and seen == [1, 2]  # 3 tries in all, the caller's included
    attempt, calls = failing_then_ok([])
    assert await policy.call(attempt, "ok", failed=APIError("busy", status=503)) == "ok"
    assert len(calls) == 1


async def test_a_first_try_that_will_repeat_is_not_sent_again(fake_clock):
    attempt, calls = failing_then_ok([])
    refused = APIError("bad key", status=401)
    with pytest.raises(APIError) as info:
        await RetryPolicy(tries=7, sleep=fake_clock.sleep).call(attempt, "x", failed=refused)
    assert info.value is refused and calls == [] and fake_clock.slept == []
