"""``batch=True``: a run whose requests go through the provider's Batch API, resumable.

How a batch run goes
--------------------
1. The run's :class:`~parrot_pandas._feed.Feed` gives the jobs still to send, as for a live
   run: cached rows never reach a batch, identical rows are one job.
2. Each job becomes one line per request it needs (:meth:`Feed.asks`: one line with ``n``
   samples on OpenAI, one line per sample on Anthropic), ``custom_id`` a short hash of the
   job's cache key; ``protocol.parts`` splits the lines by the provider's limits. With
   ``rows_per_request`` other than 1, consecutive jobs are packed first, as the live packed
   path packs them (:class:`~parrot_pandas._packing.PackedPlan`; ``"auto"`` is the fixed
   size of :func:`batch_rows_per_request`): one line per pack, ``custom_id`` ``p`` and a
   hash of its jobs' keys, and its record keeps each custom id's rows.
3. Unless a record says a part was already submitted, one row goes live first: the
   scheduler's setup request (it picks the structured-output strategy, fails the run early on
   a bad key or model, and warms the provider's prompt cache for what follows). Then each part
   gets a record in the cache database (table ``batches``, keyed by provider, base URL and
   the part's digest: what was submitted) before it is created, and its batch id right after.
   A re-run rebuilds each recorded part from its record's rows (however they were packed),
   finds it the same as submitted and re-attaches: it never submits the same batch twice,
   across processes and kernel restarts. The record is a claim, taken in one write
   transaction and naming its process: a second process running the same call at
   the same time waits for the first one's batch id; a claim whose process died before it
   recorded the id is looked up by the batch's metadata (OpenAI, Azure), or on Anthropic
   (no metadata) by its size and creation time (see ``_orphan``).
4. Waiting polls with backoff (:data:`POLL_FIRST` seconds, doubling to :data:`POLL_MAX`) and
   feeds a progress bar from the batch's request counts. Ctrl-C stops waiting, not the batch.
5. Each line's answer goes through the scheduler's own ``_judge``/``_keep``/``_finish``/
   ``_fail``: the same cache, the same verdicts as a live answer. Lines whose verdict says
   retry (expired, cancelled, a 500) go into one more batch, at most :data:`ROUNDS` batches in
   all, or live through the ordinary scheduler once ``batch_deadline`` has passed or the
   rounds are used up. A batch the provider rejects fails the call with its message.
6. A packed line's answer is checked id by id by :meth:`PackedPlan.read` and kept by the
   packer's own keeping, each row cached under its unpacked key. Rows that did not map
   (missing, duplicated, truncated, invalid) go into the next batch in packs of at most half
   the size (:func:`~parrot_pandas._packing.halve`); a pack whose line failed in passing goes
   again whole; one whose line failed for good is halved, so that only a culprit, alone,
   fails. What is left after the rounds goes live through the live packed path.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ._batch import BatchClient
from ._config import STRUCTURED_STRATEGIES
from ._events import RunFinished, RunStarted, Usage
from ._feed import Feed, Job
from ._packer import auto_bounds, packed_strategy
from ._packing import PackedPlan, PackResult, halve
from ._pricing import BATCH_DISCOUNT, batch_cost, cache_price_factors, cost, price_of
from ._progress import _AUTO_MIN_ROWS
from ._scheduler import Scheduler, error_message
from ._secrets import redact_url
from ._tokens import Tokenizer
from .errors import APIError, StructuredOutputError, Verdict
from .providers import Call, Completion
from .providers._batch import BatchPart, BatchStatus, LineResult

__all__ = [
    "BATCH_SAMPLED_ROWS",
    "BATCH_TIMEOUT",
    "POLL_FIRST",
    "POLL_MAX",
    "ROUNDS",
    "BatchScheduler",
    "Records",
    "batch_rows_per_request",
]

logger = logging.getLogger("parrot_pandas")

# Seconds between looks at a batch: the first wait, then doubling up to the longest.
POLL_FIRST = 5.0
POLL_MAX = 60.0
# Seconds between looks at a record another process is submitting.
CLAIM_POLL = 1.0


async def wait_between(seconds: float) -> None:
    """The sleep between two looks at a batch (tests replace it with a fake clock's)."""
    await asyncio.sleep(seconds)


# Seconds at least for one request of a batch run (uploads and downloads are large).
BATCH_TIMEOUT = 600.0
# Hex digits of a custom id taken from the job's cache key (160 bits: no collisions).
_STEM = 40
# The batch metadata key (OpenAI, Azure) naming the part's digest: finds a batch whose create
# response was lost to a crash.
_DIGEST_KEY = "parrot_digest"
# Seconds the provider's clock may be behind ours (batch creation times against a claim's).
_CLOCK_SKEW = 60.0
# The verdict of a line's error that carries none: the row's, not worth another try.
_UNKNOWN = Verdict("row", False, "unknown")
# Batches a line may be in before its row goes live (the first, and one for what failed).
ROUNDS = 2
#: Prompts whose lengths size a batch's packs for rows_per_request="auto".
BATCH_SAMPLED_ROWS = 256
# Prompt tokens of a typical row before any was seen (sizing only).
ASSUMED_ROW_PROMPT = 64.0


def _stem(key: str) -> str:
    """A job's custom id (before any ``-s<i>`` sample suffix): short, stable, from its key."""
    return hashlib.sha256(key.encode()).hexdigest()[:_STEM]


def resume_hint(ids: Sequence[str]) -> str:
    """The message of a wait stopped by Ctrl-C: what goes on and how to resume."""
    shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return (
        f"stopped waiting for batch(es) {shown or '(none yet)'}; they go on at the provider. "
        "Re-run the same call to resume: it re-attaches to them (no second submission) and "
        "reads their answers once they end. parrot_pandas.list_batches() shows them, "
        "parrot_pandas.cancel_batches() cancels them."
    )


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One submitted (or being submitted) batch, as the cache database remembers it."""

    provider: str
    base_url: str
    digest: str
    batch_id: str | None
    state: str
    created: float
    updated: float
    model: str | None
    custom_ids: tuple[str, ...]
    owner: str | None = None
    #: Each custom id's rows (their stems, in pack order): what a re-run rebuilds the batch's
    #: lines from, however they were packed.
    rows: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


_FIELDS = "provider, base_url, digest, batch_id, state, created, updated, model, custom_ids, owner"
# Parts this process is submitting right now (provider, base URL, digest): a claim of ours
# not in here was left by a call that was interrupted, and is stale.
# A count, not a set: two calls of one process may both be between marking and claiming.
_SUBMITTING: Counter[tuple[str, str, str]] = Counter()
# Seconds after which an unfinished claim is taken as abandoned whoever made it (a hung
# process; another host, or Windows, where no pid can be asked).
CLAIM_STALE = 900.0


def _me() -> str:
    """This process, as a record's owner names it (asked each time: a forked child differs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Records:
    """The ``batches`` table of a cache database: what was submitted, by the part's digest.

    Every write commits at once (the point is to survive kill -9). Opening the cache
    (:func:`~parrot_pandas._cache.open_cache`) has created the table.
    """

    def __init__(self, path: Any) -> None:
        self._conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None)

    def close(self) -> None:
        self._conn.close()

    def find(self, provider: str, base_url: str, digest: str) -> Record | None:
        row = self._conn.execute(
            f"SELECT {_FIELDS} FROM batches WHERE provider = ? AND base_url = ? AND digest = ?",
            (provider, base_url, digest),
        ).fetchone()
        return _record(row) if row is not None else None

    def claim(
        self,
        provider: str,
        base_url: str,
        part: BatchPart,
        now: float,
        seen: Record | None,
        rows: Mapping[str, Sequence[str]],
    ) -> bool:
        """Take the right to submit ``part``: written before the create request, so a crash
        after it leaves a trace and a second process waits instead of submitting too.
        ``rows`` maps each custom id to its rows' stems.

        ``False`` when the record is no longer ``seen`` (another process claimed or
        submitted the part meanwhile): look again.
        """
        ids = {"ids": list(part.custom_ids), "rows": {cid: list(rows[cid]) for cid in rows}}
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            row = self._conn.execute(
                f"SELECT {_FIELDS} FROM batches WHERE provider = ? AND base_url = ? AND digest = ?",
                (provider, base_url, part.digest),
            ).fetchone()
            if (_record(row) if row is not None else None) != seen:
                return False
            self._conn.execute(
                f"INSERT OR REPLACE INTO batches ({_FIELDS}) "
                "VALUES (?, ?, ?, NULL, 'submitting', ?, ?, ?, ?, ?)",
                (provider, base_url, part.digest, now, now, part.model, json.dumps(ids), _me()),
            )
            return True
        finally:
            self._conn.execute("COMMIT")

    def release(self, provider: str, base_url: str, digest: str) -> None:
        """Give up a claim whose create request failed or was interrupted: nobody waits for
        it any more, and a batch created anyway is looked for as after a crash."""
        self._conn.execute(
            "UPDATE batches SET owner = NULL WHERE provider = ? AND base_url = ? AND digest = ? "
            "AND batch_id IS NULL AND owner = ?",
            (provider, base_url, digest, _me()),
        )

    def update(
        self, provider: str, base_url: str, digest: str, state: str, now: float, *, batch_id: str
    ) -> None:
        """Batch ``batch_id``'s state, while the record still names it: another process may
        have claimed the part again since (its batch expired), for a batch of its own."""
        self._conn.execute(
            "UPDATE batches SET state = ?, updated = ? "
            "WHERE provider = ? AND base_url = ? AND digest = ? AND batch_id = ?",
            (state, now, provider, base_url, digest, batch_id),
        )

    def name(
        self, provider: str, base_url: str, digest: str, state: str, now: float, *, batch_id: str
    ) -> None:
        """The id of the batch just created (or found) for the part's claim."""
        self._conn.execute(
            "UPDATE batches SET batch_id = ?, state = ?, updated = ? "
            "WHERE provider = ? AND base_url = ? AND digest = ? "
            "AND (batch_id IS NULL OR batch_id = ?)",
            (batch_id, state, now, provider, base_url, digest, batch_id),
        )

    def all(self) -> list[Record]:
        rows = self._conn.execute(f"SELECT {_FIELDS} FROM batches ORDER BY created").fetchall()
        return [_record(row) for row in rows]


