"""estimate(): rows, requests and tokens before a run, checked against the run itself."""

from __future__ import annotations

import json
import sqlite3
import sys
import types

import pandas as pd
import pytest

from parrot_pandas import _feed as feed
from parrot_pandas import _tokens as tokens
from parrot_pandas._cache import ResponseCache
from parrot_pandas._cache_paths import default_cache_path
from parrot_pandas._cache_schema import _MIGRATIONS
from parrot_pandas._run import RunSpec, prepare
from parrot_pandas._tokens import approximate_tokens

COUNTS = ("rows", "skipped_rows", "cached_rows", "requests")


def estimate_of(frame: pd.DataFrame, template: str, *, fields=None, **options) -> pd.Series:
    return frame.llm.estimate(template, fields=fields, **options)


# FakeServer counts ceil(len / 4) per message and per schema: so does the fallback.
pytestmark = pytest.mark.usefixtures("no_tiktoken")


@pytest.fixture
def repeats() -> pd.DataFrame:
    """Duplicated and missing values, a non-default index."""
    return pd.DataFrame(
        {"t": ["tea", "coffee", "tea", None, "tea", "water", "coffee"]},
        index=[10, 11, 12, 13, 14, 15, 16],
    )


def test_duplicates_and_missing_values_send_nothing(repeats, server):
    est = estimate_of(repeats, "Describe ${t}", base_url=server.url, max_tokens=20)
    assert server.stats()["requests"] == 0
    assert est.name == "estimate"
    assert est[list(COUNTS) + ["duplicate_rows"]].tolist() == [7, 1, 0, 3, 3]
    parts = ("skipped_rows", "cached_rows", "duplicate_rows", "requests")
    assert est["rows"] == sum(est[k] for k in parts)
    distinct = ["Describe tea", "Describe coffee", "Describe water"]
    assert est["prompt_tokens"] == sum(approximate_tokens(p) for p in distinct)
    assert est["completion_tokens"] == 3 * 20
    expected = est["prompt_tokens"] * 0.15 / 1e6 + 60 * 0.60 / 1e6
    assert est["cost"] == pytest.approx(expected)
    assert est["prompt_cost"] == pytest.approx(est["prompt_tokens"] * 0.15 / 1e6)
    assert est["model"] == "gpt-4o-mini"
    assert est["tokenizer"] == "approximate: 4 characters a token"


def test_generate_estimate_agrees_with_the_run(repeats, server):
    options = dict(base_url=server.url, system="Answer in one word.", max_tokens=8, n=2)
    est = estimate_of(repeats, "Describe ${t}", **options)
    out = repeats.llm.generate("Describe ${t}", **options)
    facts = out.attrs["llm"]
    assert [est[k] for k in COUNTS] == [facts[k] for k in COUNTS]
    assert est["prompt_tokens"] == facts["prompt_tokens"]  # system message included
    assert est["completion_tokens"] == 3 * 2 * 8 >= facts["completion_tokens"]


def test_extract_estimate_counts_the_tool_schema_as_the_server_does(docs, server):
    fields = {"name": str, "year": int}
    est = estimate_of(docs, "Facts:\n${text}", fields=fields, base_url=server.url)
    out = docs.llm.extract("Facts:\n${text}", fields, base_url=server.url)
    facts = out.attrs["llm"]
    assert facts["strategy"] == "tools"
    assert [est[k] for k in COUNTS] == [facts[k] for k in COUNTS] == [4, 1, 0, 3]
    assert est["prompt_tokens"] == facts["prompt_tokens"]
    # Without max_tokens nothing bounds the answers: no completion count, no total cost.
    assert est["completion_tokens"] is None and est["cost"] is None
    assert est["prompt_cost"] > 0


def test_cached_rows_need_no_request(docs, server):
    docs.iloc[:2].llm.generate("Say: ${text}", base_url=server.url)
    est = estimate_of(docs, "Say: ${text}", base_url=server.url)
    assert [est[k] for k in COUNTS] == [4, 1, 2, 1]
    assert est["prompt_tokens"] == approximate_tokens("Say: no facts here")
    out = docs.llm.generate("Say: ${text}", base_url=server.url)
    assert [est[k] for k in COUNTS] == [out.attrs["llm"][k] for k in COUNTS]
    # Everything is cached now.
    again = estimate_of(docs, "Say: ${text}", base_url=server.url)
    assert [again[k] for k in COUNTS] == [4, 1, 3, 0]
    assert again["prompt_tokens"] == 0 and again["prompt_cost"] == 0
    # Request parameters are part of the cache key: another max_tokens is another call.
    other = estimate_of(docs, "Say: ${text}", base_url=server.url, max_tokens=5)
    assert other["cached_rows"] == 0 and other["requests"] == 3


