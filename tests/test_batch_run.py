"""batch=True end to end against the local test server's Batch endpoints (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import pathlib
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import parrot_pandas  # noqa: F401  (registers df.llm)
from parrot_pandas import APIError, ConfigurationError, _batch_run
from parrot_pandas.providers._batch import BatchLimits, BatchPart
from parrot_pandas.providers._openai_batch import OpenAIBatch
from parrot_pandas.testing import FakeServer
from parrot_pandas.testing._batches import FakeBatches

KEY = "sk-batch-run-0123456789"
Factory = Callable[..., FakeServer]


@pytest.fixture
def srv(server_factory: Factory) -> FakeServer:
    return server_factory(api_key=KEY)


@pytest.fixture
def batches(srv: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeBatches:
    """The server's batches, and a wait between looks that moves their clock, not ours."""
    fake = FakeBatches.of(srv.app)
    waits: list[float] = []

    async def wait(seconds: float) -> None:
        waits.append(seconds)
        fake.advance(seconds)
        await asyncio.sleep(0)  # as a real wait does, let the loop's other tasks run

    monkeypatch.setattr(_batch_run, "wait_between", wait)
    fake.waits = waits  # type: ignore[attr-defined]
    return fake


def frame(n: int = 6, *, extra: dict[int, str] | None = None) -> pd.DataFrame:
    texts = [f"name=N{i}, year={1900 + i}" + (extra or {}).get(i, "") for i in range(n)]
    return pd.DataFrame({"text": texts}, index=pd.Index([f"r{i}" for i in range(n)], name="id"))


def extract(df: pd.DataFrame, srv: FakeServer, **options):
    options = {"api_key": KEY, "base_url": srv.url, "model": "gpt-4o-mini", **options}
    return df.llm.extract("${text}", {"name": str, "year": int}, **options)


def test_a_clean_batch_gives_the_live_frame_at_half_price(srv, batches, tmp_path):
    df = frame()
    batched = extract(df, srv, batch=True, cache=str(tmp_path / "b.sqlite3"))
    live = extract(df, srv, cache=str(tmp_path / "l.sqlite3"))
    pd.testing.assert_frame_equal(batched, live)
    facts = batched.attrs["llm"]
    assert facts["batches"] == 1 and facts["batch_ids"] == batches.batch_ids()
    assert batches.stats()["batches"] == 1
    assert facts["batch_prompt_tokens"] > 0
    live_facts = live.attrs["llm"]
    assert facts["prompt_tokens"] == live_facts["prompt_tokens"]
    assert facts["cost"] < live_facts["cost"]


def test_failed_lines_go_into_one_more_batch(srv, batches, tmp_path):
    df = frame(extra={3: ", note=BATCH_FAIL"})
    out = extract(df, srv, batch=True, cache=str(tmp_path / "c.sqlite3"))
    assert "llm_error" not in out  # no row failed
    assert out.loc["r3", "name"] == "N3"
    facts = out.attrs["llm"]
    assert batches.stats()["batches"] == 2 and facts["batches"] == 2
    assert facts["resubmitted_lines"] == 1 and facts["live_fallback_rows"] == 0


def test_lines_failing_in_every_batch_go_live(srv, batches, tmp_path):
    batches.fail_times = 5
    df = frame(extra={2: ", note=BATCH_FAIL"})
    out = extract(df, srv, batch=True, cache=str(tmp_path / "c.sqlite3"))
    assert out.loc["r2", "year"] == 1902
    facts = out.attrs["llm"]
    assert batches.stats()["batches"] == 2 and facts["live_fallback_rows"] == 1


def test_an_expired_batch_resubmits_what_did_not_run(srv, batches, tmp_path):
    batches.window = 600
    df = frame(extra={4: ", note=BATCH_EXPIRE"})
    out = extract(df, srv, batch=True, cache=str(tmp_path / "c.sqlite3"))
    assert out.loc["r4", "name"] == "N4"
    assert batches.stats()["batches"] == 2
    # Polled with backoff: doubling from 5 s to at most 60 s, never a busy loop.
    waits = batches.waits
    assert waits[:4] == [5.0, 10.0, 20.0, 40.0] and max(waits) == 60.0


def test_past_the_deadline_failed_lines_go_live_not_into_another_batch(srv, batches, tmp_path):
    batches.window = 600
    df = frame(extra={4: ", note=BATCH_EXPIRE"})
    past = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    out = extract(df, srv, batch=True, batch_deadline=past, cache=str(tmp_path / "c.sqlite3"))
    assert out.loc["r4", "name"] == "N4"
    assert batches.stats()["batches"] == 1 and out.attrs["llm"]["live_fallback_rows"] == 1


def test_a_batch_split_by_the_providers_limits(srv, batches, tmp_path, monkeypatch):
    batches.max_requests = 2  # the server refuses bigger batches
    monkeypatch.setattr(OpenAIBatch, "limits", BatchLimits(2, 10**6))
    df = frame(7)
    out = extract(df, srv, batch=True, cache=str(tmp_path / "c.sqlite3"))
    assert list(out["name"]) == [f"N{i}" for i in range(7)]
    assert batches.stats()["batches"] == 3  # 6 lines after the live setup row, 2 a batch


