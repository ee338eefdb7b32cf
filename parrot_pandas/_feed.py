"""Rows -> the distinct requests still to send: key, dedupe, cache lookup, samples wanted.

One feed for every consumer. The scheduler sends the jobs it yields and ``estimate`` counts
them, so the two agree by construction; packing several rows into one request and writing
requests into a provider batch file take their jobs from here as well.

How rows go through
-------------------
1. A rendered prompt of ``None`` (a template value was missing) is reported skipped.
2. Each prompt gets its cache key; a prompt whose key is already pending shares that job
   (its answer is paid for once), and one whose job has finished shares its outcome at once.
3. New jobs are looked up in the cache :data:`LOOKUP_BATCH` at a time (one query per batch):
   a job with every sample cached is finished there, one with some keeps them and is
   yielded asking only for the rest (:meth:`Feed.asks`).

Nothing here sends, sleeps or writes: a feed is tested with a list of prompts and a cache file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._events import Event, RowsDone, RowsFailed, RowsSkipped
from .errors import StructuredOutputError

if TYPE_CHECKING:
    from ._cache import ResponseCache
    from ._plan import RequestPlan

__all__ = ["LOOKUP_BATCH", "Feed", "Job"]

# Distinct prompts looked up in the cache together (one SQLite query per batch). Rows are
# rendered at most this far ahead of the requests.
LOOKUP_BATCH = 256


class Job:
    """One distinct request: a prompt, the rows that share it, and its outcome.

    ``key`` is the request's cache key, or the prompt itself in a run without a cache.
    ``samples`` holds the parsed samples so far, by sample number (cached ones included).
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


def _ignore(event: Event) -> None:
    pass


class Feed:
    """Turns rendered prompts, in row order, into the distinct jobs still to send.

    Parameters
    ----------
    plan : RequestPlan
        Gives a prompt its cache key, parses cached answers, and says how many samples a row
        wants (``n``) and one request can return.
    finish : callable
        Called with a job whose every sample came from the cache; it must set ``job.done``
        and ``job.cached`` and report the job's rows (the scheduler's
        ``_finish(job, cached=True)``).
    fail : callable, optional
        Called with a job and the error of a cached answer that can never parse (a value that
        does not fit its field): the row fails without a request, since asking again would pay
        for the same answer; a fixed parser reads the cached text on a later run. By default
        such a job is finished like a cached one (an estimate sends nothing for it either).
    cache : ResponseCache, optional
        Read for answers; never written here. Without one, the prompt is the key (within one
        run the key is a function of the prompt alone, so the hashing is skipped).
    emit : callable, optional
        Receives :class:`RowsSkipped` for a missing prompt, and :class:`RowsDone` or
        :class:`RowsFailed` for a row that repeats a job already finished.
    window : int, optional
        Remember only this many distinct prompts for deduplication (bounded memory when
        streaming): a later duplicate of a forgotten prompt becomes a job of its own, which
        the cache answers once the first one is written. ``None`` remembers every prompt.
    lookup_batch : int, optional
        Distinct prompts per cache query; :data:`LOOKUP_BATCH` by default.
    """

    def __init__(
        self,
        plan: RequestPlan,
        *,
        finish: Callable[[Job], None],
        fail: Callable[[Job, StructuredOutputError], None] | None = None,
        cache: ResponseCache | None = None,
        emit: Callable[[Event], None] = _ignore,
        window: int | None = None,
        lookup_batch: int | None = None,
    ) -> None:
        config = plan.config
        self.plan = plan
        self.n = config.n
        # Samples one request can return (Anthropic: 1, as its API has no n).
        self.per_request = config.samples_per_request or config.n
        self._finish = finish
        self._fail = fail if fail is not None else lambda job, error: finish(job)
        self._cache = cache
        self._read = cache is not None and not config.refresh
        self._emit = emit
        self._window = window
        self._batch = lookup_batch or LOOKUP_BATCH

    def jobs(
        self, prompts: Iterable[str | None], outcome: list[Job | None] | None = None
    ) -> Iterator[Job]:
        """Yield each distinct job that still needs a request, lazily, in first-row order.

        Parameters
        ----------
        prompts : iterable
            Rendered prompts in row order, ``None`` for a row to skip; consumed lazily.
        outcome : list, optional
            Appended in row order as rows are consumed: the row's job, or ``None`` when
            skipped; rows sharing a request share one job.
        """
        by_key: dict[str, Job] = {}
        batch: list[Job] = []
        key_of = self.plan.key if self._cache is not None else None
        emit, window = self._emit, self._window
        record = outcome.append if outcome is not None else None
        for prompt in prompts:
            if prompt is None:
                if record is not None:
                    record(None)
                emit(RowsSkipped(rows=1))
                continue
            key = key_of(prompt) if key_of is not None else prompt
            job = by_key.get(key)
            if job is not None:
                # The same request again: share the answer instead of paying for it twice.
                if record is not None:
                    record(job)
                if not job.done:
                    job.rows += 1
                elif job.error is not None:
                    emit(RowsFailed(rows=1, error=job.error))
                else:
                    emit(RowsDone(rows=1, cached=job.cached))
                continue
            job = by_key[key] = Job(key, prompt)
            if window is not None and len(by_key) > window:
                # Forget the oldest prompt (dicts keep insertion order); a later duplicate of it
                # is then answered by the cache instead of by sharing.
                del by_key[next(iter(by_key))]
            if record is not None:
                record(job)
            batch.append(job)
            if len(batch) >= self._batch:
                yield from self._lookup(batch)
                batch = []
        yield from self._lookup(batch)

    def asks(self, job: Job) -> list[int]:
        """Samples each request for ``job`` asks, in order: the missing ones, a request's worth
        at a time (``[3]`` for ``n=3`` on OpenAI, ``[1, 1, 1]`` on Anthropic)."""
        missing = self.n - len(job.samples)
        step = self.per_request
        return [min(step, missing - done) for done in range(0, missing, step)]

    def _lookup(self, batch: list[Job]) -> Iterator[Job]:
        hits: dict[str, dict[int, str]] = {}
        if self._read and batch:
            assert self._cache is not None
            hits = self._cache.get_many([job.key for job in batch], self.n)
        if not hits:
            yield from batch
            return
        parse = self.plan.parse
        for job in batch:
            final: StructuredOutputError | None = None
            for index, text in hits.get(job.key, {}).items():
                try:
                    job.samples[index] = parse(text)
                except StructuredOutputError as exc:
                    if not exc.verdict.retry:
                        final = final or exc
                    # otherwise an entry the current parser rejects is simply asked again
            if len(job.samples) >= self.n or (final is not None and job.samples):
                # As live: a row keeps the usable samples it has rather than pay for the rest.
                self._finish(job)
            elif final is not None:
                self._fail(job, final)
            else:
                yield job