def test_only_missing_samples_are_counted(docs, server):
    options = dict(base_url=server.url, max_tokens=10)
    docs.iloc[:2].llm.generate("Say: ${title}", **options)  # sample 0 of a and b
    est = estimate_of(docs, "Say: ${title}", n=3, **options)
    assert est["cached_rows"] == 0 and est["requests"] == 4
    assert est["completion_tokens"] == (2 + 2 + 3 + 3) * 10
    out = docs.llm.generate("Say: ${title}", n=3, **options)
    assert out.attrs["llm"]["requests"] == 4
    assert out.attrs["llm"]["completion_tokens"] <= est["completion_tokens"]


def test_refresh_and_no_cache_count_every_row(docs, server):
    docs.llm.generate("${title}", base_url=server.url)
    assert estimate_of(docs, "${title}", base_url=server.url)["cached_rows"] == 4
    assert estimate_of(docs, "${title}", base_url=server.url, refresh=True)["requests"] == 4
    assert estimate_of(docs, "${title}", base_url=server.url, cache=False)["requests"] == 4


def test_an_estimate_creates_no_cache_file(docs, server, tmp_path):
    path = tmp_path / "not" / "yet" / "never.sqlite3"
    est = estimate_of(docs, "${title}", base_url=server.url, cache=str(path))
    assert est["requests"] == 4
    assert not path.parent.parent.exists() and not default_cache_path().exists()
    estimate_of(docs, "${title}", base_url=server.url)
    assert not default_cache_path().exists()


def test_an_estimate_leaves_the_cache_file_as_it_was(docs, server, tmp_path):
    path = tmp_path / "answers.sqlite3"
    docs.iloc[:2].llm.generate("${title}", base_url=server.url, cache=str(path))
    before = path.read_bytes(), path.stat().st_mtime_ns
    est = estimate_of(docs, "${title}", base_url=server.url, cache=str(path))
    assert est["cached_rows"] == 2 and est["requests"] == 2
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_an_estimate_reads_an_older_cache_without_migrating_it(docs, server, tmp_path):
    # Schema version 1, in SQLite's default journal mode: opening it for a run would switch
    # it to WAL, copy its table (migration 2) and VACUUM. An estimate only reads it.
    path = tmp_path / "old.sqlite3"
    options = {"base_url": server.url, "cache": str(path)}
    run = prepare(docs, RunSpec("${title}", output="output", options=options), sending=False)
    conn = sqlite3.connect(path)
    _MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO responses (key, sample, value, model, created) VALUES (?, 0, 'hi', 'm', 0)",
        (run.plan.key("Ada"),),
    )
    conn.commit()
    conn.close()
    before = path.read_bytes(), path.stat().st_mtime_ns
    est = estimate_of(docs, "${title}", **options)
    assert est["cached_rows"] == 1 and est["requests"] == 3
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_cached_answers_the_parser_rejects_are_asked_again(docs, server):
    fields = ["name", "year"]
    run = prepare(docs, RunSpec("${text}", fields=fields, options={"base_url": server.url}))
    with ResponseCache(default_cache_path()) as cache:
        cache.put(run.plan.key("no facts here"), 0, "not json at all", model="gpt-4o-mini")
        cache.put(run.plan.key("name=Ada, year=1815"), 0, json.dumps({"items": []}), model="m")
    est = estimate_of(docs, "${text}", fields=fields, base_url=server.url)
    assert est["cached_rows"] == 1 and est["requests"] == 2
    out = docs.llm.extract("${text}", fields, base_url=server.url)
    assert [est[k] for k in COUNTS] == [out.attrs["llm"][k] for k in COUNTS]


def test_duplicates_across_lookup_batches(monkeypatch, server):
    monkeypatch.setattr(feed, "LOOKUP_BATCH", 2)
    df = pd.DataFrame({"t": list("abcabcdd") + [None]})
    df.iloc[[0, 4]].llm.generate("${t}", base_url=server.url)  # a and b are cached
    est = estimate_of(df, "${t}", base_url=server.url)
    assert est[list(COUNTS) + ["duplicate_rows"]].tolist() == [9, 1, 4, 2, 2]
    out = df.llm.generate("${t}", base_url=server.url)
    assert [est[k] for k in COUNTS] == [out.attrs["llm"][k] for k in COUNTS]


def test_unknown_price_gives_no_cost(docs, server):
    est = estimate_of(docs, "${title}", base_url=server.url, model="my-local-llama", max_tokens=5)
    assert est["prompt_tokens"] > 0 and est["completion_tokens"] == 4 * 5
    assert est["cost"] is None and est["prompt_cost"] is None


