"""The progress bar, fed by the scheduler's events (rows done, from cache, retries, failures)."""

from __future__ import annotations

import sys
import threading
from typing import Any

from ._events import Event, Retry, RowsDone, RowsFailed, RowsSkipped, RunFinished

__all__ = ["ProgressBar", "progress_listener"]

# Below this many rows a run usually ends before a bar would be worth a line of output.
_AUTO_MIN_ROWS = 50


class ProgressBar:
    """A ``tqdm.auto`` bar counted in input rows, with cached, retried and failed in its postfix.

    ``tqdm.auto`` draws a widget in Jupyter and text on stderr elsewhere. Events may arrive from
    a worker thread's loop (the sync API inside a notebook), so updates take a lock.
    """

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, unit="row", desc="llm", file=sys.stderr, dynamic_ncols=True)
        self._lock = threading.Lock()
        self._counts = {"cached": 0, "retries": 0, "failed": 0}

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, (RowsDone, RowsFailed, RowsSkipped)):
                if isinstance(event, RowsDone) and event.cached:
                    self._counts["cached"] += event.rows
                if isinstance(event, RowsFailed):
                    self._counts["failed"] += event.rows
                self._bar.update(event.rows)
                self._postfix()
            elif isinstance(event, Retry):
                self._counts["retries"] += 1
                self._postfix()
            elif isinstance(event, RunFinished):
                self._postfix()

    def _postfix(self) -> None:
        shown: dict[str, Any] = {k: v for k, v in self._counts.items() if v}
        self._bar.set_postfix(shown, refresh=False)

    def close(self, facts: dict[str, Any] | None = None) -> None:
        """Close the bar (also after an error or Ctrl-C), leaving its last line visible.

        ``facts`` (the run's ``attrs["llm"]``) put the tokens and the cost on that last line.
        """
        with self._lock:
            if facts is not None:
                shown: dict[str, Any] = {k: v for k, v in self._counts.items() if v}
                shown["tokens"] = f"{facts['prompt_tokens']}+{facts['completion_tokens']}"
                if facts.get("cost") is not None:
                    shown["cost"] = f"${facts['cost']:.4f}"
                self._bar.set_postfix(shown, refresh=True)
            self._bar.close()


def progress_listener(setting: bool | None, total: int) -> ProgressBar | None:
    """The bar a run's ``progress=`` setting asks for (``None``: only for larger runs)."""
    if setting is None:
        setting = total >= _AUTO_MIN_ROWS
    return ProgressBar(total) if setting and total else None
