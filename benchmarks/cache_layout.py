"""The response cache: file size, write and read time for ~1 KB answers, and what durability costs.

Benchmarks the checkout it sits in (like ``run.py``). Each repetition writes ``--rows`` distinct
answers of ``--size`` characters under random SHA-256 keys through ``ResponseCache.put`` (its
batched commits, as a synchronous caller writes them), closes the file, then reads every answer
back with ``get_many`` in batches of the scheduler's size. Reported: the file size (database plus
WAL, after close) against the bytes of keys and answers stored, and the median times.

``--durability`` instead measures what committing within 50 ms costs a run against the former
0.5 s: an event loop puts answers at ``--rate`` answers a second (as a run receives them), asks
``when_durable`` for each (as the scheduler does) and drains at the end, once with each
``flush_interval``, alternating, ``--reps`` times. Reported: the whole process's CPU per answer
(the writer thread included) for each interval, their ratio and difference, and commits made.

    python benchmarks/cache_layout.py                 # 10,000 answers of 1 KB, median of 3
    python benchmarks/cache_layout.py --rows 100000 --reps 1
    python benchmarks/cache_layout.py --durability --rows 50000 --rate 5000 --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
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

from parrot_pandas import _cache_schema as schema_module  # noqa: E402
from parrot_pandas._cache import ResponseCache  # noqa: E402
from parrot_pandas._cache_admin import cache_info  # noqa: E402
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


async def _paced(cache: ResponseCache, pairs: list[tuple[str, str]], rate: float) -> int:
    """Put ``pairs`` at ``rate`` a second, counting each done once durable; return how many."""
    done = 0

    def count() -> None:
        nonlocal done
        done += 1

    loop = asyncio.get_running_loop()
    start = loop.time()
    per_tick = max(1, round(rate / 1000))  # a tick a millisecond
    for index in range(0, len(pairs), per_tick):
        for key, text in pairs[index : index + per_tick]:
            cache.put(key, 0, text, model="bench-model", usage=(300, 250))
            cache.when_durable(count)
        ahead = start + (index + per_tick) / rate - loop.time()
        await asyncio.sleep(max(0.0, ahead))
    await cache.drain()
    return done


def durability_once(pairs: list[tuple[str, str]], rate: float, interval: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="parrot-cache-bench-") as tmp:
        path = Path(tmp) / "responses.sqlite3"
        cache = ResponseCache(path, flush_interval=interval)
        commits = 0

        def trace(statement: str) -> None:
            nonlocal commits
            commits += statement == "COMMIT"

        cache._writer.set_trace_callback(trace)
        wall, cpu = time.perf_counter(), time.process_time()
        done = asyncio.run(_paced(cache, pairs, rate))
        cache.close()
        result = {
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
            "commits": commits,
        }
        assert done == len(pairs), (done, len(pairs))
    return result


def durability(args: argparse.Namespace, pairs: list[tuple[str, str]]) -> int:
    intervals = (0.5, 0.05)
    runs: dict[float, list[dict[str, float]]] = {interval: [] for interval in intervals}
    for _ in range(args.reps):
        for interval in intervals:  # alternating, so drifting load hits both alike
            runs[interval].append(durability_once(pairs, args.rate, interval))
    per_row = {
        interval: statistics.median(r["cpu_s"] for r in runs[interval]) / len(pairs) * 1e6
        for interval in intervals
    }
    result = {
        "rows": len(pairs),
        "rate": args.rate,
        "reps": args.reps,
        "cpu_us_per_row_500ms": per_row[0.5],
        "cpu_us_per_row_50ms": per_row[0.05],
        "ratio": per_row[0.05] / per_row[0.5],
        "extra_us_per_row": per_row[0.05] - per_row[0.5],
        "commits_500ms": statistics.median(r["commits"] for r in runs[0.5]),
        "commits_50ms": statistics.median(r["commits"] for r in runs[0.05]),
        "wall_s_50ms": statistics.median(r["wall_s"] for r in runs[0.05]),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{len(pairs):,} answers x {args.size} chars put at {args.rate:,.0f}/s, each counted "
        f"done once durable; median of {args.reps}, alternating\n"
        f"  flush_interval 0.5 s   {per_row[0.5]:.1f} us CPU per answer, "
        f"{result['commits_500ms']:.0f} commits\n"
        f"  flush_interval 0.05 s  {per_row[0.05]:.1f} us CPU per answer, "
        f"{result['commits_50ms']:.0f} commits\n"
        f"  50 ms / 0.5 s          {result['ratio']:.3f}x "
        f"({result['extra_us_per_row']:+.1f} us per answer)"
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--size", type=int, default=1024, help="characters per answer")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument(
        "--durability", action="store_true", help="CPU per answer of 50 ms vs 0.5 s commits"
    )
    p.add_argument("--rate", type=float, default=5000, help="--durability: answers a second")
    args = p.parse_args()
    pairs = answers(args.rows, args.size)
    if args.durability:
        return durability(args, pairs)
    data = sum(len(k) + len(v.encode()) for k, v in pairs)
    runs = [once(pairs) for _ in range(args.reps)]
    result = {
        "schema_version": len(schema_module._MIGRATIONS),
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
