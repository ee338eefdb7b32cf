"""Tests for parrot_pandas._limits: header parsing, token buckets, the rate budget.

Nothing here sleeps for real: buckets and budgets get a fake clock, and the budget's
sleep parks the task on a virtual timeline (see VirtualClock).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import re
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from parrot_pandas._limits import (
    Budget,
    LimitInfo,
    RateBudget,
    TokenBucket,
    parse_duration,
    parse_retry_after,
)


class VirtualClock:
    """A fake clock whose ``sleep`` lets many concurrent tasks share one timeline.

    ``clock.t += seconds`` would be wrong as soon as two tasks sleep at once (their
    naps would add up), so ``sleep`` parks the task instead, and ``run`` moves time
    forward to the earliest parked task whenever nothing else can make progress.
    """

    def __init__(self, start: float = 1000.0) -> None:
        # Not 0: a budget that confused "0" with "not paused" should fail here.
        self.t = start
        self.naps: list[float] = []
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.t + max(seconds, 0.0), next(self._seq), fut))
        await fut

    async def _until_idle(self, tasks: list[asyncio.Task]) -> None:
        # A lock hand-off or a task wake-up shows up within a couple of loop turns;
        # 20 quiet turns in a row means every task is parked on a timer or a lock.
        last, quiet = None, 0
        for _ in range(100_000):
            if quiet >= 20:
                return
            await asyncio.sleep(0)
            state = (self.t, len(self.naps), sum(t.done() for t in tasks))
            quiet = quiet + 1 if state == last else 0
            last = state
        raise AssertionError("livelock: tasks keep running without time passing")

    async def run(self, *coros):
        """Run `coros` concurrently on virtual time; return their results."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        stalled = 0
        while True:
            await self._until_idle(tasks)
            if all(t.done() for t in tasks):
                return [t.result() for t in tasks]
            if not self._timers:
                for t in tasks:
                    t.cancel()
                raise AssertionError("deadlock: tasks are blocked and none is sleeping")
            when, _, fut = heapq.heappop(self._timers)
            stalled = stalled + 1 if when <= self.t else 0
            if stalled > 10_000:
                raise AssertionError("livelock: tasks keep waking without time passing")
            self.t = max(self.t, when)
            if not fut.done():
                fut.set_result(None)


def make_budget(rpm=None, tpm=None, **kwargs) -> tuple[RateBudget, VirtualClock]:
    clock = VirtualClock()
    kwargs.setdefault("rng", random.Random(0))
    budget = RateBudget(rpm, tpm, clock=clock, sleep=clock.sleep, **kwargs)
    return budget, clock


# --- parse_duration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1.5s", 1.5),
        ("20ms", 0.02),  # milliseconds, not minutes
        ("1ms", 0.001),
        ("999ms", 0.999),
        ("1h2m3.5s", 3723.5),
        ("1m30s", 90.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("0s", 0.0),
        ("17.123s", 17.123),
        (".5s", 0.5),
        ("500us", 0.0005),
        ("500\u00b5s", 0.0005),  # micro sign, as Go prints it
        ("500\u03bcs", 0.0005),  # Greek mu
        ("100ns", 1e-7),
        ("1m0.5s20ms", 60.52),
        ("12", 12.0),
        ("0.5", 0.5),
        ("0", 0.0),
        ("  6m0s\n", 360.0),
        (" 3 ", 3.0),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "bad", ["", "   ", "abc", "5x", "-1s", "-1", "s", "ms", "m5", "5 s", "1.2.3s", "nan", "inf"]
)
def test_parse_duration_rejects_garbage_naming_it(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_duration(bad)


# --- parse_retry_after ------------------------------------------------------------

HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
HTTP_DATE_TS = parsedate_to_datetime(HTTP_DATE).timestamp()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # -ms wins
        ({"retry-after-ms": "20.5"}, 0.0205),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": " 0 "}, 0.0),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),  # bad -ms falls back
        ({"retry-after": HTTP_DATE}, 12.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # past: floored at 0
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 -0000"}, 12.0),  # naive = GMT
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after-ms": "-5"}, None),
        ({"content-type": "application/json"}, None),
    ],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers, now=HTTP_DATE_TS - 12.0) == pytest.approx(expected)


def test_parse_retry_after_case_insensitive_mappings():
    wire = CIMultiDictProxy(CIMultiDict({"Retry-After-Ms": "250", "Retry-After": "4"}))
    assert parse_retry_after(wire) == 0.25
    assert parse_retry_after({"Retry-After": "4"}) == 4.0


def test_parse_retry_after_date_defaults_to_wall_clock():
    soon = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 28 <= parse_retry_after({"retry-after": soon}) <= 30


# --- LimitInfo ----------------------------------------------------------------------