def test_rows_already_cached_are_not_submitted(srv, batches, tmp_path):
    cache = str(tmp_path / "c.sqlite3")
    extract(frame(3), srv, cache=cache)  # rows 0-2 live
    out = extract(frame(6), srv, batch=True, cache=cache)
    assert out.attrs["llm"]["cached_rows"] == 3
    # Row 3 went live as the setup request; rows 4 and 5 were the only lines.
    assert batches.stats()["lines"] == 2
    again = extract(frame(6), srv, cache=cache)  # a live re-run pays nothing
    assert again.attrs["llm"]["requests"] == 0


def test_identical_rows_are_one_line(srv, batches, tmp_path):
    df = pd.DataFrame({"text": ["name=A, year=1", "name=B, year=2"] * 3})
    out = extract(df, srv, batch=True, cache=str(tmp_path / "c.sqlite3"))
    assert list(out["name"]) == ["A", "B"] * 3
    assert batches.stats()["lines"] == 1  # A went live; B once


def test_a_rejected_batch_fails_the_call_with_the_providers_message(srv, batches, tmp_path):
    batches.max_requests = 2  # but the client believes the documented 50,000
    with pytest.raises(APIError, match="rejected batch") as info:
        extract(frame(6), srv, batch=True, cache=str(tmp_path / "c.sqlite3"))
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"batch": "yes"}, "batch must be True"),
        ({"batch_deadline": 60}, "only applies to batch=True"),
        ({"batch": True, "batch_deadline": -1}, "batch_deadline must be"),
        ({"batch": True, "batch_deadline": datetime.timedelta(0)}, "batch_deadline must be"),
        ({"batch": True, "cache": False}, "pass cache=True"),
    ],
)
def test_batch_settings_are_checked_before_any_request(srv, batches, options, match):
    with pytest.raises(ConfigurationError, match=match):
        extract(frame(2), srv, **options)
    assert batches.stats()["files"] == 0 and srv.stats()["requests"] == 0


_CHILD = """
import sys
import pandas as pd
import parrot_pandas
url, cache, key = sys.argv[1:4]
rows_per_request = int(sys.argv[4]) if len(sys.argv) > 4 else 1
texts = [f"name=N{i}, year={1900 + i}" for i in range(6)]
pd.DataFrame({"text": texts}).llm.extract(
    "${text}", {"name": str, "year": int}, api_key=key, base_url=url, model="gpt-4o-mini",
    batch=True, cache=cache, progress=False, rows_per_request=rows_per_request,
)
"""


def _recorded_batch_id(cache: pathlib.Path) -> str | None:
    if not cache.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(cache, timeout=1)) as conn:
            row = conn.execute("SELECT batch_id FROM batches WHERE batch_id IS NOT NULL").fetchone()
    except sqlite3.OperationalError:  # not migrated yet
        return None
    return row[0] if row else None


def test_kill_9_while_waiting_then_a_rerun_reattaches_without_submitting_again(
    srv, batches, tmp_path
):
    batches.step = 10**6  # the batch will not move while the child waits
    cache = tmp_path / "c.sqlite3"
    _submit_then_kill(srv, cache)
    submitted = batches.batch_ids()
    assert len(submitted) == 1 and _recorded_batch_id(cache) == submitted[0]
    batches.step = 0
    out = extract(frame(6), srv, batch=True, cache=str(cache))
    assert list(out["name"]) == [f"N{i}" for i in range(6)]
    assert batches.stats()["batches"] == 1  # re-attached, never submitted again
    assert out.attrs["llm"]["batch_ids"] == submitted
    assert out.attrs["llm"]["cached_rows"] == 1  # the setup row, answered live before the kill
    # A live re-run pays nothing: every answer landed in the per-row cache.
    assert extract(frame(6), srv, cache=str(cache)).attrs["llm"]["requests"] == 0


