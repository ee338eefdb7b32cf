"""The feed: rows -> distinct requests (skip, key, dedupe, window, cache lookup, samples asked),
the cache-key rules it relies on, and the estimate and the run agreeing because both use it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from parrot_pandas import _cache_key as cache_key_module
from parrot_pandas import _feed as feed_module
from parrot_pandas import _run as run_module
from parrot_pandas._cache import ResponseCache
from parrot_pandas._cache_key import request_key
from parrot_pandas._config import STRUCTURED_STRATEGIES, RunConfig
from parrot_pandas._events import RowsDone, RowsFailed, RowsSkipped
from parrot_pandas._feed import Feed, Job
from parrot_pandas._plan import RequestPlan
from parrot_pandas._structured import normalize_fields

URL = "http://127.0.0.1:1/v1"
COUNTS = ("rows", "skipped_rows", "cached_rows", "requests", "prompt_tokens")


def plan_of(*, fields=None, **options) -> RequestPlan:
    options.setdefault("base_url", URL)
    config = RunConfig.from_options(need_key=False, **options)
    if fields is None:
        return RequestPlan(config)
    return RequestPlan(config, normalize_fields(fields), strategy="tools")


class Recorder:
    """The feed's consumer side: collects events, finishes cached jobs as the scheduler does."""

    def __init__(self) -> None:
        self.events: list = []
        self.finished: list[Job] = []

    def finish(self, job: Job) -> None:
        job.done = job.cached = True
        self.finished.append(job)
        self.events.append(RowsDone(job.rows, cached=True))

    def feed(self, plan: RequestPlan, **options) -> Feed:
        return Feed(plan, finish=self.finish, emit=self.events.append, **options)

    def rows(self, kind: type) -> int:
        return sum(e.rows for e in self.events if isinstance(e, kind))


