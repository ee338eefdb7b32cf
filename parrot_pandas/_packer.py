"""The scheduler's packed path: several rows in one request, every answer kept by its row's id.

A worker takes up to :attr:`Packer.size` jobs from the feed and hands them to
:meth:`Packer.answer`. The request is built and its answer mapped back to the rows by
:class:`~parrot_pandas._packing.PackedPlan` (the format, the id checks and the halving are
stated in :mod:`._packing`); this module sends it and acts on what came back:

- A row whose answer mapped keeps it through the scheduler's own ``_keep`` (cached under the
  row's ordinary key, in the unpacked form) and finishes through ``_finish``: a packed row is
  an ordinary row from the cache's point of view, so a run with any ``rows_per_request`` reads
  what another wrote.
- An answer whose value can never fit its column is cached and fails its row at once, as
  unpacked (``_keep_unusable``, ``_fail``).
- The rows an answer did not map (missing, duplicated, truncated, invalid) are asked again in
  packs of at most half the size (:func:`~parrot_pandas._packing.halve`); a row alone goes the
  ordinary unpacked path (``Scheduler._process``), with its ordinary verdicts.

Verdicts on a packed request as a whole:

- a transient failure (5xx, a dropped connection, a rate limit) retries the same pack, under
  the run's one :class:`~parrot_pandas._retry.RetryPolicy`; when the retries run out (a 500
  that one row causes every time), the pack is halved as below;
- a ``row`` verdict (too long for the context, filtered, larger than the token limit, a
  ``max_tokens`` the model cannot give) halves the pack, so the culprit ends up alone and only
  it fails; a ``bad_parameter`` verdict counts as one too, since the setup request proved
  the run's parameters and what differs in a pack is its size (its ``max_tokens``);
- a ``strategy`` verdict (the server refuses the structured-output parameter of the packed
  answer) moves packed requests to the next strategy with ``structured="auto"``, or stops
  packing (every row then goes alone) with a fixed one;
- a ``run`` verdict stops the run.

How many rows a pack holds: the user's ``N``, or for ``"auto"`` a
:class:`~parrot_pandas._packing.PackSizer` fed with the limits the server announced, the
model's context window (:data:`CONTEXT_WINDOWS`, else
:data:`~parrot_pandas._packing.ASSUMED_CONTEXT_WINDOW`), ``max_tokens`` and the share of
rows that did not map. A pack too long or too large for the server shrinks it at once; so
does a truncated answer when no ``max_tokens`` was set (the server's own output limit cut
it). With ``max_tokens`` set, a pack's output limit grows with its rows, so a truncation
says one row ran past its share, not that the pack is too big: it counts as unmapped rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from ._config import STRUCTURED_STRATEGIES
from ._packing import (
    ASSUMED_CONTEXT_WINDOW,
    MAX_AUTO_ROWS,
    ROW_PROMPT_OVERHEAD,
    PackedPlan,
    PackLimits,
    PackResult,
    PackSizer,
    halve,
    rate_target,
    token_ceiling,
)
from ._retry import RETRIED
from ._tokens import Tokenizer
from .errors import APIError, StructuredOutputError

if TYPE_CHECKING:
    from ._feed import Job
    from ._plan import RequestPlan
    from ._scheduler import Scheduler

__all__ = ["CONTEXT_WINDOWS", "Packer", "auto_bounds", "model_limits", "packed_strategy"]

logger = logging.getLogger("parrot_pandas")

#: Context window and output cap (tokens) of well-known model families, by name prefix, first
#: match wins; other models are assumed to have ``ASSUMED_CONTEXT_WINDOW`` and no output cap.
#: Only ``"auto"`` reads them, to pack no more rows than fit.
CONTEXT_WINDOWS: tuple[tuple[str, int, int | None], ...] = (
    ("gpt-4.1", 1_047_576, 32_768),
    ("gpt-4o", 128_000, 16_384),
    ("gpt-4-turbo", 128_000, 4_096),
    ("gpt-5", 400_000, 128_000),
    ("o1", 200_000, 100_000),
    ("o3", 200_000, 100_000),
    ("o4-mini", 200_000, 100_000),
    ("claude-", 200_000, 8_192),
)

# Reasons a packed request failed as a whole because it was too big for a limit: the pack
# is split, and "auto" shrinks.
_OVERSIZED = frozenset({"context_length", "request_too_large", "bad_parameter"})
# Prompt tokens of a row before any was seen (sizing only).
_TYPICAL_ROW = 64.0
# Rows whose prompt lengths "auto" averages to size packs: enough for a typical row.
_SAMPLED_ROWS = 1000
# A tokenizer-free counter: sizing needs a rough count per row, at no cost per row.
_APPROXIMATE = Tokenizer(None)


def model_limits(model: str) -> tuple[int, int | None]:
    """The context window and output cap to size packs for ``model`` (see :data:`CONTEXT_WINDOWS`).

    Examples
    --------
    >>> model_limits("gpt-4o-mini")
    (128000, 16384)
    >>> model_limits("my-local-model")
    (4096, None)
    """
    for prefix, window, output in CONTEXT_WINDOWS:
        if model.startswith(prefix):
            return window, output
    return ASSUMED_CONTEXT_WINDOW, None


def auto_bounds(
    packed: PackedPlan,
    *,
    rpm: float | None,
    tpm: float | None,
    shared: int,
    row_prompt: float,
) -> tuple[int, int]:
    """What ``"auto"`` packs before any failure is seen: ``(rate target, token ceiling)``.

    Parameters
    ----------
    packed : PackedPlan
        The run's packed plan (its model, ``max_tokens`` and ``n``).
    rpm, tpm : float, optional
        The rate limits in effect (announced by the server, or the user's).
    shared : int
        Prompt tokens every packed request pays once (:meth:`PackedPlan.shared_tokens`).
    row_prompt : float
        Prompt tokens a typical row adds.

    Returns
    -------
    (int, int)
        :func:`~parrot_pandas._packing.rate_target` and
        :func:`~parrot_pandas._packing.token_ceiling`; a pack holds the lesser.
    """
    config = packed.plan.config
    samples = config.samples_per_request or config.n
    sizing: dict[str, Any] = {
        "shared": shared,
        "row_prompt": row_prompt,
        "row_output": config.max_output_tokens,
        "n": samples,
    }
    window, output_cap = model_limits(config.model)
    # The largest request a token limit admits is a minute's worth; a server whose bucket is
    # smaller says so (request_too_large), and the pack shrinks.
    ceiling = token_ceiling(PackLimits(window, output_cap, tpm), **sizing)
    return rate_target(rpm, tpm, **sizing), ceiling


def packed_strategy(plan: RequestPlan) -> str:
    """The structured strategy packed requests start with: ``extract``'s own (its setup request
    may move it), or for ``generate`` (which has none unpacked) the fixed ``structured=`` or
    the best one."""
    if plan.strategy is not None:
        return plan.strategy
    structured = plan.config.structured
    return structured if structured != "auto" else STRUCTURED_STRATEGIES[0]


class Packer:
    """Sends a worker's jobs as packed requests and keeps every row's answer by its id.

    Parameters
    ----------
    scheduler : Scheduler
        The run: its plan, budget, retry policy and gate are used, and its ``_keep``,
        ``_keep_unusable``, ``_finish``, ``_fail`` and ``_process`` decide every row's outcome,
        as for an unpacked row.
    prefix, suffix : str
        The template's static ends (:func:`~parrot_pandas._packing.template_ends`), sent once
        per request.

    Attributes
    ----------
    largest : int
        The most rows a pack held (the N used).
    packed_requests : int
        Requests sent carrying more than one row (retries included).
    packed_rows : int
        Rows asked in those requests (a row asked again counts again).
    repacked_rows : int
        Rows asked again after a packed answer did not map them (each row once).
    reasons : Counter
        Why rows were asked again, summed over packed answers.
    """

    def __init__(self, scheduler: Scheduler, prefix: str = "", suffix: str = "") -> None:
        config = scheduler.plan.config
        self._scheduler = scheduler
        self._prefix, self._suffix = prefix, suffix
        self._n = config.n
        self._per_request = config.samples_per_request or config.n
        self.auto = config.rows_per_request == "auto"
        # An int N is the pack size as given; "auto" asks its sizer before every pack.
        self._fixed = 0 if self.auto else int(config.rows_per_request)
        self._fixed_strategy = config.structured != "auto"
        self._strategy: str | None = None
        self._plans: dict[str, PackedPlan] = {}
        self._shared: dict[str, int] = {}  # prompt tokens every pack pays, by strategy
        self._sizer = PackSizer(MAX_AUTO_ROWS)
        self._row_prompt: float | None = None
        self._seen_rows = 0
        self._stopped = False
        self._warned = False
        self.largest = 1
        self.packed_requests = 0
        self.packed_rows = 0
        self.repacked_rows = 0
        self.reasons: Counter[str] = Counter()

    # -- sizing ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Rows the next fresh pack holds (1: send the next row alone)."""
        if self._stopped:
            return 1
        if not self.auto:
            return self._fixed
        self._retarget()
        return self._sizer.size

    def note(self, prompt: str | None) -> None:
        """Learn a typical row's prompt length from ``prompt`` (the setup row's, before any
        pack is sized)."""
        if prompt is None:
            return
        prefix, suffix = self._prefix, self._suffix
        if (prefix or suffix) and prompt.startswith(prefix) and prompt.endswith(suffix):
            prompt = prompt[len(prefix) : len(prompt) - len(suffix)]
        tokens = _APPROXIMATE.count(prompt) + ROW_PROMPT_OVERHEAD
        seen = self._seen_rows = self._seen_rows + 1
        previous = self._row_prompt
        self._row_prompt = tokens if previous is None else previous + (tokens - previous) / seen

    def _retarget(self) -> None:
        # The rate and token facts as they are now: announced limits move during a run.
        scheduler = self._scheduler
        packed = self._packed_plan()
        strategy = str(packed.strategy)
        shared = self._shared.get(strategy)
        if shared is None:
            shared = self._shared[strategy] = packed.shared_tokens(_APPROXIMATE)
        limits = scheduler.budget.snapshot()
        target, ceiling = auto_bounds(
            packed,
            rpm=limits.get("rpm"),
            tpm=limits.get("tpm"),
            shared=shared,
            row_prompt=self._row_prompt or _TYPICAL_ROW,
        )
        self._sizer.retarget(target, ceiling)

    # -- one pack --------------------------------------------------------------------------

    async def answer(self, jobs: list[Job]) -> None:
        """Answer every job: the pack, then what it failed in halves, down to single rows."""
        scheduler = self._scheduler
        self.largest = max(self.largest, len(jobs))
        if self.auto and self._seen_rows < _SAMPLED_ROWS:
            for job in jobs:
                self.note(job.prompt)
        queue = [jobs]
        asked_again: set[int] = set()
        while queue:
            group = queue.pop()
            if len(group) == 1 or self._stopped:
                for job in group:
                    await scheduler._gated(scheduler._process, job)
                continue
            failed, again = await self._ask(group)
            for job in failed:
                if id(job) not in asked_again:
                    asked_again.add(id(job))
                    self.repacked_rows += job.rows
            queue += reversed(halve(failed, len(group)))
            if again:
                queue.append(again)

    async def _ask(self, group: list[Job]) -> tuple[list[Job], list[Job]]:
        """Ask ``group`` once as a pack (retrying transient failures); keep what mapped.

        Returns the jobs to ask again in halves and the jobs that mapped every sample the
        server returned but still lack samples (it ignores ``n``): asked again at this size.
        """
        scheduler = self._scheduler
        want = min(max(self._n - len(job.samples) for job in group), self._per_request)
        while True:
            packed = self._packed_plan()
            try:
                result = await scheduler._gated(
                    scheduler._retry.call,
                    self._attempt,
                    packed,
                    group,
                    want,
                    on_retry=scheduler._on_retry,
                )
                break
            except RETRIED as exc:
                verdict = exc.verdict
                if verdict.scope == "run" and verdict.reason != "bad_parameter":
                    raise
                if verdict.scope == "strategy":
                    self._fall_back(packed.strategy, exc)
                    if self._stopped:
                        return [], list(group)
                    continue
                # A row verdict on the whole request, or retries run out on a transient one (a
                # 500 that one row's text causes every time): split it, so that only the
                # culprit fails, alone, by the ordinary path's rules.
                result = PackResult.failed(len(group), verdict.reason, exc.message)
                self._oversized(verdict.reason, len(group))
                break
        return self.keep(group, result)

    async def _attempt(self, packed: PackedPlan, group: list[Job], want: int) -> PackResult:
        # One packed request. Its answer's problems are mapped to rows, never raised: only a
        # failed exchange (an APIError) goes to the retry policy.
        scheduler = self._scheduler
        prompts = [job.prompt for job in group]
        call = packed.call(prompts, want)  # type: ignore[arg-type]
        cost = packed.cost(call, scheduler._prompt_ratio)
        reserved = want * (packed.max_tokens(len(group)) or 0)
        self.packed_requests += 1
        self.packed_rows += len(group)
        completion, _ = await scheduler._exchange(call, cost, reserved)
        result = packed.read(completion, len(group), want)
        samples = min(len(completion.texts), want) + len(completion.problems)
        cut = any(p.verdict.reason == "truncated" for p in completion.problems)
        oversized = cut and scheduler.plan.config.max_output_tokens is None
        if self.auto:
            self._sizer.observe(len(group) * max(samples, 1), result.mapped, oversized=oversized)
        return result

    def keep(self, group: list[Job], result: PackResult) -> tuple[list[Job], list[Job]]:
        """Keep what a packed answer mapped, row by row, for a live packed request and for a
        batch line alike: return the jobs to ask again in halves and the jobs to ask again as
        they are."""
        scheduler = self._scheduler
        n = self._n
        failed: list[Job] = []
        again: list[Job] = []
        for job, row in zip(group, result.rows, strict=True):
            if row.answers:
                scheduler._keep(job, row.answers)
            if row.unusable:
                scheduler._keep_unusable(job, [text for text, _ in row.unusable])
                scheduler._end(job, row.unusable[0][1])
            elif len(job.samples) >= n:
                scheduler._finish(job, cached=False)
            elif row.reask:
                failed.append(job)
            else:
                again.append(job)
        if failed:
            self.reasons.update(result.reasons)
            logger.info("packed request: %s", result.summary())
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("packed request: %s", result.summary())
        return failed, again

    # -- strategies and limits ---------------------------------------------------------------

    def _packed_plan(self) -> PackedPlan:
        plan = self._scheduler.plan
        strategy = self._strategy
        if strategy is None:
            # Taken at the first pack: extract's setup request may have moved its strategy.
            strategy = self._strategy = packed_strategy(plan)
        packed = self._plans.get(strategy)
        if packed is None:
            packed = self._plans[strategy] = PackedPlan(plan, self._prefix, self._suffix, strategy)
        return packed

    def _fall_back(self, failed: str | None, exc: APIError | StructuredOutputError) -> None:
        if failed != self._strategy:
            return  # another pack already moved on
        later = STRUCTURED_STRATEGIES[STRUCTURED_STRATEGIES.index(failed) + 1 :]
        if self._fixed_strategy or not later:
            self._stopped = True
            logger.warning(
                "the server refused structured=%r for packed requests (%s); every row now "
                'goes alone (pass structured="auto" to let packed requests try another way)',
                failed,
                exc,
            )
            return
        logger.info(
            "structured=%r refused for packed requests (%s); trying %r", failed, exc, later[0]
        )
        self._strategy = later[0]

    def _oversized(self, reason: str, rows: int) -> None:
        if reason not in _OVERSIZED:
            return
        if self.auto:
            self._sizer.observe(rows, 0, oversized=True)
        elif not self._warned:
            self._warned = True
            logger.warning(
                "a packed request of %d rows was too large for the server (%s); its rows are "
                'asked in halves. Pass a smaller rows_per_request, or "auto" to size packs '
                "from the failures",
                rows,
                reason,
            )

    def facts(self) -> dict[str, Any]:
        """Packing facts for ``attrs["llm"]``."""
        return {
            "rows_per_request": self.largest,
            "pack_strategy": self._strategy,
            "packed_requests": self.packed_requests,
            "packed_rows": self.packed_rows,
            "repacked_rows": self.repacked_rows,
            "reask_reasons": dict(self.reasons),
        }
