"""Tests for parrot_pandas._events: the run facts RunStats counts from scheduler events."""

from __future__ import annotations

import dataclasses

import pytest

from parrot_pandas._events import (
    Event,
    Retry,
    RowsDone,
    RowsFailed,
    RowsSkipped,
    RunFinished,
    RunStarted,
    RunStats,
    Usage,
)


def test_a_fresh_run_has_every_fact_at_zero(fake_clock):
    stats = RunStats(clock=fake_clock)
    assert stats.facts == {
        "rows": 0,
        "done_rows": 0,
        "cached_rows": 0,
        "failed_rows": 0,
        "skipped_rows": 0,
        "requests": 0,
        "retries": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "elapsed": 0.0,
    }


def test_a_run_is_counted(fake_clock):
    clock = fake_clock
    stats = RunStats(clock=clock)
    # The scheduler counts what requests cost in place; RunStats reads it through RunStarted.
    usage = Usage()
    usage.requests, usage.prompt_tokens, usage.completion_tokens = 4, 150, 27
    events = [
        RunStarted(rows=10, usage=usage),
        RowsSkipped(rows=1),
        RowsDone(rows=3, cached=True),
        RowsDone(rows=2),
        Retry(attempt=1, wait=0.25, error="HTTP 429: slow down"),
        RowsDone(rows=1),
        RowsFailed(rows=2, error="HTTP 400: too long"),
        RowsSkipped(rows=1),
    ]
    for event in events:
        clock.advance(0.1)
        stats(event)
    clock.advance(0.1)
    stats(RunFinished({"model": "m", "concurrency": 8}))
    assert stats.facts == {
        "rows": 10,
        "done_rows": 6,
        "cached_rows": 3,
        "failed_rows": 2,
        "skipped_rows": 2,
        "requests": 4,
        "retries": 1,
        "prompt_tokens": 150,
        "completion_tokens": 27,
        "elapsed": 0.9,
        "model": "m",
        "concurrency": 8,
    }


def test_elapsed_follows_the_injected_clock_rounded_to_milliseconds(fake_clock):
    clock = fake_clock
    clock.now = 100.0
    stats = RunStats(clock=clock)
    clock.now = 102.34567
    stats(RowsSkipped(rows=1))
    assert stats.facts["elapsed"] == 2.346


def test_rows_started_is_set_not_added(fake_clock):
    stats = RunStats(clock=fake_clock)
    stats(RunStarted(rows=4))
    stats(RunStarted(rows=7))
    assert stats.facts["rows"] == 7


def test_unknown_events_only_move_the_clock(fake_clock):
    clock = fake_clock
    stats = RunStats(clock=clock)

    @dataclasses.dataclass(frozen=True)
    class Custom(Event):
        value: int = 1

    before = dict(stats.facts)
    clock.advance(1.0)
    stats(Custom())
    assert {k: v for k, v in stats.facts.items() if k != "elapsed"} == {
        k: v for k, v in before.items() if k != "elapsed"
    }
    assert stats.facts["elapsed"] == 1.0


def test_events_are_frozen_values():
    event = RowsDone(rows=2, cached=True)
    assert event == RowsDone(rows=2, cached=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.rows = 3  # type: ignore[misc]
    assert RowsDone(rows=1).cached is False
