"""Crashes and Ctrl-C for real: a child process killed or interrupted part-way, then resumed."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

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


# The child reports, on its own clock, when each answer arrives (after the client returns it)
# and when the run counts rows done (the events the progress bar and attrs count).
_TRACED_CHILD = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    import parrot_pandas
    from parrot_pandas import _client, _run
    from parrot_pandas._events import RowsDone

    def say(line):
        # One write per line: a kill -9 can cut only the last line, never mix two.
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    send = _client.Client.send

    async def traced(self, call):
        completion = await send(self, call)
        say(f"arrived {time.monotonic()} {call.messages[-1]['content']}")
        return completion

    class Bar:
        def __call__(self, event):
            if isinstance(event, RowsDone):
                say(f"done {time.monotonic()} {event.rows}")

        def close(self, facts=None):
            pass

    _client.Client.send = traced
    _run.progress_listener = lambda setting, total: Bar()
    df = pd.DataFrame({"t": [f"row {i}" for i in range(int(sys.argv[2]))]})
    df.llm.generate("${t}", base_url=sys.argv[1], max_concurrency=int(sys.argv[3]))
    """
)
# An answer that arrived this long before the kill must have been on disk. The cache commits
# 50 ms after an answer arrives; the rest is slack for a loaded machine.
_DURABLE_WITHIN = 0.1


def test_kill_9_then_rerun_pays_only_for_unfinished_rows(server_factory, tmp_path):
    rows = 600
    server = server_factory(latency=0.05)
    script = tmp_path / "traced.py"
    script.write_text(_TRACED_CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), server.url, str(rows), "4"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[list[str]] = []
    first_answer = threading.Event()

    def read() -> None:
        for line in child.stdout:
            if line.endswith("\n"):  # the last line may be cut by the kill
                lines.append(line.split())
                first_answer.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first_answer.wait(60), child.stderr.read()
        started = float(lines[0][1])
        time.sleep(max(0.0, started + 0.5 - time.monotonic()))  # 0.5 s into the run
        killed_at = time.monotonic()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
        reader.join(10)
        child.stdout.close()
        child.stderr.close()
    arrived = [(float(t), " ".join(prompt)) for kind, t, *prompt in lines if kind == "arrived"]
    done_rows = sum(int(rest[0]) for kind, _, *rest in lines if kind == "done")
    early = {prompt for t, prompt in arrived if t < killed_at - _DURABLE_WITHIN}
    assert early and len(arrived) < rows
    time.sleep(0.3)  # the dead child's last requests finish at the server before we count
    server.reset_stats()

    df = pd.DataFrame({"t": [f"row {i}" for i in range(rows)]})
    out = df.llm.generate("${t}", base_url=server.url, max_concurrency=8, progress=False)

    assert out["output"].tolist() == [f"echo: row {i}" for i in range(rows)]
    facts = out.attrs["llm"]
    second_run = server.stats()["by_prompt"]
    # Every row the killed run counted done was on disk...
    assert facts["cached_rows"] >= done_rows
    assert len(second_run) <= rows - done_rows
    # ...and so was every answer that arrived more than _DURABLE_WITHIN before the kill.
    assert not early & set(second_run), sorted(early & set(second_run))
    assert len(second_run) <= rows - len(early)
    # The re-run sent exactly the rows that were not cached, each once.
    assert facts["requests"] == rows - facts["cached_rows"] == sum(second_run.values())
    assert all(count == 1 for count in second_run.values())
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