def test_empty_frame():
    empty = pd.DataFrame({"t": pd.Series([], dtype=object)})
    est = estimate_of(empty, "${t}", max_tokens=5)
    assert est[list(COUNTS)].tolist() == [0, 0, 0, 0] and est["cost"] == 0.0


def test_tiktoken_counts_include_message_and_tool_overhead(monkeypatch, docs):
    class Words:
        name = "o200k_base"

        def encode_ordinary(self, text: str) -> list[int]:
            return list(range(len(text.split())))

    module = types.ModuleType("tiktoken")
    module.encoding_name_for_model = lambda model: "o200k_base"  # type: ignore[attr-defined]
    module.get_encoding = lambda name: Words()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", module)
    tokens._reset_tokenizers()
    one = docs.iloc[:1]  # "name=Ada, year=1815": two words
    est = estimate_of(one, "${text}", cache=False)
    assert est["tokenizer"] == "tiktoken:o200k_base"
    assert est["prompt_tokens"] == 3 + (3 + 1 + 2)  # priming; wrapping + role + content
    fields = ["name"]
    extract = estimate_of(one, "${text}", fields=fields, cache=False)
    run = prepare(one, RunSpec("${text}", fields=fields, options={"api_key": "sk-test"}))
    schema_words = len(json.dumps(run.plan.schema).split())
    assert extract["prompt_tokens"] == est["prompt_tokens"] + tokens._TOOL_OVERHEAD + schema_words


def test_estimate_needs_no_key_and_sends_nothing(docs, monkeypatch):
    # Pointed at the real OpenAI URL with no key: an estimate is still fine, a run is not.
    est = docs.llm.estimate("${title}", model="gpt-4o-mini", max_tokens=10)
    assert est["rows"] == 4 and est["requests"] == 4 and est["cost"] is not None
    with pytest.raises(Exception, match="no API key"):
        docs.llm.generate("${title}")


# -- several rows per request ------------------------------------------------------------------

PACKED = ("rows_per_request", "packed_requests", "packed_prompt_tokens", "packed_cost")


@pytest.mark.parametrize("size", [7, "auto"])
@pytest.mark.parametrize("fields", [None, {"name": str, "year": int}])
def test_packed_estimate_agrees_with_the_packed_run(server, size, fields):
    frame = pd.DataFrame(
        {"t": [f"name=n{i}, year={1000 + i}" for i in range(95)] + ["name=n1, year=1001", None]}
    )
    options = dict(base_url=server.url, cache=False, rows_per_request=size, max_tokens=40, n=2)
    est = estimate_of(frame, "Say: ${t}", fields=fields, **options)
    if fields is None:
        out = frame.llm.generate("Say: ${t}", progress=False, **options)
    else:
        out = frame.llm.extract("Say: ${t}", fields, progress=False, **options)
    facts = out.attrs["llm"]
    assert est["rows_per_request"] == facts["rows_per_request"] == (7 if size == 7 else 10)
    assert est["packed_requests"] == facts["requests"] == 1 + -(-94 // est["rows_per_request"])
    assert est["packed_prompt_tokens"] == facts["prompt_tokens"]
    assert est["packed_completion_tokens"] >= facts["completion_tokens"]
    # The unpacked figures stay beside them: one request per distinct row.
    assert est["requests"] == 95 and est["prompt_tokens"] != est["packed_prompt_tokens"]
    assert est["packed_cost"] == pytest.approx(
        est["packed_prompt_tokens"] * 0.15 / 1e6 + est["packed_completion_tokens"] * 0.60 / 1e6
    )


def test_packing_pays_the_instructions_once_per_request(server):
    frame = pd.DataFrame({"t": [f"review {i}: fine" for i in range(200)]})
    instructions = "Classify the sentiment of the review below. " * 30  # about 300 tokens
    fields = {"sentiment": str}
    one = estimate_of(frame, instructions + "${t}", fields=fields, base_url=server.url)
    packed = estimate_of(
        frame, instructions + "${t}", fields=fields, base_url=server.url, rows_per_request=20
    )
    assert "packed_requests" not in one  # only asked for when packing
    assert packed["packed_requests"] == 1 + 10
    assert packed["packed_prompt_tokens"] * 5 < one["prompt_tokens"]


def test_cached_rows_are_not_packed(server, tmp_path):
    frame = pd.DataFrame({"t": [f"row {i}" for i in range(40)]})
    cache = str(tmp_path / "c.sqlite3")
    frame.iloc[:25].llm.generate("Say ${t}", base_url=server.url, cache=cache)
    est = estimate_of(frame, "Say ${t}", base_url=server.url, cache=cache, rows_per_request=4)
    assert est["cached_rows"] == 25
    assert est["packed_requests"] == 1 + 4  # the setup row, then 14 rows in packs of 4
