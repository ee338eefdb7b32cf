"""Shared fixtures: a clean environment, a private cache file, local servers, a fake clock."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pytest

import parrot_pandas  # noqa: F401  (registers DataFrame.llm)
from parrot_pandas import _tokens
from parrot_pandas._limits import RateBudget
from parrot_pandas.testing import FakeServer

# The fixtures a library user gets: fake_server and fake_server_factory.
pytest_plugins = ["parrot_pandas.testing.pytest_plugin"]


class FakeClock:
    """Virtual time for asyncio code: nothing waits for real.

    ``clock()`` reads the time; ``await clock.sleep(s)`` returns once the clock reaches its
    deadline. The clock jumps to the earliest deadline only after every other task has run as
    far as it can, so concurrent sleepers overlap as they would in real time (a request that
    sleeps 0.05 s next to others still measures 0.05 s).
    """

    # Loop iterations granted to runnable tasks before time moves: enough for a chain of
    # futures (a gate, a lock, a queue) to settle.
    _SETTLE = 20

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept: list[float] = []  # every sleep asked for, in order
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._driver: asyncio.Task[None] | None = None

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock by hand (for code that only reads it)."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        loop = asyncio.get_running_loop()
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        wake = loop.create_future()
        heapq.heappush(self._timers, (self.now + seconds, next(self._order), wake))
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        await wake

    async def _drive(self) -> None:
        while self._timers:
            for _ in range(self._SETTLE):
                await asyncio.sleep(0)
            when, _, wake = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not wake.done():
                wake.set_result(None)


class RecordingBudget(RateBudget):
    """A RateBudget that remembers every pause it was asked for."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pauses: list[float] = []

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        super().pause(seconds)


@pytest.fixture
def fake_clock() -> FakeClock:
    """Virtual time: pass ``fake_clock`` as a clock and ``fake_clock.sleep`` as a sleep."""
    return FakeClock()


@pytest.fixture
def recording_budget(fake_clock: FakeClock) -> Callable[..., RecordingBudget]:
    """Make RecordingBudgets that run on the fake clock: ``recording_budget(rpm=600)``."""

    def make(**limits: Any) -> RecordingBudget:
        return RecordingBudget(clock=fake_clock, sleep=fake_clock.sleep, **limits)

    return make


@pytest.fixture
def fault_markers() -> dict[str, str]:
    """FakeServer ``faults``: a marker for each per-row fault; a prompt holding it fails so."""
    return {
        "FILTERME": "content_filter",
        "CUTME": "truncate",
        "LONGME": "context_length",
        "LLAMAME": "exceed_context",
        "BOOM": "server_error",
        "HUGE": "too_large",
        "BROKE": "insufficient_quota",
        "ECHOKEY": "echo_key",
    }


@pytest.fixture
def no_tiktoken(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Counts by the fallback, four characters a token, as FakeServer counts them.

    tiktoken cannot be imported, and no test sees another's loaded encodings.
    """
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    _tokens._reset_tokenizers()
    yield
    _tokens._reset_tokenizers()


@pytest.fixture(autouse=True)
def _clean_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Tests never see the developer's key or server, and never touch the user's cache.
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_API_VERSION",
        "PARROT_PANDAS_MODEL",
        "PARROT_PANDAS_PROVIDER",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_AUTH_TOKEN",
        "AZURE_OPENAI_ENDPOINT",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_AD_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    cache_dir = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("PARROT_PANDAS_CACHE", str(cache_dir / "responses.sqlite3"))


@pytest.fixture
def server_factory(
    fake_server_factory: Callable[..., FakeServer],
) -> Callable[..., FakeServer]:
    """The plugin's ``fake_server_factory``, under the name these tests have always used."""
    return fake_server_factory


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    """The plugin's ``fake_server``: a well-behaved local server."""
    return fake_server


@pytest.fixture
def docs() -> pd.DataFrame:
    """A small frame of documents with a non-default index."""
    return pd.DataFrame(
        {
            "title": ["Ada", "Alan", "Grace", "Edsger"],
            "text": [
                "name=Ada, year=1815",
                "name=Alan, year=1912\nname=Alonzo, year=1903",
                "no facts here",
                None,
            ],
        },
        index=pd.Index(["a", "b", "c", "d"], name="doc"),
    )
