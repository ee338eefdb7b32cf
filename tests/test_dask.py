"""ddf.llm on Dask: lazy meta, the pandas path per partition, one rate budget per key."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pytest

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("dask.distributed")

import parrot_pandas  # noqa: E402
from parrot_pandas import ConfigurationError, RowsFailedError  # noqa: E402
from parrot_pandas._config import RunConfig  # noqa: E402
from parrot_pandas._limits import LimitInfo  # noqa: E402
from parrot_pandas._structured import output_dtypes  # noqa: E402
from parrot_pandas.dask import _accessor, _hook  # noqa: E402  (after the skips)
from parrot_pandas.dask._budget import (  # noqa: E402
    BudgetHost,
    BudgetService,
    SharedBudget,
    _Limits,
    budget_name,
)
from parrot_pandas.testing._batches import FakeBatches  # noqa: E402

NOWHERE = "http://127.0.0.1:9/v1"  # never contacted: nothing is computed
PACKAGE_ROOT = str(Path(parrot_pandas.__file__).resolve().parents[1])

FIELDS = {"name": str, "year": int, "score": float, "ok": bool, "kind": Literal["a", "b"]}


@pytest.fixture
def ddocs(docs: pd.DataFrame) -> Any:
    return dd.from_pandas(docs, npartitions=2, sort=False)


def _rows(count: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"Row {i}: the quick brown fox." for i in range(count)]},
        index=pd.RangeIndex(count, name="row"),
    )


# -- meta and validation, before anything is computed -----------------------------------------


def test_generate_meta_is_exact_before_compute(ddocs):
    out = ddocs.llm.generate("Say ${title}", output="said", base_url=NOWHERE)
    assert list(out.columns) == ["title", "text", "said"]
    assert out.dtypes["said"] == pd.StringDtype()
    assert out.dtypes["title"] == ddocs.dtypes["title"]
    assert out._meta.index.name == "doc"
    coerced = ddocs.llm.generate("Say ${title}", base_url=NOWHERE, errors="coerce")
    assert list(coerced.columns) == ["title", "text", "output", "llm_error"]
    assert coerced.dtypes["llm_error"] == pd.StringDtype()


def test_extract_meta_has_the_field_dtypes(ddocs):
    out = ddocs.llm.extract("Facts: ${text}", FIELDS, base_url=NOWHERE)
    assert list(out.columns) == ["title", "text", *FIELDS]
    expected = output_dtypes(FIELDS)
    for name in FIELDS:
        assert out.dtypes[name] == expected[name], name
    assert list(out.dtypes["kind"].categories) == ["a", "b"]


def test_known_divisions_are_kept(server):
    ddf = dd.from_pandas(_rows(20), npartitions=4)
    out = ddf.llm.generate("${text}", n=3, base_url=server.url, cache=False)
    assert out.divisions == ddf.divisions
    result = out.compute(scheduler="threads")
    # Each input label is repeated (two distinct echo answers) but stays in its partition.
    assert list(result.index) == [i for i in range(20) for _ in range(2)]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda d: d.llm.generate("Say ${nope}", base_url=NOWHERE), "nope"),
        (lambda d: d.llm.generate("Say ${title}", output="text", base_url=NOWHERE), "already"),
        (lambda d: d.llm.generate("${title}", temprature=0, base_url=NOWHERE), "temperature"),
        (lambda d: d.llm.extract("${title}", {"x": object}, base_url=NOWHERE), "x"),
        (lambda d: d.llm.generate("${title}", chunksize=10, base_url=NOWHERE), "partition"),
    ],
)
def test_configuration_errors_are_raised_on_the_client(ddocs, call, match):
    with pytest.raises(ConfigurationError, match=match):
        call(ddocs)


def test_the_task_graph_does_not_show_the_key(ddocs):
    out = ddocs.llm.generate("${title}", base_url=NOWHERE, api_key="sk-secret-123")
    graph = out.__dask_graph__()
    assert "sk-secret-123" not in repr(dict(graph))
    assert all("sk-secret" not in str(key) for key in graph)


# -- the same answers as pandas ----------------------------------------------------------------


def test_generate_equals_the_pandas_path(docs, server):
    ddf = dd.from_pandas(docs, npartitions=3, sort=False)
    options = {"base_url": server.url, "cache": False, "n": 3}
    out = ddf.llm.generate("Say: ${text}", output="said", **options).compute(scheduler="threads")
    expected = ddf.compute().llm.generate("Say: ${text}", output="said", **options)
    pd.testing.assert_frame_equal(out, expected)


def test_extract_equals_the_pandas_path(docs, server):
    ddf = dd.from_pandas(docs, npartitions=2, sort=False)
    fields = {"name": str, "year": int}
    options = {"base_url": server.url, "cache": False, "errors": "coerce"}
    out = ddf.llm.extract("Facts:\n${text}", fields, **options).compute(scheduler="threads")
    expected = ddf.compute().llm.extract("Facts:\n${text}", fields, **options)
    pd.testing.assert_frame_equal(out, expected)
    assert out["name"].tolist()[:3] == ["Ada", "Alan", "Alonzo"]


def test_failed_rows_coerce_to_llm_error_or_raise(server_factory):
    # The server refuses prompts over 40 tokens (a row-specific 400, not retried).
    server = server_factory(context_window=40)
    df = pd.DataFrame({"text": ["short", "x" * 400, "also short", "fine"]})
    ddf = dd.from_pandas(df, npartitions=2)
    options = {"base_url": server.url, "cache": False}
    out = ddf.llm.generate("${text}", errors="coerce", **options)
    result = out.compute(scheduler="threads")
    assert list(result.columns) == list(out.columns)
    assert result["llm_error"].notna().tolist() == [False, True, False, False]
    assert result["output"].isna().tolist() == [False, True, False, False]
    with pytest.raises(RowsFailedError) as info:
        ddf.llm.generate("${text}", **options).compute(scheduler="threads")
    assert list(info.value.errors.index) == [1]


def test_partitions_in_one_process_share_one_budget(server_factory):
    # 10 requests a second. With a budget per partition, the four setup requests and four
    # bursts of ten would hit the server at once: about 30 of 60 requests answered 429.
    server = server_factory(rpm=600, latency=0.05)
    ddf = dd.from_pandas(_rows(40), npartitions=4)
    out = ddf.llm.generate("${text}", base_url=server.url, cache=False)
    result = out.compute(scheduler="threads")
    assert (result["output"] == "echo: " + result["text"]).all()
    stats = server.stats()
    assert stats["rate_limited"] <= 2, stats


# -- SharedBudget and its host, without Dask's scheduler ---------------------------------------


class FakeHost:
    """Records the calls a SharedBudget makes; answers acquire with fixed limits."""

    def __init__(self, limits: tuple[Any, Any] = (1200.0, None), fail: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.limits = limits
        self.fail = fail

    def __call__(self, method: str, *args: Any) -> concurrent.futures.Future[Any]:
        self.calls.append((method, *args))
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self.fail:
            done.set_exception(OSError("Unable to contact Actor's worker"))
        else:
            done.set_result(self.limits if method == "acquire" else None)
        return done


async def test_reports_ride_on_the_next_acquire():
    host = FakeHost()
    budget = SharedBudget(host)
    info = LimitInfo(limit_requests=1200, remaining_requests=7)
    budget.observe(info)
    budget.settle(100, 80)
    budget.settle(50, 50)  # nothing to correct: not sent
    budget.observe(LimitInfo())  # says nothing: not sent
    await budget.acquire(30)
    assert host.calls == [("acquire", 30, [("observe", info), ("settle", 100, 80)])]
    assert budget.requests_per_second(1.0) == pytest.approx(1200 * 0.98 / 60)
    assert budget.snapshot()["rpm"] == 1200.0


async def test_pause_goes_at_once_and_reports_flush():
    host = FakeHost()
    budget = SharedBudget(host, report_delay=0.0)
    budget.settle(10, 20)
    budget.pause(2.5)
    assert host.calls == [("pause", 2.5, [("settle", 10, 20)])]
    budget.settle(10, 30)
    await asyncio.sleep(0)  # the flush timer (0 s here) fires
    await asyncio.sleep(0)
    assert host.calls[-1] == ("report", [("settle", 10, 30)])
    budget.flush()  # nothing left
    assert len(host.calls) == 2


async def test_unreachable_host_goes_alone_at_its_share(fake_clock):
    lost = []
    limits = _Limits(rpm=None, tpm=None, share=4)
    clock = fake_clock
    budget = SharedBudget(
        FakeHost(fail=True),
        limits=limits,
        on_lost=lambda: lost.append(1),
        clock=clock,
        sleep=clock.sleep,
    )
    limits.rpm = 1200.0  # as learned from an earlier acquire
    budget.observe(LimitInfo(limit_requests=1200, remaining_requests=100))
    await budget.acquire(0)
    assert lost == [1]
    # A quarter of 1200 rpm, and the server's announcement does not lift it.
    assert budget.snapshot()["rpm"] == 300.0
    budget.observe(LimitInfo(limit_requests=1200))
    assert budget.snapshot()["rpm"] == 300.0
    assert "alone at 1/4" in repr(budget)


async def test_alone_from_the_start_takes_the_announced_limit_share():
    budget = SharedBudget(None, limits=_Limits(share=2))
    budget.observe(LimitInfo(limit_requests=600))
    assert budget.snapshot()["rpm"] == 300.0


LOCAL = RunConfig.from_options(base_url="http://127.0.0.1:1/v1", rpm=60)


async def test_local_partitions_share_one_bucket(fake_clock):
    clock, start = fake_clock, fake_clock.now
    with BudgetService(clock=clock, sleep=clock.sleep) as service:
        first, second = service.budget(LOCAL), service.budget(LOCAL)
        await first.acquire(0)  # the bucket holds one request a second: the first takes it
        await second.acquire(0)  # so the other partition waits for the refill
        assert clock.now - start == pytest.approx(60 / (60 * 0.98))
        other = BudgetService(clock=clock, sleep=clock.sleep)
        await other.budget(LOCAL).acquire(0)  # another service, another bucket: no wait
        assert clock.now - start == pytest.approx(60 / (60 * 0.98))
        other.close()


async def test_a_pause_from_one_partition_holds_the_others(fake_clock):
    clock, start = fake_clock, fake_clock.now
    with BudgetService(clock=clock, sleep=clock.sleep) as service:
        first, second = service.budget(LOCAL), service.budget(LOCAL)
        await first.acquire(0)
        first.pause(30.0)  # sent at once, so it reaches the host before the next acquire
        await second.acquire(0)
        assert clock.now - start >= 30.0
        assert max(clock.slept) >= 30.0


def _budget_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "parrot_pandas-budget"}


async def test_the_host_thread_runs_only_while_a_budget_is_held(fake_clock):
    before = _budget_threads()
    clock = fake_clock
    service = BudgetService(clock=clock, sleep=clock.sleep)
    first, second = service.budget(LOCAL), service.budget(LOCAL)
    started = _budget_threads() - before
    assert len(started) == 1 and service.running
    await first.acquire(0)
    first.observe(LimitInfo(limit_requests=600))  # batched: rides on close's flush
    first.close()
    first.close()  # idempotent: the other lease is still held
    assert service.running
    second.close()
    assert not service.running
    assert not any(t.is_alive() for t in started)
    # The budget outlives its thread: the report sent while closing arrived before it stopped.
    third = service.budget(LOCAL)
    await third.acquire(0)
    assert third.snapshot()["rpm"] == 60.0  # the user's 60 is below the announced 600
    assert len(service) == 1
    service.close()
    assert not _budget_threads() - before


async def test_closing_the_service_leaves_a_waiting_partition_going_alone(caplog):
    config = RunConfig.from_options(base_url="http://127.0.0.1:1/v1", rpm=60_000)
    service = BudgetService()
    first, second = service.budget(config), service.budget(config)
    await first.acquire(0)
    first.pause(3600.0)  # the host holds every acquire for an hour
    waiting = asyncio.ensure_future(second.acquire(0))
    await asyncio.sleep(0)  # the acquire is sent to the host
    service.close()
    await asyncio.wait_for(waiting, 5)  # goes alone at once: no hang on a stopped host
    assert "alone at 1/1" in repr(second)
    assert "goes on alone" in caplog.text
    await asyncio.wait_for(first.acquire(0), 5)
    with pytest.raises(RuntimeError, match="closed"):
        service.budget(config)


def test_the_service_remembers_a_bounded_number_of_keys():
    with BudgetService(max_budgets=2) as service:
        for port in (1, 2, 3):
            config = RunConfig.from_options(base_url=f"http://127.0.0.1:{port}/v1")
            service.budget(config).close()
        assert len(service) == 2
    assert len(service) == 0 and service.closed


async def test_host_applies_reports_before_acquiring():
    host = BudgetHost(rpm=None, tpm=None)
    limits = await host.acquire(0, [("observe", LimitInfo(limit_requests=600))])
    assert limits == (600.0, None)
    await host.pause(1.0, [])
    assert (await host.snapshot())["paused_until"] is not None


def test_budget_name_hides_the_key_and_separates_servers():
    def name(**options: Any) -> str:
        return budget_name(RunConfig.from_options(**options))

    base = {"base_url": "http://127.0.0.1:8000/v1", "api_key": "sk-abc"}
    assert "sk-abc" not in name(**base)
    assert name(**base) == name(**base)
    assert name(**base) != name(**{**base, "api_key": "sk-other"})
    assert name(**base) != name(**{**base, "base_url": "http://127.0.0.1:8001/v1"})
    assert name(**base) != name(**base, rpm=100)


# -- registration without importing Dask, and graphs that travel --------------------------------


def _python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter that finds this checkout; its stdout."""
    environ = {**os.environ, "PYTHONPATH": PACKAGE_ROOT, **env}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env=environ,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("dask_first", [False, True])
