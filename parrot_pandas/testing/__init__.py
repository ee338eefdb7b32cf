"""A deterministic local LLM server for tests, benchmarks and offline quickstarts.

``FakeServer`` speaks three protocols, each with its API's own response, error and rate-limit
header shapes:

- OpenAI: ``POST /v1/chat/completions`` (``x-ratelimit-*`` headers, durations like ``6m0s``);
- Anthropic Messages: ``POST /v1/messages`` (``x-api-key``, ``anthropic-version``, top-level
  ``system``, required ``max_tokens``, ``tool_use`` blocks, ``anthropic-ratelimit-*`` headers
  with RFC 3339 resets, ``{"type": "error", ...}`` bodies, 529 ``overloaded_error``);
- Azure OpenAI: ``POST /openai/deployments/{deployment}/chat/completions?api-version=...``
  (``api-key`` header, the deployment as the model, Azure's 401/404/429 bodies and its
  ``content_filter`` 400).

Behind them is one predictable "model":

- Plain requests get the *echo model*: choice ``i`` answers ``"echo: <last user message>"``
  when ``i`` is even and ``"echo (alt): <last user message>"`` when it is odd, so ``n=3``
  gives two distinct answers. Anthropic has no ``n``: there the answers alternate across
  repeated requests for the same message instead.
- Structured requests (a tool call, ``response_format`` ``json_schema`` / ``json_object``,
  Anthropic's ``output_config.format``, or a prompt that asks for JSON) get
  ``{"items": [...]}``: every line of the last user message that contains ``=`` becomes one
  object of its comma-separated ``key=value`` pairs (``name=Ada, year=1815``), keeping the keys
  the item schema declares and converting values to the declared types.

On top of that it can be slow (``latency``), rate limited (``rpm`` / ``tpm`` token buckets),
and unreliable (``fail_rate``, ``drop_rate``, ``malformed_rate``, drawn from a seeded
generator), and it counts what happened (``stats()``, or ``GET /_stats`` from another process).
``faults`` fails chosen rows the way real servers do, every time they are asked: a marker word
in the prompt picks the fault (a content filter, a truncation, a context-length 400, a
persistent 500, a request too large for the rate limit, a quota gone, a 200 echoing the key;
see :data:`FAULTS`).

Examples
--------
>>> from parrot_pandas.testing import FakeServer
>>> with FakeServer(latency=0.05, rpm=600) as srv:  # doctest: +SKIP
...     out = df.llm.generate("Summarize: ${text}", base_url=srv.url, api_key="x")
...     srv.stats()["ok"]
>>> with FakeServer() as srv:  # doctest: +SKIP
...     out = df.llm.generate("${text}", provider="anthropic", base_url=srv.origin, api_key="x")

From a shell (prints the base URL once it listens, serves until SIGTERM / Ctrl-C)::

    python -m parrot_pandas.testing --port 0 --latency 0.2 --rpm 1200

In pytest, enable the fixtures in your ``conftest.py`` (pytest is not a dependency of
parrot_pandas, so they live in their own module)::

    # conftest.py
    pytest_plugins = ["parrot_pandas.testing.pytest_plugin"]

    # test_summaries.py
    def test_summaries(fake_server, df):
        out = df.llm.generate("Summarize: ${text}", base_url=fake_server.url, api_key="x")

``fake_server`` is a well-behaved server; ``fake_server_factory(rpm=600, fail_rate=0.1)``
starts servers with any :class:`ServerConfig` fields. Both are stopped after the test.

Inside the package
------------------
The names above are the public ones; the modules behind them are private, one concern each:

- ``_config.py``: :class:`ServerConfig`, checked once;
- ``_bucket.py``: the server's own token bucket behind ``rpm`` / ``tpm``;
- ``_model.py``: the echo and ``key=value`` answer model, and reading schemas from a request;
- ``_faults.py``: fault injection: the random rates and the per-row :data:`FAULTS`;
- ``_packing.py``: packed requests (several rows in one), answered row by row and spoilt on
  purpose;
- ``_openai.py``, ``_azure.py``, ``_anthropic.py``: one protocol dialect each: reading,
  checking and answering its requests in its API's shapes;
- ``_server.py``: the aiohttp application, its routes and counters, and :class:`FakeServer`;
- ``__main__.py``: the command line; ``pytest_plugin.py``: the pytest fixtures.

Every protocol endpoint is mounted in ``_server.make_app``, before the catch-all 404: the chat
routes above, ``/_stats`` and ``/_reset``, and that is where the Files and Batches endpoints
(``_batches.py``) mount too.

The package imports nothing of the client (``parrot_pandas._*`` outside ``testing/``, not even
``parrot_pandas.errors``): it reads requests as the providers document them, so it is an
independent oracle for the client's code (``tests/test_testing_server.py`` walks the
imports to keep it so).
"""

from __future__ import annotations

from ._config import ServerConfig
from ._faults import FAULTS
from ._server import FakeServer

__all__ = ["FAULTS", "FakeServer", "ServerConfig"]
