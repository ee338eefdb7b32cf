"""pytest fixtures that start :class:`~parrot_pandas.testing.FakeServer` s and stop them after.

Enable them in your ``conftest.py`` (this module imports pytest, which parrot_pandas does not
depend on, so the package does not import it)::

    pytest_plugins = ["parrot_pandas.testing.pytest_plugin"]

Then ask for ``fake_server`` (a well-behaved server) or ``fake_server_factory`` (servers with
any :class:`~parrot_pandas.testing.ServerConfig` fields) in a test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ._config import ServerConfig
from ._server import FakeServer

__all__ = ["fake_server", "fake_server_factory"]


@pytest.fixture
def fake_server_factory() -> Iterator[Callable[..., FakeServer]]:
    """Start local servers for one test; every one is stopped when the test ends.

    Yields
    ------
    callable
        ``start(config=None, /, **fields) -> FakeServer``: a started server, built like
        :class:`~parrot_pandas.testing.FakeServer` from a ``ServerConfig`` and/or its fields
        (and ``host``, ``port``, ``clock``). It runs in a daemon thread, so sync and async
        tests can both call it.

    Examples
    --------
    >>> def test_retries_through_faults(fake_server_factory, df):  # doctest: +SKIP
    ...     srv = fake_server_factory(rpm=600, fail_rate=0.2, seed=1)
    ...     out = df.llm.generate("${text}", base_url=srv.url, api_key="x")
    ...     assert srv.stats()["failed"] > 0
    """
    started: list[FakeServer] = []

    def start(config: ServerConfig | None = None, /, **fields: Any) -> FakeServer:
        server = FakeServer(config, **fields).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fake_server(fake_server_factory: Callable[..., FakeServer]) -> FakeServer:
    """A well-behaved local OpenAI, Anthropic and Azure OpenAI server, for one test.

    Examples
    --------
    >>> def test_echo(fake_server, df):  # doctest: +SKIP
    ...     out = df.llm.generate("${text}", base_url=fake_server.url, api_key="x")
    """
    return fake_server_factory()
