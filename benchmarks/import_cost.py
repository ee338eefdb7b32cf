"""Import cost: what ``import parrot_pandas`` adds to ``import pandas, aiohttp``.

Every measurement is a fresh interpreter (``python -c``) that times its own import
statement, wall (:func:`time.perf_counter`) and CPU (:func:`time.process_time`, steadier on
a shared machine); interpreter start-up, the same for every variant, is left out. The
variants run in alternating order, round after round, so a change in the machine's load
hits all of them alike; the median of the rounds is reported.

- ``base``: ``import pandas, aiohttp``, what any user of the package pays anyway;
- ``parrot``: ``import pandas, aiohttp, parrot_pandas``: the target is at most 0.2 s more;
- ``dask``, ``dask+parrot``: the same with ``dask.dataframe`` first, what a Dask user (or a
  fresh Dask worker) pays; skipped when Dask is not installed.

With ``--compare PATH`` the ``parrot`` variants also run against another checkout (e.g. an
older commit, from ``git archive``), in the same alternating rounds, for a fair before/after.

::

    python benchmarks/import_cost.py                          # 15 rounds
    python benchmarks/import_cost.py --rounds 5               # quicker, noisier
    python benchmarks/import_cost.py --compare /tmp/old-checkout

The exit status is 1 if the median wall time added by parrot_pandas is above the target.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.2  # seconds parrot_pandas may add to pandas + aiohttp

VARIANTS = {
    "base": "import pandas, aiohttp",
    "parrot": "import pandas, aiohttp, parrot_pandas",
    "dask": "import pandas, aiohttp, dask.dataframe",
    "dask+parrot": "import pandas, aiohttp, dask.dataframe, parrot_pandas",
}

_PROBE = """\
import time
_wall, _cpu = time.perf_counter(), time.process_time()
{statement}
print(time.perf_counter() - _wall, time.process_time() - _cpu)
"""


def measure(statement: str, root: Path = ROOT) -> tuple[float, float]:
    """Wall and CPU seconds of `statement` in a fresh interpreter importing the checkout at
    `root`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(statement=statement)],
        capture_output=True, text=True, check=True, env=env, cwd=root,
    )  # fmt: skip
    wall, cpu = done.stdout.split()[-2:]
    return float(wall), float(cpu)


def run(rounds: int, variants: dict[str, tuple[str, Path]]) -> dict[str, list[tuple[float, float]]]:
    """`rounds` times each variant, alternating; a first round only warms the disk cache."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    names = list(variants)
    for name in names:
        measure(*variants[name])
    for i in range(rounds):
        # Alternate the order too: the variant that runs first in a round is not always the same.
        for name in names if i % 2 == 0 else reversed(names):
            times[name].append(measure(*variants[name]))
    return times


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    p.add_argument("--compare", type=Path, help="another checkout to measure alongside")
    args = p.parse_args(argv)
    names = ["base", "parrot"]
    if importlib.util.find_spec("dask") is not None:
        names += ["dask", "dask+parrot"]
    variants = {name: (VARIANTS[name], ROOT) for name in names}
    if args.compare is not None:
        for name in [n for n in names if "parrot" in n]:
            variants[f"{name} @ {args.compare}"] = (VARIANTS[name], args.compare.resolve())
    before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    times = run(args.rounds, variants)
    after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    wall = {name: statistics.median(w for w, _ in values) for name, values in times.items()}
    cpu = {name: statistics.median(c for _, c in values) for name, values in times.items()}
    print(
        f"Python {platform.python_version()}, {platform.platform()}, {os.cpu_count()} CPUs; "
        f"load average {before:.1f} before, {after:.1f} after; "
        f"median of {args.rounds} alternating rounds"
    )
    print()
    print("| imports | wall s (median) | wall s (min-max) | CPU s (median) |")
    print("|---|---|---|---|")
    for name, (statement, root) in variants.items():
        where = "" if root == ROOT else f" ({root})"
        walls = [w for w, _ in times[name]]
        print(
            f"| `{statement}`{where} | {wall[name]:.3f} | "
            f"{min(walls):.3f}-{max(walls):.3f} | {cpu[name]:.3f} |"
        )
    print()
    suffixes = [""] + ([f" @ {args.compare}"] if args.compare is not None else [])
    for suffix in suffixes:
        checkout = "this checkout" if not suffix else str(args.compare)
        parrot = "parrot" + suffix
        line = (
            f"{checkout}: parrot_pandas adds {wall[parrot] - wall['base']:.3f} s wall "
            f"(ratio {wall[parrot] / wall['base']:.2f}), {cpu[parrot] - cpu['base']:.3f} s CPU "
            f"(ratio {cpu[parrot] / cpu['base']:.2f}) to pandas + aiohttp; target <= {TARGET} s"
        )
        if "dask" in wall:
            line += (
                f"; after dask.dataframe {wall['dask+parrot' + suffix] - wall['dask']:.3f} s wall, "
                f"{cpu['dask+parrot' + suffix] - cpu['dask']:.3f} s CPU"
            )
        print(line)
    return 0 if wall["parrot"] - wall["base"] <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
