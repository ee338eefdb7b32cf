"""The progress bar, fed by scheduler events."""

from __future__ import annotations

import pandas as pd

from parrot_pandas._events import Retry, RowsDone, RowsFailed, RowsSkipped
from parrot_pandas._progress import ProgressBar, progress_listener


def test_bar_counts_rows_and_shows_cached_retries_failed(capsys):
    bar = ProgressBar(total=10)
    for event in (
        RowsDone(3, cached=True),
        RowsDone(2),
        Retry(1, 0.1, "503"),
        RowsFailed(1, "x"),
        RowsSkipped(4),
    ):
        bar(event)
    bar.close()
    err = capsys.readouterr().err
    assert "10/10" in err and "cached=3" in err and "retries=1" in err and "failed=1" in err


def test_auto_progress_only_for_larger_runs():
    assert progress_listener(None, total=3) is None
    assert progress_listener(False, total=10_000) is None
    bar = progress_listener(None, total=10_000)
    assert isinstance(bar, ProgressBar)
    bar.close()


def test_progress_false_prints_nothing_and_true_prints_the_bar(server, capsys):
    df = pd.DataFrame({"t": [f"r{i}" for i in range(60)]})
    df.llm.generate("${t}", base_url=server.url, progress=False)
    assert capsys.readouterr().err == ""
    df.llm.generate("${t}", base_url=server.url, progress=True)
    err = capsys.readouterr().err
    assert "60/60" in err and "cached=60" in err


def test_last_line_shows_tokens_and_cost(server, capsys):
    df = pd.DataFrame({"t": [f"r{i}" for i in range(3)]})
    df.llm.generate("${t}", base_url=server.url, progress=True, cache=False)
    err = capsys.readouterr().err
    assert "tokens=" in err and "cost=$" in err  # gpt-4o-mini has a known price


def test_debug_log_per_request_has_no_bodies(server, caplog):
    import logging

    df = pd.DataFrame({"t": ["secret-prompt-text"]})
    with caplog.at_level(logging.DEBUG, logger="parrot_pandas"):
        df.llm.generate("${t}", base_url=server.url, cache=False, api_key="sk-never-logged-123")
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("request ") for line in lines)
    assert any(line.startswith("llm run: 1 rows") for line in lines)  # the INFO line
    assert not any("secret-prompt-text" in line or "sk-never" in line for line in lines)