def test_import_leaves_dask_alone_and_ddf_llm_still_appears(dask_first):
    out = _python(f"""
        import sys
        if {dask_first}:
            import dask.dataframe
        import parrot_pandas
        print("dask.dataframe" in sys.modules)
        import dask.dataframe as dd
        import pandas as pd

        ddf = dd.from_pandas(pd.DataFrame({{"text": ["a"]}}), npartitions=1)
        print(type(ddf.llm).__name__)
        print(sum(type(f).__name__ == "PostImportHook" for f in sys.meta_path))
        print(type(dd.__spec__.loader).__name__)
    """)
    loaded, accessor, hooks, loader = out.split()
    assert loaded == str(dask_first)  # never imported by parrot_pandas itself
    assert accessor == "DaskLLMAccessor"
    assert hooks == "0"  # the hook took itself off sys.meta_path
    assert loader == "SourceFileLoader"  # and left the module's own loader in place


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "parrot_hook_probe"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "sub.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in (name, f"{name}.sub"):
        sys.modules.pop(module, None)


def test_post_import_hook_fires_once_after_the_module_ran(fake_package):
    seen: list[Any] = []
    hook = _hook.PostImportHook(f"{fake_package}.sub", lambda m: seen.append(m.VALUE))
    sys.meta_path.insert(0, hook)
    try:
        importlib.import_module(fake_package)
        assert seen == [] and hook in sys.meta_path  # the package is not the module
        module = importlib.import_module(f"{fake_package}.sub")
        assert seen == [42]
        assert hook not in sys.meta_path
        assert type(module.__loader__).__name__ == "SourceFileLoader"
        importlib.reload(module)
        assert seen == [42]
    finally:
        hook.remove()


