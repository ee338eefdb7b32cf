"""Tests for the cache store, its file format, paths and admin helpers, alone and in runs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import math
import multiprocessing
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import pytest

from parrot_pandas import _cache as cache_module
from parrot_pandas import _cache_schema as schema_module
from parrot_pandas import _run as run_module
from parrot_pandas._cache import ResponseCache, open_cache
from parrot_pandas._cache_admin import cache_info, clear_cache
from parrot_pandas._cache_key import request_key
from parrot_pandas._cache_paths import default_cache_path
from parrot_pandas._events import RowsDone
from parrot_pandas.errors import ConfigurationError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX-only")


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "sub" / "responses.sqlite3"


@pytest.fixture
def clock(fake_clock: Any) -> Any:
    # The shared virtual clock (conftest); these tests only read it and move it by hand.
    return fake_clock


@pytest.fixture
def cache(path: pathlib.Path, clock: Any):
    # A long interval and a fake clock: nothing is written unless the test says so.
    with ResponseCache(path, flush_interval=3600, flush_size=1000, clock=clock) as opened:
        yield opened


def stored_rows(path: pathlib.Path) -> int:
    """Rows committed to the file, as another process would see them."""
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM responses").fetchone()[0]


@contextlib.contextmanager
def schema_version(monkeypatch: pytest.MonkeyPatch, version: int) -> Iterator[None]:
    """Inside, a cache is made (or migrated) only up to schema ``version``, as an older
    release left it."""
    with monkeypatch.context() as patched:
        patched.setattr(schema_module, "_MIGRATIONS", schema_module._MIGRATIONS[:version])
        yield


def integrity(path: pathlib.Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def run_python(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, **kwargs
    )


# --------------------------------------------------------------------------- default path


def test_default_path_from_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("PARROT_PANDAS_CACHE", str(tmp_path / "mine.db"))
    assert default_cache_path() == tmp_path / "mine.db"


def test_default_path_from_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("PARROT_PANDAS_CACHE", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "parrot_pandas" / "responses.sqlite3"


@pytest.mark.parametrize("xdg", [None, "", "relative/dir"])
def test_default_path_falls_back_to_dot_cache(monkeypatch, tmp_path, xdg):
    monkeypatch.delenv("PARROT_PANDAS_CACHE", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(pathlib.Path, "home", classmethod(lambda cls: tmp_path))
    if xdg is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    expected = tmp_path / ".cache" / "parrot_pandas" / "responses.sqlite3"
    assert default_cache_path() == expected


def test_default_path_on_macos(monkeypatch, tmp_path):
    monkeypatch.delenv("PARROT_PANDAS_CACHE", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(pathlib.Path, "home", classmethod(lambda cls: tmp_path))
    expected = tmp_path / "Library" / "Caches" / "parrot_pandas" / "responses.sqlite3"
    assert default_cache_path() == expected


def test_default_path_on_windows(monkeypatch, tmp_path):
    monkeypatch.delenv("PARROT_PANDAS_CACHE", raising=False)
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    expected = tmp_path / "parrot_pandas" / "Cache" / "responses.sqlite3"
    assert default_cache_path() == expected


# --------------------------------------------------------------------------- get and put


def test_put_then_get_before_and_after_flush(cache, path):
    assert cache.get("k") is None
    cache.put("k", 0, "answer", model="m", usage=(10, 2))
    assert cache.get("k") == "answer"
    assert cache.get("k", 1) is None
    assert stored_rows(path) == 0
    cache.flush()
    assert stored_rows(path) == 1
    assert cache.get("k") == "answer"


def test_put_replaces_and_records_usage(cache, path):
    cache.put("k", 0, "first", model="m", usage=(10, 2))
    cache.flush()
    cache.put("k", 0, "second", model="m2", usage=(11, 3))
    cache.flush()
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT value, model, prompt_tokens, completion_tokens, created FROM responses"
        ).fetchall()
    assert len(rows) == 1
    value, model, prompt_tokens, completion_tokens, created = rows[0]
    assert (value, model, prompt_tokens, completion_tokens) == ("second", "m2", 11, 3)
    assert abs(created - time.time()) < 60


def test_put_rejects_non_string_answers(cache):
    with pytest.raises(TypeError, match="str"):
        cache.put("k", 0, {"a": 1}, model="m")


def test_get_samples_returns_the_cached_ones_in_order(cache):
    cache.put("k", 2, "two", model="m")
    cache.flush()
    cache.put("k", 0, "zero", model="m")  # still buffered
    cache.put("k", 3, "three", model="m")
    result = cache.get_samples("k", 3)
    assert result == {0: "zero", 2: "two"}
    assert list(result) == [0, 2]
    assert cache.get_samples("other", 3) == {}


def test_get_many_batches_past_the_sqlite_variable_limit(cache):
    keys = [request_key({"row": i}) for i in range(1500)]
    for i, key in enumerate(keys):
        cache.put(key, 0, f"a{i}", model="m")
        if i % 3 == 0:
            cache.put(key, 1, f"b{i}", model="m")
    cache.flush()
    cache.put(keys[1], 1, "late", model="m")  # buffered answers count too

    statements: list[str] = []
    cache._reader.set_trace_callback(statements.append)
    missing = [request_key({"missing": i}) for i in range(100)]
    found = cache.get_many(keys + missing + keys[:10], n=2)
    cache._reader.set_trace_callback(None)

    assert len([s for s in statements if s.lstrip().startswith("SELECT")]) == 4  # 1600 / 500
    assert set(found) == set(keys)
    assert found[keys[0]] == {0: "a0", 1: "b0"}
    assert found[keys[1]] == {0: "a1", 1: "late"}
    assert found[keys[2]] == {0: "a2"}
    assert cache.get_many(keys[:5], n=1)[keys[0]] == {0: "a0"}
    assert cache.get_many([]) == {}


def test_a_commit_larger_than_one_insert_statement_writes_every_row(path, monkeypatch):
    monkeypatch.setattr(cache_module, "_ROWS_PER_INSERT", 3)  # as old SQLite's limit, smaller
    with ResponseCache(path, flush_size=10) as cache:
        for i in range(10):
            cache.put(f"k{i}", i % 2, f"v{i}", model="m", usage=(i, i))
    assert stored_rows(path) == 10
    with ResponseCache(path) as cache:
        assert cache.get("k7", 1) == "v7"


def test_an_answer_with_a_lone_surrogate_is_left_out_and_the_rest_written(cache, path):
    # json.loads turns a server's broken "\\ud83d" escape into a lone surrogate, which SQLite
    # text cannot hold.
    cache.put("good", 0, "fine ☕", model="m")
    cache.put("broken", 0, "half an emoji \ud83d", model="m")
    cache.flush()
    assert cache.writable
    assert stored_rows(path) == 1
    cache.put("later", 0, "still written", model="m")
    cache.flush()
    assert stored_rows(path) == 2


def test_threads_share_one_cache(cache, path):
    def work(worker: int) -> None:
        for i in range(200):
            cache.put(f"{worker}-{i}", 0, "v", model="m")
            cache.get(f"{worker}-{i // 2}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.flush()
    assert stored_rows(path) == 800


# --------------------------------------------------------------------------- buffering


def test_flush_when_the_buffer_is_full(path, clock):
    with ResponseCache(path, flush_interval=3600, flush_size=3, clock=clock) as cache:
        cache.put("a", 0, "v", model="m")
        cache.put("b", 0, "v", model="m")
        assert stored_rows(path) == 0
        cache.put("c", 0, "v", model="m")
        assert stored_rows(path) == 3


def test_flush_when_the_interval_has_passed(path, clock):
    with ResponseCache(path, flush_interval=60, flush_size=1000, clock=clock) as cache:
        cache.put("a", 0, "v", model="m")
        clock.now += 59
        cache.put("b", 0, "v", model="m")
        assert stored_rows(path) == 0
        clock.now += 1
        cache.put("c", 0, "v", model="m")
        assert stored_rows(path) == 3
        cache.put("d", 0, "v", model="m")  # the interval restarts at each write
        assert stored_rows(path) == 3


def test_close_flushes_is_idempotent_and_final(path, clock):
    cache = ResponseCache(path, flush_interval=3600, clock=clock)
    cache.put("a", 0, "v", model="m")
    cache.close()
    cache.close()
    assert cache.closed
    assert stored_rows(path) == 1
    assert "closed" in repr(cache)
    with pytest.raises(ValueError, match="closed"):
        cache.get("a")
    with pytest.raises(ValueError, match="closed"):
        cache.put("b", 0, "v", model="m")
    cache.flush()  # nothing to do, no error


def test_answers_persist_across_instances(path):
    with ResponseCache(path) as first:
        first.put("k", 0, "kept", model="m")
    with ResponseCache(path) as second:
        assert second.get("k") == "kept"
        assert len(second) == 1


def test_repr_shows_path_and_count_only(cache, path):
    cache.put("k", 0, "a secret answer", model="m")
    cache.flush()
    cache.put("k", 0, "replaced", model="m")
    cache.put("k2", 0, "new", model="m")
    text = repr(cache)
    assert str(path) in text
    assert "entries=2" in text
    assert "secret" not in text


@pytest.mark.parametrize(
    "kwargs",
    [{"flush_interval": -1}, {"flush_size": 0}, {"lock_timeout": -1}, {"lock_timeout": math.inf}],
    ids=["interval", "size", "lock", "lock-inf"],
)
def test_bad_buffer_settings(path, kwargs):
    with pytest.raises(ConfigurationError):
        ResponseCache(path, **kwargs)


# --------------------------------------------------------------------------- schema


def test_migrations_set_user_version_and_schema(path):
    ResponseCache(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema_module._MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'responses'").fetchone()[0]
        indexes = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'responses'"
            )
        }
    # A rowid table (rows appended in order) with (key, sample) unique: see _m002.
    assert "WITHOUT ROWID" not in sql and "UNIQUE (key, sample)" in sql
    assert {"responses_model", "responses_created"} <= indexes
    ResponseCache(path).close()  # reopening runs nothing twice


def test_a_new_migration_runs_once_on_an_old_file(path, monkeypatch):
    ResponseCache(path).close()
    calls = []

    def m002_example(conn):
        calls.append(1)
        conn.execute("ALTER TABLE responses ADD COLUMN extra TEXT")

    latest = len(schema_module._MIGRATIONS)
    monkeypatch.setattr(schema_module, "_MIGRATIONS", [*schema_module._MIGRATIONS, m002_example])
    ResponseCache(path).close()
    ResponseCache(path).close()
    assert calls == [1]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest + 1


def test_a_failing_migration_leaves_the_file_as_it_was(path, monkeypatch):
    ResponseCache(path).close()

    def m002_broken(conn):
        conn.execute("ALTER TABLE responses ADD COLUMN extra TEXT")
        raise RuntimeError("boom")

    latest = len(schema_module._MIGRATIONS)
    monkeypatch.setattr(schema_module, "_MIGRATIONS", [*schema_module._MIGRATIONS, m002_broken])
    with pytest.raises(RuntimeError, match="boom"):
        ResponseCache(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
        columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
    assert "extra" not in columns


def test_a_version_1_file_moves_to_a_rowid_table_with_every_row(path, monkeypatch):
    # A file as version 1 left it: responses WITHOUT ROWID, keyed by (key, sample).
    with schema_version(monkeypatch, 1), ResponseCache(path) as old:
        old.put("k1", 0, "first", model="gpt-4o-mini", usage=(10, 2))
        old.put("k1", 1, "second ☕", model="gpt-4o-mini", usage=(10, 3))
        old.put("k2", 0, "x" * 5000, model="gpt-4o", usage=None)
    _backdate(path, "k2", days=3)
    columns = "key, sample, value, model, prompt_tokens, completion_tokens, created"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        before = sorted(conn.execute(f"SELECT {columns} FROM responses").fetchall())

    with ResponseCache(path) as cache:
        assert cache.get_many(["k1", "k2"], 2) == {
            "k1": {0: "first", 1: "second ☕"},
            "k2": {0: "x" * 5000},
        }
        cache.put("k1", 0, "replaced", model="gpt-4o-mini")  # the unique pair still replaces
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(schema_module._MIGRATIONS)
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'responses'").fetchone()[0]
        after = sorted(conn.execute(f"SELECT {columns} FROM responses").fetchall())
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0  # compacted
    assert "WITHOUT ROWID" not in sql
    assert [row[:2] for row in after] == [row[:2] for row in before]
    assert after[1:] == before[1:]  # every row intact but the one replaced
    assert after[0][2] == "replaced"
    assert cache_info(path)["models"] == {"gpt-4o-mini": 2, "gpt-4o": 1}
    assert clear_cache(path, older_than=datetime.timedelta(days=1)) == 1  # k2, backdated


def test_a_file_from_a_newer_version_is_refused(path):
    ResponseCache(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(ConfigurationError, match="newer parrot_pandas"):
        ResponseCache(path)


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("these are my notes, not a database " * 20)
    before = bogus.read_bytes()
    with pytest.raises(ConfigurationError, match="not an SQLite database") as info:
        ResponseCache(bogus)
    assert str(bogus) in str(info.value)
    assert bogus.read_bytes() == before


# --------------------------------------------------------------------------- processes


def _write_entries(path: str, worker: int, count: int, barrier) -> None:
    # Both writers open the fresh file at the same moment, racing the WAL switch and
    # the first migration as two notebooks started together would.
    barrier.wait()
    with ResponseCache(path, flush_size=100) as cache:
        for i in range(count):
            cache.put(f"w{worker}-{i}", 0, f"answer {worker} {i}", model=f"m{worker}")


def test_two_processes_write_one_file(tmp_path):
    path = tmp_path / "shared.sqlite3"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    workers = [
        ctx.Process(target=_write_entries, args=(str(path), w, 2000, barrier)) for w in (1, 2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert stored_rows(path) == 4000
    assert integrity(path) == "ok"
    assert cache_info(path)["models"] == {"m1": 2000, "m2": 2000}


@POSIX_ONLY
def test_sigkill_keeps_everything_flushed_before(tmp_path):
    path = tmp_path / "killed.sqlite3"
    child = run_python(
        f"""
        import os, signal, time
        from parrot_pandas._cache import ResponseCache

        cache = ResponseCache({str(path)!r}, flush_interval=3600, flush_size=10**6)
        for i in range(100):
            cache.put(f"flushed-{{i}}", 0, "v", model="m")
        cache.flush()
        for i in range(10):
            cache.put(f"buffered-{{i}}", 0, "v", model="m")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert integrity(path) == "ok"
    with ResponseCache(path) as cache:
        found = cache.get_many([f"flushed-{i}" for i in range(100)])
        assert len(found) == 100
        # What was still in memory is the loss the flush interval bounds.
        assert cache.get("buffered-0") is None