async def _cancelled_while_waiting(start: Callable[[], Any], monkeypatch) -> None:
    """Start a batch call (``start()``) and cancel it, as Ctrl-C does, once it is waiting."""
    waiting = asyncio.Event()

    async def wait(seconds: float) -> None:
        waiting.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(_batch_run, "wait_between", wait)
    task = asyncio.ensure_future(start())
    await asyncio.wait_for(waiting.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_ctrl_c_stops_waiting_not_the_batch_and_says_how_to_resume(
    srv, batches, tmp_path, monkeypatch, caplog
):
    batches.step = 10**6
    cache = str(tmp_path / "c.sqlite3")
    options = {"api_key": KEY, "base_url": srv.url, "model": "gpt-4o-mini", "cache": cache}
    await _cancelled_while_waiting(
        lambda: frame(6).llm.aextract("${text}", {"name": str, "year": int}, batch=True, **options),
        monkeypatch,
    )
    (batch_id,) = batches.batch_ids()
    assert "Re-run the same call to resume" in caplog.text and batch_id in caplog.text
    assert batches.stats()["cancels"] == 0  # the batch goes on
    batches.step = 0
    monkeypatch.setattr(_batch_run, "wait_between", lambda s: asyncio.sleep(0))
    out = await frame(6).llm.aextract("${text}", {"name": str, "year": int}, batch=True, **options)
    assert out.attrs["llm"]["batch_ids"] == [batch_id] and batches.stats()["batches"] == 1


def test_outstanding_batches_are_listed_refreshed_and_cancelled(srv, batches, tmp_path):
    cache = tmp_path / "c.sqlite3"
    batches.step = 10**6
    _submit_then_kill(srv, cache)
    (batch_id,) = batches.batch_ids()
    listed = parrot_pandas.list_batches(cache)
    assert list(listed["batch_id"]) == [batch_id]
    assert listed.loc[0, "requests"] == 5 and listed.loc[0, "provider"] == "openai"
    fresh = parrot_pandas.list_batches(cache, refresh=True, api_key=KEY)
    assert fresh.loc[0, "state"] == "validating"
    with pytest.raises(ConfigurationError, match="not among this project's"):
        parrot_pandas.cancel_batches(["batch_nope"], cache, api_key=KEY)
    cancelled = parrot_pandas.cancel_batches(cache=cache, api_key=KEY)
    assert list(cancelled["batch_id"]) == [batch_id]
    assert cancelled.loc[0, "state"] in ("cancelling", "ended:cancelled")
    assert batches.stats()["cancels"] == 1
    # After the cancel the provider has ended it; a re-run reads it and sends the rest again.
    batches.step = 0
    out = extract(frame(6), srv, batch=True, cache=str(cache))
    assert list(out["year"]) == [1900 + i for i in range(6)]
    assert parrot_pandas.list_batches(cache).empty


def test_a_redacted_base_url_is_never_called_and_base_url_overrides_it(srv, batches, tmp_path):
    # A gateway carrying its key in the query: the record keeps the URL redacted.
    secret = "gw-secret-0123456789"
    gateway = f"{srv.url}?api-key={secret}"
    cache = tmp_path / "c.sqlite3"
    extract(frame(3), srv, batch=True, cache=str(cache), base_url=gateway)
    (batch_id,) = batches.batch_ids()
    (stored,) = parrot_pandas.list_batches(cache, every=True)["base_url"]
    assert secret not in stored and "***" in stored
    before = parrot_pandas.list_batches(cache, every=True).loc[0, "updated"]
    with pytest.raises(ConfigurationError, match="pass base_url=") as info:
        parrot_pandas.list_batches(cache, every=True, refresh=True, api_key=KEY)
    assert secret not in str(info.value)
    with pytest.raises(ConfigurationError, match="pass base_url="):
        parrot_pandas.cancel_batches([batch_id], cache, api_key=KEY)
    assert batches.stats()["cancels"] == 0
    assert parrot_pandas.list_batches(cache, every=True).loc[0, "updated"] == before
    # With the full URL given again, the refresh reaches the provider; the record stays redacted.
    fresh = parrot_pandas.list_batches(
        cache, every=True, refresh=True, api_key=KEY, base_url=gateway
    )
    assert fresh.loc[0, "state"] == "ended:completed" and fresh.loc[0, "updated"] > before
    assert secret not in fresh.loc[0, "base_url"]


# -- prompt caching, live and in a batch ------------------------------------------------------

SYSTEM = "You read short records and pull out the fields asked for. " * 40


def test_live_answers_report_prompt_cache_reads_into_attrs_and_cost(srv, batches, tmp_path):
    batches.cache_min_tokens = 50
    df = frame(4)
    opts = {"system": SYSTEM, "max_concurrency": 1, "cache": str(tmp_path / "c.sqlite3")}
    out = extract(df, srv, **opts)
    facts = out.attrs["llm"]
    assert facts["cached_prompt_tokens"] > 0  # rows 2-4 read the prefix row 1 wrote
    assert facts["cache_creation_tokens"] == 0  # OpenAI does not bill writes
    full = parrot_pandas.price_of("gpt-4o-mini").cost(
        facts["prompt_tokens"], facts["completion_tokens"]
    )
    assert facts["cost"] == pytest.approx(full - facts["cached_prompt_tokens"] * 0.5 * 0.15 / 1e6)


def test_an_anthropic_batch_reads_the_cache_its_live_setup_request_warmed(srv, batches, tmp_path):
    batches.cache_min_tokens = 50
    long_system = SYSTEM * 3  # past Anthropic's 1,024-token minimum, so cache_control is set
    out = frame(5).llm.extract(
        "${text}",
        {"name": str, "year": int},
        api_key=KEY,
        provider="anthropic",
        base_url=srv.origin,
        model="claude-sonnet-4-5",
        system=long_system,
        batch=True,
        cache=str(tmp_path / "c.sqlite3"),
    )
    assert list(out["name"]) == [f"N{i}" for i in range(5)]
    facts = out.attrs["llm"]
    assert facts["batches"] == 1 and batches.stats()["lines"] == 4
    assert batches.stats()["cache_reads"] == 4  # each line read the warm prefix
    assert facts["cache_creation_tokens"] > 0  # the live setup request wrote the prefix
    # Every line of the batch read it: a cold batch would have read nothing.
    assert facts["batch_cached_prompt_tokens"] > 0
    assert facts["cached_prompt_tokens"] == facts["batch_cached_prompt_tokens"]


# -- every protocol, samples, streaming --------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "lines"),
    [("openai", 4), ("azure", 4), ("anthropic", 8)],  # Anthropic has no n: a line per sample
)
def test_n_samples_per_row_on_every_protocol(srv, batches, tmp_path, provider, lines):
    options = {"api_key": KEY, "model": "gpt-4o-mini", "cache": str(tmp_path / "c.sqlite3")}
    if provider == "openai":
        options["base_url"] = srv.url
    else:
        options.update(provider=provider, base_url=srv.origin)
        if provider == "azure":
            options["api_version"] = "2024-10-21"
    df = frame(5)
    out = df.llm.generate("${text}", output="said", n=2, batch=True, **options)
    assert len(out) == 10 and out.index.tolist() == [f"r{i}" for i in range(5) for _ in (0, 1)]
    assert out["said"].notna().all()
    assert batches.stats()["lines"] == lines and out.attrs["llm"]["batches"] == 1
    live = df.llm.generate("${text}", output="said", n=2, **options)
    assert live.attrs["llm"]["requests"] == 0  # every sample landed in the per-row cache


