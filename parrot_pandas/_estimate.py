"""What a run will send and cost, before it runs: the run's own feed, counted instead of sent.

The rows go through the same :class:`~parrot_pandas._feed.Feed` the scheduler sends from, so
skipped, cached and shared rows, the requests and the samples they ask are the run's by
construction; only the tokens are counted here. The cache is opened read-only: an estimate
never migrates, writes or creates it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from ._batch_run import BATCH_SAMPLED_ROWS, batch_rows_per_request
from ._cache import open_cache
from ._events import RowsDone, RunStats
from ._feed import Feed, Job
from ._packer import auto_bounds, packed_strategy
from ._packing import PackedPlan, template_ends
from ._pricing import batch_cost, cost, price_of
from ._tokens import Tokenizer, tokenizer

if TYPE_CHECKING:
    from ._plan import RequestPlan
    from ._template import PromptTemplate

__all__ = ["estimate"]


def estimate(frame: pd.DataFrame, template: PromptTemplate, plan: RequestPlan) -> pd.Series:
    """What running ``plan`` over ``frame`` will send and cost; nothing is sent.

    Every prompt is rendered with the run's own template and plan, identical prompts are
    counted once (by cache key, as the scheduler shares their answer), and the run's cache is
    read (never written or created) for this exact call.

    Parameters
    ----------
    frame : pandas.DataFrame
    template : PromptTemplate
        Already checked against ``frame``'s columns.
    plan : RequestPlan
        The run's plan: model, system message, ``n``, request parameters, fields and strategy.

    Returns
    -------
    pandas.Series
        Named ``"estimate"``, with:

        - ``model``
        - ``rows``: input rows; ``rows = skipped_rows + cached_rows + duplicate_rows`` plus
          one row per distinct prompt sent
        - ``skipped_rows``: a template value is missing (NaN/None); not sent
        - ``cached_rows``: every sample of the row's answer is in the cache; no request
        - ``duplicate_rows``: the same prompt as an earlier uncached row, whose answer it shares
        - ``requests``: one per distinct prompt to send, asking its missing samples, or one
          per missing sample on a provider without ``n`` (Anthropic); retries, and servers
          that ignore ``n``, add requests
        - ``prompt_tokens``: of those requests, system message and schema included
        - ``completion_tokens``: the ceiling ``max_tokens`` (or ``max_completion_tokens``) x
          samples asked; ``None`` without one, as nothing bounds an answer's length
        - ``prompt_cost``: USD for the prompt tokens; ``None`` when the model's price is unknown
        - ``cost``: USD, an upper bound: prompt cost plus the completion ceiling; ``None`` when
          the price or ``completion_tokens`` is unknown
        - ``tokenizer``: how tokens were counted (tiktoken's encoding, or the approximation)

        With ``rows_per_request`` other than 1, next to those unpacked figures, the same for
        packed requests (assuming every id maps: re-asks, like retries, add requests):

        - ``rows_per_request``: the rows a pack would hold (``"auto"``: what it would start
          with, from ``rpm`` / ``tpm`` as given, the model's context window and
          ``max_tokens``; a run also reads the limits its server announces)
        - ``packed_requests``: the setup request (one row, alone) plus the packs
        - ``packed_prompt_tokens``: their prompts, the shared instructions once per request
        - ``packed_completion_tokens``: packed ``max_tokens`` x samples asked, per request
        - ``packed_cost``: USD, as ``cost``

        and for ``batch=True`` with the same ``rows_per_request`` (a batch packs the same way,
        but ``"auto"`` is a fixed size there:
        :func:`~parrot_pandas._batch_run.batch_rows_per_request`, not bound by ``rpm`` or
        ``tpm``):

        - ``batch_rows_per_request``, ``batch_packed_requests``,
          ``batch_packed_prompt_tokens``, ``batch_packed_completion_tokens``: as above
        - ``batch_packed_cost``: USD, the setup request (one row, live) at the live price and
          the packs at the batch price

    Examples
    --------
    >>> df.llm.estimate("Summarize: ${text}", max_tokens=200)  # doctest: +SKIP
    """
    config = plan.config
    model = config.model
    # One tokenizer for the whole estimate, even if a slow tiktoken load finishes midway.
    counter = tokenizer(model)
    structured = _structured_tokens(plan, counter)
    stats = RunStats()  # counts skipped and cached rows as the run's attrs do

    def cached(job: Job) -> None:
        job.done = job.cached = True
        stats(RowsDone(job.rows, cached=True))

    sent: list[Job] = []
    requests = prompt_tokens = samples_asked = 0
    packing = batch_packing = None
    if config.rows_per_request != 1:
        packing = _Packing(plan, template, counter)
        # "auto" packs a batch by its own rule; an int packs both alike (counted once).
        if config.rows_per_request == "auto":
            batch_packing = _Packing(plan, template, counter, batch=True)
    cache = None if config.refresh else open_cache(config.cache, readonly=True)
    try:
        feed = Feed(plan, finish=cached, cache=cache, emit=stats)
        for job in feed.jobs(template.rows(frame)):
            asks = feed.asks(job)
            assert job.prompt is not None
            requests += len(asks)
            samples_asked += sum(asks)
            prompt_tokens += len(asks) * (counter.messages(plan.messages(job.prompt)) + structured)
            for counting in (packing, batch_packing):
                if counting is not None:
                    counting.add(job.prompt, asks)
            job.prompt = None  # counted; only the number of rows sharing it is still needed
            sent.append(job)
    finally:
        if cache is not None:
            cache.close()

    counts = stats.facts
    max_out = config.max_output_tokens
    completion_tokens = samples_asked * max_out if max_out is not None else None
    price = price_of(model)
    facts: dict[str, Any] = {
        "model": model,
        "rows": len(frame),
        "skipped_rows": counts["skipped_rows"],
        "cached_rows": counts["cached_rows"],
        "duplicate_rows": sum(job.rows - 1 for job in sent),
        "requests": requests,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "prompt_cost": price.cost(prompt_tokens, 0) if price is not None else None,
        "cost": cost(model, prompt_tokens, completion_tokens),
        "tokenizer": counter.name,
    }
    if packing is not None:
        facts.update(packing.facts())
        batching = batch_packing or packing
        batch_facts = batching.facts() if batch_packing is not None else facts
        facts.update(
            batch_rows_per_request=batch_facts["rows_per_request"],
            batch_packed_requests=batch_facts["packed_requests"],
            batch_packed_prompt_tokens=batch_facts["packed_prompt_tokens"],
            batch_packed_completion_tokens=batch_facts["packed_completion_tokens"],
            batch_packed_cost=batching.batch_cost(),
        )
    return pd.Series(facts, name="estimate", dtype=object)


def _structured_tokens(plan: RequestPlan, counter: Tokenizer) -> int:
    """Prompt tokens a structured request adds beyond its messages (the schema it carries)."""
    if plan.schema is None or plan.strategy not in ("tools", "json_schema"):
        return 0  # free text, or the schema travels inside the messages already
    return counter.schema(plan.schema, tool=plan.strategy == "tools")


class _Packing:
    """The packed figures of an estimate: the feed's jobs grouped as a packed run groups them.

    The first job goes alone (the setup request); the rest go in packs of ``rows_per_request``
    consecutive jobs, as workers take them (or as a batch run lines them up, ``batch=True``).
    For ``"auto"`` the size comes from the first :data:`_SAMPLE` jobs' prompts, so they are
    held until it is known.
    """

    _SAMPLE = BATCH_SAMPLED_ROWS

    def __init__(
        self,
        plan: RequestPlan,
        template: PromptTemplate,
        counter: Tokenizer,
        *,
        batch: bool = False,
    ) -> None:
        config = plan.config
        strategy = packed_strategy(plan)
        self.plan = plan
        self.packed = PackedPlan(plan, *template_ends(template), strategy=strategy)
        self.counter = counter
        self.size: int | None = (
            None if config.rows_per_request == "auto" else int(config.rows_per_request)
        )
        self._schema = (
            counter.schema(self.packed.schema, tool=strategy == "tools")
            if strategy in ("tools", "json_schema")
            else 0
        )
        self._single = _structured_tokens(plan, counter)
        self._pending: list[tuple[str, list[int]]] = []
        self._first = True
        self._batch = batch
        self.requests = self.prompt_tokens = self.completion_tokens = 0
        # The setup request's tokens: billed live even in a batch run.
        self.setup_prompt = self.setup_completion = 0
        self._bounded = config.max_output_tokens is not None

    def add(self, prompt: str, asks: list[int]) -> None:
        if self._first:
            # The setup request: one row, unpacked.
            self._first = False
            self.requests += len(asks)
            self.prompt_tokens += len(asks) * (
                self.counter.messages(self.plan.messages(prompt)) + self._single
            )
            self._output(1, sum(asks), unpacked=True)
            self.setup_prompt, self.setup_completion = self.prompt_tokens, self.completion_tokens
            return
        self._pending.append((prompt, asks))
        if self.size is None and len(self._pending) >= self._SAMPLE:
            self._choose()
        if self.size is not None:
            while len(self._pending) >= self.size:
                self._pack(self._pending[: self.size])
                del self._pending[: self.size]

    def _choose(self) -> None:
        config = self.plan.config
        prompts = [prompt for prompt, _ in self._pending]
        if self._batch:
            self.size = batch_rows_per_request(self.packed, prompts)
            return
        row = sum(self.packed.row_tokens(self.counter, p) for p in prompts) / max(len(prompts), 1)
        target, ceiling = auto_bounds(
            self.packed,
            rpm=config.rpm,
            tpm=config.tpm,
            shared=self.packed.shared_tokens(self.counter),
            row_prompt=row,
        )
        self.size = max(1, min(target, ceiling))

    def _pack(self, group: list[tuple[str, list[int]]]) -> None:
        if len(group) == 1:
            prompt, asks = group[0]
            self.requests += len(asks)
            self.prompt_tokens += len(asks) * (
                self.counter.messages(self.plan.messages(prompt)) + self._single
            )
            self._output(1, sum(asks), unpacked=True)
            return
        # A pack asks what its neediest row lacks, a request's worth of samples at a time.
        asks = max((a for _, a in group), key=sum)
        messages = self.packed.messages([prompt for prompt, _ in group])
        self.requests += len(asks)
        self.prompt_tokens += len(asks) * (self.counter.messages(messages) + self._schema)
        self._output(len(group), sum(asks), unpacked=False)

    def _output(self, rows: int, samples: int, *, unpacked: bool) -> None:
        if not self._bounded:
            return
        per_row = self.plan.config.max_output_tokens or 0
        self.completion_tokens += samples * (
            per_row if unpacked else self.packed.max_tokens(rows) or 0
        )

    def facts(self) -> dict[str, Any]:
        if self.size is None:
            self._choose()
        rest, self._pending = self._pending, []
        for start in range(0, len(rest), self.size or 1):
            self._pack(rest[start : start + (self.size or 1)])
        model = self.plan.config.model
        completion = self.completion_tokens if self._bounded else None
        return {
            "rows_per_request": self.size,
            "packed_requests": self.requests,
            "packed_prompt_tokens": self.prompt_tokens,
            "packed_completion_tokens": completion,
            "packed_cost": cost(model, self.prompt_tokens, completion),
        }

    def batch_cost(self) -> float | None:
        """USD in a batch run (after :meth:`facts`): the setup request at the live price, the
        packs at the batch price."""
        model = self.plan.config.model
        if not self._bounded:
            return None
        setup = cost(model, self.setup_prompt, self.setup_completion)
        packs = batch_cost(
            model,
            self.prompt_tokens - self.setup_prompt,
            self.completion_tokens - self.setup_completion,
        )
        return None if setup is None or packs is None else setup + packs