@POSIX_ONLY
def test_sigkill_after_the_durable_callback_loses_nothing(tmp_path):
    # In an event loop nobody calls flush: the loop's own timer commits, and when_durable
    # says when. What it has reported survives a kill -9.
    path = tmp_path / "quiet.sqlite3"
    child = run_python(
        f"""
        import asyncio, os, signal
        from parrot_pandas._cache import ResponseCache

        async def main():
            cache = ResponseCache({str(path)!r})
            for i in range(10):
                cache.put(f"k{{i}}", 0, "v", model="m")
            cache.when_durable(lambda: print("durable", flush=True))
            await asyncio.Event().wait()

        asyncio.run(main())
        """,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline().strip() == "durable"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.stdout.close()
    assert stored_rows(path) == 10


@POSIX_ONLY
def test_sigkill_in_the_middle_of_writing_leaves_a_readable_file(tmp_path):
    path = tmp_path / "busy.sqlite3"
    child = run_python(
        f"""
        import sys
        from parrot_pandas._cache import ResponseCache

        cache = ResponseCache({str(path)!r}, flush_interval=3600, flush_size=10**6)
        i = 0
        while True:
            for _ in range(50):
                cache.put(f"k{{i}}", 0, "x" * 200, model="m")
                i += 1
            cache.flush()
            print(i, flush=True)
        """,
        stdout=subprocess.PIPE,
    )
    try:
        for line in child.stdout:
            flushed = int(line)
            if flushed >= 2000:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert integrity(path) == "ok"
    rows = stored_rows(path)
    assert rows >= flushed
    assert rows % 50 == 0  # each batch is one transaction: all of it or none
    assert cache_info(path)["entries"] == rows


# --------------------------------------------------------------------------- info and clear


def _backdate(path: pathlib.Path, key: str, days: float) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE responses SET created = ? WHERE key = ?", (time.time() - days * 86400, key)
        )