def test_a_failing_callback_is_a_warning_not_a_failed_import(fake_package):
    def fail(module: Any) -> None:
        raise ValueError("no accessor today")

    hook = _hook.PostImportHook(f"{fake_package}.sub", fail)
    sys.meta_path.insert(0, hook)
    try:
        with pytest.warns(RuntimeWarning, match="no accessor today"):
            module = importlib.import_module(f"{fake_package}.sub")
        assert module.VALUE == 42
    finally:
        hook.remove()


def test_install_registers_at_once_when_dask_is_imported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _hook.install() is None  # dask.dataframe is imported here: nothing to wait for
    assert not any(isinstance(f, _hook.PostImportHook) for f in sys.meta_path)


@pytest.mark.slow
def test_a_pickled_graph_runs_in_a_fresh_process(server):
    # What a fresh worker does: unpickle the tasks (functions found by module path, which
    # imports parrot_pandas and registers nothing by hand) and run them.
    import cloudpickle

    ddf = dd.from_pandas(_rows(6), npartitions=2)
    out = ddf.llm.generate("${text}", output="answer", base_url=server.url, cache=False)
    payload = cloudpickle.dumps((dict(out.__dask_graph__()), out.__dask_keys__()))
    assert b"parrot_pandas.dask._accessor" in payload
    code = """
        import pickle, sys
        import dask

        graph, keys = pickle.load(sys.stdin.buffer)
        parts = dask.get(graph, keys)
        print(sum(len(p) for p in parts), all((p["answer"] == "echo: " + p["text"]).all()
                                                for p in parts))
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], input=payload, capture_output=True,
        timeout=120, env={**os.environ, "PYTHONPATH": PACKAGE_ROOT},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["6", "True"]
    assert pickle.loads(pickle.dumps(_accessor.llm_generate)) is _accessor.llm_generate


# -- a real cluster: four worker processes, one key ---------------------------------------------


@pytest.fixture
def limited_server() -> Iterator[str]:
    """``python -m parrot_pandas.testing --rpm 1200 --latency 0.2`` in its own process."""
    cmd = [sys.executable, "-m", "parrot_pandas.testing", "--port", "0",
           "--latency", "0.2", "--rpm", "1200"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        url = proc.stdout.readline().strip() if ready else ""
        assert url.startswith("http"), "the test server did not start"
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _server_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_stats", timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=4, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        # Fresh worker processes import pandas, dask.dataframe and parrot_pandas when the first
        # task arrives (seconds on a busy machine): a one-time cost of the cluster, not of the
        # run being timed.
        client.run(importlib.import_module, "parrot_pandas.dask._accessor")
        yield client


def _check_rows(result: pd.DataFrame, rows: int) -> None:
    assert len(result) == rows
    assert result.index.is_unique and sorted(result.index) == list(range(rows))
    assert (result["answer"] == "echo: " + result["text"]).all()


@pytest.mark.slow
def test_four_workers_share_one_budget_at_the_limit(cluster_client, limited_server, tmp_path):
    rows, rpm = 400, 1200
    ddf = dd.from_pandas(_rows(rows), npartitions=8)
    out = ddf.llm.generate(
        "${text}", output="answer", base_url=limited_server, api_key="test-key",
        cache=str(tmp_path / "cache.sqlite3"),
    )  # fmt: skip
    started = time.perf_counter()
    result = out.compute()
    wall = time.perf_counter() - started
    stats = _server_stats(limited_server)
    floor = rows / rpm * 60
    share_429 = stats["rate_limited"] / stats["requests"]
    print(
        f"\ndask 4 workers x 1 thread, {rows} rows / 8 partitions, {rpm} rpm, 0.2 s latency: "
        f"wall {wall:.2f} s, floor {floor:.1f} s, ratio {wall / floor:.3f}; "
        f"server requests {stats['requests']}, 429 {stats['rate_limited']} "
        f"({share_429:.1%}), max in flight {stats['max_in_flight']}"
    )
    _check_rows(result, rows)
    assert stats["ok"] == rows  # every row paid once
    assert share_429 < 0.02
    # The wall time against the floor is benchmarks/dask_bench.py's to check, not a noisy CI's.


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["a worker", "the budget's worker"])
def test_a_dying_worker_loses_no_rows(cluster_client, limited_server, tmp_path, victim):
    client = cluster_client
    client.wait_for_workers(4, timeout=60)
    rows = 200
    cache = tmp_path / "cache.sqlite3"
    ddf = dd.from_pandas(_rows(rows), npartitions=8)
    out = ddf.llm.generate(
        "${text}", output="answer", base_url=limited_server, api_key="test-key",
        cache=str(cache),
    )  # fmt: skip
    name = budget_name(RunConfig.from_options(base_url=limited_server, api_key="test-key"))
    future = client.compute(out)
    holders = _wait_for(
        lambda: client.run_on_scheduler(_actor_holders, name=name),
        future,
        "the budget actor was created",
    )
    # Some answers durable in the cache before the kill: the re-run must read them, not pay.
    _wait_for(lambda: parrot_pandas.cache_info(cache)["entries"] >= 20, future, "20 rows cached")
    busy = {addr for addr, keys in client.processing().items() if keys}
    pids = client.run(os.getpid)
    if victim == "the budget's worker":
        target = holders[0]
    else:
        # A busy worker if the moment offers one (on a loaded machine every busy one may be
        # the budget's), else any other: it holds results or gets the next partitions.
        others = [a for a in sorted(busy) if a not in holders]
        target = (others or [a for a in sorted(pids) if a not in holders])[0]
    os.kill(pids[target], signal.SIGKILL)  # a worker process this test's cluster started
    result = future.result(timeout=120)
    stats = _server_stats(limited_server)
    print(
        f"\nkilled {victim}: server requests {stats['requests']}, answered {stats['ok']}, "
        f"429 {stats['rate_limited']}"
    )
    _check_rows(result, rows)
    # Rows finished before the death came from the cache; at most about a second of answers
    # (those not yet flushed to it) were paid twice.
    assert stats["ok"] <= rows + 40


def _wait_for(condition: Any, future: Any, what: str, timeout: float = 120.0) -> Any:
    """Poll `condition` until it is truthy and return it; fail naming `what`, or the compute's
    own error if it failed (or finished) first: a failure says its real cause."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if future.done():
            if future.status == "error":
                raise AssertionError(f"the compute failed before {what}") from future.exception()
            raise AssertionError(f"the compute finished before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def _actor_holders(dask_scheduler: Any, name: str) -> list[str]:
    task = dask_scheduler.tasks.get(name)
    if task is None or task.state != "memory":
        return []
    return [ws.address for ws in task.who_has or ()]


@pytest.mark.slow
def test_failed_rows_cross_the_cluster(cluster_client, server_factory):
    server = server_factory(context_window=40)
    df = pd.DataFrame({"text": ["short", "x" * 400, "also short", "fine"]})
    ddf = dd.from_pandas(df, npartitions=2)
    out = ddf.llm.generate("${text}", base_url=server.url, cache=False, errors="coerce")
    assert out.compute()["llm_error"].notna().tolist() == [False, True, False, False]
    with pytest.raises(RowsFailedError) as info:
        ddf.llm.generate("${text}", base_url=server.url, cache=False).compute()
    assert list(info.value.errors.index) == [1]
    assert len(info.value.result) == 2  # the failing partition's own partial result


# -- batch=True on a cluster: one batch per partition, submitted once ---------------------------

BATCH_KEY = "sk-dask-batch-0123456789"
BATCH_FIELDS = {"name": str, "year": int}


def _facts(count: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [f"name=N{i}, year={1900 + i}" for i in range(count)]},
        index=pd.RangeIndex(count, name="row"),
    )