def test_limit_info_empty():
    assert LimitInfo().empty
    assert not LimitInfo(remaining_tokens=0).empty
    assert not LimitInfo(retry_after=0.0).empty


@pytest.mark.parametrize(
    ("info", "wait"),
    [
        (LimitInfo(), 1.0),
        (LimitInfo(retry_after=3.0, reset_requests=20.0, remaining_requests=0), 3.0),
        (LimitInfo(retry_after=0.0), 0.0),
        (LimitInfo(retry_after=600.0), 60.0),  # capped
        (
            LimitInfo(
                remaining_requests=5, reset_requests=0.2, remaining_tokens=0, reset_tokens=7.0
            ),
            7.0,
        ),
        (
            LimitInfo(
                remaining_requests=0, reset_requests=0.2, remaining_tokens=9, reset_tokens=7.0
            ),
            0.2,
        ),
        (
            LimitInfo(
                remaining_requests=0, reset_requests=2.0, remaining_tokens=0, reset_tokens=5.0
            ),
            5.0,
        ),
        (LimitInfo(reset_requests=0.5, reset_tokens=4.0), 4.0),  # nothing exhausted: longest
        (LimitInfo(remaining_requests=0), 1.0),  # exhausted but no reset known
        (LimitInfo(reset_tokens=3600.0, remaining_tokens=0), 60.0),
    ],
)
def test_wait_after_429(info, wait):
    assert info.wait_after_429() == pytest.approx(wait)


# --- TokenBucket --------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 50.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_bucket_starts_full_and_refills_to_capacity():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=clock)
    assert bucket.level == 4.0
    bucket.take(3)
    assert bucket.level == 1.0
    clock.t += 0.5
    assert bucket.level == pytest.approx(2.0)
    clock.t += 100
    assert bucket.level == 4.0


def test_bucket_wait_time():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=clock)
    assert bucket.wait_time(4) == 0.0
    bucket.take(4)
    assert bucket.wait_time(1) == pytest.approx(0.5)
    assert bucket.wait_time(0) == 0.0
    clock.t += 0.5
    assert bucket.wait_time(1) == 0.0


def test_bucket_oversized_request_goes_through_when_full_then_leaves_a_debt():
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=4.0, clock=clock)
    bucket.take(1)
    assert bucket.wait_time(10) == pytest.approx(0.5)  # fits once full: no deadlock
    clock.t += 0.5
    assert bucket.wait_time(10) == 0.0
    bucket.take(10)
    assert bucket.level == -6.0
    assert bucket.wait_time(1) == pytest.approx(3.5)  # the debt paces what follows


def test_bucket_drain_clamp_give():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, capacity=10.0, clock=clock)
    bucket.clamp(3)
    assert bucket.level == 3.0
    bucket.clamp(8)  # the server's view only ever lowers ours
    assert bucket.level == 3.0
    bucket.give(100)
    assert bucket.level == 10.0
    bucket.drain()
    assert bucket.level == 0.0
    assert bucket.wait_time(2) == pytest.approx(2.0)
    bucket.take(5)
    bucket.drain()  # a debt is not forgiven
    assert bucket.level == -5.0
    bucket.drain(seconds=8)  # empty only 8 s from now
    assert bucket.level == -8.0
    clock.t += 8
    assert bucket.level == 0.0


def test_bucket_resize_keeps_level_and_accrues_at_the_old_rate_first():
    clock = Clock()
    bucket = TokenBucket(rate=1.0, capacity=10.0, clock=clock)
    bucket.take(10)
    clock.t += 2
    bucket.resize(rate=4.0, capacity=3.0)
    assert bucket.level == 2.0
    clock.t += 10
    assert bucket.level == 3.0
    assert (bucket.rate, bucket.capacity) == (4.0, 3.0)
    assert "TokenBucket(rate=4" in repr(bucket)


@pytest.mark.parametrize(("rate", "capacity"), [(0, 1), (1, 0), (-1, 1), (float("inf"), 1)])
def test_bucket_rejects_bad_sizes(rate, capacity):
    with pytest.raises(ValueError):
        TokenBucket(rate, capacity)


# --- RateBudget ---------------------------------------------------------------------


def test_rate_budget_is_a_budget():
    assert isinstance(RateBudget(), Budget)


async def test_unlimited_budget_never_waits():
    budget, clock = make_budget()
    start = clock()
    await clock.run(*(budget.acquire(tokens=10_000) for _ in range(100)))
    budget.settle(10_000, 50_000)
    budget.observe(LimitInfo(remaining_requests=0, remaining_tokens=0))
    await clock.run(budget.acquire(5))
    assert clock() == start
    assert clock.naps == []
    assert budget.rpm is None and budget.tpm is None
    assert budget.requests_per_second(100) is None


