"""chunksize=: finished frames in input order, requests flowing across chunk boundaries."""

from __future__ import annotations

import pandas as pd
import pytest

from parrot_pandas import ConfigurationError, RowsFailedError


def _frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"facts": [f"name=n{i}, year={1000 + i}" for i in range(rows)]},
        index=pd.RangeIndex(100, 100 + rows, name="id"),
    )


def test_chunks_come_in_order_and_add_up_to_the_whole_result(server):
    df = _frame(500)
    parts = list(
        df.llm.extract("${facts}", {"name": str, "year": int}, base_url=server.url, chunksize=64)
    )
    assert [len(p) for p in parts] == [64] * 7 + [52]
    assert all(list(p.columns) == ["facts", "name", "year", "llm_error"] for p in parts)
    assert all(str(p["year"].dtype) == "Int64" for p in parts)
    streamed = pd.concat(parts)
    whole = df.llm.extract("${facts}", {"name": str, "year": int}, base_url=server.url)
    pd.testing.assert_frame_equal(streamed.drop(columns="llm_error"), whole)
    assert streamed["llm_error"].isna().all()


def test_leaving_early_cancels_the_rest(server_factory):
    server = server_factory(latency=0.02)
    stream = _frame(3000).llm.generate("${facts}", base_url=server.url, chunksize=50, cache=False)
    first = next(stream)
    stream.close()
    assert len(first) == 50
    # The run stays a few chunks ahead of the consumer, never the whole frame.
    assert server.stats()["requests"] < 1000


def test_failed_rows_stay_in_their_chunk_and_raise_at_the_end(server_factory):
    server = server_factory(context_window=100)
    df = pd.DataFrame({"t": ["a", "x" * 4000, "b", "c"]})
    stream = df.llm.generate("${t}", base_url=server.url, chunksize=2)
    parts = [next(stream), next(stream)]
    assert parts[0]["llm_error"].notna().tolist() == [False, True]
    with pytest.raises(RowsFailedError) as info:
        next(stream)
    assert list(info.value.errors.index) == [1]
    coerced = list(df.llm.generate("${t}", base_url=server.url, chunksize=2, errors="coerce"))
    assert [len(p) for p in coerced] == [2, 2]


async def test_async_streaming(server):
    parts = [
        p
        async for p in await _frame(30).llm.agenerate("${facts}", base_url=server.url, chunksize=8)
    ]
    assert [len(p) for p in parts] == [8, 8, 8, 6]
    assert pd.concat(parts).index.tolist() == list(range(100, 130))


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_chunksize(server, size):
    with pytest.raises(ConfigurationError, match="chunksize"):
        _frame(3).llm.generate("${facts}", base_url=server.url, chunksize=size)
