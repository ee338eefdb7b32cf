"""Streaming benchmark (issue 8): 100,000 rows of 1 KB text to Parquet in chunks of 10,000.

The server runs in its own process (no latency, no limits). The client streams
``df.llm.generate(..., chunksize=10_000)`` into one Parquet file with pyarrow's
``ParquetWriter`` and reports its peak RSS and rows per second, next to a bare aiohttp loop
sending the same requests (rows per second, no Parquet). Each measurement runs in a fresh
child process so peak RSS is its own::

    python benchmarks/stream_bench.py               # full size
    python benchmarks/stream_bench.py --rows 20000  # quicker

Needs pyarrow (the ``spark`` extra brings it, or ``pip install pyarrow``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the server, documents, the bare loop, RSS)

CHUNK = 10_000
TARGET_RSS_MB = 1024


def _stream_child(url: str, rows: int, out: str) -> dict[str, float]:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    import parrot_pandas  # noqa: F401

    df = pd.DataFrame({"text": bench.documents(rows, 1024)})
    before = bench._rss_now_mb()
    start = time.perf_counter()
    writer = None
    written = 0
    for part in bench._generate(df, url, cache=False, chunksize=CHUNK):
        table = pa.Table.from_pandas(part, preserve_index=True)
        if writer is None:
            writer = pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
        written += len(part)
    if writer is not None:
        writer.close()
    wall = time.perf_counter() - start
    return {"rows": written, "wall": wall, "rss_before": before, "peak_rss": bench._peak_rss_mb()}


def _bare_child(url: str, rows: int) -> dict[str, float]:
    texts = bench.documents(rows, 1024)
    start = time.perf_counter()
    answers = asyncio.run(bench._bare_loop(url, texts, 64))
    return {"rows": len(answers), "wall": time.perf_counter() - start}


def _in_child(kind: str, url: str, rows: int, out: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--url", url, "--rows", str(rows),
           "--out", out]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--child", choices=["stream", "bare"])
    parser.add_argument("--url")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.child == "stream":
        print(json.dumps(_stream_child(args.url, args.rows, args.out)))
        return 0
    if args.child == "bare":
        print(json.dumps(_bare_child(args.url, args.rows)))
        return 0

    with bench.Server() as server, tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.parquet")
        stream = _in_child("stream", server.url, args.rows, out)
        bare = _in_child("bare", server.url, args.rows, out)
    stream_rate = stream["rows"] / stream["wall"]
    bare_rate = bare["rows"] / bare["wall"]
    ok = stream["peak_rss"] < TARGET_RSS_MB and stream["rows"] == args.rows
    print(
        f"| 6 Streaming to Parquet | peak RSS | {stream['peak_rss']:.0f} MB | "
        f"< {TARGET_RSS_MB} MB | {'yes' if ok else '**NO**'} | {args.rows:,} rows x 1 KB in "
        f"chunks of {CHUNK:,}, RSS before the call {stream['rss_before']:.0f} MB |"
    )
    print(
        f"| 6 Streaming to Parquet | rows / s (bare aiohttp) | {stream_rate:,.0f} "
        f"({bare_rate:,.0f}) |  |  | ratio {stream_rate / bare_rate:.2f} of the bare loop, "
        "which writes nothing |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