async def test_unlimited_budget_with_real_sleep():
    budget = RateBudget()
    await asyncio.wait_for(asyncio.gather(*(budget.acquire(1) for _ in range(50))), 5)


async def test_request_pacing_sequential():
    budget, clock = make_budget(rpm=600)
    start = clock()
    for _ in range(100):
        await clock.run(budget.acquire())
    rate = 600 / 60 * 0.98
    # the first `rate` requests (1 s of burst) go at once, the rest at `rate` per second
    assert clock() - start == pytest.approx((100 - rate) / rate)


async def test_request_pacing_concurrent_is_fifo_and_as_fast_as_sequential():
    budget, clock = make_budget(rpm=600)
    start = clock()
    order: list[tuple[int, float]] = []

    async def one(i):
        await budget.acquire()
        order.append((i, clock()))

    await clock.run(*(one(i) for i in range(100)))
    assert [i for i, _ in order] == list(range(100))
    rate = 9.8
    assert order[-1][1] - start == pytest.approx((100 - rate) / rate)
    assert sum(t == start for _, t in order) == 9  # the burst: floor(9.8)
    gaps = [b - a for (_, a), (_, b) in zip(order[9:-1], order[10:], strict=True)]
    assert max(gaps) == pytest.approx(1 / rate)


async def test_token_pacing():
    budget, clock = make_budget(tpm=60_000)
    start = clock()
    await clock.run(*(budget.acquire(tokens=1000) for _ in range(20)))
    tokens_per_s = 60_000 / 60 * 0.98
    # the bucket starts with 980 tokens (one second of refill) and never holds more
    # than the largest request (1000 tokens) after that
    assert clock() - start == pytest.approx((20 * 1000 - tokens_per_s) / tokens_per_s)
    assert budget.requests_per_second(1000) == pytest.approx(0.98)


async def test_large_request_is_not_starved_by_small_ones():
    budget, clock = make_budget(tpm=6000)  # 98 tokens/s
    done: list[str] = []

    async def ask(name, tokens, delay_steps):
        for _ in range(delay_steps):
            await asyncio.sleep(0)
        await budget.acquire(tokens)
        done.append(name)

    await clock.run(ask("big", 500, 0), *(ask(f"small{i}", 10, 3) for i in range(3)))
    assert done == ["big", "small0", "small1", "small2"]


async def test_settle_gives_tokens_back_and_takes_more():
    budget, clock = make_budget(tpm=6000)  # 98 tokens/s, capacity 98
    await clock.run(budget.acquire(tokens=90))  # level 8
    budget.settle(estimated=90, actual=10)  # level 88
    start = clock()
    await clock.run(budget.acquire(tokens=80))  # fits at once; level 8
    assert clock() == start
    budget.settle(estimated=80, actual=276)  # 196 more: level -188
    await clock.run(budget.acquire(tokens=1))
    assert clock() - start == pytest.approx(189 / 98)


async def test_observe_sizes_buckets_from_announced_limits():
    budget, clock = make_budget()
    budget.observe(LimitInfo(limit_requests=600, limit_tokens=60_000))
    assert (budget.rpm, budget.tpm) == (600, 60_000)
    start = clock()
    await clock.run(*(budget.acquire() for _ in range(100)))
    assert clock() - start == pytest.approx((100 - 9.8) / 9.8)
    budget.observe(LimitInfo(limit_requests=300))  # a new announcement replaces the old
    assert budget.rpm == 300
    assert budget.requests_per_second(0) == pytest.approx(300 / 60 * 0.98)


@pytest.mark.parametrize(("user", "announced", "expected"), [(100, 600, 100), (1000, 600, 600)])
def test_observe_keeps_the_lower_of_user_and_announced(user, announced, expected):
    budget, _ = make_budget(rpm=user, tpm=user * 100)
    budget.observe(LimitInfo(limit_requests=announced, limit_tokens=announced * 100))
    assert (budget.rpm, budget.tpm) == (expected, expected * 100)
    assert budget.requests_per_second(1) == pytest.approx(expected / 60 * 0.98)


async def test_observe_clamps_to_what_the_server_says_remains():
    budget, clock = make_budget(rpm=600, tpm=60_000)
    budget.observe(LimitInfo(remaining_requests=0, remaining_tokens=5000))
    start = clock()
    await clock.run(budget.acquire(tokens=100))
    assert clock() - start == pytest.approx(1 / 9.8)
    budget.observe(LimitInfo(remaining_requests=1000, remaining_tokens=0))
    start = clock()
    await clock.run(budget.acquire(tokens=196))
    assert clock() - start == pytest.approx(0.2)  # 196 tokens at 980 tokens/s