@pytest.fixture
def filled(path) -> pathlib.Path:
    with ResponseCache(path) as cache:
        for i in range(3):
            cache.put(f"mini-{i}", 0, "v", model="gpt-4o-mini")
        cache.put("big-0", 0, "v", model="gpt-4o")
        cache.put("big-0", 1, "w", model="gpt-4o")
    _backdate(path, "mini-0", days=40)
    _backdate(path, "big-0", days=10)
    return path


def test_cache_info_of_a_missing_file_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "responses.sqlite3"
    info = cache_info(missing)
    assert info == {
        "path": missing,
        "size_bytes": 0,
        "entries": 0,
        "models": {},
        "oldest": None,
        "newest": None,
    }
    assert not missing.parent.exists()


def test_cache_info_counts_by_model(filled):
    info = cache_info(filled)
    assert info["path"] == filled
    assert info["entries"] == 5
    assert info["models"] == {"gpt-4o-mini": 3, "gpt-4o": 2}
    assert info["size_bytes"] >= filled.stat().st_size > 0
    now = datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=39) < now - info["oldest"] < datetime.timedelta(days=41)
    assert now - info["newest"] < datetime.timedelta(minutes=5)


def test_cache_info_uses_the_default_path(monkeypatch, filled):
    monkeypatch.setenv("PARROT_PANDAS_CACHE", str(filled))
    assert cache_info()["entries"] == 5