def _record(row: tuple[Any, ...]) -> Record:
    provider, base_url, digest, batch_id, state, created, updated, model, ids, owner = row
    facts = (provider, base_url, digest, batch_id, state, created, updated, model)
    listed = json.loads(ids)
    if isinstance(listed, list):  # written before records named their rows: not re-attached
        return Record(*facts, tuple(listed), owner)
    rows = {cid: tuple(stems) for cid, stems in listed["rows"].items()}
    return Record(*facts, tuple(listed["ids"]), owner, rows)


def being_submitted(record: Record, now: float) -> bool:
    """Whether another process (or call) is submitting ``record``'s part right now."""
    if record.batch_id is not None or record.state != "submitting" or record.owner is None:
        return False
    if now - record.updated >= CLAIM_STALE:
        return False
    if record.owner == _me():
        return _SUBMITTING[(record.provider, record.base_url, record.digest)] > 0
    host, _, pid = record.owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and os.name != "nt":
        # (On Windows signal 0 is CTRL_C_EVENT, not a question: the claim's age decides.)
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False  # it died (kill -9, a crash) before its batch id was recorded
        except PermissionError:
            return True  # alive, another user's
    return True


def record_state(status: BatchStatus) -> str:
    """A record's state: the batch's state, and how it ended."""
    return f"ended:{status.outcome}" if status.ended else status.state


