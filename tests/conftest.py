"""Shared fixtures: a clean environment, a private cache file, and local servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pandas as pd
import pytest

import parrot_pandas  # noqa: F401  (registers DataFrame.llm)
from parrot_pandas.testing import FakeServer


@pytest.fixture(autouse=True)
def _clean_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Tests never see the developer's key or server, and never touch the user's cache.
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_API_VERSION",
        "PARROT_PANDAS_MODEL",
        "PARROT_PANDAS_PROVIDER",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_AUTH_TOKEN",
        "AZURE_OPENAI_ENDPOINT",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_AD_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    cache_dir = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("PARROT_PANDAS_CACHE", str(cache_dir / "responses.sqlite3"))


@pytest.fixture
def server_factory() -> Iterator[Callable[..., FakeServer]]:
    """Start FakeServers with any ServerConfig fields; all are stopped after the test."""
    started: list[FakeServer] = []

    def start(**config: object) -> FakeServer:
        server = FakeServer(**config)
        server.__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


@pytest.fixture
def server(server_factory: Callable[..., FakeServer]) -> FakeServer:
    """A well-behaved local OpenAI-compatible server."""
    return server_factory()


@pytest.fixture
def docs() -> pd.DataFrame:
    """A small frame of documents with a non-default index."""
    return pd.DataFrame(
        {
            "title": ["Ada", "Alan", "Grace", "Edsger"],
            "text": [
                "name=Ada, year=1815",
                "name=Alan, year=1912\nname=Alonzo, year=1903",
                "no facts here",
                None,
            ],
        },
        index=pd.Index(["a", "b", "c", "d"], name="doc"),
    )