def test_chunks_of_a_batch_run_are_the_batch_frame(srv, batches, tmp_path):
    df = frame(6)
    chunks = list(extract(df, srv, batch=True, cache=str(tmp_path / "a.sqlite3"), chunksize=4))
    assert [len(c) for c in chunks] == [4, 2] and batches.stats()["batches"] == 1
    whole = extract(df, srv, batch=True, cache=str(tmp_path / "b.sqlite3"))
    pd.testing.assert_frame_equal(pd.concat(chunks).drop(columns="llm_error"), whole)


def test_estimate_puts_live_and_batch_side_by_side(tmp_path):
    df = frame(11)
    est = df.llm.estimate(
        "${text}",
        fields={"name": str, "year": int},
        max_tokens=50,
        rpm=60,
        cache=str(tmp_path / "c.sqlite3"),
    )
    modes = est.attrs["modes"]
    assert list(modes.index) == ["live", "batch"]
    live, batch = modes.loc["live"], modes.loc["batch"]
    assert live["requests"] == batch["requests"] == 11
    assert live["expected_seconds"] == 11.0 and batch["expected_seconds"] == "within 24 h"
    # One setup row live, ten at half price.
    assert batch["cost"] == pytest.approx(live["cost"] * (1 + 10 / 2) / 11)
    assert est["batch_cost"] == batch["cost"]