# -- the run ---------------------------------------------------------------------------------


@dataclass
class _Line:
    """One request of a batch: one row's (``packed`` ``None``) or a pack of rows'."""

    custom_id: str
    jobs: tuple[Job, ...]
    want: int
    call: Call
    packed: PackedPlan | None = None

    @property
    def job(self) -> Job:
        return self.jobs[0]


def _settled(job: Job) -> bool:
    # Finished (its answers maybe not yet durable, so not yet ``done``) or failed.
    return job.done or job.values is not None


def _verdict(error: Exception | None) -> Verdict:
    return getattr(error, "verdict", None) or _UNKNOWN


def batch_rows_per_request(packed: PackedPlan, prompts: Sequence[str]) -> int:
    """The rows a batch line packs for ``rows_per_request="auto"``: a fixed size.

    What ``"auto"`` starts a live run with when no rate limit is known
    (:data:`~parrot_pandas._packing.DEFAULT_AUTO_ROWS`, 10), or fewer when the model's context
    window or output cap cannot hold that many rows of these prompts with their ``max_tokens``
    (:func:`~parrot_pandas._packer.auto_bounds`). A batch is not held to the per-minute
    limits, so they play no part; and the size stays fixed, since nothing is learnt from a
    batch's failures before it has ended. Rows' lengths come from the first
    :data:`BATCH_SAMPLED_ROWS` prompts, counted without a tokenizer (the estimate counts
    the same way, so it quotes the run's size).
    """
    counter = Tokenizer(None)
    sample = prompts[:BATCH_SAMPLED_ROWS]
    row = (
        sum(packed.row_tokens(counter, p) for p in sample) / len(sample)
        if sample
        else ASSUMED_ROW_PROMPT
    )
    target, ceiling = auto_bounds(
        packed, rpm=None, tpm=None, shared=packed.shared_tokens(counter), row_prompt=row
    )
    return max(1, min(target, ceiling))


