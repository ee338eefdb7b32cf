"""Where scenario 1's CPU goes: a waterfall of in-process patches, each removing one cost.

A diagnostic, not a benchmark: every step monkeypatches parrot_pandas (or aiohttp) *in the
child process only* to show how much CPU one mechanism costs per 1,000 rows. The steps are
cumulative; each step's saving is what a library fix of that mechanism could win (an upper
bound: the mechanism is switched off, not made cheaper). It reaches into current internals
by name, so it may need updating when they change. The machine's noise is a few hundredths of
the ratio; a step that moves less than that is not a finding.

    python benchmarks/diagnose_overhead.py            # 3,000 rows; 3 processes x 5 calls a step
    python benchmarks/diagnose_overhead.py --rows 1000 --reps 3 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (benchmarks/run.py: server, payloads, bare loop)

STEPS = [
    ("bare", "bare aiohttp loop (trust_env=False, the aiohttp default)"),
    ("bare+trust", "bare aiohttp loop with trust_env=True (for scale: what parrot_pandas avoids)"),
    ("parrot", "parrot_pandas as is"),
    ("parrot+noemit", "  - no events at all (RowsDone feeds the progress bar and attrs)"),
    ("parrot+noemit+nolearn", "  - no per-response learning (_learn, budget.observe)"),
    ("parrot+noemit+nolearn+nolimits", "  - no rate-limit header parsing (provider.limits)"),
    ("parrot+noemit+nolearn+nolimits+nocost", "  - no token estimate per request (plan.cost)"),
    ("parrot+noemit+nolearn+nolimits+nocost+nobudget",
     "  - no budget.acquire at all (its unlimited fast path already skips the lock)"),
]  # fmt: skip


def _patch(opts: set[str]) -> None:
    import aiohttp

    if "trust" in opts:
        original = aiohttp.ClientSession.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            kwargs["trust_env"] = True
            original(self, *args, **kwargs)

        aiohttp.ClientSession.__init__ = init  # type: ignore[method-assign]
    if "parrot" not in opts:
        return
    from parrot_pandas import _limits as limits
    from parrot_pandas import _plan as plan
    from parrot_pandas import _scheduler as scheduler

    if "noemit" in opts:
        scheduler.Scheduler._emit = lambda self, event: None  # type: ignore[method-assign]
    if "nolearn" in opts:
        scheduler.Scheduler._learn = lambda self, *args: None  # type: ignore[method-assign]
        limits.RateBudget.observe = lambda self, info: None  # type: ignore[method-assign]
    if "nolimits" in opts:
        from parrot_pandas.providers import openai

        empty = limits.LimitInfo()
        openai.OpenAIProvider.limits = lambda self, headers: empty  # type: ignore[method-assign]
    if "nocost" in opts:
        plan.RequestPlan.cost = lambda self, prompt, n, ratio=1.0: 16  # type: ignore[method-assign]
    if "nobudget" in opts:

        async def acquire(self: Any, tokens: int = 0) -> None:
            pass

        limits.RateBudget.acquire = acquire  # type: ignore[method-assign]


def child(variant: str, url: str, rows: int, reps: int) -> dict[str, Any]:
    opts = set(variant.split("+"))
    _patch(opts)
    import pandas as pd

    import parrot_pandas  # noqa: F401

    texts = bench.short_texts(rows)
    warm = bench.short_texts(100)
    if "parrot" in opts:
        df = pd.DataFrame({"text": texts})
        bench._generate(pd.DataFrame({"text": warm}), url, cache=False)

        def call() -> Any:
            return bench._generate(df, url, cache=False)

    else:
        asyncio.run(bench._bare_loop(url, warm, bench.CONCURRENCY))

        def call() -> Any:
            return asyncio.run(bench._bare_loop(url, texts, bench.CONCURRENCY))

    cpu = []
    for _ in range(reps):
        start = time.process_time()
        call()
        cpu.append(time.process_time() - start)
    return {"variant": variant, "cpu_per_1k": statistics.median(cpu) / rows * 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--reps", type=int, default=5, help="calls measured in each process")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per step")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(child(args.variant, args.url, args.rows, args.reps)))
        return 0
    # Every step runs in a fresh process in each round, the rounds alternating the steps: one
    # process can be a few percent faster or slower than the next, the same code.
    runs: dict[str, list[float]] = {variant: [] for variant, _ in STEPS}
    with bench.Server() as srv:
        for _ in range(args.rounds):
            for variant, _label in STEPS:
                cmd = [sys.executable, __file__, "--variant", variant, "--url", srv.url,
                       "--rows", str(args.rows), "--reps", str(args.reps)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, env=bench._env())
                if out.returncode:
                    print(out.stderr, file=sys.stderr)
                    return 1
                runs[variant].append(json.loads(out.stdout.splitlines()[-1])["cpu_per_1k"])
    results = {variant: statistics.median(values) for variant, values in runs.items()}
    bare = results["bare"]
    print(
        f"{args.rows:,} rows, {bench.CONCURRENCY} concurrent; median over {args.rounds} "
        f"processes of the median of {args.reps} calls each\n"
    )
    print("| step | CPU s / 1k rows | vs bare |")
    print("|---|---|---|")
    for variant, label in STEPS:
        print(f"| {label} | {results[variant]:.3f} | {results[variant] / bare:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
