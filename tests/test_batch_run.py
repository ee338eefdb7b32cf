"""batch=True end to end against the local test server's Batch endpoints (issue 14)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import pytest

import parrot_pandas  # noqa: F401  (registers df.llm)
from parrot_pandas import _batch_run
from parrot_pandas.testing import FakeServer
from parrot_pandas.testing._batches import FakeBatches

KEY = "sk-batch-run-0123456789"
Factory = Callable[..., FakeServer]


@pytest.fixture
def srv(server_factory: Factory) -> FakeServer:
    return server_factory(api_key=KEY)


@pytest.fixture
def batches(srv: FakeServer, monkeypatch: pytest.MonkeyPatch) -> FakeBatches:
    """The server's batches, and a wait between looks that moves their clock, not ours."""
    fake = FakeBatches.of(srv.app)
    waits: list[float] = []

    async def wait(seconds: float) -> None:
        waits.append(seconds)
        fake.advance(seconds)

    monkeypatch.setattr(_batch_run, "wait_between", wait)
    fake.waits = waits  # type: ignore[attr-defined]
    return fake


def frame(n: int = 6, *, extra: dict[int, str] | None = None) -> pd.DataFrame:
    texts = [f"name=N{i}, year={1900 + i}" + (extra or {}).get(i, "") for i in range(n)]
    return pd.DataFrame({"text": texts}, index=pd.Index([f"r{i}" for i in range(n)], name="id"))


def extract(df: pd.DataFrame, srv: FakeServer, **options):
    options = {"api_key": KEY, "base_url": srv.url, "model": "gpt-4o-mini", **options}
    return df.llm.extract("${text}", {"name": str, "year": int}, **options)


def test_a_clean_batch_gives_the_live_frame_at_half_price(srv, batches, tmp_path):
    df = frame()
    batched = extract(df, srv, batch=True, cache=str(tmp_path / "b.sqlite3"))
    live = extract(df, srv, cache=str(tmp_path / "l.sqlite3"))
    pd.testing.assert_frame_equal(batched, live)
    facts = batched.attrs["llm"]
    assert facts["batches"] == 1 and facts["batch_ids"] == batches.batch_ids()
    assert batches.stats()["batches"] == 1
    assert facts["batch_prompt_tokens"] > 0
    live_facts = live.attrs["llm"]
    assert facts["prompt_tokens"] == live_facts["prompt_tokens"]
    assert facts["cost"] < live_facts["cost"]
