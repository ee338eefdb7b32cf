"""The pandas accessor inside Spark's ``mapInPandas`` (the recipe in docs/spark.md).

A local Spark session (``local[2,2]``: two task slots, each task tried at most twice) runs its
Python workers as separate processes; they reach the in-process FakeServer over loopback and
share one SQLite cache file, as executors on one machine do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

pytestmark = [
    pytest.mark.slow,
    # pyspark 4.x on pandas 3: its own warnings, not ours.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated::pyspark"),
]

pytest.importorskip("pyspark")
pytest.importorskip("pyarrow")  # mapInPandas moves batches as Arrow (the pyspark[sql] extra)
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs a Java runtime (java on PATH or JAVA_HOME)", allow_module_level=True)

from pyspark import SparkContext, TaskContext  # noqa: E402  (after the skips)
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql.types import StringType, StructField, StructType  # noqa: E402

TEMPLATE = "Summarize: ${text}"


@pytest.fixture(scope="module")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    # The JVM, and the Python workers it forks, keep the environment they start with: give
    # them this interpreter (which has parrot_pandas and pyarrow) and none of the developer's
    # keys, servers or cache.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYSPARK_PYTHON", sys.executable)
        env.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PARROT_PANDAS_MODEL"):
            env.delenv(name, raising=False)
        env.setenv(
            "PARROT_PANDAS_CACHE", str(tmp_path_factory.mktemp("spark-env") / "unused.sqlite3")
        )
        started = time.monotonic()
        session = (
            SparkSession.builder.master("local[2,2]")
            .appName("parrot_pandas-test")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "4")
            .config("spark.default.parallelism", "4")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        session.startup_seconds = time.monotonic() - started  # type: ignore[attr-defined]
    try:
        yield session
    finally:
        gateway = SparkContext._gateway
        session.stop()
        # stop() leaves the JVM running until this interpreter exits; it exits when its stdin
        # closes, so the rest of the suite does not carry it.
        proc = getattr(gateway, "proc", None)
        if gateway is not None and proc is not None:
            gateway.shutdown()
            SparkContext._gateway = SparkContext._jvm = None
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _rows(spark: SparkSession, count: int, partitions: int) -> Any:
    pdf = pd.DataFrame(
        {"id": range(count), "text": [f"row {i}: the quick brown fox" for i in range(count)]}
    )
    return spark.createDataFrame(pdf).repartition(partitions)


def _schema(sdf: Any, output: str) -> StructType:
    """The input columns, then the output column, then llm_error (always there with coerce)."""
    return StructType(
        [
            *sdf.schema.fields,
            StructField(output, StringType()),
            StructField("llm_error", StringType()),
        ]
    )


def _summarizer(base_url: str, cache: str, *, fail_first_attempt: bool = False) -> Any:
    def summarize(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import parrot_pandas  # noqa: F401  (registers DataFrame.llm in this Python worker)

        for batch in batches:
            out = batch.llm.generate(
                TEMPLATE,
                output="summary",
                base_url=base_url,
                cache=cache,
                progress=False,
                errors="coerce",
            )
            if fail_first_attempt and TaskContext.get().attemptNumber() == 0:
                # As if the executor died after the answers came back: Spark retries the task.
                raise RuntimeError("simulated task failure after the LLM call")
            yield out

    return summarize


def test_map_in_pandas_answers_every_row_then_serves_the_cache(spark, server, tmp_path):
    cache = str(tmp_path / "spark-cache" / "responses.sqlite3")
    sdf = _rows(spark, 40, 4)
    assert sdf.rdd.getNumPartitions() == 4
    out = sdf.mapInPandas(_summarizer(server.url, cache), _schema(sdf, "summary"))

    started = time.monotonic()
    first = out.toPandas().sort_values("id", ignore_index=True)
    first_run = time.monotonic() - started

    assert list(first.columns) == ["id", "text", "summary", "llm_error"]
    assert list(first["id"]) == list(range(40))
    expected = [f"echo: Summarize: row {i}: the quick brown fox" for i in range(40)]
    assert list(first["summary"]) == expected
    assert first["llm_error"].isna().all()
    stats = server.stats()
    assert stats["ok"] == stats["requests"] == 40  # one request per row, none repeated

    started = time.monotonic()
    second = out.toPandas().sort_values("id", ignore_index=True)
    second_run = time.monotonic() - started
    pd.testing.assert_frame_equal(second, first)
    assert server.stats()["requests"] == 40  # every row served from the shared cache

    # Shown with -s or -rP.
    print(
        f"spark session startup {spark.startup_seconds:.1f}s, "
        f"first run {first_run:.1f}s, cached run {second_run:.1f}s"
    )


def test_a_failed_row_is_coerced_and_a_retried_task_pays_only_for_uncached_rows(
    spark, server_factory, tmp_path
):
    # A row longer than the context window fails (400, not retried) without failing its task.
    server = server_factory(context_window=500)
    cache = str(tmp_path / "responses.sqlite3")
    pdf = pd.DataFrame({"id": range(12), "text": [f"row {i}" for i in range(12)]})
    pdf.loc[5, "text"] = "long " * 1000
    sdf = spark.createDataFrame(pdf).repartition(2)
    out = sdf.mapInPandas(
        _summarizer(server.url, cache, fail_first_attempt=True), _schema(sdf, "summary")
    )
    result = out.toPandas().sort_values("id", ignore_index=True)

    assert list(result["id"]) == list(range(12))
    good = result["id"] != 5
    assert list(result.loc[good, "summary"]) == [
        f"echo: Summarize: row {i}" for i in range(12) if i != 5
    ]
    assert result.loc[good, "llm_error"].isna().all()
    assert pd.isna(result.loc[5, "summary"])
    assert "context length" in result.loc[5, "llm_error"]
    # Each task ran twice; the second attempts found the 11 answers in the cache and sent
    # only the row that had no answer to cache.
    stats = server.stats()
    assert stats["ok"] == 11
    assert stats["rejected"] == 2
    assert stats["requests"] == 13