def test_clear_cache_by_model(filled):
    assert clear_cache(filled, model="gpt-4o") == 2
    assert cache_info(filled)["models"] == {"gpt-4o-mini": 3}


@pytest.mark.parametrize(
    ("older_than", "deleted"),
    [(datetime.timedelta(days=30), 1), (5 * 86400.0, 3), (datetime.timedelta(days=50), 0)],
)
def test_clear_cache_by_age(filled, older_than, deleted):
    assert clear_cache(filled, older_than=older_than) == deleted
    assert cache_info(filled)["entries"] == 5 - deleted


def test_clear_cache_by_model_and_age(filled):
    assert clear_cache(filled, model="gpt-4o-mini", older_than=datetime.timedelta(days=5)) == 1


def test_clear_cache_everything(filled, monkeypatch):
    monkeypatch.setenv("PARROT_PANDAS_CACHE", str(filled))
    assert clear_cache() == 5
    assert cache_info(filled)["entries"] == 0
    assert integrity(filled) == "ok"


def test_clear_cache_of_a_missing_file_creates_nothing(tmp_path):
    missing = tmp_path / "responses.sqlite3"
    assert clear_cache(missing) == 0
    assert not missing.exists()


@pytest.mark.parametrize("older_than", [-1, datetime.timedelta(days=-1), "30d", True])
def test_clear_cache_rejects_bad_ages(filled, older_than):
    with pytest.raises(ConfigurationError, match="older_than"):
        clear_cache(filled, older_than=older_than)


# --------------------------------------------------------------------------- open_cache


def test_open_cache_true_uses_the_default_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PARROT_PANDAS_CACHE", str(tmp_path / "deep" / "default.db"))
    cache = open_cache(True)
    try:
        assert cache.path == tmp_path / "deep" / "default.db"
        assert cache.path.exists()
    finally:
        cache.close()


@pytest.mark.parametrize("setting", [False, None])
def test_open_cache_off(setting):
    assert open_cache(setting) is None


@pytest.mark.parametrize("as_type", [str, pathlib.Path])
def test_open_cache_with_a_path(tmp_path, as_type):
    cache = open_cache(as_type(tmp_path / "mine.db"))
    try:
        assert cache.path == tmp_path / "mine.db"
    finally:
        cache.close()


@pytest.mark.parametrize("setting", [1, 0, "", b"yes", ["a.db"], 3.5])
def test_open_cache_rejects_anything_else(setting):
    with pytest.raises(ConfigurationError, match="cache must be True, False or a path, got"):
        open_cache(setting)


def test_open_cache_readonly_never_creates_a_file(tmp_path):
    missing = tmp_path / "nowhere" / "responses.sqlite3"
    assert open_cache(missing, readonly=True) is None
    assert not missing.parent.exists()
    empty = tmp_path / "empty.sqlite3"
    empty.touch()
    assert open_cache(empty, readonly=True) is None
    assert empty.read_bytes() == b""


def test_open_cache_readonly_reads_and_refuses_to_write(path):
    with ResponseCache(path) as cache:
        cache.put("k", 0, "kept", model="m")
    before = path.read_bytes()
    cache = open_cache(path, readonly=True)
    try:
        assert cache.get_many(["k", "other"]) == {"k": {0: "kept"}}
        with pytest.raises(ValueError, match="read-only"):
            cache.put("k2", 0, "v", model="m")
        cache.flush()  # nothing to do
    finally:
        cache.close()
    assert path.read_bytes() == before


def test_open_cache_readonly_leaves_an_old_file_unmigrated(path, monkeypatch):
    # An estimate reads a cache written by an older version as it is: no migration, no
    # VACUUM, no WAL switch (the bug: estimate ran migrations and compacted the file).
    with schema_version(monkeypatch, 1), ResponseCache(path) as old:
        old.put("k", 0, "v1 answer", model="m")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode = DELETE")  # as a copied file may come
    before = path.read_bytes()
    cache = open_cache(path, readonly=True)
    try:
        assert cache.get("k") == "v1 answer"
    finally:
        cache.close()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# --------------------------------------------------------------------------- whose file