@pytest.fixture
def batch_server(server_factory: Any) -> tuple[Any, FakeBatches]:
    """A server with the Batch endpoints whose batches do not move until the test says so."""
    srv = server_factory(api_key=BATCH_KEY)
    batches = FakeBatches.of(srv.app)
    batches.step = 10**6  # a batch stays "validating" until step is set back to 0
    return srv, batches


def _batch_extract(ddf: Any, srv: Any, **options: Any) -> Any:
    options = {"api_key": BATCH_KEY, "base_url": srv.url, "model": "gpt-4o-mini", **options}
    return ddf.llm.extract("${text}", BATCH_FIELDS, **options)


async def test_batch_is_refused_on_a_cluster_of_several_machines(ddocs):
    # Two hosts as far as the scheduler can tell (both are loopback addresses of this one).
    async with (
        distributed.Scheduler(host="127.0.0.1", port=0, dashboard_address=":0") as scheduler,
        distributed.Worker(scheduler.address, host="127.0.0.1", nthreads=1, dashboard=False),
        distributed.Worker(scheduler.address, host="127.0.0.2", nthreads=1, dashboard=False),
        distributed.Client(scheduler.address, asynchronous=True) as client,
    ):
        await client.wait_for_workers(2)
        with pytest.raises(ConfigurationError, match="spread over 2 machines"):
            ddocs.llm.generate("${title}", batch=True, base_url=NOWHERE)
        ddocs.llm.generate("${title}", base_url=NOWHERE)  # live rows may run anywhere


