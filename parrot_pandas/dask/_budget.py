"""The shared rate budget: one :class:`~parrot_pandas._limits.RateBudget` per API key, asked by
every partition before each request. Nothing here imports Dask's dataframe.

Every partition that uses the same API key and server asks one budget for permission before
each request. Under ``dask.distributed`` that budget is a :class:`BudgetHost` living in a Dask
*actor* on one worker, named ``parrot_pandas-budget-<hash>`` where the hash covers the base
URL, the key and the user's ``rpm``/``tpm`` (the key itself is never in the name, a log or the
task graph's repr). A partition talks to it through :class:`SharedBudget`: one round trip per
request (``acquire``, which returns when the request may go, so nobody polls); what a response
teaches (``settle`` with the real token count, ``observe`` with the rate-limit headers) is
batched and carried by the next ``acquire`` instead of costing messages of its own; a 429's
``pause`` is sent at once, so every worker stops. The first partition that needs the budget
creates the actor, leaving the worker's thread pool while it waits so that the actor can take
the freed thread; every worker then keeps a handle (in its :class:`BudgetService`), so the
actor (and a pause) outlives one compute. Pauses are durations measured on the actor's clock,
so clocks need not agree across machines. An actor was chosen over ``Semaphore`` (it bounds
concurrency, not a rate), ``Variable`` (every acquire would be a read-modify-write race, or a
lock plus two round trips) and pub/sub (splitting the rate statically between workers wastes
the share of idle ones).

Without a distributed client (the threaded or synchronous scheduler) the partitions of one
process share in-process hosts instead, served on a private event loop that runs only while a
partition holds a budget. The ``processes`` scheduler gets one per process, so use
``dask.distributed`` to run several processes against one key.

If the host cannot be reached (the worker holding the actor died), each partition that finds it
gone goes on alone with an in-process budget held to its equal share of the key's limits (the
limits divided by the cluster's threads), so together they stay within the limit, and a
warning is logged. Once no worker holds a handle on the dead actor, the next partition creates
a new one. While old partitions go alone and new ones share the new actor, the sum can briefly
exceed the limit; the server's 429s then pause and retry as usual.

Everything a process keeps lives in one explicit :class:`BudgetService` (bounded, closable);
partitions use :func:`default_service`, which is closed at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import hashlib
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from .._config import RunConfig
from .._limits import LimitInfo, RateBudget

__all__ = ["BudgetHost", "BudgetService", "SharedBudget", "budget_name", "default_service"]

logger = logging.getLogger("parrot_pandas")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]
Call = Callable[..., "concurrent.futures.Future[Any]"]

# RateBudget's default, spelled out because SharedBudget derives the paced rate from it.
_HEADROOM = 0.98
# How long settle/observe reports wait for an acquire to carry them before going alone.
_REPORT_DELAY = 0.05
# Distinct keys a process remembers budgets for; the oldest is forgotten beyond that.
_MAX_BUDGETS = 64
_ACTOR_PRIORITY = 1_000_000
# How long closing waits for the local host thread to finish its last messages.
_JOIN_TIMEOUT = 5.0


def budget_name(config: RunConfig) -> str:
    """The shared budget's name for a run: one per server, API key and user rate limits.

    The key enters only through a SHA-256 digest, so the name can be shown in Dask's
    dashboard and logs.

    Examples
    --------
    >>> from parrot_pandas._config import RunConfig
    >>> config = RunConfig.from_options(base_url="http://127.0.0.1:8000/v1", api_key="sk-x")
    >>> name = budget_name(config)
    >>> name.startswith("parrot_pandas-budget-") and "sk-x" not in name
    True
    """
    material = json.dumps([config.base_url, config.api_key or "", config.rpm, config.tpm])
    return "parrot_pandas-budget-" + hashlib.sha256(material.encode()).hexdigest()[:20]


@dataclass
class _Limits:
    """What this process last learned of one shared budget: what a partition going alone needs."""

    rpm: float | None = None
    tpm: float | None = None
    share: int = 1  # partitions that can run at once (the cluster's threads)


class BudgetHost:
    """The shared state: one :class:`RateBudget`, driven by async calls.

    Under ``dask.distributed`` this is the actor; every method is a coroutine so that they all
    run on the hosting worker's event loop (RateBudget is not thread-safe; an actor's plain
    methods would run in a separate thread).
    """

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._budget = RateBudget(rpm=rpm, tpm=tpm, headroom=_HEADROOM, clock=clock, sleep=sleep)

    async def acquire(self, tokens: int, reports: list[tuple[Any, ...]]) -> tuple[Any, Any]:
        self._apply(reports)
        await self._budget.acquire(tokens)
        return self._budget.rpm, self._budget.tpm

    async def report(self, reports: list[tuple[Any, ...]]) -> None:
        self._apply(reports)

    async def pause(self, seconds: float, reports: list[tuple[Any, ...]]) -> None:
        self._apply(reports)
        self._budget.pause(seconds)

    async def snapshot(self) -> dict[str, Any]:
        return self._budget.snapshot()

    def _apply(self, reports: list[tuple[Any, ...]]) -> None:
        for kind, *args in reports:
            if kind == "settle":
                self._budget.settle(*args)
            elif kind == "observe":
                self._budget.observe(*args)


class SharedBudget:
    """A :class:`~parrot_pandas._limits.Budget` whose state lives in a shared :class:`BudgetHost`.

    One per partition run, used from that run's event loop. ``acquire`` is one round trip to
    the host; ``settle`` and ``observe`` are batched and sent with the next ``acquire`` (or
    after 50 ms without one); ``pause`` goes at once. If the host cannot be reached, the rest
    of the run paces alone with an in-process :class:`RateBudget` held to ``1 / share`` of the
    limits (the last ones the host reported, and the server's announced ones), so partitions
    going alone together stay within the key's limit; a warning is logged.

    Parameters
    ----------
    call : callable or None
        ``call(method, *args)`` starts the host's coroutine ``method`` and returns a
        :class:`concurrent.futures.Future` of its result, from any thread; ``None`` to go
        alone from the start.
    limits : _Limits, optional
        The user's limits and the share, updated with the limits the host reports; shared by
        the runs of one process.
    on_lost : callable, optional
        Called once when the host is found unreachable.
    on_close : callable, optional
        Called once by :meth:`close`, after the last reports are sent.
    clock, sleep : callable, optional
        Time and waiting for the budget used when going alone.
    report_delay : float, default 0.05
        Seconds a report waits for an ``acquire`` to carry it.
    """

    def __init__(
        self,
        call: Call | None,
        *,
        limits: _Limits | None = None,
        on_lost: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        report_delay: float = _REPORT_DELAY,
    ) -> None:
        self._call = call
        self._limits = limits if limits is not None else _Limits()
        self._on_lost = on_lost
        self._on_close = on_close
        self._clock = clock
        self._sleep = sleep
        self._report_delay = report_delay
        self._reports: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._own: RateBudget | None = None if call is not None else self._alone()

    def __repr__(self) -> str:
        where = "shared" if self._own is None else f"alone at 1/{self._limits.share}"
        return f"SharedBudget(rpm={self._limits.rpm!r}, tpm={self._limits.tpm!r}, {where})"

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until the shared budget lets one request costing `tokens` go."""
        if self._own is None:
            assert self._call is not None
            reports = self._take_reports()
            try:
                rpm, tpm = await asyncio.wrap_future(self._call("acquire", tokens, reports))
            except Exception as exc:  # noqa: BLE001  (any transport failure: go on alone)
                self._lost(exc, reports)
            else:
                self._limits.rpm, self._limits.tpm = rpm, tpm
                return
        assert self._own is not None
        await self._own.acquire(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the shared token count once a response reports its usage (batched)."""
        if self._own is not None:
            self._own.settle(estimated, actual)
        elif estimated != actual:
            self._report(("settle", estimated, actual))

    def observe(self, info: LimitInfo) -> None:
        """Pass a response's rate-limit headers to the shared budget (batched)."""
        if self._own is not None:
            self._own.observe(self._my_share(info))
        elif not info.empty:
            self._report(("observe", info))

    def pause(self, seconds: float) -> None:
        """Stop every partition that shares the budget for `seconds`; sent at once."""
        if self._own is not None:
            self._own.pause(seconds)
        else:
            self._send("pause", seconds, self._take_reports())

    def flush(self) -> None:
        """Send the batched reports now. Safe from any thread."""
        if self._own is None:
            reports = self._take_reports()
            if reports:
                self._send("report", reports)

    def close(self) -> None:
        """Send what is left and let the host go if no other run uses it (idempotent)."""
        self.flush()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def requests_per_second(self, tokens_per_request: float) -> float | None:
        """The request rate the shared limits sustain, as last reported by the host."""
        if self._own is not None:
            return self._own.requests_per_second(tokens_per_request)
        rates = []
        if self._limits.rpm is not None:
            rates.append(self._limits.rpm * _HEADROOM / 60.0)
        if self._limits.tpm is not None and tokens_per_request > 0:
            rates.append(self._limits.tpm * _HEADROOM / 60.0 / tokens_per_request)
        return min(rates) if rates else None

    def snapshot(self) -> dict[str, Any]:
        """The limits in effect, for ``attrs``."""
        if self._own is not None:
            return self._own.snapshot()
        return {"rpm": self._limits.rpm, "tpm": self._limits.tpm}

    # -- internals ------------------------------------------------------------------------

    def _report(self, report: tuple[Any, ...]) -> None:
        self._reports.append(report)
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self._report_delay, self.flush)

    def _take_reports(self) -> list[tuple[Any, ...]]:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reports, self._reports = self._reports, []
        return reports

    def _send(self, method: str, *args: Any) -> None:
        assert self._call is not None
        try:
            self._call(method, *args).add_done_callback(_log_failure)
        except Exception as exc:  # noqa: BLE001
            self._lost(exc, [])

    def _lost(self, exc: BaseException, reports: list[tuple[Any, ...]]) -> None:
        if self._own is not None:
            return
        logger.warning(
            "the shared rate budget is unreachable (%s); this partition goes on alone at 1/%d "
            "of the rate limit", str(exc) or type(exc).__name__, self._limits.share,
        )  # fmt: skip
        self._own = self._alone()
        for kind, *args in [*reports, *self._take_reports()]:
            getattr(self, kind)(*args)
        if self._on_lost is not None:
            self._on_lost()

    def _alone(self) -> RateBudget:
        share = self._limits.share
        budget = RateBudget(
            rpm=None if self._limits.rpm is None else self._limits.rpm / share,
            tpm=None if self._limits.tpm is None else self._limits.tpm / share,
            clock=self._clock,
            sleep=self._sleep,
        )
        # Start empty: several partitions going alone at once must not each open with a burst
        # while the server's window is already spent.
        budget.pause(0.0)
        return budget

    def _my_share(self, info: LimitInfo) -> LimitInfo:
        """`info` with the announced limits cut to this partition's share."""
        share = self._limits.share
        if share == 1 or (info.limit_requests is None and info.limit_tokens is None):
            return info

        # Whole numbers, as headers give them; rounding down keeps the shares within the limit.
        def part(limit: int | None) -> int | None:
            return None if limit is None else max(1, limit // share)

        return replace(
            info, limit_requests=part(info.limit_requests), limit_tokens=part(info.limit_tokens)
        )


def _log_failure(future: concurrent.futures.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.debug("shared rate budget message failed: %s", future.exception())


async def _relay(make: Callable[[], Awaitable[Any]], done: concurrent.futures.Future[Any]) -> None:
    """Await ``make()`` on the host's loop and hand its outcome to `done`, in another thread."""
    try:
        result = await make()
    except asyncio.CancelledError:
        # The host is shutting down: the caller learns it is gone (and goes on alone), rather
        # than seeing a cancellation it could not tell from its own.
        if not done.done():
            done.set_exception(ConnectionError("the shared rate budget was shut down"))
        raise
    except BaseException as exc:  # handed to the caller's thread
        if not done.done():
            done.set_exception(exc)
    else:
        if not done.done():
            done.set_result(result)


# -- where the hosts live ---------------------------------------------------------------------


class BudgetService:
    """The shared budgets of this process: every handle, host and limit it keeps, in one place.

    :meth:`budget` returns a :class:`SharedBudget` for one partition run. Inside a
    ``dask.distributed`` worker it talks to the budget actor for the run's key (created by the
    first partition that asks, and kept alive by a handle held here). Anywhere else the
    partitions of this process share a :class:`BudgetHost` per key, served on a private event
    loop in a thread that runs only while some partition holds a budget.

    Bounded: at most `max_budgets` keys are remembered, the oldest forgotten first. Closable:
    :meth:`close` (or leaving a ``with`` block) drops the actor handles and stops the thread;
    budgets still in use then go on alone.

    Parameters
    ----------
    clock : callable, optional
        Current time in seconds for the in-process hosts and budgets; :func:`time.monotonic`.
    sleep : callable, optional
        Coroutine function that waits; :func:`asyncio.sleep`.
    max_budgets : int, default 64
        Distinct keys remembered.
    report_delay : float, default 0.05
        Seconds a report waits for an ``acquire`` to carry it (see :class:`SharedBudget`).

    Examples
    --------
    >>> from parrot_pandas._config import RunConfig
    >>> config = RunConfig.from_options(base_url="http://127.0.0.1:8000/v1", rpm=600)
    >>> with BudgetService() as service:
    ...     budget = service.budget(config)
    ...     budget.close()
    """

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        max_budgets: int = _MAX_BUDGETS,
        report_delay: float = _REPORT_DELAY,
    ) -> None:
        if max_budgets < 1:
            raise ValueError(f"max_budgets must be at least 1, got {max_budgets!r}")
        self._clock = clock
        self._sleep = sleep
        self._max = max_budgets
        self._report_delay = report_delay
        self._lock = threading.Lock()
        self._closed = False
        self._limits: OrderedDict[str, _Limits] = OrderedDict()
        # name -> (future, actor, threads). Holding the future keeps the actor alive between
        # partitions and computes: a pause outlives one partition.
        self._actors: OrderedDict[str, tuple[Any, Any, int]] = OrderedDict()
        self._hosts: OrderedDict[str, BudgetHost] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._leases = 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._limits)} budgets"
        return f"BudgetService({state}, {self._leases} in use)"

    def __len__(self) -> int:
        """Keys remembered (at most `max_budgets`)."""
        return len(self._limits)

    def __enter__(self) -> BudgetService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def running(self) -> bool:
        """True while the in-process host thread runs (some partition holds a budget)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def budget(self, config: RunConfig) -> SharedBudget:
        """A :class:`SharedBudget` for one run, bound to the budget of its key.

        Call :meth:`SharedBudget.close` when the run ends.

        Raises
        ------
        RuntimeError
            If the service is closed.
        """
        name = budget_name(config)
        with self._lock:
            self._check_open()
            limits, _ = _remember(
                self._limits, name, self._max, lambda: _Limits(config.rpm, config.tpm)
            )
        options: dict[str, Any] = {
            "limits": limits,
            "clock": self._clock,
            "sleep": self._sleep,
            "report_delay": self._report_delay,
        }
        worker = _current_worker()
        if worker is None:
            call, release = self._lease(name, config.rpm, config.tpm)
            return SharedBudget(call, on_close=release, **options)
        try:
            actor, limits.share = self._actor_for(name, config.rpm, config.tpm)
        except Exception as exc:  # noqa: BLE001  (a cluster problem must not fail the rows)
            logger.warning(
                "no shared rate budget (%s); this partition paces on its own at 1/%d of the "
                "rate limit", str(exc) or type(exc).__name__, limits.share,
            )  # fmt: skip
            return SharedBudget(None, **options)
        return SharedBudget(
            _actor_transport(worker, actor),
            on_lost=lambda: self._forget_actor(name, actor),
            **options,
        )

    def close(self) -> None:
        """Drop the actor handles, stop the host thread, forget every budget (idempotent)."""
        with self._lock:
            self._closed = True
            actors = [future for future, _, _ in self._actors.values()]
            self._actors.clear()
            self._limits.clear()
            self._hosts.clear()
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            self._leases = 0
        for future in actors:
            _release(future)
        if loop is not None and thread is not None:
            _stop(loop, thread)

    # -- in this process ----------------------------------------------------------------

    def _lease(
        self, name: str, rpm: float | None, tpm: float | None
    ) -> tuple[Call, Callable[[], None]]:
        """``call`` for the local host of `name`, and the function that gives the lease back."""
        with self._lock:
            self._check_open()
            if self._thread is not None and not self._thread.is_alive():
                # A forked child inherits the loop object but not the thread that ran it.
                self._loop = self._thread = None
                self._leases = 0
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=_serve, args=(self._loop,), name="parrot_pandas-budget", daemon=True
                )
                self._thread.start()
            host, _ = _remember(
                self._hosts,
                name,
                self._max,
                lambda: BudgetHost(rpm, tpm, clock=self._clock, sleep=self._sleep),
            )
            self._leases += 1
            loop = self._loop

        def call(method: str, *args: Any) -> concurrent.futures.Future[Any]:
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            with self._lock:
                # Checked under the lock that stopping takes: a message either starts before
                # the loop's stop, or learns at once that the host is gone.
                if self._loop is not loop:
                    done.set_exception(ConnectionError("the shared rate budget was shut down"))
                    return done
                loop.call_soon_threadsafe(_start, loop, getattr(host, method), args, done)
            return done

        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released or self._loop is not loop:
                    released = True
                    return
                released = True
                self._leases -= 1
                if self._leases:
                    return
                thread = self._thread
                self._loop = self._thread = None
            assert thread is not None
            _stop(loop, thread)

        return call, release

    # -- on a dask.distributed worker -----------------------------------------------------

    def _actor_for(self, name: str, rpm: float | None, tpm: float | None) -> tuple[Any, int]:
        """The budget actor called `name` and the cluster's thread count; created on first use."""
        with self._lock:
            found = self._actors.get(name)
        if found is None:
            from distributed import worker_client

            # The actor is itself a task and needs a thread slot, which this task holds:
            # worker_client() secedes from the pool while we wait (and rejoins after), and the
            # priority gives the freed slot to the actor rather than to the next partition.
            # The fixed key makes every worker's submit name the same single actor. No lock is
            # held while waiting: a partition that blocked on it would hold its slot.
            with worker_client() as client:
                future = client.submit(
                    BudgetHost, rpm, tpm, key=name, actor=True, priority=_ACTOR_PRIORITY
                )
                # Raises if the worker holding it died during this compute: the key stays
                # erred (not rebuilt) until every handle on it is dropped, so that every
                # partition then goes on at its fixed share and together they stay within the
                # limit.
                actor = future.result()
                workers = client.scheduler_info()["workers"].values()
                threads = max(1, sum(w.get("nthreads", 1) for w in workers))
            with self._lock:
                self._check_open()
                found, dropped = _remember(
                    self._actors, name, self._max, lambda: (future, actor, threads)
                )
            for old_future, _, _ in dropped:
                _release(old_future)
        return found[1], found[2]

    def _forget_actor(self, name: str, actor: Any) -> None:
        with self._lock:
            found = self._actors.get(name)
            if found is None or found[1] is not actor:
                return
            del self._actors[name]
        _release(found[0])

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this BudgetService is closed")


