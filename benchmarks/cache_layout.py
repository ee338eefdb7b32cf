"""The response cache as a run uses it: file size, and the time of a run that writes it and of
a re-run that reads everything back from it.

Benchmarks the checkout it sits in (like ``run.py``), through public calls only. Each
repetition runs ``df.llm.generate("${text}", cache=PATH)`` on ``--rows`` distinct prompts of
``--size`` characters against the test server in its own process (its echo model answers
each prompt with itself, so every answer is about ``--size`` characters), then runs the same
call again: every row now comes from the cache and the server sees no request. Reported, as
medians: the file size (``parrot_pandas.cache_info``: database plus WAL) against the bytes of
the answers stored, the wall and CPU time of the first run (requests, parsing and the cache's
writes) and of the cached re-run (lookups and building the frame).

    python benchmarks/cache_layout.py                 # 10,000 answers of 1 KB, median of 3
    python benchmarks/cache_layout.py --rows 100000 --reps 1

Run it from an older checkout to compare cache layouts. (What committing every 50 ms costs
against 0.5 s, once measured here with ``--durability``, depended on a private parameter no
public call sets; see the git history of this file.)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: the server in its own process)


def prompts(rows: int, size: int, seed: int = 11) -> list[str]:
    """``rows`` distinct prompts of ``size`` characters."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(8)) for _ in range(500)]
    return [
        (f"prompt {i}: " + " ".join(rng.choice(words) for _ in range(size // 8)))[:size]
        for i in range(rows)
    ]


def _timed(call: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = call()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def once(texts: list[str], server: bench.Server) -> dict[str, float]:
    import pandas as pd

    import parrot_pandas

    df = pd.DataFrame({"text": texts})
    url = server.url
    with tempfile.TemporaryDirectory(prefix="parrot-cache-bench-") as tmp:
        path = Path(tmp) / "responses.sqlite3"
        first, write_s, write_cpu_s = _timed(lambda: bench._generate(df, url, cache=str(path)))
        before = server.stats()
        again, read_s, read_cpu_s = _timed(lambda: bench._generate(df, url, cache=str(path)))
        sent_again = server.stats()["requests"] - before["requests"]
        info = parrot_pandas.cache_info(path)
        assert info["entries"] == len(texts), (info["entries"], len(texts))
        assert sent_again == 0, f"the cached re-run sent {sent_again} requests"
        assert again["output"].equals(first["output"])
        data = sum(len(answer.encode()) for answer in first["output"])
    return {
        "write_s": write_s,
        "write_cpu_s": write_cpu_s,
        "read_s": read_s,
        "read_cpu_s": read_cpu_s,
        "bytes": info["size_bytes"],
        "data": data,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--size", type=int, default=1024, help="characters per prompt and answer")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args()
    texts = prompts(args.rows, args.size)
    with bench.Server() as server:
        runs = [once(texts, server) for _ in range(args.reps)]
    import parrot_pandas

    result = {
        "version": parrot_pandas.__version__,
        "rows": args.rows,
        "answer_chars": args.size,
        "data_mb": statistics.median(r["data"] for r in runs) / 2**20,
        "file_mb": statistics.median(r["bytes"] for r in runs) / 2**20,
        "write_s": statistics.median(r["write_s"] for r in runs),
        "write_cpu_s": statistics.median(r["write_cpu_s"] for r in runs),
        "read_s": statistics.median(r["read_s"] for r in runs),
        "read_cpu_s": statistics.median(r["read_cpu_s"] for r in runs),
    }
    result["file_over_data"] = result["file_mb"] / result["data_mb"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"parrot_pandas {result['version']}: {args.rows:,} answers of about {args.size} chars "
        f"({result['data_mb']:.1f} MB of answers), median of {args.reps}\n"
        f"  file          {result['file_mb']:.1f} MB "
        f"({result['file_over_data']:.2f}x the answers)\n"
        f"  first run     {result['write_s']:.2f} s wall, {result['write_cpu_s']:.2f} s CPU "
        f"(requests, parsing, cache writes)\n"
        f"  cached re-run {result['read_s']:.2f} s wall, {result['read_cpu_s']:.2f} s CPU "
        f"(no request: lookups and the frame)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
