"""Sync over async: run a coroutine from plain code, from inside a running loop, and on Ctrl-C.

Inside Jupyter the kernel's event loop is already running in the calling thread, so
``asyncio.run`` is refused. By default the run goes to a private event loop in a worker thread
while the caller blocks (interruptibly) on it: nothing in the process is patched, so other
asyncio libraries in the kernel (anyio, httpx, the OpenAI SDK) keep working. ``nest_asyncio``
stays available as an explicit opt-in (``running_loop="nest"``) for users who need the run on
the caller's own loop; it is applied only then, and only to that loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

__all__ = ["iterate_sync", "run_sync"]

T = TypeVar("T")

# How long a cancelled run may take to close its connections and flush the cache after Ctrl-C.
_CANCEL_GRACE = 5.0


def run_sync(make: Callable[[], Awaitable[T]], *, running_loop: str = "thread") -> T:
    """Run ``make()`` to completion from synchronous code and return its result.

    Parameters
    ----------
    make : callable
        Returns the awaitable to run; called on the loop that runs it.
    running_loop : {"thread", "nest"}
        What to do when the calling thread already runs an event loop (a notebook cell):
        ``"thread"`` runs on a private loop in a worker thread; ``"nest"`` re-enters the
        caller's loop through ``nest_asyncio``.

    Raises
    ------
    KeyboardInterrupt
        After cancelling the run (in-flight requests are aborted, finished answers kept).
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    if loop is None:
        return asyncio.run(_call(make)).value
    if running_loop == "nest":
        import nest_asyncio

        nest_asyncio.apply(loop)
        return loop.run_until_complete(_call(make)).value
    return _run_in_thread(make)


class _Held:
    """A run's result, out of sight of ``repr``: on Python 3.11 ``asyncio.run`` builds the repr
    of its main task, result included, when it puts the SIGINT handler back, and a DataFrame's
    repr costs milliseconds (issue 12, CPU per row)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


async def _call(make: Callable[[], Awaitable[T]]) -> _Held:
    return _Held(await make())


def _run_in_thread(make: Callable[[], Awaitable[T]]) -> T:
    loop = asyncio.new_event_loop()
    outcome: dict[str, Any] = {}
    started = threading.Event()
    interrupted = threading.Event()
    finished = threading.Event()

    async def main() -> T:
        outcome["task"] = asyncio.current_task()
        started.set()
        if interrupted.is_set():  # Ctrl-C came before this task could be cancelled
            raise asyncio.CancelledError
        return await make()

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            outcome["value"] = loop.run_until_complete(main())
        except BaseException as exc:  # handed to the calling thread, which re-raises it
            outcome["error"] = exc
        finally:
            started.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                finished.set()

    thread = threading.Thread(target=target, name="parrot_pandas-run", daemon=True)
    try:
        # Ctrl-C can cut start() short after the thread began: that run must be cancelled too.
        thread.start()
        # A short timeout keeps the calling thread responsive to Ctrl-C (SIGINT) everywhere.
        while not finished.wait(0.05):
            pass
    except KeyboardInterrupt:
        interrupted.set()
        _cancel(loop, outcome, started)
        # Not thread.join: on Python 3.11 a join cut short by Ctrl-C marks the thread as
        # stopped while it still runs, and every later join returns at once.
        finished.wait(_CANCEL_GRACE)
        raise
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def iterate_sync(make: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
    """Iterate an async iterator from synchronous code, one item at a time.

    The async side always runs on a private loop in a worker thread, so it keeps working
    (requests in flight) while the caller handles the previous item, in a plain script and in
    a notebook cell alike. It stays at most one item ahead. Leaving the loop early, an
    exception, or Ctrl-C cancels the async side.
    """
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    outcome: dict[str, Any] = {}

    async def hand_over(entry: tuple[str, Any]) -> None:
        # The consumer may be busy with the previous item: wait without blocking the loop.
        while not stop.is_set():
            try:
                items.put_nowait(entry)
                return
            except queue.Full:
                await asyncio.sleep(0.005)

    async def pump() -> None:
        outcome["task"] = asyncio.current_task()
        started.set()
        if stop.is_set():  # the consumer left before this task could be cancelled
            return
        source = make()
        try:
            async for item in source:
                await hand_over(("item", item))
                if stop.is_set():
                    break
        finally:
            close = getattr(source, "aclose", None)
            if close is not None:
                await close()

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(pump())
            entry: tuple[str, Any] = ("done", None)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            entry = ("error", exc)
        finally:
            started.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.05)
                return
            except queue.Full:
                continue

    def consume() -> Iterator[T]:
        thread = threading.Thread(target=target, name="parrot_pandas-stream", daemon=True)
        try:
            # Inside the try: Ctrl-C can cut start() short after the thread began.
            thread.start()
            while True:
                try:
                    kind, value = items.get(timeout=0.05)
                except queue.Empty:
                    continue
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return
        finally:
            stop.set()
            _cancel(loop, outcome, started)
            thread.join(_CANCEL_GRACE)

    return consume()


def _cancel(
    loop: asyncio.AbstractEventLoop, outcome: dict[str, Any], started: threading.Event
) -> None:
    """Cancel the worker thread's task from the calling thread, once it has one."""
    started.wait(1.0)
    task = outcome.get("task")
    if task is not None:
        try:
            loop.call_soon_threadsafe(task.cancel)
        except RuntimeError:
            pass  # the loop already finished and closed: nothing left to cancel
