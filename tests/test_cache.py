"""Tests for parrot_pandas._cache: keys, paths, buffering, sharing a file between processes."""

from __future__ import annotations

import datetime
import hashlib
import multiprocessing
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from parrot_pandas import _cache as cache_module
from parrot_pandas._cache import (
    ResponseCache,
    cache_info,
    clear_cache,
    default_cache_path,
    open_cache,
    request_key,
)
from parrot_pandas.errors import ConfigurationError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
POSIX_ONLY = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX-only")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "sub" / "responses.sqlite3"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(path: pathlib.Path, clock: FakeClock):
    # A long interval and a fake clock: nothing is written unless the test says so.
    with ResponseCache(path, flush_interval=3600, flush_size=1000, clock=clock) as opened:
        yield opened


def stored_rows(path: pathlib.Path) -> int:
    """Rows committed to the file, as another process would see them."""
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT count(*) FROM responses").fetchone()[0]


def integrity(path: pathlib.Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def run_python(code: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, **kwargs
    )


# --------------------------------------------------------------------------- request_key

PAYLOAD = {
    "base_url": "https://api.openai.com/v1",
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Summarize: naïve café ☕"}],
    "params": {"temperature": 0.2, "seed": 7},
    "schema": None,
    "strategy": "text",
}


def test_request_key_ignores_dict_order():
    reordered = {
        "strategy": "text",
        "params": {"seed": 7, "temperature": 0.2},
        "schema": None,
        "messages": [{"content": "Summarize: naïve café ☕", "role": "user"}],
        "model": "gpt-4o-mini",
        "base_url": "https://api.openai.com/v1",
    }
    assert request_key(PAYLOAD) == request_key(reordered)


def test_request_key_is_sha256_of_canonical_json():
    canonical = (
        '{"base_url":"https://api.openai.com/v1","messages":[{"content":"Summarize: naïve café ☕",'
        '"role":"user"}],"model":"gpt-4o-mini","params":{"seed":7,"temperature":0.2},'
        '"schema":null,"strategy":"text"}'
    )
    assert request_key(PAYLOAD) == hashlib.sha256(canonical.encode()).hexdigest()


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"temperature": 0.3, "seed": 7}},
        {"params": {"temperature": 0.2}},
        {"model": "gpt-4o"},
        {"base_url": "http://localhost:8000/v1"},
        {"messages": [{"role": "user", "content": "Summarize: naive cafe"}]},
        {"schema": {"type": "object"}},
        {"strategy": "json_schema"},
    ],
)
def test_request_key_changes_with_anything_that_shapes_the_answer(change):
    assert request_key({**PAYLOAD, **change}) != request_key(PAYLOAD)


def test_request_key_hashes_lone_surrogates():
    assert len(request_key({"messages": ["broken \ud800 text"]})) == 64


@pytest.mark.parametrize(
    "payload",
    [
        {"api_key": "sk-secret"},
        {"params": {"OPENAI_API_KEY": "sk-secret"}},
        {"params": {"headers": {"Authorization": "Bearer sk-secret"}}},
        {"messages": [{"x-api-key": "sk-secret"}]},
        {"params": {"Proxy-Authorization": None}},
    ],
)
def test_request_key_rejects_credentials_without_echoing_them(payload):
    with pytest.raises(ValueError, match="credential") as info:
        request_key(payload)
    assert "sk-secret" not in str(info.value)


def test_request_key_allows_an_extracted_field_named_authorization():
    schema = {
        "type": "object",
        "properties": {"authorization": {"type": "string"}},
        "required": ["authorization"],
    }
    assert len(request_key({**PAYLOAD, "schema": schema})) == 64


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
    cache._conn.set_trace_callback(statements.append)
    missing = [request_key({"missing": i}) for i in range(100)]
    found = cache.get_many(keys + missing + keys[:10], n=2)
    cache._conn.set_trace_callback(None)

    assert len([s for s in statements if s.lstrip().startswith("SELECT")]) == 4  # 1600 / 500
    assert set(found) == set(keys)
    assert found[keys[0]] == {0: "a0", 1: "b0"}
    assert found[keys[1]] == {0: "a1", 1: "late"}
    assert found[keys[2]] == {0: "a2"}
    assert cache.get_many(keys[:5], n=1)[keys[0]] == {0: "a0"}
    assert cache.get_many([]) == {}


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


def test_a_quiet_buffer_is_written_by_the_timer(path):
    with ResponseCache(path, flush_interval=0.05, flush_size=1000) as cache:
        cache.put("a", 0, "v", model="m")
        deadline = time.monotonic() + 5
        while stored_rows(path) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stored_rows(path) == 1
        assert cache._timer is None


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
    "kwargs", [{"flush_interval": -1}, {"flush_size": 0}], ids=["interval", "size"]
)
def test_bad_buffer_settings(path, kwargs):
    with pytest.raises(ConfigurationError):
        ResponseCache(path, **kwargs)


# --------------------------------------------------------------------------- schema


def test_migrations_set_user_version_and_schema(path):
    ResponseCache(path).close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(cache_module._MIGRATIONS)
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

    latest = len(cache_module._MIGRATIONS)
    monkeypatch.setattr(cache_module, "_MIGRATIONS", [*cache_module._MIGRATIONS, m002_example])
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

    latest = len(cache_module._MIGRATIONS)
    monkeypatch.setattr(cache_module, "_MIGRATIONS", [*cache_module._MIGRATIONS, m002_broken])
    with pytest.raises(RuntimeError, match="boom"):
        ResponseCache(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
        columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
    assert "extra" not in columns


def test_a_version_1_file_moves_to_a_rowid_table_with_every_row(path, monkeypatch):
    # A file as version 1 left it: responses WITHOUT ROWID, keyed by (key, sample).
    with monkeypatch.context() as patched:
        patched.setattr(cache_module, "_MIGRATIONS", cache_module._MIGRATIONS[:1])
        with ResponseCache(path) as old:
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
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(cache_module._MIGRATIONS)
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


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("these are my notes, not a database " * 20)
    with pytest.raises(ConfigurationError, match="not a database"):
        ResponseCache(bogus)


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
def test_sigkill_after_a_quiet_second_loses_nothing(tmp_path):
    path = tmp_path / "quiet.sqlite3"
    child = run_python(
        f"""
        import os, signal, time
        from parrot_pandas._cache import ResponseCache

        cache = ResponseCache({str(path)!r}, flush_interval=0.1)
        for i in range(10):
            cache.put(f"k{{i}}", 0, "v", model="m")
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    assert child.wait(timeout=30) == -signal.SIGKILL
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


def test_key_function_matches_request_key_for_every_field_position():
    from parrot_pandas._cache import key_function

    fixed = {
        "base_url": "http://h/v1",
        "model": "m",
        "params": {"b": 1, "a": [1, 2]},
        "schema": None,
    }
    for varying in ("aaa", "messages", "zzz", "params2"):
        key = key_function(fixed, varying)
        for value in (["x"], [{"role": "user", "content": "é \ud800"}], None, {"k": 1}):
            assert key(value) == request_key({**fixed, varying: value})


def test_key_function_rejects_credentials_in_the_fixed_part():
    from parrot_pandas._cache import key_function

    with pytest.raises(ValueError, match="credential"):
        key_function({"params": {"api_key": "sk-x"}}, "messages")