async def test_a_server_without_the_batch_endpoints_names_batch_false(tmp_path):
    # A plain OpenAI-compatible server (llama.cpp, vLLM): chat answers, /files is a 404.
    async def chat(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "ok"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with TestServer(app, host="127.0.0.1") as plain:
        with pytest.raises(APIError, match=r"no Batch API.*pass batch=False"):
            await frame(3).llm.agenerate(
                "${text}",
                output="said",
                api_key=KEY,
                base_url=str(plain.make_url("/v1")),
                batch=True,
                cache=str(tmp_path / "c.sqlite3"),
            )


def _submit_then_kill(srv: FakeServer, cache: pathlib.Path, rows_per_request: int = 1) -> None:
    """A real child process submits the batch of frame(6), and is killed -9 while waiting."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, srv.url, str(cache), KEY, str(rows_per_request)],
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])},
    )
    try:
        deadline = time.monotonic() + 60
        while _recorded_batch_id(cache) is None:
            assert child.poll() is None, "the child ended before submitting"
            assert time.monotonic() < deadline, "the child never recorded its batch"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_a_crash_before_the_batch_id_was_recorded_finds_the_batch_by_its_metadata(
    srv, batches, tmp_path
):
    batches.step = 10**6
    cache = tmp_path / "c.sqlite3"
    _submit_then_kill(srv, cache)
    # As if the process had died after the create request, before its answer was recorded.
    with contextlib.closing(sqlite3.connect(cache)) as conn, conn:
        conn.execute("UPDATE batches SET batch_id = NULL, state = 'submitting'")
    batches.step = 0
    out = extract(frame(6), srv, batch=True, cache=str(cache))
    assert list(out["name"]) == [f"N{i}" for i in range(6)]
    assert batches.stats()["batches"] == 1 and out.attrs["llm"]["batch_ids"] == batches.batch_ids()


@pytest.mark.parametrize("marker", ["LONGME", "FILTERME", "CUTME"])
def test_a_line_that_fails_for_good_fails_its_row_without_another_batch(
    server_factory, monkeypatch, tmp_path, marker
):
    srv = server_factory(
        api_key=KEY,
        faults={"LONGME": "context_length", "FILTERME": "content_filter", "CUTME": "truncate"},
    )
    monkeypatch.setattr(_batch_run, "wait_between", lambda s: asyncio.sleep(0))
    out = extract(
        frame(5, extra={3: f", note={marker}"}),
        srv,
        batch=True,
        errors="coerce",
        cache=str(tmp_path / "c.sqlite3"),
    )
    assert out["llm_error"].notna().tolist() == [False, False, False, True, False]
    assert out.loc[["r0", "r1", "r2", "r4"], "name"].tolist() == ["N0", "N1", "N2", "N4"]
    facts = out.attrs["llm"]
    # Judged as a live answer is: failed for good, so neither resubmitted nor sent live.
    assert FakeBatches.of(srv.app).stats()["batches"] == 1
    assert facts["resubmitted_lines"] == 0 and facts["live_fallback_rows"] == 0
    assert facts["failed_rows"] == 1


def test_ctrl_c_in_a_script_says_how_to_resume_and_the_batch_goes_on(srv, batches, tmp_path):
    batches.step = 10**6
    cache = tmp_path / "c.sqlite3"
    # As a script started from a terminal: Ctrl-C neither ignored nor blocked (a child
    # inherits both from this process, which other tests' libraries may have changed). A
    # child still alive after 45 s prints every thread's stack, so a hang shows where.
    script = (
        "import faulthandler, signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "faulthandler.dump_traceback_later(45, exit=True)\n" + _CHILD
    )
    inherited = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    child = subprocess.Popen(
        [sys.executable, "-c", script, srv.url, str(cache), KEY],
        env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1])},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _recorded_batch_id(cache) is None:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert "KeyboardInterrupt" in stderr, (inherited, stderr)
    assert "Re-run the same call to resume" in stderr and batches.batch_ids()[0] in stderr
    assert KEY not in stderr
    assert batches.stats()["cancels"] == 0


def test_a_rerun_finds_a_batch_whose_lines_used_the_fallen_back_strategy(
    server_factory, monkeypatch, tmp_path
):
    # The first run's setup request moved structured="auto" from tools to json_schema, so its
    # batch lines carry json_schema; a re-run must find that batch, not submit another.
    srv = server_factory(api_key=KEY, supports_tools=False)
    fake = FakeBatches.of(srv.app)
    fake.step = 10**6
    cache = tmp_path / "c.sqlite3"
    _submit_then_kill(srv, cache)
    fake.step = 0
    monkeypatch.setattr(_batch_run, "wait_between", lambda s: asyncio.sleep(0))
    out = extract(frame(6), srv, batch=True, cache=str(cache))
    assert list(out["name"]) == [f"N{i}" for i in range(6)]
    assert fake.stats()["batches"] == 1 and out.attrs["llm"]["strategy"] == "json_schema"


async def test_two_calls_running_at_once_submit_one_batch(srv, batches, tmp_path):
    # Two notebooks (here two calls on one loop, each with its own connection to the file) run
    # the same call: the second waits for the first one's submission and attaches to it.
    batches.step = 5.0
    cache = str(tmp_path / "c.sqlite3")
    options = {"api_key": KEY, "base_url": srv.url, "model": "gpt-4o-mini", "cache": cache}
    call = frame(6).llm.aextract
    first, second = await asyncio.gather(
        call("${text}", {"name": str, "year": int}, batch=True, **options),
        call("${text}", {"name": str, "year": int}, batch=True, **options),
    )
    pd.testing.assert_frame_equal(first, second)
    assert list(first["name"]) == [f"N{i}" for i in range(6)]
    assert batches.stats()["batches"] == 1
    assert (
        first.attrs["llm"]["batch_ids"] == second.attrs["llm"]["batch_ids"] == batches.batch_ids()
    )


async def test_two_calls_resubmitting_the_same_expired_lines_submit_one_more_batch(
    srv, batches, tmp_path
):
    # Both calls read the same expired batch; its lines, all of them again, make the same part:
    # the second call must attach to the first one's new batch, not refuse it as one it read.
    batches.window = 600
    cache = str(tmp_path / "c.sqlite3")
    options = {"api_key": KEY, "base_url": srv.url, "model": "gpt-4o-mini", "cache": cache}
    df = frame(6, extra={i: ", note=BATCH_EXPIRE" for i in range(6)})
    first, second = await asyncio.gather(
        df.llm.aextract("${text}", {"name": str, "year": int}, batch=True, **options),
        df.llm.aextract("${text}", {"name": str, "year": int}, batch=True, **options),
    )
    assert list(first["name"]) == list(second["name"]) == [f"N{i}" for i in range(6)]
    assert batches.stats()["batches"] == 2  # the first, and one for its expired lines


def test_a_claim_whose_create_request_failed_is_released(tmp_path):
    path = tmp_path / "c.sqlite3"
    parrot_pandas._cache.ResponseCache(path).close()  # the batches table, as a run makes it
    records = _batch_run.Records(path)
    try:
        part = BatchPart(("c1",), (b"{}",), "m")
        assert records.claim("openai", "u", part, 1000.0, None, {"c1": ["s1"]})
        (claimed,) = records.all()
        assert claimed.owner is not None and claimed.rows == {"c1": ("s1",)}
        records.release("openai", "u", part.digest)
        (released,) = records.all()
        assert released.owner is None and released.state == "submitting"
        assert not _batch_run.being_submitted(released, 1000.0)  # looked up, not waited for
    finally:
        records.close()


def _claim(owner: str | None, *, updated: float = 1000.0, batch_id: str | None = None):
    return _batch_run.Record(
        "openai", "http://x/v1", "d" * 64, batch_id, "submitting", 1000.0, updated, "m", (), owner
    )


def test_a_claim_is_waited_for_only_while_its_submitter_can_still_record_it():
    host, now = socket.gethostname(), 1010.0
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _batch_run.being_submitted(_claim(f"{host}:{sleeper.pid}"), now)
    finally:
        sleeper.kill()
        sleeper.wait()
    # Killed before it recorded its batch id: its claim is a leftover to look up, not to wait for.
    assert not _batch_run.being_submitted(_claim(f"{host}:{sleeper.pid}"), now)
    # This process: only while one of its calls is in the create request.
    me = f"{host}:{os.getpid()}"
    assert not _batch_run.being_submitted(_claim(me), now)  # a call interrupted by Ctrl-C
    submitting = ("openai", "http://x/v1", "d" * 64)
    _batch_run._SUBMITTING[submitting] += 1
    try:
        assert _batch_run.being_submitted(_claim(me), now)
        # A claim nobody finished in CLAIM_STALE seconds is given up, even by a live process.
        assert not _batch_run.being_submitted(_claim(me), now + _batch_run.CLAIM_STALE)
    finally:
        del _batch_run._SUBMITTING[submitting]
    # Another host: no pid to ask, so the claim's age decides.
    assert _batch_run.being_submitted(_claim("elsewhere:1"), now)
    stale = now + _batch_run.CLAIM_STALE
    assert not _batch_run.being_submitted(_claim("elsewhere:1"), stale)
    # A recorded batch, or a record written before owners were kept, is never waited for.
    assert not _batch_run.being_submitted(_claim("elsewhere:1", batch_id="b1"), now)
    assert not _batch_run.being_submitted(_claim(None), now)


# -- rows_per_request inside a batch: the two savings multiply ---------------------------------


def _one_of_each(srv: FakeServer, provider: str) -> dict:
    if provider == "openai":
        return {"base_url": srv.url, "model": "gpt-4o-mini"}
    return {"provider": "anthropic", "base_url": srv.origin, "model": "claude-sonnet-4-5"}


def _pack_sizes(cache: str) -> list[list[int]]:
    """Per batch recorded, oldest first: the rows of each of its lines (from its record)."""
    records = _batch_run.Records(cache)
    try:
        return [[len(record.rows[cid]) for cid in record.custom_ids] for record in records.all()]
    finally:
        records.close()


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_packed_batch_gives_the_live_frame_in_fewer_lines(srv, batches, tmp_path, provider):
    df = frame(13)
    options = {"api_key": KEY, **_one_of_each(srv, provider)}
    fields = {"name": str, "year": int}
    cache = str(tmp_path / "b.sqlite3")
    out = df.llm.extract("${text}", fields, batch=True, rows_per_request=4, cache=cache, **options)
    live = df.llm.extract("${text}", fields, cache=str(tmp_path / "l.sqlite3"), **options)
    pd.testing.assert_frame_equal(out, live)
    assert out.attrs["llm"]["batch"] and live.attrs["llm"].get("batch") is None
    facts = out.attrs["llm"]
    # The setup row live, then 12 rows in 3 lines of 4: one batch.
    assert batches.stats()["lines"] == 3 and facts["batches"] == 1
    assert facts["rows_per_request"] == 4 and facts["packed_requests"] == 3
    assert facts["packed_rows"] == 12 and facts["repacked_rows"] == 0
    assert facts["requests"] == 1 + 3 and facts["batch_prompt_tokens"] > 0
    # Every row's answer landed in the per-row cache, under its unpacked key: a live re-run,
    # unpacked or packed, pays nothing.
    for size in (1, 5):
        again = df.llm.extract("${text}", fields, rows_per_request=size, cache=cache, **options)
        assert again.attrs["llm"]["requests"] == 0
        pd.testing.assert_frame_equal(again.drop(columns="llm_error", errors="ignore"), live)


def test_generate_packs_inside_a_batch_too(srv, batches, tmp_path):
    df = frame(9)
    options = {"api_key": KEY, "base_url": srv.url, "model": "gpt-4o-mini"}
    out = df.llm.generate(
        "Say: ${text}",
        output="said",
        batch=True,
        rows_per_request=4,
        cache=str(tmp_path / "b.sqlite3"),
        **options,
    )
    live = df.llm.generate("Say: ${text}", output="said", cache=False, **options)
    pd.testing.assert_frame_equal(out, live)
    assert batches.stats()["lines"] == 2  # 8 rows after the setup row, 4 a line


def test_mis_mapped_ids_are_asked_again_in_halves_in_the_next_batch(
    server_factory, tmp_path, monkeypatch
):
    # A server that drops ids, duplicates them with wrong answers, adds unknown ids and
    # reorders: no row may get another row's answer, and none may be lost.
    faults = {"drop": 0.2, "duplicate": 0.2, "unknown": 0.3, "reorder": 0.5}
    srv = server_factory(api_key=KEY, pack_faults=faults, seed=3)
    batches = FakeBatches.of(srv.app)
    monkeypatch.setattr(_batch_run, "wait_between", lambda s: _advance(batches, s))
    df = frame(41)
    cache = str(tmp_path / "c.sqlite3")
    out = extract(df, srv, batch=True, rows_per_request=8, cache=cache)
    expected = extract(df, server_factory(api_key=KEY), cache=False)
    pd.testing.assert_frame_equal(out, expected)
    stats, facts = srv.stats(), out.attrs["llm"]
    assert stats["ids_dropped"] > 0 and stats["ids_duplicated"] > 0
    assert facts["repacked_rows"] > 0 and facts["reask_reasons"].keys() >= {"missing"}
    # Round one: 40 rows in 5 lines of 8; round two: the unmapped rows, in packs of at most 4.
    assert batches.stats()["batches"] == 2 and facts["resubmitted_lines"] > 0
    first, second = _pack_sizes(cache)
    assert first == [8] * 5 and max(second) <= 4


async def _advance(batches: FakeBatches, seconds: float) -> None:
    batches.advance(seconds)


def test_a_pack_line_that_fails_in_passing_goes_again_whole(srv, batches, tmp_path):
    df = frame(9, extra={5: ", note=BATCH_FAIL"})
    out = extract(df, srv, batch=True, rows_per_request=4, cache=str(tmp_path / "c.sqlite3"))
    assert "llm_error" not in out and list(out["year"]) == [1900 + i for i in range(9)]
    facts = out.attrs["llm"]
    assert batches.stats()["batches"] == 2 and facts["resubmitted_lines"] == 1
    assert facts["repacked_rows"] == 0  # the pack was not halved: its line failed, not its ids


def test_rows_still_unmapped_after_two_batches_go_live_packed(
    server_factory, tmp_path, monkeypatch
):
    srv = server_factory(api_key=KEY, pack_faults={"drop": 0.5}, seed=8)
    batches = FakeBatches.of(srv.app)
    monkeypatch.setattr(_batch_run, "wait_between", lambda s: _advance(batches, s))
    df = frame(30)
    out = extract(df, srv, batch=True, rows_per_request=8, cache=str(tmp_path / "c.sqlite3"))
    assert list(out["name"]) == [f"N{i}" for i in range(30)] and "llm_error" not in out
    facts = out.attrs["llm"]
    assert batches.stats()["batches"] == 2 and facts["live_fallback_rows"] > 0


def test_a_row_that_fails_for_good_in_a_pack_fails_alone(server_factory, tmp_path, monkeypatch):
    # The whole pack gets the row's 400 (context length): halved, the culprit ends up alone
    # and fails by the unpacked rules; the rows packed with it are answered.
    srv = server_factory(api_key=KEY, faults={"LONGME": "context_length"})
    batches = FakeBatches.of(srv.app)
    monkeypatch.setattr(_batch_run, "wait_between", lambda s: _advance(batches, s))
    df = frame(9, extra={6: ", note=LONGME"})
    out = extract(
        df, srv, batch=True, rows_per_request=4, errors="coerce", cache=str(tmp_path / "c.sqlite3")
    )
    failed = out["llm_error"].notna()
    assert failed.sum() == 1 and failed["r6"]
    assert list(out.loc[~failed, "name"]) == [f"N{i}" for i in range(9) if i != 6]


def test_auto_packs_a_batch_with_a_fixed_size(srv, batches, tmp_path):
    df = frame(26)
    out = extract(df, srv, batch=True, rows_per_request="auto", cache=str(tmp_path / "c.sqlite3"))
    assert list(out["name"]) == [f"N{i}" for i in range(26)]
    facts = out.attrs["llm"]
    assert facts["rows_per_request"] == 10  # DEFAULT_AUTO_ROWS: no rate limit binds a batch
    assert batches.stats()["lines"] == 3  # 25 rows after the setup row: 10, 10, 5


def test_kill_9_while_waiting_on_a_packed_batch_then_a_rerun_reattaches(srv, batches, tmp_path):
    batches.step = 10**6
    cache = tmp_path / "c.sqlite3"
    _submit_then_kill(srv, cache, rows_per_request=2)
    submitted = batches.batch_ids()
    assert len(submitted) == 1 and batches.stats()["lines"] == 0
    batches.step = 0
    out = extract(frame(6), srv, batch=True, rows_per_request=2, cache=str(cache))
    assert list(out["name"]) == [f"N{i}" for i in range(6)]
    assert batches.stats()["batches"] == 1 and out.attrs["llm"]["batch_ids"] == submitted
    assert batches.stats()["lines"] == 3  # 5 rows after the setup row: 2, 2, 1
    assert extract(frame(6), srv, cache=str(cache)).attrs["llm"]["requests"] == 0


def test_a_rerun_reattaches_to_a_second_round_of_halved_packs(server_factory, tmp_path):
    # The second batch holds halved packs, grouped unlike any fresh run: its record's rows
    # are what a re-run rebuilds it from.
    srv = server_factory(api_key=KEY, pack_faults={"drop": 0.3}, seed=4)
    batches = FakeBatches.of(srv.app)

    async def wait(seconds: float) -> None:
        if len(batches.batch_ids()) == 2:
            raise KeyboardInterrupt  # stops the run while the second batch waits
        batches.advance(seconds)

    cache = str(tmp_path / "c.sqlite3")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_batch_run, "wait_between", wait)
        with pytest.raises(KeyboardInterrupt):
            extract(frame(25), srv, batch=True, rows_per_request=8, cache=cache)
    first, second = batches.batch_ids()
    assert _pack_sizes(cache)[0] == [8, 8, 8] and max(_pack_sizes(cache)[1]) <= 4
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_batch_run, "wait_between", lambda s: _advance(batches, s))
        out = extract(frame(25), srv, batch=True, rows_per_request=8, cache=cache)
    assert list(out["name"]) == [f"N{i}" for i in range(25)]
    # Re-attached to the waiting second batch: its halved packs were not submitted again.
    assert out.attrs["llm"]["batch_ids"][0] == second
    assert first not in out.attrs["llm"]["batch_ids"]
    assert len(batches.batch_ids()) == len(_pack_sizes(cache))


def test_estimate_puts_batch_packed_beside_the_other_modes(tmp_path):
    # Instructions worth packing: sent once per pack instead of once per row.
    est = frame(11).llm.estimate(
        "Find the person in this note, with the year they were born. " * 20 + "${text}",
        fields={"name": str, "year": int},
        max_tokens=50,
        rows_per_request=5,
        rpm=60,
        cache=str(tmp_path / "c.sqlite3"),
    )
    modes = est.attrs["modes"]
    assert list(modes.index) == ["live", "live packed", "batch", "batch packed"]
    live_packed, batch_packed = modes.loc["live packed"], modes.loc["batch packed"]
    assert batch_packed["requests"] == live_packed["requests"] == 1 + 2
    assert batch_packed["prompt_tokens"] == live_packed["prompt_tokens"]
    assert batch_packed["expected_seconds"] == "within 24 h"
    assert live_packed["expected_seconds"] == 3.0
    # The setup row live; the packs at half the price.
    assert live_packed["cost"] / 2 < batch_packed["cost"] < live_packed["cost"]
    assert batch_packed["cost"] < modes.loc["batch", "cost"]
    assert est["batch_packed_cost"] == batch_packed["cost"]


def test_an_auto_estimate_quotes_the_size_a_batch_run_packs(srv, batches, tmp_path):
    # Live "auto" packs by the rate limits (rpm alone binds: the most rows); a batch is not
    # held to them and packs its fixed size, the one the run then uses.
    df = frame(26)
    options = {"fields": {"name": str, "year": int}, "rows_per_request": "auto", "rpm": 500}
    est = df.llm.estimate("${text}", max_tokens=50, cache=str(tmp_path / "e.sqlite3"), **options)
    assert est["rows_per_request"] == 50 and est["batch_rows_per_request"] == 10
    assert est.attrs["modes"].loc["batch packed", "requests"] == 1 + 3
    out = extract(
        df,
        srv,
        batch=True,
        max_tokens=50,
        cache=str(tmp_path / "c.sqlite3"),
        **{k: v for k, v in options.items() if k != "fields"},
    )
    assert out.attrs["llm"]["rows_per_request"] == est["batch_rows_per_request"]
    assert out.attrs["llm"]["requests"] == est["batch_packed_requests"]


@pytest.mark.parametrize(("provider", "lines"), [("openai", 2), ("anthropic", 4)])
def test_n_samples_of_packed_lines_on_both_protocols(srv, batches, tmp_path, provider, lines):
    # Anthropic has no n: a pack's line per sample, each checked by id on its own.
    df = frame(7)
    options = {"api_key": KEY, **_one_of_each(srv, provider)}
    cache = str(tmp_path / "c.sqlite3")
    out = df.llm.generate(
        "${text}", output="said", n=2, batch=True, rows_per_request=3, cache=cache, **options
    )
    assert len(out) == 14 and out["said"].notna().all()
    assert batches.stats()["lines"] == lines  # 6 rows after the setup row: 2 packs
    again = df.llm.generate("${text}", output="said", n=2, cache=cache, **options)
    assert again.attrs["llm"]["requests"] == 0
    pd.testing.assert_frame_equal(again.drop(columns="llm_error", errors="ignore"), out)


def test_a_batch_that_expired_whole_is_submitted_again_not_read_again(srv, batches, tmp_path):
    # Every line expired: the same lines again have the same digest as the batch read, which
    # must be a new batch, not the expired one re-attached and read a second time.
    batches.window = 600
    df = frame(4, extra={i: ", note=BATCH_EXPIRE" for i in range(1, 4)})
    out = extract(df, srv, batch=True, cache=str(tmp_path / "c.sqlite3"))
    assert list(out["name"]) == [f"N{i}" for i in range(4)]
    facts = out.attrs["llm"]
    assert batches.stats()["batches"] == 2 and len(set(facts["batch_ids"])) == 2
    assert facts["resubmitted_lines"] == 3 and facts["live_fallback_rows"] == 0


async def test_an_anthropic_batch_whose_id_was_never_recorded_is_found_by_size_and_time(
    srv, batches, tmp_path, monkeypatch
):
    # Anthropic's batches keep no metadata: a process killed during the create request leaves
    # a claim without a batch id, and the re-run must find that batch another way.
    batches.step = 10**6
    cache = tmp_path / "c.sqlite3"
    options = {"api_key": KEY, **_one_of_each(srv, "anthropic"), "cache": str(cache)}
    fields = {"name": str, "year": int}
    await _cancelled_while_waiting(
        lambda: frame(6).llm.aextract("${text}", fields, batch=True, **options), monkeypatch
    )
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    with contextlib.closing(sqlite3.connect(cache)) as conn, conn:
        conn.execute(
            "UPDATE batches SET batch_id = NULL, state = 'submitting', owner = ?",
            (f"{socket.gethostname()}:{dead}",),
        )
    batches.step = 0
    monkeypatch.setattr(_batch_run, "wait_between", lambda s: asyncio.sleep(0))
    out = await frame(6).llm.aextract("${text}", fields, batch=True, **options)
    assert list(out["name"]) == [f"N{i}" for i in range(6)]
    assert batches.stats()["batches"] == 1  # found, not submitted again
    assert out.attrs["llm"]["batch_ids"] == batches.batch_ids()
