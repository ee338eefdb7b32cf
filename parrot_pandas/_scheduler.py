"""The run: setup request, a streaming worker pool, retries, cache, rows in and answers out.

How a run goes
--------------
1. Prompts are rendered lazily and deduplicated by cache key: identical requests are sent once.
   Rows are looked up in the cache in batches; cached rows finish without a request.
2. The first row that needs a request goes alone (the setup request): a bad key, model or URL
   fails the run at once with the server's message, and its rate-limit headers size the run.
3. Workers (at most ``max_concurrency``) pull jobs from the same lazy feed; a gate sized by
   Little's law (sustainable rate x observed latency) keeps only as many requests in flight as
   the limits can use, and every request first asks the rate budget for permission.
4. Transient failures are retried with exponential backoff and full jitter; a 429 pauses the
   whole budget (every worker) until the announced reset. A row that still fails is recorded
   and the others go on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import backoff

from ._cache import ResponseCache
from ._client import Client
from ._config import STRUCTURED_STRATEGIES
from ._events import (
    Event,
    Listener,
    Retry,
    RowsDone,
    RowsFailed,
    RowsSkipped,
    RunFinished,
    RunStarted,
    Usage,
)
from ._limits import Budget
from ._plan import RequestPlan
from .errors import APIError, StructuredOutputError

__all__ = ["LOOKUP_BATCH", "Job", "Scheduler"]

logger = logging.getLogger("parrot_pandas")

# Rows rendered and looked up in the cache together (one SQLite query per batch).
LOOKUP_BATCH = 256
# 400s that belong to one row (its prompt), not to the run's configuration.
_ROW_SPECIFIC = re.compile(
    r"context.{0,20}(length|window)|maximum context|too many tokens|too long|content.?filter",
    re.IGNORECASE,
)
# What the retry policy retries (the rest, e.g. a cancellation, goes straight up).
_RETRIED = (APIError, StructuredOutputError)
# An error that names a structured-output parameter: the server does not support that strategy.
_STRATEGY_PARAMETER = re.compile(
    r"tool|function|response_format|json_schema|json_object|grammar|schema|output_config"
    r"|output_format",
    re.IGNORECASE,
)
# Error codes that belong to one row's prompt (OpenAI's too-long prompt, Azure's content filter).
_ROW_SPECIFIC_CODES = frozenset({"context_length_exceeded", "content_filter"})


class Job:
    """One distinct request: a prompt, the rows that share it, and its outcome.

    ``key`` is the request's cache key, or the prompt itself in a run without a cache.
    """

    __slots__ = ("key", "prompt", "rows", "samples", "values", "error", "cached", "done")

    def __init__(self, key: str, prompt: str) -> None:
        self.key = key
        self.prompt: str | None = prompt
        self.rows = 1
        self.samples: dict[int, Any] = {}
        self.values: list[Any] | None = None
        self.error: str | None = None
        self.cached = False
        self.done = False


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
        retry_factor: float = 0.5,
        retry_max_wait: float = 30.0,
    ) -> None:
        config = plan.config
        self.plan = plan
        self.client = client
        self.budget = budget
        # Optional in the Budget protocol: what sizes the gate by Little's law.
        self._rate_of: Callable[[float], float | None] | None = getattr(
            budget, "requests_per_second", None
        )
        self.cache = cache
        self.listeners = list(listeners)
        self.usage = Usage()
        self._clock = clock
        self._n = config.n
        # Samples one request can return (Anthropic: 1, as its API has no n).
        self._per_request = config.samples_per_request or config.n
        self._max_concurrency = config.max_concurrency
        self._max_output = config.max_output_tokens
        self._refresh = config.refresh
        self._gate = _Gate(config.max_concurrency)
        self._latency: float | None = None
        self._tokens_per_request: float | None = None
        self._prompt_ratio = 1.0
        # Retry policy, declared once: what is retried, how long we wait, what gives up.
        retrying = functools.partial(
            backoff.on_exception,
            backoff.expo,
            _RETRIED,
            max_tries=config.max_retries + 1,
            jitter=backoff.full_jitter,
            on_backoff=self._on_backoff,
            logger=None,
            factor=retry_factor,
            max_value=retry_max_wait,
        )
        self._retry = retrying(giveup=lambda exc: not exc.retryable)(self._replay_then_send)
        # Probing a structured strategy retries only what is plainly transient.
        self._send_probe = retrying(
            giveup=lambda exc: (
                isinstance(exc, StructuredOutputError)
                or not exc.retryable
                or _rejects_strategy(exc)
            )
        )(self._send)
        self._probing = config.structured == "auto" and plan.fields is not None

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
        APIError
            When the setup request fails for a reason no retry can fix (bad key, model, URL),
            or the key is refused mid-run (401/403). Finished answers stay in the cache.
        """
        self._emit(RunStarted(rows=rows, usage=self.usage))
        outcome = [] if outcome is None else outcome
        feed = self._feed(prompts, outcome, dedupe_window)
        try:
            first = next(feed, None)
            if first is not None:
                await self._process(first, setup=True)
                await self._run_workers(feed, outcome, room)
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

    async def _run_workers(
        self,
        feed: Iterator[Job],
        outcome: list[Job | None],
        room: Callable[[int], Awaitable[None]] | None,
    ) -> None:
        workers = [
            asyncio.create_task(self._worker(feed, outcome, room))
            for _ in range(self._max_concurrency)
        ]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(
        self,
        feed: Iterator[Job],
        outcome: list[Job | None],
        room: Callable[[int], Awaitable[None]] | None,
    ) -> None:
        # Every worker pulls from the same lazy feed: rows are rendered only as they are needed,
        # and a slow request never holds back the others (no fixed chunks).
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

    def facts(self) -> dict[str, Any]:
        """Run facts for ``out.attrs["llm"]`` beyond the event counts."""
        snapshot = getattr(self.budget, "snapshot", dict)()
        return {
            "model": self.plan.config.model,
            "strategy": self.plan.strategy,
            "concurrency": self._gate.limit,
            "rpm": snapshot.get("rpm"),
            "tpm": snapshot.get("tpm"),
        }

    # -- feeding -------------------------------------------------------------------------

    def _feed(
        self, prompts: Iterable[str | None], outcome: list[Job | None], window: int | None
    ) -> Iterator[Job]:
        by_key: dict[str, Job] = {}
        batch: list[Job] = []
        # Within one run the cache key is a function of the prompt alone, so without a cache
        # the prompt tells requests apart just as well, and the hashing is skipped.
        key_of = self.plan.key if self.cache is not None else None
        for prompt in prompts:
            if prompt is None:
                outcome.append(None)
                self._emit(RowsSkipped(rows=1))
                continue
            key = key_of(prompt) if key_of is not None else prompt
            job = by_key.get(key)
            if job is not None:
                # The same request again: share the answer instead of paying for it twice.
                outcome.append(job)
                if not job.done:
                    job.rows += 1
                elif job.error is not None:
                    self._emit(RowsFailed(rows=1, error=job.error))
                else:
                    self._emit(RowsDone(rows=1, cached=job.cached))
                continue
            job = by_key[key] = Job(key, prompt)
            if window is not None and len(by_key) > window:
                # Forget the oldest prompt (dicts keep insertion order); a later duplicate of it
                # is then answered by the cache instead of by sharing.
                del by_key[next(iter(by_key))]
            outcome.append(job)
            batch.append(job)
            if len(batch) >= LOOKUP_BATCH:
                yield from self._lookup(batch)
                batch = []
        yield from self._lookup(batch)

    def _lookup(self, batch: list[Job]) -> Iterator[Job]:
        hits: dict[str, dict[int, str]] = {}
        if self.cache is not None and not self._refresh and batch:
            hits = self.cache.get_many([job.key for job in batch], self._n)
        if not hits:
            yield from batch
            return
        parse = self.plan.parse
        for job in batch:
            for index, text in hits.get(job.key, {}).items():
                try:
                    job.samples[index] = parse(text)
                except StructuredOutputError:
                    continue  # an entry the current parser rejects is simply asked again
            if len(job.samples) >= self._n:
                self._finish(job, cached=True)
            else:
                yield job

    # -- one job ---------------------------------------------------------------------------

    async def _process(self, job: Job, *, setup: bool = False) -> None:
        try:
            if setup and self._probing:
                await self._probe_strategies(job)
            while len(job.samples) < self._n:
                want = min(self._n - len(job.samples), self._per_request)
                # The first attempt goes out directly; only a failed one enters the retry policy
                # (measured: its per-call bookkeeping was a tenth of the client's CPU).
                try:
                    answers = await self._send(job, want)
                except _RETRIED as exc:
                    failed = [exc]
                else:
                    self._keep(job, answers)
                    continue
                self._keep(job, await self._retry(job, want, failed))
        except (APIError, StructuredOutputError) as exc:
            if _is_fatal(exc, setup=setup):
                raise
            if job.samples:
                # Some samples arrived: keep them rather than lose paid-for answers.
                logger.warning("row gave %d of %d samples: %s", len(job.samples), self._n, exc)
                self._finish(job, cached=False)
            else:
                self._fail(job, exc)
            return
        self._finish(job, cached=False)

    async def _probe_strategies(self, job: Job) -> None:
        # Once per run, on the setup request: a server that rejects a structured-output
        # strategy (an error naming the parameter) or ignores it (no parseable answer) moves
        # the run to the next one, so rows never pay for the discovery.
        strategies = STRUCTURED_STRATEGIES[STRUCTURED_STRATEGIES.index(self.plan.strategy) :]
        for strategy in strategies:
            self.plan = self.plan.with_strategy(strategy)
            last = strategy == strategies[-1]
            try:
                answers = await self._send_probe(job, min(self._n, self._per_request))
            except StructuredOutputError as exc:
                if last:
                    raise
                logger.info(
                    "structured=%r gave no usable answer (%s); trying the next", strategy, exc
                )
                continue
            except APIError as exc:
                if last or not _rejects_strategy(exc):
                    raise
                logger.info(
                    "structured=%r refused by the server (%s); trying the next", strategy, exc
                )
                continue
            self._keep(job, answers)
            return

    async def _replay_then_send(
        self, job: Job, want: int, failed: list[Exception]
    ) -> list[tuple[str, Any]]:
        # The retry policy's first try is the attempt _process already made: replaying its
        # error keeps attempt numbers, waits and give-up rules exactly the policy's.
        if failed:
            raise failed.pop()
        return await self._send(job, want)

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

    async def _send(self, job: Job, want: int) -> list[tuple[str, Any]]:
        plan = self.plan
        assert job.prompt is not None
        call = plan.call(job.prompt, want)
        cost = plan.cost(call, self._prompt_ratio)
        await self.budget.acquire(cost)
        usage = self.usage
        usage.requests += 1
        started = self._clock()
        try:
            completion = await self.client.send(call)
        except (APIError, StructuredOutputError) as exc:
            self.budget.settle(cost, 0)
            if isinstance(exc, APIError):
                self._react_to_error(exc)
            raise
        latency = self._clock() - started
        self._learn(
            job, want, cost, completion.prompt_tokens, completion.completion_tokens, latency
        )
        self.budget.observe(completion.limits)
        usage.prompt_tokens += completion.prompt_tokens
        usage.completion_tokens += completion.completion_tokens
        if logger.isEnabledFor(logging.DEBUG):  # checked first: this is the hot path
            logger.debug(
                "request %s n=%d: %d answer(s), %d+%d tokens, %.3fs",
                job.key[:12] if len(job.key) == 64 else "(prompt)",
                want,
                len(completion.texts),
                completion.prompt_tokens,
                completion.completion_tokens,
                latency,
            )
        answers: list[tuple[str, Any]] = []
        problem: StructuredOutputError | None = None
        parse = plan.parse
        for text in completion.texts[:want]:
            try:
                answers.append((text, parse(text)))
            except StructuredOutputError as exc:
                problem = problem or exc
        if not answers:
            raise problem or StructuredOutputError("the server returned no answer")
        return answers

    def _react_to_error(self, exc: APIError) -> None:
        if exc.limits is not None:
            self.budget.observe(exc.limits)
        if exc.status == 429:
            wait = exc.limits.wait_after_429() if exc.limits is not None else exc.retry_after
            self.budget.pause(wait if wait is not None else 1.0)
        elif exc.retryable and exc.retry_after:
            self.budget.pause(exc.retry_after)

    def _learn(
        self,
        job: Job,
        want: int,
        cost: int,
        prompt_tokens: int,
        completion_tokens: int,
        latency: float,
    ) -> None:
        # Moving averages (weights 0.2 and 0.1) of what requests really cost and take.
        if prompt_tokens:
            reserved = want * (self._max_output or 0)
            # Providers count prompt + max_tokens at admission; without max_tokens, what was
            # produced.
            actual = prompt_tokens + (reserved or completion_tokens)
            self.budget.settle(cost, actual)
            estimate = (cost - reserved) / self._prompt_ratio
            if estimate > 0:
                self._prompt_ratio += 0.2 * (prompt_tokens / estimate - self._prompt_ratio)
            per_request = actual / max(want, 1)
            previous = self._tokens_per_request
            self._tokens_per_request = (
                per_request if previous is None else previous + 0.1 * (per_request - previous)
            )
        previous = self._latency
        self._latency = latency if previous is None else previous + 0.1 * (latency - previous)
        self._resize()

    def _resize(self) -> None:
        # Little's law: in-flight requests = sustainable rate x time in flight. A margin covers
        # latency jitter; the budget, not the gate, is what keeps us under the limit.
        rate_of = self._rate_of
        rate = rate_of(self._tokens_per_request or 1.0) if rate_of is not None else None
        if rate is None or self._latency is None:
            target = self._max_concurrency
        else:
            target = min(self._max_concurrency, math.ceil(rate * self._latency * 1.5) + 2)
        if target != self._gate.limit:
            self._gate.resize(target)

    def _on_backoff(self, details: dict[str, Any]) -> None:
        exc = details["exception"]
        self._emit(Retry(attempt=details["tries"], wait=details["wait"], error=str(exc)))
        logger.debug("retry %d in %.2fs after: %s", details["tries"], details["wait"], exc)

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
        self._emit(RowsDone(job.rows, job.cached))

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


def _is_fatal(exc: Exception, *, setup: bool) -> bool:
    if not isinstance(exc, APIError):
        return False
    if exc.status in (401, 403):
        return True  # the key is refused: no other row can succeed
    if not setup:
        return False
    return not (
        exc.status == 400 and (exc.code in _ROW_SPECIFIC_CODES or _ROW_SPECIFIC.search(exc.message))
    )


def _rejects_strategy(exc: APIError) -> bool:
    return exc.status not in (None, 401, 403, 429) and bool(_STRATEGY_PARAMETER.search(exc.message))
