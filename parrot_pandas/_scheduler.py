"""The run: setup request, a streaming worker pool, retries, cache, rows in and answers out.

How a run goes
--------------
1. Prompts are rendered lazily and deduplicated by cache key: identical requests are sent once.
   Rows are looked up in the cache in batches; cached rows finish without a request.
2. The first row that needs a request goes alone (the setup request), and its rate-limit
   headers size the run. Only a ``run`` verdict (bad key, model or URL, no quota) fails the
   run there; a ``row`` verdict fails that row and the next row becomes the setup request, up
   to ``_SETUP_TRIES`` rows in a row, after which the run stops (if rows are left) rather than
   pay for every row of a broken server. A ``strategy`` verdict moves ``structured="auto"`` to
   the next strategy (with a fixed ``structured=`` it fails the run, naming
   ``structured="auto"``).
3. Workers (at most ``max_concurrency``, never more than the rows) pull jobs from the same lazy
   feed; a gate sized by Little's law (sustainable rate x observed latency) keeps only as many
   requests in flight as the limits can use, and every request first asks the rate budget.
4. Each failure is acted on by its verdict alone (see :mod:`._retry`, the one retry
   declaration): retried only when ``verdict.retry``; a rate limit also pauses the whole budget
   until the announced reset. A ``row`` failure is recorded and the others go on; a ``run``
   failure stops the run, and every finished answer stays cached.
5. With ``rows_per_request`` other than 1, a worker takes up to that many jobs at once and a
   :class:`~parrot_pandas._packer.Packer` sends them as one request, keeping each row's answer
   by its id and asking the rest again in halves; the setup request always goes alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, TypeVar

from ._cache import ResponseCache
from ._client import Client
from ._config import STRUCTURED_STRATEGIES
from ._events import (
    Event,
    Listener,
    Retry,
    RowsDone,
    RowsFailed,
    RunFinished,
    RunStarted,
    Usage,
)
from ._feed import Feed, Job
from ._limits import MAX_PAUSE, Budget, LimitInfo
from ._packer import Packer
from ._plan import RequestPlan
from ._retry import RETRIED, RetryPolicy
from .errors import RATE_LIMITED, APIConnectionError, APIError, StructuredOutputError, Verdict
from .providers import Call, Completion

__all__ = ["Scheduler", "error_message"]

logger = logging.getLogger("parrot_pandas")

# Setup requests that may fail on their own rows, one after the other, before the run stops:
# a server that fails every row (every answer truncated, a 500 on every prompt) is then paid
# three times, not once per row.
_SETUP_TRIES = 3

T = TypeVar("T")

_ONE_ROW = {False: RowsDone(1, False), True: RowsDone(1, True)}


class _Gate:
    """A semaphore whose size can change while it is held (the concurrency target moves).

    A free slot is taken synchronously (``enter_now``); only a full gate is awaited
    (``enter``). Every entry is matched by one ``leave``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def enter_now(self) -> bool:
        if self.active < self.limit:
            self.active += 1
            return True
        return False

    def leave(self) -> None:
        self.active -= 1
        if self._waiters:
            self._wake()

    async def enter(self) -> None:
        while self.active >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise
        self.active += 1

    def resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.active
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class Scheduler:
    """Runs every row of a plan through the client, within the budget, with retries.

    Parameters
    ----------
    plan : RequestPlan
        Turns prompts into requests, cache keys and values.
    client : Client
        The open HTTP client.
    budget : Budget
        Asked for permission before every request; told about every response.
    cache : ResponseCache, optional
        Read in batches before requests, written as answers arrive.
    listeners : iterable of callables
        Receive every :class:`~parrot_pandas._events.Event`.
    template_ends : (str, str)
        The template's static text before and after its placeholders, sent once per packed
        request (``config.rows_per_request`` other than 1).

    Attributes
    ----------
    usage : Usage
        Requests and billed tokens so far, counted in place (handed to listeners with
        :class:`~parrot_pandas._events.RunStarted`).
    """

    def __init__(
        self,
        plan: RequestPlan,
        client: Client,
        budget: Budget,
        *,
        cache: ResponseCache | None = None,
        listeners: Iterable[Listener] = (),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        retry_factor: float = 0.5,
        retry_max_wait: float = 30.0,
        template_ends: tuple[str, str] = ("", ""),
    ) -> None:
        config = plan.config
        self.plan = plan
        self.client = client
        self.budget = budget
        self.cache = cache
        self.listeners = list(listeners)
        self.usage = Usage()
        self._clock = clock
        self._n = config.n
        # Samples one request can return (Anthropic: 1, as its API has no n).
        self._per_request = config.samples_per_request or config.n
        self._max_concurrency = config.max_concurrency
        self._max_output = config.max_output_tokens or 0
        self._gate = _Gate(config.max_concurrency)
        self._latency: float | None = None
        self._tokens_per_request: float | None = None
        self._prompt_ratio = 1.0
        # What is retried, how long we wait, what gives up: declared once, in _retry.
        self._retry = RetryPolicy(
            tries=config.max_retries + 1, factor=retry_factor, max_wait=retry_max_wait, sleep=sleep
        )
        # Whether a strategy verdict on the setup request may fall back to the next strategy.
        self._probing = config.structured == "auto" and plan.fields is not None
        # Several rows per request: the packed send path, in its own room (_packer).
        self._packer = Packer(self, *template_ends) if config.rows_per_request != 1 else None

    # -- the run -------------------------------------------------------------------------

    async def run(
        self,
        prompts: Iterable[str | None],
        rows: int,
        *,
        outcome: list[Job | None] | None = None,
        room: Callable[[int], Awaitable[None]] | None = None,
        dedupe_window: int | None = None,
    ) -> list[Job | None]:
        """Answer every prompt; return each row's job (``None`` for skipped rows).

        Parameters
        ----------
        prompts : iterable
            Rendered prompts in row order, ``None`` for rows to skip; consumed lazily.
        rows : int
            How many there are (for progress).
        outcome : list, optional
            Filled in row order as rows are fed, so a caller can stream finished rows.
        room : coroutine function, optional
            Awaited with the number of rows fed so far before a worker takes another row:
            a streaming consumer uses it to keep the run from racing ahead of it.
        dedupe_window : int, optional
            Remember only this many distinct prompts for deduplication (bounded memory
            when streaming); ``None`` remembers every one.

        Raises
        ------
        APIError or StructuredOutputError
            On a ``run`` verdict (bad key, model or URL, quota gone; at the setup request or
            mid-run), when the server refuses a fixed ``structured=`` strategy, or when
            ``_SETUP_TRIES`` setup requests in a row failed on their rows. Finished answers
            stay in the cache.
        """
        self._emit(RunStarted(rows=rows, usage=self.usage))
        outcome = [] if outcome is None else outcome
        feed = Feed(
            self.plan,
            finish=functools.partial(self._finish, cached=True),
            fail=self._fail,
            cache=self.cache,
            emit=self._emit,
            window=dedupe_window,
        ).jobs(prompts, outcome)
        try:
            first = next(feed, None)
            if first is not None:
                if self._packer is not None:
                    self._packer.note(first.prompt)
                await self._setup(first, feed)
                await self._run_workers(feed, outcome, room, workers=rows)
            else:
                # Every row was cached or skipped: drain the generator's bookkeeping.
                for _ in feed:
                    pass
        finally:
            if self.cache is not None:
                # Rows count as done only once their answers are written: wait for the last.
                await self.cache.drain()
            self._emit(RunFinished(self.facts()))
        return outcome

    async def _setup(self, job: Job, feed: Iterator[Job]) -> None:
        # The setup request: one row at a time until one succeeds. A row's own failure moves
        # on to the next row; a strategy verdict asks the same row again the next way.
        failures = 0
        while True:
            try:
                error = await self._process(job, setup=True)
            except RETRIED as exc:
                if exc.verdict.scope != "strategy":
                    raise
                self._fall_back(exc)
                continue
            if error is None:
                return
            failures += 1
            next_job = next(feed, None)
            if next_job is None:
                return  # no row left to pay for: the failed rows are the run's outcome
            if failures >= _SETUP_TRIES:
                raise _with_message(
                    error,
                    f"the first {failures} rows sent all failed, the last with: "
                    f"{error_message(error)}. "
                    "The run stops here rather than pay for every row: fix the cause and run "
                    "again (answers already received are cached).",
                    Verdict("run", False, "setup_failed"),
                )
            job = next_job

    def _fall_back(self, exc: APIError | StructuredOutputError) -> None:
        # A strategy verdict on the setup request: the server refused the structured-output
        # parameter or ignored it. Never taken from what an answer says (a filter, a truncation).
        strategy = self.plan.strategy
        later = STRUCTURED_STRATEGIES[STRUCTURED_STRATEGIES.index(strategy) + 1 :]
        if not self._probing or not later:
            fix = (
                'pass structured="auto" to use the best way it supports'
                if not self._probing
                else "no structured-output strategy is left to try"
            )
            raise _with_message(
                exc,
                f"{exc.message.rstrip('.')}. The server does not support "
                f"structured={strategy!r}; {fix}.",
                Verdict("run", False, "unsupported_strategy"),
            )
        logger.info(
            "structured=%r refused or ignored by the server (%s); trying %r",
            strategy,
            exc,
            later[0],
        )
        self.plan = self.plan.with_strategy(later[0])

    async def _run_workers(
        self,
        feed: Iterator[Job],
        outcome: list[Job | None],
        room: Callable[[int], Awaitable[None]] | None,
        *,
        workers: int,
    ) -> None:
        # Never more workers than rows: max_concurrency=1_000_000 on 3 rows makes 3 tasks.
        count = max(1, min(self._max_concurrency, workers))
        tasks = [asyncio.create_task(self._worker(feed, outcome, room)) for _ in range(count)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(
        self,
        feed: Iterator[Job],
        outcome: list[Job | None],
        room: Callable[[int], Awaitable[None]] | None,
    ) -> None:
        # Every worker pulls from the same lazy feed: rows are rendered only as they are needed,
        # and a slow request never holds back the others (no fixed chunks).
        if self._packer is not None:
            await self._pack_worker(feed, outcome, room, self._packer)
            return
        gate = self._gate
        while True:
            if room is not None:
                await room(len(outcome))
            job = next(feed, None)
            if job is None:
                return
            if not gate.enter_now():
                await gate.enter()
            try:
                await self._process(job)
            finally:
                gate.leave()

    async def _pack_worker(
        self,
        feed: Iterator[Job],
        outcome: list[Job | None],
        room: Callable[[int], Awaitable[None]] | None,
        packer: Packer,
    ) -> None:
        # A worker of a packed run: up to packer.size jobs per request. Room is awaited before
        # a pack, never inside one, so the jobs a worker holds are always being answered.
        while True:
            if room is not None:
                await room(len(outcome))
            jobs: list[Job] = []
            for _ in range(packer.size):
                job = next(feed, None)
                if job is None:
                    break
                jobs.append(job)
            if not jobs:
                return
            if len(jobs) == 1:
                await self._gated(self._process, jobs[0])
            else:
                await packer.answer(jobs)

    async def _gated(self, work: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """``await work(*args, **kwargs)`` holding a slot of the concurrency gate."""
        gate = self._gate
        if not gate.enter_now():
            await gate.enter()
        try:
            return await work(*args, **kwargs)
        finally:
            gate.leave()

    def facts(self) -> dict[str, Any]:
        """Run facts for ``out.attrs["llm"]`` beyond the event counts."""
        snapshot = self.budget.snapshot()
        facts = {
            "model": self.plan.config.model,
            "strategy": self.plan.strategy,
            "concurrency": self._gate.limit,
            "rpm": snapshot.get("rpm"),
            "tpm": snapshot.get("tpm"),
        }
        if self._packer is not None:
            facts.update(self._packer.facts())
        else:
            facts.update(rows_per_request=1, packed_requests=0, repacked_rows=0)
        return facts

    # -- one job ---------------------------------------------------------------------------

    async def _process(self, job: Job, *, setup: bool = False) -> Exception | None:
        """Answer one job; return the error that failed its row, if any.

        Raises on a ``run`` verdict, and on a ``strategy`` verdict of the setup request (the
        caller falls back); any other failure is the row's.
        """
        try:
            while len(job.samples) < self._n:
                want = min(self._n - len(job.samples), self._per_request)
                # The first try is awaited here: most succeed, and only a failed one enters
                # the retry policy, which judges it as try 1 (issue 12, CPU per row). The
                # policy is called after the except block, so a later error does not carry
                # the first one as its context ("During handling of the above exception").
                try:
                    await self._attempt(job, want)
                    continue
                except RETRIED as exc:
                    failed = exc
                await self._retry.call(
                    self._attempt, job, want, setup=setup, on_retry=self._on_retry, failed=failed
                )
        except RETRIED as exc:
            scope = exc.verdict.scope
            if scope == "run" or (setup and scope == "strategy"):
                raise
            return self._end(job, exc)
        self._finish(job, cached=False)
        return None

    def _end(self, job: Job, exc: Exception) -> Exception | None:
        """A row that cannot get all its samples: finished with the ones it has, else failed
        with ``exc`` (returned)."""
        if job.samples:
            # Some samples arrived: keep them rather than lose paid-for answers.
            logger.warning("row gave %d of %d samples: %s", len(job.samples), self._n, exc)
            self._finish(job, cached=False)
            return None
        self._fail(job, exc)
        return exc

    async def _attempt(self, job: Job, want: int) -> None:
        # One request: its good answers are kept (and cached) whatever else came with them.
        plan = self.plan
        assert job.prompt is not None
        call = plan.call(job.prompt, want)
        cost = plan.cost(call, self._prompt_ratio)
        completion, latency = await self._exchange(call, cost, want * self._max_output)
        if logger.isEnabledFor(logging.DEBUG):  # checked first: this is the hot path
            _log_answer(job, want, completion, latency)
        answers, unusable, problem = self._judge(completion, want)
        if answers:
            self._keep(job, answers)
        if unusable:
            self._keep_unusable(job, unusable)
        if problem is not None and (not answers or not problem.verdict.retry):
            raise problem

    def _keep(self, job: Job, answers: list[tuple[str, Any]]) -> None:
        # Answers fill the free sample numbers in order; extra answers are dropped.
        samples, cache = job.samples, self.cache
        index = 0
        for text, value in answers:
            while index in samples:
                index += 1
            if index >= self._n:
                return
            samples[index] = value
            if cache is not None:
                cache.put(job.key, index, text, model=self.plan.config.model)

    def _keep_unusable(self, job: Job, texts: list[str]) -> None:
        # Answers the parser rejected for good (a value that does not fit its field): asking
        # again would pay for the same answer, so the raw text is cached under the next free
        # sample numbers, and a fixed parser reads it on a re-run without a request.
        cache = self.cache
        if cache is None:
            return
        taken = set(job.samples)
        index = 0
        for text in texts:
            while index in taken:
                index += 1
            if index >= self._n:
                return
            taken.add(index)
            cache.put(job.key, index, text, model=self.plan.config.model)

    def _judge(
        self, completion: Completion, want: int
    ) -> tuple[list[tuple[str, Any]], list[str], StructuredOutputError | None]:
        """An answer's usable samples as (text, value), the texts whose values can never
        parse, and the worst problem among the rest: the same for a live answer and a
        batch line's."""
        plan = self.plan
        answers: list[tuple[str, Any]] = []
        unusable: list[str] = []
        problem: StructuredOutputError | None = None
        for known in completion.problems:
            problem = _worse(problem, known)
        parse = plan.parse
        for text in completion.texts[:want]:
            try:
                answers.append((text, parse(text)))
            except StructuredOutputError as exc:
                if not exc.verdict.retry:
                    unusable.append(text)
                problem = _worse(problem, exc)
        if not answers and problem is None:
            problem = StructuredOutputError("the server returned no answer")
        return answers, unusable, problem

    async def _exchange(self, call: Call, cost: int, reserved: int) -> tuple[Completion, float]:
        """One request within the budget: admitted, counted, sent, learnt from.

        ``cost`` is what the budget takes on admission; ``reserved`` its output share (what
        the provider counts for ``max_tokens``). Returns the completion and its latency;
        raises the request's ``APIError`` (after telling the budget).
        """
        await self.budget.acquire(cost)
        self.usage.requests += 1
        started = self._clock()
        try:
            completion = await self.client.send(call)
        except RETRIED as exc:
            self.budget.settle(cost, 0)
            if isinstance(exc, APIError):
                self._react_to_error(exc)
            raise
        latency = self._clock() - started
        self._answered(call, cost, reserved, completion, latency)
        return completion, latency

    def _react_to_error(self, exc: APIError) -> None:
        limits = exc.limits
        if limits is not None:
            self.budget.observe(limits)
        if exc.verdict == RATE_LIMITED:
            # The limit is shared by every request: every worker waits, for the one 429 wait.
            if limits is None:
                limits = LimitInfo(retry_after=exc.retry_after)
            self.budget.pause(limits.wait_after_429())
        elif exc.verdict.retry and exc.retry_after:
            self.budget.pause(min(exc.retry_after, MAX_PAUSE))

    def _answered(
        self, call: Call, cost: int, reserved: int, completion: Completion, latency: float
    ) -> None:
        # An answered request: its tokens are counted, its limits observed, and moving averages
        # (weights 0.2 and 0.1) learn what requests really cost and take.
        prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
        usage = self.usage
        usage.prompt_tokens += prompt_tokens
        usage.completion_tokens += completion_tokens
        budget = self.budget
        if prompt_tokens:
            # Providers count prompt + max_tokens at admission; without max_tokens, what was
            # produced.
            actual = prompt_tokens + (reserved or completion_tokens)
            budget.settle(cost, actual)
            estimate = (cost - reserved) / self._prompt_ratio
            if estimate > 0:
                self._prompt_ratio += 0.2 * (prompt_tokens / estimate - self._prompt_ratio)
            per_request = actual / max(call.n, 1)
            previous = self._tokens_per_request
            self._tokens_per_request = (
                per_request if previous is None else previous + 0.1 * (per_request - previous)
            )
        previous = self._latency
        self._latency = latency if previous is None else previous + 0.1 * (latency - previous)
        self._resize()
        budget.observe(completion.limits)

    def _resize(self) -> None:
        # Little's law: in-flight requests = sustainable rate x time in flight. A margin covers
        # latency jitter; the budget, not the gate, is what keeps us under the limit.
        rate = self.budget.requests_per_second(self._tokens_per_request or 1.0)
        if rate is None or self._latency is None:
            target = self._max_concurrency
        else:
            target = min(self._max_concurrency, math.ceil(rate * self._latency * 1.5) + 2)
        if target != self._gate.limit:
            self._gate.resize(target)

    def _on_retry(self, attempt: int, wait: float, exc: Exception) -> None:
        self._emit(Retry(attempt=attempt, wait=wait, error=str(exc)))
        logger.debug("retry %d in %.2fs after: %s", attempt, wait, exc)

    # -- outcomes ----------------------------------------------------------------------------

    def _finish(self, job: Job, *, cached: bool) -> None:
        samples = job.samples
        # Samples arrive in any order; one needs no sorting.
        ordered = [samples[i] for i in sorted(samples)] if len(samples) > 1 else [*samples.values()]
        job.values = self.plan.combine(ordered)
        job.cached = cached
        if cached or self.cache is None:
            self._done(job)
        else:
            # Not done until its answers are on disk: a row counted done survives a kill -9.
            self.cache.when_durable(functools.partial(self._done, job))

    def _done(self, job: Job) -> None:
        self._close(job)
        # Events are frozen: the common one-row event is made once (issue 12, CPU per row).
        rows, cached = job.rows, job.cached
        self._emit(_ONE_ROW[cached] if rows == 1 else RowsDone(rows, cached))

    def _fail(self, job: Job, exc: Exception) -> None:
        job.error = str(exc)
        self._close(job)
        logger.warning("%d row(s) failed: %s", job.rows, job.error)
        self._emit(RowsFailed(rows=job.rows, error=job.error))

    @staticmethod
    def _close(job: Job) -> None:
        job.done = True
        job.prompt = None  # the prompt can be large; the outcome is all that is kept
        job.samples.clear()

    def _emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)


def _log_answer(job: Job, want: int, completion: Completion, latency: float) -> None:
    logger.debug(
        "request %s n=%d: %d answer(s), %d+%d tokens, %.3fs",
        job.key[:12] if len(job.key) == 64 else "(prompt)",
        want,
        len(completion.texts),
        completion.prompt_tokens,
        completion.completion_tokens,
        latency,
    )


def _worse(
    known: StructuredOutputError | None, new: StructuredOutputError
) -> StructuredOutputError:
    # The problem a request is judged by: the first that will repeat, else the first.
    if known is None or (known.verdict.retry and not new.verdict.retry):
        return new
    return known


def error_message(exc: Exception) -> str:
    """An error's own message (an APIError's, without its context), or its text."""
    return getattr(exc, "message", None) or str(exc)


def _with_message(
    exc: Exception, message: str, verdict: Verdict
) -> APIError | StructuredOutputError:
    """The same kind of error as ``exc``, with another message and verdict."""
    if isinstance(exc, APIConnectionError):
        return APIConnectionError(message, verdict=verdict)
    if isinstance(exc, APIError):
        error = APIError(
            message, status=exc.status, code=exc.code, retry_after=exc.retry_after, verdict=verdict
        )
        error.limits = exc.limits
        return error
    return StructuredOutputError(message, verdict=verdict)