@pytest.mark.slow
def test_every_partition_submits_its_batch_at_once(cluster_client, batch_server, tmp_path):
    srv, batches = batch_server
    ddf = dd.from_pandas(_facts(32), npartitions=8)
    cache = str(tmp_path / "c.sqlite3")  # made by 8 partitions at once
    out = _batch_extract(ddf, srv, batch=True, cache=cache)
    future = cluster_client.compute(out)
    # 8 partitions on 4 one-thread workers: a partition holding its thread while its batch
    # waits would keep the other four from submitting until the first batches end.
    _wait_for(lambda: batches.stats()["batches"] == 8, future, "8 batches submitted", 60)
    batches.step = 0
    result = future.result(timeout=120)
    pd.testing.assert_frame_equal(result, _batch_extract(ddf.compute(), srv, cache=False))
    stats = batches.stats()
    assert stats["batches"] == 8 and stats["lines"] == 32 - 8  # each partition's first row live


@pytest.mark.slow
def test_a_partition_rerun_after_a_worker_died_reattaches_to_its_batch(
    cluster_client, batch_server, tmp_path
):
    client = cluster_client
    client.wait_for_workers(4, timeout=60)
    srv, batches = batch_server
    cache = str(tmp_path / "c.sqlite3")  # made by 8 partitions at once
    ddf = dd.from_pandas(_facts(32), npartitions=8)
    future = client.compute(_batch_extract(ddf, srv, batch=True, cache=cache))
    _wait_for(lambda: batches.stats()["batches"] == 8, future, "8 batches submitted", 60)
    # A worker with partitions waiting for their batches (off its thread pool, still its
    # tasks): killed, they have no result and run again elsewhere.
    waiting = {
        addr: [key for key in keys if "llm_extract" in str(key)]
        for addr, keys in client.processing().items()
    }
    victim = max(sorted(waiting), key=lambda addr: len(waiting[addr]))
    assert waiting[victim], waiting
    os.kill(client.run(os.getpid)[victim], signal.SIGKILL)
    batches.step = 0
    result = future.result(timeout=120)
    pd.testing.assert_frame_equal(result, _batch_extract(ddf.compute(), srv, cache=False))
    assert batches.stats()["batches"] == 8  # re-attached: no partition submitted twice
    # A re-run of the whole call pays nothing: every answer is in the per-row cache.
    requests = srv.stats()["requests"]
    again = client.compute(_batch_extract(ddf, srv, batch=True, cache=cache)).result(timeout=120)
    pd.testing.assert_frame_equal(again, result)
    assert batches.stats()["batches"] == 8 and srv.stats()["requests"] == requests
