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

from .cache import ResponseCache
from .client import Client
from .config import STRUCTURED_STRATEGIES
from .errors import APIError, StructuredOutputError
from .events import (
    Event,
    Listener,
    RequestDone,
    RequestSent,
    Retry,
    RowsDone,
    RowsFailed,
    RowsSkipped,
    RunFinished,
    RunStarted,
)
from .limits import Budget
from .plan import RequestPlan

__all__ = ["LOOKUP_BATCH", "Job", "Scheduler"]

logger = logging.getLogger("parrot_pandas")

# Rows rendered and looked up in the cache together (one SQLite query per batch).
LOOKUP_BATCH = 256
# 400s that belong to one row (its prompt), not to the run's configuration.
_ROW_SPECIFIC = re.compile(
    r"context.{0,20}(length|window)|maximum context|too many tokens|too long|content.?filter",
    re.IGNORECASE,
)
# An error that names a structured-output parameter: the server does not support that strategy.
_STRATEGY_PARAMETER = re.compile(
    r"tool|function|response_format|json_schema|json_object|grammar|schema", re.IGNORECASE
)


class Job:
    """One distinct request: a prompt, the rows that share it, and its outcome."""

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
    """A semaphore whose size can change while it is held (the concurrency target moves)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
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

    async def __aexit__(self, *exc_info: object) -> None:
        self.active -= 1
        self._wake()

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
        Receive every :class:`~parrot_pandas.events.Event`.
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
        self.cache = cache
        self.listeners = list(listeners)
        self._clock = clock
        self._n = config.n
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
            (APIError, StructuredOutputError),
            max_tries=config.max_retries + 1,
            jitter=backoff.full_jitter,
            on_backoff=self._on_backoff,
            logger=None,
            factor=retry_factor,
            max_value=retry_max_wait,
        )
        self._send_with_retries = retrying(giveup=lambda exc: not exc.retryable)(self._send)
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
        self._emit(RunStarted(rows=rows))
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
                self.cache.flush()
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
        while True:
            if room is not None:
                await room(len(outcome))
            job = next(feed, None)
            if job is None:
                return
            async with self._gate:
                await self._process(job)

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
        for prompt in prompts:
            if prompt is None:
                outcome.append(None)
                self._emit(RowsSkipped(rows=1))
                continue
            key = self.plan.key(prompt)
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
                self._keep(job, await self._send_with_retries(job, self._n - len(job.samples)))
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
                answers = await self._send_probe(job, self._n)
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

    def _keep(self, job: Job, answers: list[tuple[str, Any]]) -> None:
        free = (i for i in range(self._n) if i not in job.samples)
        for (text, value), index in zip(answers, free, strict=False):
            job.samples[index] = value
            if self.cache is not None:
                self.cache.put(job.key, index, text, model=self.plan.config.model)

    async def _send(self, job: Job, want: int) -> list[tuple[str, Any]]:
        plan = self.plan
        assert job.prompt is not None
        cost = plan.cost(job.prompt, want, self._prompt_ratio)
        await self.budget.acquire(cost)
        self._emit(RequestSent())
        started = self._clock()
        try:
            completion = await self.client.send(plan.call(job.prompt, want))
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
        self._emit(RequestDone(completion.prompt_tokens, completion.completion_tokens, latency))
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
        reserved = want * (self._max_output or 0)
        # Providers count prompt + max_tokens at admission; without max_tokens, what was produced.
        actual = prompt_tokens + (reserved or completion_tokens)
        if prompt_tokens:
            self.budget.settle(cost, actual)
            estimate = (cost - reserved) / self._prompt_ratio
            if estimate > 0:
                self._prompt_ratio = _ema(self._prompt_ratio, prompt_tokens / estimate, 0.2)
        self._latency = latency if self._latency is None else _ema(self._latency, latency, 0.1)
        per_request = actual / max(want, 1) if prompt_tokens else None
        if per_request:
            self._tokens_per_request = (
                per_request
                if self._tokens_per_request is None
                else _ema(self._tokens_per_request, per_request, 0.1)
            )
        self._resize()

    def _resize(self) -> None:
        # Little's law: in-flight requests = sustainable rate x time in flight. A margin covers
        # latency jitter; the budget, not the gate, is what keeps us under the limit.
        rate_of = getattr(self.budget, "requests_per_second", None)
        rate = rate_of(self._tokens_per_request or 1.0) if rate_of is not None else None
        if rate is None or self._latency is None:
            target = self._max_concurrency
        else:
            target = math.ceil(rate * self._latency * 1.5) + 2
        self._gate.resize(min(self._max_concurrency, target))

    def _on_backoff(self, details: dict[str, Any]) -> None:
        exc = details["exception"]
        self._emit(Retry(attempt=details["tries"], wait=details["wait"], error=str(exc)))
        logger.debug("retry %d in %.2fs after: %s", details["tries"], details["wait"], exc)

    # -- outcomes ----------------------------------------------------------------------------

    def _finish(self, job: Job, *, cached: bool) -> None:
        job.values = self.plan.combine([job.samples[i] for i in sorted(job.samples)])
        job.cached = cached
        self._close(job)
        self._emit(RowsDone(rows=job.rows, cached=cached))

    def _fail(self, job: Job, exc: Exception) -> None:
        job.error = str(exc)
        self._close(job)
        logger.warning("%d row(s) failed after retries: %s", job.rows, job.error)
        self._emit(RowsFailed(rows=job.rows, error=job.error))

    @staticmethod
    def _close(job: Job) -> None:
        job.done = True
        job.prompt = None  # the prompt can be large; the outcome is all that is kept
        job.samples = {}

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
        exc.status == 400
        and (exc.code == "context_length_exceeded" or _ROW_SPECIFIC.search(exc.message))
    )


def _rejects_strategy(exc: APIError) -> bool:
    return exc.status not in (None, 401, 403, 429) and bool(_STRATEGY_PARAMETER.search(exc.message))


def _ema(previous: float, sample: float, weight: float) -> float:
    return previous + weight * (sample - previous)
