"""Crashes and Ctrl-C for real: a child process killed or interrupted part-way, then resumed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ROWS = 200

_CHILD = textwrap.dedent(
    """
    import sys
    import pandas as pd
    import parrot_pandas

    df = pd.DataFrame({"t": [f"row {i}" for i in range(int(sys.argv[2]))]})
    out = df.llm.generate("${t}", base_url=sys.argv[1], max_concurrency=int(sys.argv[3]),
                          progress=False)
    print("finished", len(out), flush=True)
    """
)


def _start_child(tmp_path, url: str, rows: int, concurrency: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(script), url, str(rows), str(concurrency)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cached_entries() -> int:
    path = os.environ["PARROT_PANDAS_CACHE"]
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill_9_then_rerun_pays_only_for_what_was_missing(server_factory, tmp_path):
    server = server_factory(latency=0.05)
    child = _start_child(tmp_path, server.url, ROWS, concurrency=4)
    history: list[tuple[float, int]] = []

    def enough() -> bool:
        history.append((time.monotonic(), server.stats()["ok"]))
        return history[-1][1] >= 80

    try:
        _wait_for(enough, 60, "80 answers")
        child.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        child.wait(10)
    finally:
        child.kill()
    answered_a_second_before = max(ok for t, ok in history if t <= killed_at - 1.0)
    time.sleep(0.3)  # the dead child's last requests finish at the server before we count
    first_run = server.stats()["by_prompt"]
    server.reset_stats()

    df = pd.DataFrame({"t": [f"row {i}" for i in range(ROWS)]})
    out = df.llm.generate("${t}", base_url=server.url, max_concurrency=4, progress=False)

    assert out["output"].tolist() == [f"echo: row {i}" for i in range(ROWS)]
    facts = out.attrs["llm"]
    # Everything answered more than a second before the kill came from the cache...
    assert facts["cached_rows"] >= answered_a_second_before
    # ...and the second run sent exactly the rows that were not cached, each once.
    second_run = server.stats()["by_prompt"]
    assert facts["requests"] == ROWS - facts["cached_rows"] == sum(second_run.values())
    assert all(count == 1 for count in second_run.values())
    paid_twice = set(first_run) & set(second_run)
    assert len(paid_twice) <= len(first_run) - answered_a_second_before
    with sqlite3.connect(os.environ["PARROT_PANDAS_CACHE"]) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_ctrl_c_in_a_script_stops_promptly_and_keeps_finished_answers(server_factory, tmp_path):
    server = server_factory(latency=2.0)
    child = _start_child(tmp_path, server.url, 50, concurrency=5)
    try:
        # The setup request, then a first wave of five answers.
        _wait_for(lambda: server.stats()["ok"] >= 6, 30, "the first answers")
        time.sleep(0.3)  # the next wave is in flight
        child.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        _, stderr = child.communicate(timeout=10)
        stopped_after = time.monotonic() - interrupted_at
    finally:
        child.kill()
    assert child.returncode != 0
    assert "KeyboardInterrupt" in stderr
    assert stopped_after < 1.5, f"took {stopped_after:.2f}s to stop"
    assert _cached_entries() >= 6  # every finished answer was kept
    assert server.stats()["ok"] < 50