def _foreign_database(path: pathlib.Path, *, wal: bool = False) -> bytes:
    """Someone's own app.db: an SQLite database with their tables, not ours."""
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO users (name) VALUES (?)", [("ada",), ("alan",)])
    conn.commit()
    conn.close()
    return path.read_bytes()


@pytest.mark.parametrize("wal", [False, True], ids=["rollback-journal", "wal"])
def test_a_foreign_database_is_refused_and_left_byte_for_byte(tmp_path, wal):
    foreign = tmp_path / "app.db"
    before = _foreign_database(foreign, wal=wal)
    for attempt in (
        lambda: ResponseCache(foreign),
        lambda: open_cache(foreign),
        lambda: open_cache(foreign, readonly=True),
        lambda: cache_info(foreign),
        lambda: clear_cache(foreign),
    ):
        with pytest.raises(ConfigurationError, match="not a parrot_pandas cache") as info:
            attempt()
        assert str(foreign) in str(info.value)
        assert "cache=False" in str(info.value)
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, no -shm


def test_a_foreign_database_with_a_table_named_responses_is_refused(tmp_path):
    foreign = tmp_path / "app.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE responses (id INTEGER, body TEXT)")
        conn.execute("PRAGMA user_version = 2")
    before = foreign.read_bytes()
    with pytest.raises(ConfigurationError, match="not a parrot_pandas cache"):
        ResponseCache(foreign)
    assert foreign.read_bytes() == before


def test_a_new_file_is_marked_as_ours(path):
    ResponseCache(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == schema_module.APPLICATION_ID


def test_an_empty_file_is_ours_to_initialise(tmp_path):
    empty = tmp_path / "made-by-touch.sqlite3"
    empty.touch()
    with ResponseCache(empty) as cache:
        cache.put("k", 0, "v", model="m")
    assert cache_info(empty)["entries"] == 1


def test_a_cache_from_before_the_mark_is_still_ours_and_gets_marked(path, monkeypatch):
    with schema_version(monkeypatch, 2), ResponseCache(path) as old:
        old.put("k", 0, "kept", model="m")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == 0
    assert cache_info(path)["entries"] == 1  # recognised read-only, without the mark
    with ResponseCache(path) as cache:
        assert cache.get("k") == "kept"
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA application_id").fetchone()[0] == schema_module.APPLICATION_ID


def test_a_truncated_cache_is_refused_naming_the_path(path):
    with ResponseCache(path) as cache:
        for i in range(2000):
            cache.put(f"k{i}", 0, "x" * 500, model="m")
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)
    for attempt in (lambda: ResponseCache(path), lambda: open_cache(path, readonly=True)):
        with pytest.raises(ConfigurationError) as info:
            attempt()
        assert str(path) in str(info.value)
        assert "delete it" in str(info.value)