def _remember(
    store: OrderedDict[str, Any], name: str, limit: int, make: Callable[[], Any]
) -> tuple[Any, list[Any]]:
    """``store[name]`` (made if missing, marked most recent), and the oldest values dropped to
    keep `limit`."""
    value = store.get(name)
    if value is None:
        value = store[name] = make()
    store.move_to_end(name)
    dropped = []
    while len(store) > limit:
        dropped.append(store.popitem(last=False)[1])
    return value, dropped


def _release(future: Any) -> None:
    try:
        future.release()
    except Exception as exc:  # noqa: BLE001  (the cluster may be gone already)
        logger.debug("releasing a budget actor handle failed: %s", exc)


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The host thread: run `loop` until stopped, then cancel what is left and close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()


def _start(
    loop: asyncio.AbstractEventLoop,
    method: Callable[..., Awaitable[Any]],
    args: tuple[Any, ...],
    done: concurrent.futures.Future[Any],
) -> None:
    """On the host's loop: start one message, and stop it if the caller gives up waiting."""
    task = loop.create_task(_relay(lambda: method(*args), done))

    def on_done(future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop is closed: the task is gone with it
                pass

    done.add_done_callback(on_done)


async def _stop_loop() -> None:
    asyncio.get_running_loop().stop()


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    # A task, not a plain callback: tasks start in the order they were sent, so the reports a
    # closing run sent last are applied before the loop stops.
    try:
        asyncio.run_coroutine_threadsafe(_stop_loop(), loop)
    except RuntimeError:  # closed already
        return
    if thread is not threading.current_thread():
        thread.join(_JOIN_TIMEOUT)


def _current_worker() -> Any:
    # A process that never imported distributed is not a worker: no need to import it (1 s).
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def _actor_transport(worker: Any, actor: Any) -> Call:
    """``call(method, *args)`` for an actor, usable from the partition's own event loop.

    Actor calls belong on the worker's event loop (their futures are bound to it); the result
    crosses back through a thread-safe concurrent future.
    """
    loop = worker.loop

    def call(method: str, *args: Any) -> concurrent.futures.Future[Any]:
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        loop.add_callback(_relay, lambda: getattr(actor, method)(*args), done)
        return done

    return call


_DEFAULT: BudgetService | None = None
_DEFAULT_LOCK = threading.Lock()


def default_service() -> BudgetService:
    """The process's :class:`BudgetService`, which partitions use; made on first use.

    It is closed at interpreter exit; once closed, the next call makes a new one.
    """
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT.closed:
            _DEFAULT = BudgetService()
            atexit.register(_DEFAULT.close)
        return _DEFAULT
