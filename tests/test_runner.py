"""_runner: sync over async with and without a running loop, across a thread, and on Ctrl-C.

No test sleeps: each waits on an event the other side sets. Ctrl-C is a real SIGINT sent to
this process, handled by Python's own handler in the main thread, as in a script or a kernel.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from parrot_pandas import _runner as runner
from parrot_pandas._runner import iterate_sync, run_sync


class Boom(Exception):
    """Raised on the async side; must reach the caller as itself."""


def _run_threads() -> list[str]:
    """The runner's own threads still alive (other modules name theirs parrot_pandas-* too)."""
    names = ("parrot_pandas-run", "parrot_pandas-stream")
    return [t.name for t in threading.enumerate() if t.name in names]


class _CtrlC:
    """Ctrl-C: a SIGINT to this process, turned into KeyboardInterrupt in the main thread."""

    def arm(self) -> None:
        # Python's own handler, as in a script (ipykernel's raises KeyboardInterrupt too).
        # Armed inside the test: an asyncio.Runner around an async test installs its own.
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def press(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def ctrl_c() -> Iterator[_CtrlC]:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are handled in the main thread only")
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield _CtrlC()
    finally:
        signal.signal(signal.SIGINT, previous)


# A run waiting to be stopped is cancelled at once when all is well; the cap turns a
# regression into a failure instead of a hang.
_CAP = 30.0


async def _until_stopped() -> None:
    await asyncio.sleep(_CAP)


# -- run_sync ------------------------------------------------------------------------------


def test_without_a_running_loop_it_runs_here_on_a_fresh_loop():
    seen: dict[str, Any] = {}

    def make() -> Any:
        seen["loop at make"] = asyncio.get_running_loop()  # make() is called on the loop

        async def work() -> str:
            seen["thread"] = threading.current_thread()
            seen["loop"] = asyncio.get_running_loop()
            return "done"

        return work()

    assert run_sync(make) == "done"
    assert seen["thread"] is threading.main_thread()
    assert seen["loop"] is seen["loop at make"] and seen["loop"].is_closed()


async def test_inside_a_running_loop_it_runs_on_a_private_loop_in_a_thread():
    caller = asyncio.get_running_loop()
    seen: dict[str, Any] = {}

    async def work() -> int:
        seen["thread"] = threading.current_thread().name
        seen["loop"] = asyncio.get_running_loop()
        await asyncio.sleep(0)
        return 42

    assert run_sync(work) == 42
    assert seen["thread"] == "parrot_pandas-run"
    assert seen["loop"] is not caller and seen["loop"].is_closed()
    assert _run_threads() == []  # the worker thread is gone
    # The default leaves the caller's loop as it was: nest_asyncio is not applied.
    assert not getattr(caller, "_nest_patched", False)


async def test_an_exception_crosses_the_thread_as_itself():
    error = Boom("from the private loop")

    async def work() -> None:
        raise error

    with pytest.raises(Boom) as info:
        run_sync(work)
    assert info.value is error
    assert _run_threads() == []


def test_an_exception_without_a_loop_is_raised_as_itself():
    error = Boom("here")

    async def work() -> None:
        raise error

    with pytest.raises(Boom) as info:
        run_sync(work)
    assert info.value is error


@pytest.mark.slow
def test_nest_runs_on_the_callers_own_loop():
    pytest.importorskip("nest_asyncio")
    # nest_asyncio patches asyncio for the whole process, so it gets a process of its own.
    script = textwrap.dedent(
        """
        import asyncio
        from parrot_pandas._runner import run_sync

        async def inner():
            return asyncio.get_running_loop()

        async def main():
            outer = asyncio.get_running_loop()
            got = run_sync(inner, running_loop="nest")
            print(got is outer, getattr(outer, "_nest_patched", False))

        asyncio.run(main())
        """
    )
    # The code under test, wherever it is imported from here.
    root = str(pathlib.Path(runner.__file__).resolve().parent.parent)
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


async def test_ctrl_c_cancels_the_run_in_the_thread_and_is_raised(ctrl_c):
    ctrl_c.arm()
    cancelled = threading.Event()

    async def work() -> None:
        ctrl_c.press()
        try:
            await _until_stopped()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(KeyboardInterrupt):
        run_sync(work)
    # The cancel landed before Ctrl-C reached the caller: the run had its grace to clean up.
    assert cancelled.is_set()


def test_ctrl_c_without_a_loop_stops_the_run_and_is_raised(ctrl_c):
    ctrl_c.arm()
    stopped = threading.Event()

    async def work() -> None:
        try:
            ctrl_c.press()
            await _until_stopped()
        finally:
            # 3.11+ cancels the run's task; 3.10 raises KeyboardInterrupt inside it.
            stopped.set()

    with pytest.raises(KeyboardInterrupt):
        run_sync(work)
    assert stopped.is_set()


# -- iterate_sync --------------------------------------------------------------------------


async def _numbers(upto: int | None, closed: threading.Event | None = None) -> AsyncIterator[int]:
    i = 0
    try:
        while upto is None or i < upto:
            yield i
            i += 1
    finally:
        if closed is not None:
            closed.set()


def test_items_come_in_order_in_plain_code():
    assert list(iterate_sync(lambda: _numbers(5))) == [0, 1, 2, 3, 4]
    assert _run_threads() == []


async def test_items_come_in_order_inside_a_running_loop():
    assert list(iterate_sync(lambda: _numbers(3))) == [0, 1, 2]


def test_leaving_early_closes_the_async_side():
    closed = threading.Event()
    stream = iterate_sync(lambda: _numbers(None, closed))  # endless
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()
    # close() returns once the async side has run its cleanup and its thread has ended.
    assert closed.is_set()
    assert _run_threads() == []


def test_an_error_after_some_items_is_raised_as_itself():
    error = Boom("third item")

    async def source() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise error

    got = []
    with pytest.raises(Boom) as info:
        for item in iterate_sync(source):
            got.append(item)
    assert got == [1, 2] and info.value is error


def test_nothing_starts_before_the_first_item_is_asked_for():
    started = threading.Event()

    async def source() -> AsyncIterator[int]:
        started.set()
        yield 1

    stream = iterate_sync(source)
    assert not started.is_set()
    assert list(stream) == [1] and started.is_set()


def test_ctrl_c_while_waiting_for_an_item_cancels_the_async_side(ctrl_c):
    ctrl_c.arm()
    cancelled = threading.Event()
    taken = threading.Event()

    async def source() -> AsyncIterator[int]:
        yield 0
        await asyncio.get_running_loop().run_in_executor(None, taken.wait, _CAP)
        ctrl_c.press()
        try:
            await _until_stopped()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield 1  # never reached

    got = []
    with pytest.raises(KeyboardInterrupt):
        for item in iterate_sync(source):
            got.append(item)
            taken.set()
    assert got == [0]
    assert cancelled.is_set()
    assert _run_threads() == []


def _start_interrupted(began: threading.Event) -> type[threading.Thread]:
    """A Thread whose start() is cut short by Ctrl-C once the run in it has begun."""

    class StartInterrupted(threading.Thread):
        def start(self) -> None:
            super().start()
            began.wait(_CAP)
            raise KeyboardInterrupt

    return StartInterrupted


async def test_ctrl_c_while_the_run_thread_starts_still_cancels_the_run(monkeypatch):
    began, cancelled = threading.Event(), threading.Event()

    async def work() -> None:
        began.set()
        try:
            await _until_stopped()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with monkeypatch.context() as patch:
        patch.setattr(threading, "Thread", _start_interrupted(began))
        with pytest.raises(KeyboardInterrupt):
            run_sync(work)
    assert cancelled.is_set()  # not left running, unseen, in its thread


def test_ctrl_c_while_the_stream_thread_starts_still_closes_the_stream(monkeypatch):
    began, closed = threading.Event(), threading.Event()

    def make() -> AsyncIterator[int]:
        began.set()
        return _numbers(None, closed)

    stream = iterate_sync(make)
    with monkeypatch.context() as patch:
        patch.setattr(threading, "Thread", _start_interrupted(began))
        with pytest.raises(KeyboardInterrupt):
            next(stream)
    assert closed.is_set()
    assert _run_threads() == []


def test_the_result_is_never_formatted_on_the_way_back():
    # Python 3.11's asyncio.run formats its main task (result included) when it puts the SIGINT
    # handler back: a DataFrame's repr cost milliseconds per call (issue 12).
    formatted: list[int] = []

    class Result:
        def __repr__(self) -> str:
            formatted.append(1)
            return "Result()"

    async def make() -> Result:
        return Result()

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a script
    try:
        assert isinstance(run_sync(make), Result)
    finally:
        signal.signal(signal.SIGINT, before)
    assert formatted == []