def _readonly_attempt(path: pathlib.Path) -> str:
    """Open ``path`` for writing as a user who may only read it; return the error message.

    As root every file is writable, so a child process drops to the ``nobody`` user once
    everything it needs is imported.
    """
    code = f"""
        import os, sys
        from parrot_pandas._cache import open_cache
        from parrot_pandas.errors import ConfigurationError

        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        try:
            open_cache({str(path)!r}).close()
        except ConfigurationError as exc:
            print(exc)
        else:
            print("opened")
        """
    child = run_python(code, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    return out.strip()


@POSIX_ONLY
def test_a_read_only_cache_file_is_refused_naming_the_path():
    # Not under tmp_path: pytest keeps its folders private to root, and the child that tries
    # the file as a plain user must reach it.
    with tempfile.TemporaryDirectory() as top:
        folder = pathlib.Path(top) / "shared"
        folder.mkdir()
        path = folder / "responses.sqlite3"
        with ResponseCache(path) as cache:
            cache.put("k", 0, "v", model="m")
        if os.geteuid() == 0:
            # The folder and file belong to the user the child runs as, like a user's own.
            os.chmod(top, 0o755)
            for item in (folder, *folder.iterdir()):
                os.chown(item, 65534, 65534)
        before = path.read_bytes()
        path.chmod(0o444)
        message = _readonly_attempt(path)
        assert "read-only" in message and str(path) in message and "cache=False" in message
        assert path.read_bytes() == before


# --------------------------------------------------------------------------- in an event loop


def _inserts(cache: ResponseCache) -> list[tuple[str, int]]:
    """Record (thread name, statement) for every INSERT the cache's writer connection runs."""
    seen: list[tuple[str, int]] = []

    def trace(statement: str) -> None:
        if statement.startswith("INSERT"):
            seen.append((threading.current_thread().name, statement))

    cache._writer.set_trace_callback(trace)
    return seen


async def test_a_put_in_a_loop_is_committed_by_the_loop_timer_in_the_writer_thread(path):
    with ResponseCache(path, flush_interval=0.05) as cache:
        inserts = _inserts(cache)
        loop = asyncio.get_running_loop()
        durable = asyncio.Event()
        cache.put("a", 0, "v", model="m")
        # No thread of its own: the commit is a call_later on this loop, flush_interval away.
        assert cache._timer is not None
        assert cache._timer.when() - loop.time() == pytest.approx(0.05, abs=0.02)
        assert stored_rows(path) == 0

        def check() -> None:
            # Called only once the answer is committed: another connection sees it.
            assert stored_rows(path) == 1
            durable.set()

        cache.when_durable(check)
        await asyncio.wait_for(durable.wait(), 10)
        assert cache._timer is None
        assert inserts and all(name.startswith("parrot_pandas-cache") for name, _ in inserts)
        assert threading.current_thread().name not in {name for name, _ in inserts}


async def test_puts_during_a_commit_go_into_the_next_commit(path):
    ResponseCache(path).close()
    with ResponseCache(path, flush_interval=0) as cache:
        inserts = _inserts(cache)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the first commit waits for this lock
        try:
            cache.put("a", 0, "v", model="m")
            while not cache._writing:  # the writer thread took "a" and waits for the lock
                await asyncio.sleep(0.005)
            cache.put("b", 0, "v", model="m")
            cache.put("c", 0, "v", model="m")
            assert cache.get_many(["a", "b", "c"]) == {k: {0: "v"} for k in "abc"}
        finally:
            other.execute("ROLLBACK")
            other.close()
        await asyncio.wait_for(cache.drain(), 10)
        assert len(inserts) == 2  # a, then b and c together
        assert "'a'" in inserts[0][1] and "'b'" not in inserts[0][1]
        assert "'b'" in inserts[1][1] and "'c'" in inserts[1][1]
        assert stored_rows(path) == 3


async def test_when_durable_fires_in_order_and_drain_waits_for_all(path):
    with ResponseCache(path, flush_interval=3600) as cache:
        order: list[str] = []
        cache.when_durable(lambda: order.append("nothing waiting"))
        assert order == ["nothing waiting"]
        cache.put("a", 0, "v", model="m")
        cache.when_durable(lambda: order.append(f"a: {stored_rows(path)} stored"))
        cache.put("b", 0, "v", model="m")
        cache.when_durable(lambda: order.append(f"b: {stored_rows(path)} stored"))
        assert order == ["nothing waiting"]
        await asyncio.wait_for(cache.drain(), 10)  # commits now, not an hour from now
        assert order == ["nothing waiting", "a: 2 stored", "b: 2 stored"]


async def test_close_writes_what_the_loop_had_not_committed_yet(path):
    cache = ResponseCache(path, flush_interval=3600)
    cache.put("a", 0, "v", model="m")
    dropped: list[int] = []
    cache.when_durable(lambda: dropped.append(1))
    cache.close()
    assert stored_rows(path) == 1
    assert dropped == []  # the run is over: nobody is counting rows any more


# --------------------------------------------------------------------------- failed writes


@contextlib.contextmanager
def write_lock_held(path: pathlib.Path) -> Iterator[Callable[[], None]]:
    """Another process holds the file's write lock (an open BEGIN IMMEDIATE) until released."""
    holder = run_python(
        f"""
        import sqlite3, sys
        conn = sqlite3.connect({str(path)!r}, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
        sys.stdin.readline()
        conn.execute("ROLLBACK")
        """,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            holder.stdin.write("\n")
            holder.stdin.flush()

    try:
        assert holder.stdout.readline().strip() == "locked"
        yield release
    finally:
        try:
            release()
            holder.wait(timeout=30)
        finally:
            holder.kill()
            holder.stdin.close()
            holder.stdout.close()


def _cache_warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "parrot_pandas" and r.levelno == logging.WARNING and "cache" in r.getMessage()
    ]


async def test_a_failed_commit_keeps_answers_in_memory_warns_once_and_never_blocks(path, caplog):
    ResponseCache(path).close()
    with write_lock_held(path):
        cache = ResponseCache(path, flush_interval=0, lock_timeout=0.5)
        ticks = 0
        durable = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not durable.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        with pytest.warns(RuntimeWarning, match="could not write") as warned:
            cache.put("a", 0, "first", model="m")
            cache.when_durable(durable.set)  # still called: the answer is held in memory
            await asyncio.wait_for(durable.wait(), 10)
            await ticker
            cache.put("b", 0, "second", model="m")
            fired: list[int] = []
            cache.when_durable(lambda: fired.append(1))
            assert fired == [1]
            await asyncio.wait_for(cache.drain(), 10)
            cache.flush()
            cache.close()
        assert ticks >= 10  # the loop kept running through the 0.5 s wait for the lock
    assert len([w for w in warned if "could not write" in str(w.message)]) == 1
    assert len(_cache_warnings(caplog)) == 1
    assert str(path) in _cache_warnings(caplog)[0]
    assert stored_rows(path) == 0


async def test_after_a_failed_commit_reads_still_find_every_answer(path):
    ResponseCache(path).close()
    with write_lock_held(path):
        with pytest.warns(RuntimeWarning):
            with ResponseCache(path, flush_interval=0, lock_timeout=0.1) as cache:
                cache.put("a", 0, "first", model="m")
                await asyncio.wait_for(cache.drain(), 10)
                assert not cache.writable
                keys = [f"k{i}" for i in range(3000)]
                for key in keys:
                    cache.put(key, 0, key.upper(), model="m")
                found = cache.get_many(["a", *keys], 1)
                assert found["a"] == {0: "first"}
                assert all(found[key] == {0: key.upper()} for key in keys)


def test_a_failed_sync_flush_warns_and_does_not_raise(path):
    ResponseCache(path).close()
    with write_lock_held(path):
        with pytest.warns(RuntimeWarning, match="could not write"):
            cache = ResponseCache(path, flush_size=1, lock_timeout=0.1)
            cache.put("a", 0, "v", model="m")  # flush_size=1: commits in place, and fails
        assert cache.get("a") == "v"
        cache.close()


# --------------------------------------------------------------------------- in a run


class RowsCounted:
    """Stands in for the progress bar: what it would count as done, as it happens."""

    def __init__(self) -> None:
        self.done = 0

    def __call__(self, event: object) -> None:
        if isinstance(event, RowsDone):
            self.done += event.rows

    def close(self, facts: object = None) -> None:
        pass


@pytest.fixture
def bar(monkeypatch) -> RowsCounted:
    counted = RowsCounted()
    monkeypatch.setattr(run_module, "progress_listener", lambda setting, total: counted)
    return counted


def _frame(rows: int, width: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"t": [f"row {i} " + "x" * width for i in range(rows)]})