class SpyCache(ResponseCache):
    """A real cache file that records every lookup."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.lookups: list[list[str]] = []

    def get_many(self, keys, n=1):
        self.lookups.append(list(keys))
        return super().get_many(keys, n)


@pytest.fixture
def cache(tmp_path):
    with SpyCache(tmp_path / "feed.sqlite3") as opened:
        yield opened


# -- skipping and sharing --------------------------------------------------------------------


def test_missing_prompts_are_skipped_and_repeats_share_one_job():
    seen = Recorder()
    outcome: list = []
    jobs = list(seen.feed(plan_of()).jobs(iter(["a", None, "a", "b", "a"]), outcome))
    assert [job.prompt for job in jobs] == ["a", "b"]
    first, second = jobs
    assert outcome == [first, None, first, second, first]
    assert (first.rows, second.rows) == (3, 1)
    assert seen.rows(RowsSkipped) == 1 and seen.rows(RowsDone) == 0
    assert first.key == "a"  # without a cache the prompt is the key: no hashing


def test_a_repeat_of_a_finished_job_reports_its_outcome_at_once():
    seen = Recorder()
    jobs = seen.feed(plan_of(), lookup_batch=1).jobs(iter(["a", "b", "a", "b", "c"]))
    a = next(jobs)
    a.done, a.values = True, ["answer"]
    b = next(jobs)
    b.done, b.error = True, "HTTP 400: too long"
    assert next(jobs).prompt == "c"  # the repeats of a and b were consumed on the way
    assert seen.events == [RowsDone(1, cached=False), RowsFailed(1, "HTTP 400: too long")]
    assert a.rows == b.rows == 1  # a finished job is not told about later rows


# -- the streaming window ---------------------------------------------------------------------


def test_the_window_forgets_the_oldest_prompt():
    prompts = ["a", "b", "c", "b", "a"]
    unbounded = list(Recorder().feed(plan_of()).jobs(iter(prompts)))
    assert [job.prompt for job in unbounded] == ["a", "b", "c"]
    windowed = list(Recorder().feed(plan_of(), window=2).jobs(iter(prompts)))
    # b is still among the last two distinct prompts and is shared; a was forgotten.
    assert [job.prompt for job in windowed] == ["a", "b", "c", "a"]
    assert windowed[1].rows == 2 and windowed[0] is not windowed[3]


def test_a_forgotten_prompt_is_answered_by_the_cache_once_written(cache):
    seen = Recorder()
    plan = plan_of()
    jobs = seen.feed(plan, cache=cache, window=1, lookup_batch=1).jobs(iter(["a", "b", "a"]))
    a = next(jobs)
    assert a.key == plan.key("a")
    cache.put(a.key, 0, "answer to a", model="m")  # the run writes a's answer
    assert [job.prompt for job in jobs] == ["b"]  # a again: not sent
    [again] = seen.finished
    assert again is not a and again.samples == {0: "answer to a"}
    assert seen.rows(RowsDone) == 1


def test_a_streamed_run_shares_within_the_window_and_the_cache_answers_the_rest(
    server, monkeypatch
):
    monkeypatch.setattr(run_module, "_STREAM_DEDUPE_WINDOW", 2)
    monkeypatch.setattr(feed_module, "LOOKUP_BATCH", 1)
    df = pd.DataFrame({"t": ["a", "b", "a", "c", "d", "a"]})
    parts = list(df.llm.generate("${t}", base_url=server.url, chunksize=2, max_concurrency=1))
    out = pd.concat(parts)
    assert out["output"].tolist() == [f"echo: {t}" for t in df["t"]]
    # The second a shares the first's request; by the third, a was forgotten (c and d came
    # after it) and its answer comes from the cache: four requests, one cached row.
    assert server.stats()["requests"] == 4
    assert parts[-1].attrs["llm"]["cached_rows"] == 1


# -- cache lookups -----------------------------------------------------------------------------


def test_lookups_go_a_batch_of_distinct_prompts_at_a_time(cache):
    consumed: list[str] = []

    def prompts():
        for prompt in ["p0", "p1", "p0", "p2", "p3", "p1", "p4", "p5", "p6"]:
            consumed.append(prompt)
            yield prompt

    plan = plan_of()
    jobs = Recorder().feed(plan, cache=cache, lookup_batch=3).jobs(prompts())
    first = next(jobs)
    # Rendered only as far as one batch of distinct prompts: the rows stay lazy.
    assert first.prompt == "p0" and consumed == ["p0", "p1", "p0", "p2"]
    rest = list(jobs)
    assert [job.prompt for job in [first, *rest]] == [f"p{i}" for i in range(7)]
    keys = [[plan.key(f"p{i}") for i in batch] for batch in ([0, 1, 2], [3, 4, 5], [6])]
    assert cache.lookups == keys  # a repeat is never looked up again


def test_cached_samples_are_kept_and_only_the_missing_ones_asked(cache):
    seen = Recorder()
    plan = plan_of(n=3)
    key = plan.key
    cache.put(key("some"), 0, "s0", model="m")
    cache.put(key("some"), 2, "s2", model="m")
    for sample in range(3):
        cache.put(key("all"), sample, f"all{sample}", model="m")
    feed = seen.feed(plan, cache=cache)
    outcome: list = []
    jobs = {job.prompt: job for job in feed.jobs(iter(["some", "none", "all", "all"]), outcome)}
    assert set(jobs) == {"some", "none"}
    assert jobs["some"].samples == {0: "s0", 2: "s2"} and feed.asks(jobs["some"]) == [1]
    assert feed.asks(jobs["none"]) == [3]  # one request asks all three
    [done] = seen.finished
    assert done.samples == {0: "all0", 1: "all1", 2: "all2"} and done.rows == 2
    assert outcome[2] is outcome[3] is done
    assert seen.rows(RowsDone) == 2


def test_without_n_a_request_asks_one_sample():
    # Anthropic's API has no n: every missing sample is a request of its own.
    plan = plan_of(provider="anthropic", model="claude-3-5-haiku", n=3)
    feed = Recorder().feed(plan)
    [job] = feed.jobs(iter(["x"]))
    assert feed.asks(job) == [1, 1, 1]
    job.samples[1] = "kept"
    assert feed.asks(job) == [1, 1]
    openai = Recorder().feed(plan_of(n=5))
    assert openai.asks(Job("k", "p")) == [5]


def test_a_cached_answer_the_parser_rejects_is_asked_again(cache):
    seen = Recorder()
    plan = plan_of(fields=["name"])
    cache.put(plan.key("bad"), 0, "not json", model="m")
    cache.put(plan.key("good"), 0, json.dumps({"items": [{"name": "Ada"}]}), model="m")
    jobs = list(seen.feed(plan, cache=cache).jobs(iter(["bad", "good"])))
    assert [job.prompt for job in jobs] == ["bad"] and jobs[0].samples == {}
    assert seen.finished[0].samples == {0: [{"name": "Ada"}]}


def test_refresh_reads_nothing(cache):
    plan = plan_of(refresh=True)
    cache.put(plan.key("a"), 0, "old", model="m")
    jobs = list(Recorder().feed(plan, cache=cache).jobs(iter(["a", "b"])))
    assert [job.prompt for job in jobs] == ["a", "b"] and cache.lookups == []
    assert jobs[0].key == plan.key("a")  # still keyed: the run writes its fresh answers


# -- the cache key -----------------------------------------------------------------------------


def test_the_key_is_the_same_for_every_structured_strategy():
    plan = plan_of(fields={"name": str, "year": int})
    keys = {plan.with_strategy(s).key("Ada, 1815") for s in STRUCTURED_STRATEGIES}
    assert len(keys) == 1
    # ...although the strategies without native structured output send other messages.
    assert plan.messages("x") != plan.with_strategy("json_object").messages("x")


def test_answers_survive_a_strategy_fallback(docs, server):
    fields = {"name": str, "year": int}
    first = docs.llm.extract("${text}", fields, base_url=server.url, structured="json_object")
    assert first.attrs["llm"]["strategy"] == "json_object"
    sent = server.stats()["requests"]
    # "auto" starts with tools; the answers cached under json_object still serve every row.
    again = docs.llm.extract("${text}", fields, base_url=server.url)
    assert server.stats()["requests"] == sent
    assert again.attrs["llm"]["cached_rows"] == 3
    pd.testing.assert_frame_equal(again[list(fields)], first[list(fields)])


def _fixed_payloads(monkeypatch) -> list[dict]:
    captured: list[dict] = []
    original = cache_key_module.key_function

    def spy(fixed, varying):
        captured.append(dict(fixed))
        return original(fixed, varying)

    # The plan's key function is built by _cache_key.answer_key_function, which calls this.
    monkeypatch.setattr(cache_key_module, "key_function", spy)
    return captured


def test_user_and_password_are_stripped_from_the_url_in_the_key(monkeypatch):
    payloads = _fixed_payloads(monkeypatch)
    plain = plan_of(base_url="http://127.0.0.1:8/v1").key("hi")
    assert plan_of(base_url="http://ann:s3cret-pw@127.0.0.1:8/v1").key("hi") == plain
    assert plan_of(base_url="http://bob:other@127.0.0.1:8/v1").key("hi") == plain
    assert plan_of(base_url="http://127.0.0.1:9/v1").key("hi") != plain  # the port counts
    urls = {p["base_url"] for p in payloads}
    assert urls == {"http://127.0.0.1:8/v1", "http://127.0.0.1:9/v1"}
    assert "s3cret-pw" not in json.dumps(payloads) and "ann" not in json.dumps(payloads)


def test_the_provider_is_in_the_key_and_openai_keys_keep_their_old_form():
    options = dict(model="m", base_url="http://127.0.0.1:8", max_tokens=100)
    payload = {
        "base_url": "http://127.0.0.1:8",
        "model": "m",
        "params": {"max_tokens": 100},
        "schema": None,
        "messages": [{"role": "user", "content": "hi"}],
    }
    keys = {p: plan_of(provider=p, **options).key("hi") for p in ("openai", "anthropic", "azure")}
    assert keys["openai"] == request_key(payload)
    assert keys["anthropic"] == request_key({**payload, "provider": "anthropic"})
    assert keys["azure"] == request_key({**payload, "provider": "azure"})
    assert len(set(keys.values())) == 3


def test_the_api_key_is_never_in_the_key(monkeypatch):
    payloads = _fixed_payloads(monkeypatch)
    one = plan_of(api_key="sk-first-0123456789").key("hi")
    assert plan_of(api_key="sk-second-9876543210").key("hi") == one
    assert plan_of().key("hi") == one
    text = json.dumps(payloads)
    assert "sk-first" not in text and "sk-second" not in text


# -- the estimate counts what the run sends ----------------------------------------------------


@pytest.fixture
def mixed() -> pd.DataFrame:
    """Repeats within and across lookup batches, missing values, a non-default index."""
    words = ["tea", "coffee", "tea", None, "milk", "water", "coffee", "juice", "tea", None, "soda"]
    return pd.DataFrame({"t": words}, index=range(100, 100 + len(words)))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_the_estimate_and_the_run_agree(provider, mixed, server, no_tiktoken, monkeypatch):
    monkeypatch.setattr(feed_module, "LOOKUP_BATCH", 2)
    url = server.url if provider == "openai" else server.origin
    options = dict(provider=provider, model="claude-3-5-haiku", base_url=url, max_tokens=16)
    options["system"] = "One word."
    # Sample 0 of some rows is cached: the estimate and the run ask only for the rest.
    mixed.iloc[:3].llm.generate("About ${t}", n=1, **options)
    est = mixed.llm.estimate("About ${t}", n=2, **options)
    before = server.stats()["requests"]
    out = mixed.llm.generate("About ${t}", n=2, **options)
    facts = out.attrs["llm"]
    assert [est[k] for k in COUNTS] == [facts[k] for k in COUNTS]
    assert est["requests"] == server.stats()["requests"] - before
    # 6 distinct drinks, tea and coffee half cached: OpenAI asks 4x2 + 2x1 samples in 6
    # requests, Anthropic (no n) one request per sample.
    assert est["requests"] == (6 if provider == "openai" else 10)
    assert est["completion_tokens"] == 10 * 16
    assert (est["skipped_rows"], est["cached_rows"], est["duplicate_rows"]) == (2, 0, 3)
    assert est["rows"] == est["skipped_rows"] + est["cached_rows"] + est["duplicate_rows"] + 6


def test_the_estimate_and_an_extract_run_agree(docs, server, no_tiktoken, monkeypatch):
    monkeypatch.setattr(feed_module, "LOOKUP_BATCH", 1)
    fields = {"name": str, "year": int}
    frame = pd.concat([docs, docs.iloc[:2]])
    frame.iloc[:1].llm.extract("${text}", fields, base_url=server.url)
    est = frame.llm.estimate("${text}", fields=fields, base_url=server.url)
    out = frame.llm.extract("${text}", fields, base_url=server.url)
    assert [est[k] for k in COUNTS] == [out.attrs["llm"][k] for k in COUNTS]
    assert (est["cached_rows"], est["duplicate_rows"], est["requests"]) == (2, 1, 2)
