"""The response cache's file: size and write/read time for many ~1 KB answers.

Benchmarks the checkout it sits in (like ``run.py``). Each repetition writes ``--rows`` distinct
answers of ``--size`` characters under random SHA-256 keys through ``ResponseCache.put`` (its
batched commits, as a run writes them), closes the file, then reads every answer back with
``get_many`` in batches of the scheduler's size. Reported: the file size (database plus WAL,
after close) against the bytes of keys and answers stored, and the median times.

    python benchmarks/cache_layout.py                 # 10,000 answers of 1 KB, median of 3
    python benchmarks/cache_layout.py --rows 100000 --reps 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from parrot_pandas import _cache as cache_module  # noqa: E402
from parrot_pandas._cache import ResponseCache, cache_info  # noqa: E402
from parrot_pandas._feed import LOOKUP_BATCH  # noqa: E402


def answers(rows: int, size: int, seed: int = 11) -> list[tuple[str, str]]:
    """``rows`` (key, answer) pairs: random SHA-256 keys, distinct text of ``size`` chars."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghij klmnop") for _ in range(8)) for _ in range(500)]
    out = []
    for i in range(rows):
        key = hashlib.sha256(f"prompt {i} {rng.random()}".encode()).hexdigest()
        text = f"answer {i}: " + " ".join(rng.choice(words) for _ in range(size // 8))
        out.append((key, text[:size]))
    return out


def once(pairs: list[tuple[str, str]]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="parrot-cache-bench-") as tmp:
        path = Path(tmp) / "responses.sqlite3"
        cache = ResponseCache(path)
        wall, cpu = time.perf_counter(), time.process_time()
        for key, text in pairs:
            cache.put(key, 0, text, model="bench-model", usage=(300, 250))
        cache.close()
        write_wall, write_cpu = time.perf_counter() - wall, time.process_time() - cpu
        size = cache_info(path)["size_bytes"]
        cache = ResponseCache(path)
        keys = [key for key, _ in pairs]
        rng = random.Random(5)
        rng.shuffle(keys)
        wall = time.perf_counter()
        found = 0
        for start in range(0, len(keys), LOOKUP_BATCH):
            found += len(cache.get_many(keys[start : start + LOOKUP_BATCH], 1))
        read_wall = time.perf_counter() - wall
        cache.close()
        assert found == len(pairs), (found, len(pairs))
    return {"write_s": write_wall, "write_cpu_s": write_cpu, "read_s": read_wall, "bytes": size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--size", type=int, default=1024, help="characters per answer")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = p.parse_args()
    pairs = answers(args.rows, args.size)
    data = sum(len(k) + len(v.encode()) for k, v in pairs)
    runs = [once(pairs) for _ in range(args.reps)]
    result = {
        "schema_version": len(cache_module._MIGRATIONS),
        "rows": args.rows,
        "answer_chars": args.size,
        "data_mb": data / 2**20,
        "file_mb": statistics.median(r["bytes"] for r in runs) / 2**20,
        "write_s": statistics.median(r["write_s"] for r in runs),
        "write_cpu_s": statistics.median(r["write_cpu_s"] for r in runs),
        "read_s": statistics.median(r["read_s"] for r in runs),
    }
    result["file_over_data"] = result["file_mb"] / result["data_mb"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"schema v{result['schema_version']}: {args.rows:,} answers x {args.size} chars "
        f"({result['data_mb']:.1f} MB of keys and answers), median of {args.reps}\n"
        f"  file        {result['file_mb']:.1f} MB ({result['file_over_data']:.2f}x the data)\n"
        f"  write       {result['write_s']:.2f} s wall, {result['write_cpu_s']:.2f} s CPU "
        f"(put + batched commits + close)\n"
        f"  read back   {result['read_s']:.2f} s (get_many, {LOOKUP_BATCH} keys a query)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