def test_a_run_whose_cache_stays_locked_returns_every_answer_and_warns_once(
    server_factory, path, monkeypatch, caplog
):
    # Another process holds the write lock for the whole run, past the bound: every commit
    # would fail. The run must neither raise a raw sqlite3 error nor ignore errors="coerce".
    monkeypatch.setattr(cache_module, "LOCK_TIMEOUT_S", 0.3)
    server = server_factory()
    ResponseCache(path).close()
    df = _frame(40)
    with write_lock_held(path), pytest.warns(RuntimeWarning, match="could not write") as warned:
        out = df.llm.generate(
            "${t}", base_url=server.url, cache=str(path), errors="coerce", max_concurrency=4
        )
    assert out["output"].tolist() == [f"echo: {t}" for t in df["t"]]
    assert out["llm_error"].isna().all()
    assert out.attrs["llm"]["done_rows"] == 40
    assert len([w for w in warned if "could not write" in str(w.message)]) == 1
    assert len(_cache_warnings(caplog)) == 1
    assert stored_rows(path) == 0


@POSIX_ONLY
def test_a_run_on_a_full_disk_returns_every_answer_and_warns_once(server_factory, tmp_path):
    # A real failing write: the child may not grow files past 192 KiB (RLIMIT_FSIZE), so the
    # cache's WAL hits the wall part-way through a run of 300 answers of ~2 KB.
    server = server_factory(latency=0.01)
    path = tmp_path / "full.sqlite3"
    child = run_python(
        f"""
        import json, logging, resource, signal, warnings
        import pandas as pd
        import parrot_pandas

        warnings.simplefilter("always")
        logged = []
        handler = logging.Handler()
        handler.emit = lambda record: logged.append(record.getMessage())
        logging.getLogger("parrot_pandas").addHandler(handler)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (192 * 1024, 192 * 1024))

        df = pd.DataFrame({{"t": [f"row {{i}} " + "x" * 2000 for i in range(300)]}})
        with warnings.catch_warnings(record=True) as caught:
            out = df.llm.generate("${{t}}", base_url={server.url!r}, cache={str(path)!r},
                                  errors="coerce", progress=False, max_concurrency=4)
        print(json.dumps({{
            "answers": int((out["output"] == "echo: " + df["t"]).sum()),
            "errors": int(out["llm_error"].notna().sum()),
            "done": out.attrs["llm"]["done_rows"],
            "warned": [str(w.message) for w in caught if "cache" in str(w.message)],
            "logged": [m for m in logged if "cache" in m],
        }}))
        """,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    result = json.loads(out)
    assert (result["answers"], result["errors"], result["done"]) == (300, 0, 300)
    assert len(result["warned"]) == 1 and len(result["logged"]) == 1, result
    assert "could not write" in result["warned"][0] and str(path) in result["warned"][0]
    assert 0 < stored_rows(path) < 300  # what fitted was kept; the rest was held in memory
    assert integrity(path) == "ok"


def test_requests_keep_going_out_while_another_process_holds_the_lock(server_factory, path, bar):
    # While the lock is held, the run keeps sending (cache I/O is off the event loop) and
    # counts no row as done (none is on disk). Released, every row is written, then done.
    server = server_factory(latency=0.05)
    ResponseCache(path).close()
    rows = 60
    seen: dict[str, object] = {}

    def watch(release: Callable[[], None]) -> None:
        deadline = time.monotonic() + 15
        while server.stats()["ok"] < rows and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["served"] = server.stats()["ok"]
        seen["done"] = bar.done
        seen["stored"] = stored_rows(path)
        release()

    df = _frame(rows)
    with write_lock_held(path) as release:
        watcher = threading.Thread(target=watch, args=(release,))
        watcher.start()
        try:
            out = df.llm.generate("${t}", base_url=server.url, cache=str(path), max_concurrency=4)
        finally:
            watcher.join()
    assert seen == {"served": rows, "done": 0, "stored": 0}
    assert out["output"].tolist() == [f"echo: {t}" for t in df["t"]]
    assert bar.done == out.attrs["llm"]["done_rows"] == rows
    assert stored_rows(path) == rows


def test_no_row_is_done_before_its_answer_is_on_disk(server_factory, path, bar, monkeypatch):
    server = server_factory(latency=0.01)
    checked: list[tuple[int, int]] = []

    def counted(event: object) -> None:
        if isinstance(event, RowsDone) and not event.cached:
            checked.append((bar.done + event.rows, stored_rows(path)))
        RowsCounted.__call__(bar, event)

    monkeypatch.setattr(run_module, "progress_listener", lambda setting, total: counted)
    counted.close = bar.close  # type: ignore[attr-defined]
    _frame(30).llm.generate("${t}", base_url=server.url, cache=str(path), max_concurrency=4)
    assert checked and all(done <= stored for done, stored in checked)


def test_a_run_with_a_foreign_cache_file_sends_nothing_and_leaves_it_alone(server, tmp_path):
    foreign = tmp_path / "app.db"
    before = _foreign_database(foreign)
    df = _frame(3)
    for call in (
        lambda: df.llm.generate("${t}", base_url=server.url, cache=str(foreign)),
        lambda: df.llm.estimate("${t}", base_url=server.url, cache=str(foreign)),
    ):
        with pytest.raises(ConfigurationError, match="not a parrot_pandas cache") as info:
            call()
        assert str(foreign) in str(info.value)
    assert server.stats()["requests"] == 0
    assert foreign.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_a_run_over_a_damaged_page_finishes_and_warns_once(server, path):
    # Damage deep in the file passes every check at open and shows only when a lookup reaches
    # it: the run asks those rows again instead of dying on a raw sqlite3 error.
    df = _frame(600, width=400)
    df.llm.generate("${t}", base_url=server.url, cache=str(path), max_concurrency=8)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    with open(path, "r+b") as file:
        file.seek(4096 * (pages // 2))
        file.write(b"\xa5" * 4096 * 4)
    server.reset_stats()
    with pytest.warns(RuntimeWarning) as warned:
        out = df.llm.generate("${t}", base_url=server.url, cache=str(path), max_concurrency=8)
    assert out["output"].tolist() == [f"echo: {t}" for t in df["t"]]
    assert 0 < server.stats()["requests"]
    messages = [str(w.message) for w in warned]
    reads = [m for m in messages if "could not read" in m]
    assert len(reads) == 1 and str(path) in reads[0] and "delete the file" in reads[0]
    # Writing into the damaged file may fail too: that is said once more, and no more.
    assert len(messages) - len(reads) <= 1


def test_estimate_never_writes_the_cache(server, path, monkeypatch):
    df = _frame(5)
    # A cache written by version 1: opening it for writing would migrate and compact it.
    with schema_version(monkeypatch, 1):
        df.iloc[:3].llm.generate("${t}", base_url=server.url, cache=str(path))
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = path.read_bytes()
    facts = df.llm.estimate("${t}", base_url=server.url, cache=str(path))
    assert (facts["cached_rows"], facts["requests"]) == (3, 2)
    assert path.read_bytes() == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    missing = path.with_name("never.sqlite3")
    assert df.llm.estimate("${t}", base_url=server.url, cache=str(missing))["requests"] == 5
    assert not missing.exists()


def test_a_file_another_process_is_setting_up_is_not_called_foreign(path, monkeypatch):
    # Dask workers open one new cache file at the same moment. The first look is an immutable
    # read (no side files), which ignores the other process's locks and log and can see the
    # file half written: our table, but no version or mark yet. Seen on CI with four workers.
    with ResponseCache(path):
        pass  # a real cache file of ours, in WAL mode, closed: the immutable read is used
    real = schema_module._facts
    reads: list[bool] = []

    def torn_then_real(where, *, immutable):
        reads.append(immutable)
        if immutable:
            return 0, 0, ["responses"], schema_module._COLUMNS  # the half-written view
        return real(where, immutable=immutable)

    monkeypatch.setattr(schema_module, "_facts", torn_then_real)
    assert schema_module._inspect(path) == "ours"
    assert reads == [True, False]  # confirmed by a locking read before any verdict


def test_a_migration_committed_between_two_reads_of_the_facts_is_not_called_foreign(
    path, monkeypatch
):
    # Four Dask workers opening one new file: while one read the file's mark, version and tables
    # statement by statement, another committed every migration in between, so the reader saw
    # no mark but version 4 and called its own cache foreign (CI, 4 workers). The facts must
    # come from one snapshot of the file.
    path.parent.mkdir(parents=True)
    setup = schema_module.open_plain(path, busy_timeout=5.0)
    schema_module._enable_wal(setup)  # a new file, switched to WAL, not migrated yet
    writer = schema_module.open_plain(path, busy_timeout=5.0)
    real_connect = schema_module._connect_readonly

    def connect_then_migrate_after_the_first_read(where, *, immutable):
        conn = real_connect(where, immutable=immutable)
        seen: list[str] = []

        def trace(statement: str) -> None:
            seen.append(statement)
            if len(seen) == 2 and not immutable:  # after the first read, before the second
                schema_module._migrate(writer)

        conn.set_trace_callback(trace)
        return conn

    monkeypatch.setattr(
        schema_module, "_connect_readonly", connect_then_migrate_after_the_first_read
    )
    try:
        assert schema_module._inspect(path) in ("empty", "ours")
        # And the migration it raced really happened: the file is a marked cache now.
        assert schema_module._inspect(path) == "ours"
    finally:
        writer.close()
        setup.close()


_SHARED_LOCK_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:  # SQLite's SHARED range (PENDING_BYTE + 2, 510 bytes): taken only if no reader holds it
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 510, 0x40000002)
    print("free")
except OSError:
    print("held")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")
def test_checking_a_file_keeps_the_locks_of_this_process_s_open_connections(path):
    # Closing any descriptor of a file drops every POSIX lock the process holds on it. Reading
    # the header with open()/close() while another thread's connection was mid-transaction took
    # its lock away, so other processes wrote under it (Dask partitions on threads: "disk I/O
    # error", SQLITE_IOERR_SHORT_READ).
    ResponseCache(path).close()
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM responses").fetchone()

        def lock() -> str:
            probe = [sys.executable, "-c", _SHARED_LOCK_PROBE, str(path)]
            return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()

        assert lock() == "held"
        assert schema_module._inspect(path) == "ours"
        with ResponseCache(path, readonly=True):
            pass
        assert lock() == "held"
    finally:
        reader.close()
