"""What a run will send and cost, before it runs: the run's own feed, counted instead of sent.

The rows go through the same :class:`~parrot_pandas._feed.Feed` the scheduler sends from, so
skipped, cached and shared rows, the requests and the samples they ask are the run's by
construction; only the tokens are counted here. The cache is opened read-only: an estimate
never migrates, writes or creates it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from ._cache import open_cache
from ._events import RowsDone, RunStats
from ._feed import Feed, Job
from ._pricing import cost, price_of
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
    cache = None if config.refresh else open_cache(config.cache, readonly=True)
    try:
        feed = Feed(plan, finish=cached, cache=cache, emit=stats)
        for job in feed.jobs(template.rows(frame)):
            asks = feed.asks(job)
            assert job.prompt is not None
            requests += len(asks)
            samples_asked += sum(asks)
            prompt_tokens += len(asks) * (counter.messages(plan.messages(job.prompt)) + structured)
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
    return pd.Series(facts, name="estimate", dtype=object)


def _structured_tokens(plan: RequestPlan, counter: Tokenizer) -> int:
    """Prompt tokens a structured request adds beyond its messages (the schema it carries)."""
    if plan.schema is None or plan.strategy not in ("tools", "json_schema"):
        return 0  # free text, or the schema travels inside the messages already
    return counter.schema(plan.schema, tool=plan.strategy == "tools")