class BatchScheduler(Scheduler):
    """A :class:`~parrot_pandas._scheduler.Scheduler` whose rows go through batches.

    Takes the scheduler's parameters (``client`` must be a
    :class:`~parrot_pandas._batch.BatchClient`) and:

    Parameters
    ----------
    wall : callable, default time.time
        Unix time now: for ``batch_deadline`` and the records.
    wait : coroutine function, default :func:`wait_between`
        Sleeps between looks at a batch (a test passes one that moves a fake clock).
    on_counts : callable, optional
        Called with ``(done, total)`` requests of the batches being waited for.
    """

    def __init__(
        self,
        *args: Any,
        wall: Callable[[], float] = time.time,
        wait: Callable[[float], Awaitable[Any]] | None = None,
        on_counts: Callable[[int, int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.client: BatchClient
        self._wall = wall
        self._wait = wait
        self._on_counts = on_counts
        self.batch_usage = Usage()
        self.batch_ids: list[str] = []
        self.resubmitted = 0
        self.live_fallback = 0
        self.cache_read = 0
        self.cache_written = 0
        self._waiting: list[str] = []
        # Packing (rows_per_request other than 1): the same packed plans as the live path.
        self._ends: tuple[str, str] = kwargs.get("template_ends", ("", ""))
        self._packed_plans: dict[str, PackedPlan] = {}
        self._repacked: set[int] = set()
        self._read: set[str] = set()  # ids of the batches whose results this run read
        config = self.plan.config
        self._provider_name = config.provider
        self._base_url = redact_url(config.base_url)
        deadline = config.batch_deadline
        if isinstance(deadline, datetime.datetime):
            self._deadline: float | None = (
                deadline.timestamp()
                if deadline.tzinfo is not None
                else deadline.astimezone().timestamp()
            )
        elif isinstance(deadline, datetime.timedelta):
            self._deadline = wall() + deadline.total_seconds()
        elif deadline is not None:
            self._deadline = wall() + float(deadline)
        else:
            self._deadline = None

    async def run(  # type: ignore[override]
        self,
        prompts: Iterable[str | None],
        rows: int,
        *,
        outcome: list[Job | None] | None = None,
        room: Any = None,
        dedupe_window: int | None = None,
    ) -> list[Job | None]:
        """Answer every prompt through batches; return each row's job, as ``Scheduler.run``.

        Raises
        ------
        APIError
            The provider rejected a batch (with its message), or a ``run`` verdict.
        asyncio.CancelledError
            Ctrl-C (the task cancelled) while waiting: the batches go on, and a warning
            names them and says that re-running the call resumes.
        """
        self._emit(RunStarted(rows=rows, usage=self.usage))
        outcome = [] if outcome is None else outcome
        assert self.cache is not None, "batch=True needs the cache (checked in the config)"
        records = Records(self.cache.path)
        feed = Feed(
            self.plan,
            finish=lambda job: self._finish(job, cached=True),
            fail=self._fail,
            cache=self.cache,
            emit=self._emit,
            window=dedupe_window,
        )
        try:
            jobs = list(feed.jobs(prompts, outcome))
            if jobs:
                await self._batches(jobs, feed, records)
        finally:
            # As a live run ends: the last answers written, off the event loop.
            await self.cache.drain()
            records.close()
            self._emit(RunFinished(self.facts()))
        return outcome

    def facts(self) -> dict[str, Any]:
        """The scheduler's facts, and the batches': ids, and tokens billed at batch price."""
        facts = super().facts()
        facts.update(
            batch=True,
            batches=len(self.batch_ids),
            batch_ids=list(self.batch_ids),
            batch_prompt_tokens=self.batch_usage.prompt_tokens,
            batch_completion_tokens=self.batch_usage.completion_tokens,
            resubmitted_lines=self.resubmitted,
            live_fallback_rows=self.live_fallback,
            batch_cached_prompt_tokens=self.cache_read,
            batch_cache_creation_tokens=self.cache_written,
        )
        return facts

    # -- rounds ------------------------------------------------------------------------------

    async def _batches(self, jobs: list[Job], feed: Feed, records: Records) -> None:
        groups = self._known(jobs, feed, records)
        if not groups:
            # No batch of this call exists yet: one row goes live first, the scheduler's setup
            # request (strategy, bad key or model found for one row's price; and a warm
            # prompt cache for the batch, which reads nothing from a cold one).
            rest = iter(jobs[1:])
            await self._setup(jobs[0], rest)
            # The live answer is durable before any batch is: a re-run after a crash then
            # computes the same batch lines (without that row) and finds their record.
            assert self.cache is not None
            await self.cache.drain()
        covered = {id(job) for group in groups for line in group for job in line.jobs}
        fresh = [job for job in jobs if not _settled(job) and id(job) not in covered]
        if fresh:
            groups.append(self._lines(self._packs(fresh), feed))
        for round_ in range(1, ROUNDS + 1):
            groups = [group for group in groups if group]
            if not groups:
                return
            if round_ > 1:
                self.resubmitted += sum(len(group) for group in groups)
            again = await self._round(groups, records)
            groups = [self._lines(again, feed)] if again else []
            if groups and (round_ == ROUNDS or self._past_deadline()):
                break
        pending = list(dict.fromkeys(job for group in groups for ln in group for job in ln.jobs))
        if pending:
            why = "batch_deadline has passed" if self._past_deadline() else "after two batches"
            logger.info("%d row(s) still unanswered %s: sent live", len(pending), why)
            self.live_fallback += sum(job.rows for job in pending)
            await self._run_workers(iter(pending), [], None, workers=len(pending))

    def _plans(self) -> list[Any]:
        """The plans a submitted batch's lines may have used: an earlier run may have moved
        ``structured="auto"`` to a later strategy at its setup request."""
        plans = [self.plan]
        if self._probing and self.plan.strategy in STRUCTURED_STRATEGIES:
            later = STRUCTURED_STRATEGIES[STRUCTURED_STRATEGIES.index(self.plan.strategy) + 1 :]
            plans += [self.plan.with_strategy(strategy) for strategy in later]
        return plans

    def _known(self, jobs: list[Job], feed: Feed, records: Records) -> list[list[_Line]]:
        """The lines of each batch this call submitted and whose answers may not be in the
        cache, rebuilt from its record's rows (a re-run re-attaches to it), with each plan the
        run may use (:meth:`_plans`; the plan takes the one found).

        A record whose rows are not all still to send (some answered since), or whose lines
        come out other than submitted, is left: its rows go into a new batch.
        """
        protocol = self.client.protocol
        by_stem = {_stem(job.key): job for job in jobs}
        first = self.plan
        groups: list[list[_Line]] = []
        for record in self._ours(records):
            if not record.rows or record.state == "ended:failed":
                continue
            packs: list[list[Job]] = []
            seen: set[tuple[str, ...]] = set()
            for cid in record.custom_ids:
                stems = record.rows.get(cid, ())
                if stems in seen:
                    continue  # another sample's line of the same pack
                seen.add(stems)
                pack = [by_stem.get(stem) for stem in stems]
                if not pack or any(job is None or _settled(job) for job in pack):
                    break
                packs.append(pack)  # type: ignore[arg-type]
            else:
                for plan in self._plans():
                    self.plan = plan
                    lines = self._lines(packs, feed)
                    parts = protocol.parts([(line.custom_id, line.call) for line in lines])
                    if [part.digest for part in parts] == [record.digest]:
                        groups.append(lines)
                        first = plan
                        break
                self.plan = first
        return groups

    def _ours(self, records: Records) -> list[Record]:
        return [
            record
            for record in records.all()
            if record.provider == self._provider_name and record.base_url == self._base_url
        ]

    def _past_deadline(self) -> bool:
        return self._deadline is not None and self._wall() >= self._deadline

    def _packs(self, jobs: list[Job]) -> list[list[Job]]:
        """Fresh jobs grouped as lines: one each, or ``rows_per_request`` consecutive jobs."""
        if self._packer is None:
            return [[job] for job in jobs]
        size = self.plan.config.rows_per_request
        if size == "auto":
            size = batch_rows_per_request(
                self._packed(), [job.prompt for job in jobs[:BATCH_SAMPLED_ROWS] if job.prompt]
            )
        return [jobs[start : start + int(size)] for start in range(0, len(jobs), int(size))]

    def _packed(self) -> PackedPlan:
        """The packed plan of the run's current plan: what the live packed path would send."""
        strategy = packed_strategy(self.plan)
        key = f"{self.plan.strategy}/{strategy}"
        packed = self._packed_plans.get(key)
        if packed is None:
            packed = self._packed_plans[key] = PackedPlan(self.plan, *self._ends, strategy)
        return packed

    def _lines(self, packs: Iterable[Sequence[Job]], feed: Feed) -> list[_Line]:
        """Each pack's lines: a job alone is asked as unpacked (custom id from its key); a
        pack of jobs as a packed request (custom id from its jobs' keys, ids ``1..K`` inside),
        asking what its neediest row lacks. One line per request :meth:`Feed.asks` wants."""
        lines: list[_Line] = []
        plan = self.plan
        for pack in packs:
            jobs = tuple(job for job in pack if not _settled(job) and job.prompt is not None)
            if not jobs:
                continue
            packed: PackedPlan | None = None
            if len(jobs) == 1:
                asks = feed.asks(jobs[0])
                stem = _stem(jobs[0].key)
            else:
                packed = self._packed()
                asks = max((feed.asks(job) for job in jobs), key=sum)
                stem = "p" + _stem("\n".join(job.key for job in jobs))[1:]
            prompts = [job.prompt for job in jobs]
            for i, want in enumerate(asks):
                cid = stem if len(asks) == 1 else f"{stem}-s{i}"
                call = (
                    plan.call(prompts[0], want)  # type: ignore[arg-type]
                    if packed is None
                    else packed.call(prompts, want)  # type: ignore[arg-type]
                )
                lines.append(_Line(cid, jobs, want, call, packed))
        return lines

    def _found(self, records: Records, part: BatchPart) -> Any:
        return records.find(self._provider_name, self._base_url, part.digest)

    async def _round(self, groups: list[list[_Line]], records: Records) -> list[list[Job]]:
        """Submit (or re-attach to) every part of each group of lines, wait, keep the
        answers; return the jobs worth another try, grouped as their lines go next (a pack's
        unmapped rows in halves, a pack whose line failed in passing whole)."""
        protocol = self.client.protocol
        lines = [line for group in groups for line in group]
        by_id = {line.custom_id: line for line in lines}
        parts = [
            part
            for group in groups
            for part in protocol.parts([(line.custom_id, line.call) for line in group])
        ]
        statuses = [await self._attach_or_submit(records, part, by_id) for part in parts]
        ended = await self._wait_all(statuses, parts, records)
        whole: set[tuple[int, ...]] = set()  # packs (by their jobs) to send again as they are
        unmapped: dict[tuple[int, ...], dict[int, Job]] = {}  # per pack, rows to re-ask
        for part, status in zip(parts, ended, strict=True):
            calls = [(cid, by_id[cid].call) for cid in part.custom_ids]
            results = await self.client.results(status, calls)
            for cid, result in results.items():
                line = by_id[cid]
                key = tuple(id(job) for job in line.jobs)
                if line.packed is None:
                    if self._take(line, result):
                        whole.add(key)
                    continue
                failed, again = self._take_pack(line, result)
                if again:
                    whole.add(key)
                unmapped.setdefault(key, {}).update((id(job), job) for job in failed)
            self._read.add(status.id)
            records.update(
                self._provider_name,
                self._base_url,
                part.digest,
                "collected",
                self._wall(),
                batch_id=status.id,
            )
        retry: list[list[Job]] = []
        for jobs in dict.fromkeys(line.jobs for line in lines):
            key = tuple(id(job) for job in jobs)
            if key in whole:
                retry.append([job for job in jobs if not _settled(job)])
            elif unmapped.get(key):
                retry += halve(
                    [job for job in unmapped[key].values() if not _settled(job)], len(jobs)
                )
        # A job whose lines all came back, none worth another try, is finished now (the
        # lines of one job may sit in two parts: only now have all of them been read).
        pending = {id(job) for pack in retry for job in pack}
        for jobs in dict.fromkeys(line.jobs for line in lines):
            for job in jobs:
                if _settled(job) or id(job) in pending:
                    continue
                if len(job.samples) >= self._n:
                    self._finish(job, cached=False)
                else:
                    self._end(job, StructuredOutputError("the batch returned fewer answers than n"))
        return [pack for pack in retry if pack]

    async def _attach_or_submit(
        self, records: Records, part: BatchPart, lines: Mapping[str, _Line]
    ) -> BatchStatus:
        while True:
            record = self._found(records, part)
            if record is not None and being_submitted(record, self._wall()):
                # Another process runs the same call and is submitting this part: wait for
                # its batch id rather than submit a second batch.
                await (self._wait or wait_between)(CLAIM_POLL)
                continue
            batch_id = record.batch_id if record is not None else None
            if record is not None and batch_id is None and record.state == "submitting":
                # A crash between the create request and its record: the batch may exist.
                batch_id = await self._orphan(part, record.created, records)
            # A batch this run has read (or one rejected) is never attached to again: the same
            # lines once more are lines to resubmit (they all expired, say). One read by a run
            # that then crashed is, as its answers may not have reached the cache.
            if (
                batch_id is not None
                and record is not None
                and record.state != "ended:failed"
                and batch_id not in self._read
            ):
                logger.info("re-attaching to batch %s (%d requests)", batch_id, len(part))
                status = await self._look(records, part, batch_id)
                if record.batch_id is None:  # found after a crash: its record names it now
                    self._note_id(records, part, status)
                break
            rows = {cid: [_stem(job.key) for job in lines[cid].jobs] for cid in part.custom_ids}
            mine = (self._provider_name, self._base_url, part.digest)
            # Marked before the claim commits, so another thread of this process never takes
            # the claim for one left by an interrupted call; unmarked once the id is recorded.
            _SUBMITTING[mine] += 1
            try:
                if not records.claim(
                    self._provider_name, self._base_url, part, self._wall(), record, rows
                ):
                    continue  # another process claimed the part first: look again
                status = await self._submit(records, part)
                self._note_id(records, part, status)
            finally:
                _SUBMITTING[mine] -= 1
                if not _SUBMITTING[mine]:
                    del _SUBMITTING[mine]
            break
        if status.id not in self.batch_ids:
            self.batch_ids.append(status.id)
        return status

    async def _submit(self, records: Records, part: BatchPart) -> BatchStatus:
        """Create the batch of a part this process has claimed."""
        try:
            status = await self.client.submit(part, metadata={_DIGEST_KEY: part.digest[:64]})
        except BaseException as exc:
            records.release(self._provider_name, self._base_url, part.digest)
            if isinstance(exc, APIError):
                raise _batch_refused(exc) from None
            raise
        logger.info("submitted batch %s (%d requests)", status.id, len(part))
        return status

    def _note_id(self, records: Records, part: BatchPart, status: BatchStatus) -> None:
        records.name(
            self._provider_name,
            self._base_url,
            part.digest,
            record_state(status),
            self._wall(),
            batch_id=status.id,
        )

    async def _orphan(self, part: BatchPart, since: float, records: Records) -> str | None:
        """The id of a batch created for ``part`` whose create response never reached its
        record (claimed at ``since``), or ``None`` when there seems to be none.

        OpenAI and Azure keep the part's digest in the batch's metadata. Anthropic keeps
        none: there the one batch of the part's size created since the claim and recorded
        for no other part is taken. A wrong guess costs time, never answers: its results
        carry none of the part's custom ids, so every line goes into the next batch.
        """
        protocol = self.client.protocol
        wanted = part.digest[:64]
        known = {record.batch_id for record in records.all() if record.batch_id}
        guesses: list[str] = []
        after = None
        while True:
            body = await self.client.call(protocol.list_request(after, 100))
            data = body.get("data") if isinstance(body, dict) and protocol.keeps_metadata else None
            for item in data or ():
                metadata = item.get("metadata") if isinstance(item, dict) else None
                if isinstance(metadata, dict) and metadata.get(_DIGEST_KEY) == wanted:
                    return str(item.get("id"))
            statuses, after = protocol.read_list(body)
            if not protocol.keeps_metadata:
                guesses += [
                    s.id
                    for s in statuses
                    if s.total == len(part)
                    and s.id not in known
                    and (s.created_at or since) >= since - _CLOCK_SKEW
                ]
            # Newest first: a page that reaches back before the claim was written is the last.
            if after is None or any(
                (s.created_at or since) < since - _CLOCK_SKEW for s in statuses
            ):
                return guesses[0] if len(guesses) == 1 else None

    async def _wait_all(
        self, statuses: list[BatchStatus], parts: list[BatchPart], records: Records
    ) -> list[BatchStatus]:
        delay = POLL_FIRST
        self._waiting = [s.id for s in statuses]
        try:
            while True:
                self._report(statuses)
                if all(s.ended for s in statuses):
                    return statuses
                # wait_between is looked up now, so a test can put a fake clock's sleep there.
                await (self._wait or wait_between)(delay)
                delay = min(delay * 2, POLL_MAX)
                for i, status in enumerate(statuses):
                    if not status.ended:
                        statuses[i] = await self._look(records, parts[i], status.id)
        except asyncio.CancelledError:
            logger.warning("%s", resume_hint(self._waiting))
            raise

    async def _look(self, records: Records, part: BatchPart, batch_id: str) -> BatchStatus:
        """The batch now, its record updated; a batch the provider rejected fails the call
        (its record says so, and a re-run submits the part again)."""
        try:
            status = await self.client.retrieve(batch_id)
        except APIError as exc:
            if exc.verdict.reason == "batch_rejected":
                records.update(
                    self._provider_name,
                    self._base_url,
                    part.digest,
                    "ended:failed",
                    self._wall(),
                    batch_id=batch_id,
                )
            raise
        records.update(
            self._provider_name,
            self._base_url,
            part.digest,
            record_state(status),
            self._wall(),
            batch_id=batch_id,
        )
        return status

    def _report(self, statuses: list[BatchStatus]) -> None:
        if self._on_counts is not None:
            done = sum(s.total if s.ended else s.done for s in statuses)
            self._on_counts(done, sum(s.total for s in statuses))

    def _take(self, line: _Line, result: LineResult) -> bool:
        """Keep one line's answer as a live one would be kept; ``True`` when it is worth
        another try."""
        job = line.job
        completion = self._bill(result)  # billed whatever became of its row
        if _settled(job):
            return False
        problem: Exception | None = result.error
        if completion is not None:
            answers, unusable, judged = self._judge(completion, line.want)
            if answers:
                self._keep(job, answers)
            if unusable:
                self._keep_unusable(job, unusable)
            worth = judged is not None and (not answers or not judged.verdict.retry)
            problem = judged if worth else None
        if problem is None:
            return False
        verdict = _verdict(problem)
        if verdict.retry:
            return True
        self._end(job, problem)
        return False

    def _take_pack(self, line: _Line, result: LineResult) -> tuple[list[Job], bool]:
        """Keep a packed line's answer row by row, as the live packed path keeps it
        (:meth:`PackedPlan.read`, then the packer's own keeping); return the rows to ask
        again in halves, and whether the whole pack goes again as it is.

        A line that failed in passing (expired, cancelled, a 5xx) sends the pack again; one
        that failed for good (too long, filtered, refused), like a live packed request with a
        ``row`` verdict, has its rows asked again in halves, so that only a culprit, alone,
        fails, by the unpacked rules.
        """
        packer, packed = self._packer, line.packed
        assert packer is not None and packed is not None
        completion = self._bill(result)
        live = [i for i, job in enumerate(line.jobs) if not _settled(job)]
        if not live:
            return [], False
        packer.packed_requests += 1
        packer.packed_rows += len(line.jobs)
        packer.largest = max(packer.largest, len(line.jobs))
        if completion is not None:
            mapped = packed.read(completion, len(line.jobs), line.want)
        else:
            error = result.error
            verdict = _verdict(error)
            if isinstance(error, APIError) and verdict.retry:
                return [], True
            mapped = PackResult.failed(len(line.jobs), verdict.reason, error_message(error))
        group = [line.jobs[i] for i in live]
        failed, _ = packer.keep(group, PackResult([mapped.rows[i] for i in live], mapped.unknown))
        for job in failed:
            if id(job) not in self._repacked:
                self._repacked.add(id(job))
                packer.repacked_rows += job.rows
        return failed, False

    def _bill(self, result: LineResult) -> Completion | None:
        """Count one line's request and the tokens it billed (at the batch price)."""
        self.usage.requests += 1
        completion = result.completion
        if completion is not None:
            for usage in (self.usage, self.batch_usage):
                usage.prompt_tokens += completion.prompt_tokens
                usage.completion_tokens += completion.completion_tokens
            self.cache_read += result.cache.read
            self.cache_written += result.cache.written
        return completion


def _batch_refused(exc: APIError) -> APIError:
    # A plain OpenAI-compatible server without the Batch endpoints answers 404: say so.
    if exc.status == 404:
        exc.message = (
            f"{exc.message.rstrip('.')}. The server has no Batch API (its Files/Batches "
            "endpoints answered 404); pass batch=False to send the rows live."
        )
        exc.args = (exc.message,)
        exc.verdict = Verdict("run", False, "no_batch_api")
    return exc


# -- cost and progress -----------------------------------------------------------------------


def run_cost(model: str, provider: str, facts: dict[str, Any]) -> float | None:
    """USD for a run's facts: live tokens at the live price, batch tokens at the batch price,
    prompt-cache reads and writes at their prices (:func:`~._pricing.cache_price_factors`)."""
    batch_prompt = facts.get("batch_prompt_tokens", 0)
    batch_completion = facts.get("batch_completion_tokens", 0)
    live = cost(
        model, facts["prompt_tokens"] - batch_prompt, facts["completion_tokens"] - batch_completion
    )
    batch = batch_cost(model, batch_prompt, batch_completion)
    price = price_of(model)
    if live is None or batch is None or price is None:
        return None
    read_factor, write_factor = cache_price_factors(provider)
    batch_read = facts.get("batch_cached_prompt_tokens", 0)
    batch_written = facts.get("batch_cache_creation_tokens", 0)
    live_read = facts.get("cached_prompt_tokens", 0) - batch_read
    live_written = facts.get("cache_creation_tokens", 0) - batch_written
    # Cached tokens are part of the prompt tokens above, billed at the full input price.
    per_token = price.input / 1_000_000
    adjust = (live_read + batch_read * BATCH_DISCOUNT) * (read_factor - 1) + (
        live_written + batch_written * BATCH_DISCOUNT
    ) * (write_factor - 1)
    return live + batch + adjust * per_token


class BatchBar:
    """A ``tqdm.auto`` bar of a batch's requests while waiting; ``progress=None`` shows it
    for runs of 50 rows or more, as the row bar."""

    def __init__(self, setting: bool | None, rows: int) -> None:
        self._on = setting if setting is not None else rows >= _AUTO_MIN_ROWS
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self._on or not total:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="request", desc="batch", file=sys.stderr)
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# -- estimate ---------------------------------------------------------------------------------


def with_batch_figures(estimate: Any, rpm: float | None) -> Any:
    """``estimate`` (the Series of :func:`~._estimate.estimate`) with the batch figures, and
    ``estimate.attrs["modes"]``: live, live packed, batch and batch packed side by side.

    A batch run sends its first row live (the setup request), the rest at the batch price.
    The packed modes are there with ``rows_per_request`` other than 1; ``batch packed`` is
    the estimate's own ``batch_packed_*`` figures (a batch packs as a live run does, and
    prices its setup request live and its packs at the batch price), so the two savings
    multiply.
    """
    model = estimate["model"]
    rows = max(estimate["rows"] - estimate["skipped_rows"] - estimate["cached_rows"], 0)
    modes: dict[str, dict[str, Any]] = {}

    def mode(name: str, prefix: str, price: float | None) -> None:
        requests = estimate[f"{prefix}requests"]
        seconds: Any = "within 24 h" if name.startswith("batch") else None
        if seconds is None and rpm:
            seconds = round(requests / rpm * 60, 1)
        modes[name] = {
            "requests": requests,
            "prompt_tokens": estimate[f"{prefix}prompt_tokens"],
            "completion_tokens": estimate[f"{prefix}completion_tokens"],
            "cost": price,
            "expected_seconds": seconds,
        }

    live = cost(model, estimate["prompt_tokens"], estimate["completion_tokens"])
    requests = estimate["requests"]
    # One request of the batch mode goes live (the setup request): its share at full price.
    share = 1 / requests if requests else 0.0
    mode("live", "", live)
    if "packed_requests" in estimate:
        mode("live packed", "packed_", estimate["packed_cost"])
    mode("batch", "", None if live is None else live * (share + (1 - share) * BATCH_DISCOUNT))
    if "batch_packed_requests" in estimate:
        mode("batch packed", "batch_packed_", estimate["batch_packed_cost"])
    out = estimate.copy()
    out["batch_cost"] = modes["batch"]["cost"]
    out.attrs["modes"] = pd.DataFrame(list(modes.values()), index=pd.Index(modes, name="mode"))
    out.attrs["modes"].attrs["rows_to_send"] = rows
    return out