async def test_pause_blocks_every_acquirer_and_the_restart_is_paced():
    budget, clock = make_budget(rpm=600)
    times: list[float] = []
    pause_end: list[float] = []

    async def worker():
        for _ in range(5):
            await budget.acquire()
            times.append(clock())
            if len(times) == 20:  # this request got a 429
                budget.pause(5.0)
                pause_end.append(clock() + 5.0)

    await clock.run(*(worker() for _ in range(20)))
    (end,) = pause_end
    after = times[20:]
    assert len(after) == 80
    assert min(after) >= end
    assert sum(t < end + 0.1 for t in after) <= 1  # no thundering herd
    assert sum(t < end + 1.0 for t in after) <= 10  # paced by the refill, ~9.8/s


async def test_pause_with_unlimited_budget_still_waits():
    budget, clock = make_budget()
    budget.pause(2.0)
    assert budget.paused_until == clock() + 2.0
    start = clock()
    await clock.run(*(budget.acquire() for _ in range(3)))
    assert 2.0 <= clock() - start <= 2.25
    assert budget.paused_until is None


async def test_pause_extends_never_shortens():
    budget, clock = make_budget(rpm=60_000)  # jitter <= 1/980 s
    budget.pause(10.0)
    budget.pause(3.0)
    assert budget.paused_until == clock() + 10.0
    start = clock()
    await clock.run(budget.acquire())
    assert clock() - start == pytest.approx(10.0, abs=0.01)


async def test_pause_during_a_wait_is_respected():
    budget, clock = make_budget(rpm=60)  # 0.98/s: the second request waits ~1 s
    await clock.run(budget.acquire())
    start = clock()

    async def pause_soon():
        await clock.sleep(0.5)
        budget.pause(30.0)

    await clock.run(budget.acquire(), pause_soon())
    assert clock() - start >= 30.5


async def test_cancelled_acquirer_takes_nothing_and_frees_the_queue():
    budget, clock = make_budget(rpm=60)
    await clock.run(budget.acquire())
    stuck = asyncio.ensure_future(budget.acquire())
    await asyncio.sleep(0)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    start = clock()
    await clock.run(budget.acquire())
    assert clock() - start == pytest.approx(1 / 0.98)


def test_budget_survives_several_event_loops():
    clock = Clock()

    async def sleep(seconds):
        clock.t += seconds
        await asyncio.sleep(0)

    budget = RateBudget(rpm=60, clock=clock, sleep=sleep)

    async def two():
        await asyncio.gather(budget.acquire(), budget.acquire())

    asyncio.run(two())  # contended: the queue binds to this loop
    asyncio.run(two())
    assert clock.t == pytest.approx(50.0 + 3 / 0.98)


def test_requests_per_second_is_the_tighter_limit():
    budget = RateBudget(rpm=600, tpm=60_000, headroom=1.0)
    assert budget.requests_per_second(100) == pytest.approx(10.0)  # rpm binds
    assert budget.requests_per_second(1000) == pytest.approx(1.0)  # tpm binds
    assert budget.requests_per_second(0) == pytest.approx(10.0)
    assert RateBudget(tpm=6000, headroom=1.0).requests_per_second(50) == pytest.approx(2.0)


def test_snapshot():
    budget, clock = make_budget(rpm=600)
    snap = budget.snapshot()
    assert snap == {
        "rpm": 600,
        "tpm": None,
        "paused_until": None,
        "request_level": pytest.approx(9.8),
        "token_level": None,
    }
    budget.pause(1.0)
    assert budget.snapshot()["paused_until"] == clock() + 1.0
    # empty when the pause ends: a debt of one second of refill now
    assert budget.snapshot()["request_level"] == pytest.approx(-9.8)


@pytest.mark.parametrize(
    "kwargs",
    [{"rpm": 0}, {"tpm": -5}, {"burst": 0}, {"headroom": 0}, {"headroom": 1.5}],
)
def test_budget_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        RateBudget(**kwargs)


def test_api_error_reads_retry_after_from_its_limits_only():
    # Issue 12: retry-after was stored on the error and on its limits; the limits are the one
    # source, so a later correction of the limits is what every reader sees.
    from parrot_pandas.errors import APIError, Verdict
    from parrot_pandas.providers.base import ErrorBody, api_error

    error = api_error(
        429,
        ErrorBody(message="slow down"),
        Verdict("row", True, "rate_limited"),
        LimitInfo(retry_after=2.0),
    )
    assert error.retry_after == 2.0
    error.limits = LimitInfo(retry_after=5.0)
    assert error.retry_after == 5.0
    # An error built without headers keeps the value it was given.
    assert APIError("x", status=503, retry_after=1.5).retry_after == 1.5
