"""Dask benchmark: one shared rate budget across a LocalCluster of worker processes.

The request-bound scenario of ``benchmarks/run.py`` (400 short rows, a server with
``--rpm 1200 --latency 0.2``, floor = rows / rpm = 20 s), run as ``ddf.llm.generate`` over
8 partitions on a ``dask.distributed.LocalCluster`` of 4 worker processes with one thread
each. The server runs in its own process (``python -m parrot_pandas.testing``); the wall time
is measured around ``.compute()`` on a warmed-up cluster (its workers have imported
parrot_pandas). Prints the same Markdown table rows as ``run.py``::

    python benchmarks/dask_bench.py                 # the full scenario
    python benchmarks/dask_bench.py --rows 100      # quicker (the server's burst weighs more)
    python benchmarks/dask_bench.py --workers 2 --partitions 4

Needs the ``dask`` extra: ``pip install -e .[dask]``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Benchmark the checkout this file belongs to, installed or not.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the test server in its own process)

RPM = 1200
LATENCY = 0.2
TARGET_RATIO = 1.1
TARGET_429 = 0.02


def measure(rows: int, workers: int, partitions: int) -> dict[str, Any]:
    """One run on a fresh cluster and a fresh server; the figures as a dict."""
    import dask.dataframe as dd
    import pandas as pd
    from dask.distributed import Client, LocalCluster

    import parrot_pandas  # noqa: F401  (registers ddf.llm)

    with bench.Server(latency=LATENCY, rpm=RPM) as server:
        url = server.url
        with (
            LocalCluster(
                n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
            tempfile.TemporaryDirectory() as tmp,
        ):
            # Workers import Dask's dataframe and parrot_pandas (which then registers ddf.llm)
            # now, not in the timed compute.
            for module in ("dask.dataframe", "parrot_pandas"):
                client.run(importlib.import_module, module)
            texts = [f"Row {i}: the quick brown fox jumps over the lazy dog." for i in range(rows)]
            ddf = dd.from_pandas(pd.DataFrame({"text": texts}), npartitions=partitions)
            out = ddf.llm.generate(
                "${text}", base_url=url, api_key="bench-key", model="parrot-bench",
                cache=str(Path(tmp) / "cache.sqlite3"),
            )  # fmt: skip
            started = time.perf_counter()
            result = out.compute()
            wall = time.perf_counter() - started
        stats = server.stats()
    correct = int((result["output"] == "echo: " + result["text"]).sum())
    return {"rows": rows, "workers": workers, "partitions": partitions, "wall": wall,
            "floor": rows / RPM * 60, "correct": correct, "server": stats}  # fmt: skip


def table_rows(r: dict[str, Any]) -> list[str]:
    s = r["server"]
    ratio = r["wall"] / r["floor"]
    share = s["rate_limited"] / s["requests"] if s["requests"] else 0.0
    label = f"5 Dask ({r['workers']} workers)"
    note = (
        f"wall {r['wall']:.2f} s vs floor {r['floor']:.1f} s ({r['rows']} rows / {RPM} rpm), "
        f"latency {LATENCY} s; {r['partitions']} partitions on {r['workers']} worker processes "
        f"x 1 thread, one shared budget (actor); {r['correct']} of {r['rows']} rows correct; "
        f"server max in flight {s['max_in_flight']}"
    )
    mark = {True: "yes", False: "**NO**"}
    return [
        f"| {label} | wall / floor | {ratio:.3f} | <= {TARGET_RATIO} | "
        f"{mark[ratio <= TARGET_RATIO]} | {note} |",
        f"| {label} | 429 share (server) | {share:.1%} | < {TARGET_429:.0%} | "
        f"{mark[share < TARGET_429]} | {s['rate_limited']} of {s['requests']} requests |",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=400)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--partitions", type=int, default=8)
    args = p.parse_args(argv)
    result = measure(args.rows, args.workers, args.partitions)
    print("| Scenario | Metric | Result | Target | Met | Details |")
    print("|---|---|---|---|---|---|")
    for line in table_rows(result):
        print(line)
    return 0 if result["correct"] == result["rows"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
