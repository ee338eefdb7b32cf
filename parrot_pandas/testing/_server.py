"""The aiohttp application: its routes, its counters, and the :class:`FakeServer` lifecycle.

:func:`make_app` mounts every endpoint on one application (see it for the list): each chat
route is handled by its dialect module (``_openai.py``, ``_azure.py``, ``_anthropic.py``), and
what every protocol shares happens here, in :meth:`ChatServer.serve`: the rate-limit buckets,
latency, the random faults, and the answer (``_model.py``, or ``_packing.py`` for a packed
request). :class:`FakeServer` runs the application in a daemon thread, or on the current loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import _anthropic, _azure, _openai
from ._batches import mount as mount_batches
from ._bucket import Clock, TokenBucket
from ._config import ServerConfig
from ._faults import Faults, given_key
from ._model import Job, Plan, answer_texts
from ._openai import openai_error
from ._packing import PackedModel

__all__ = ["ChatServer", "FakeServer", "make_app"]


class _Stats:
    """Counters shared by the loop thread (writes) and any caller thread (snapshots)."""

    _FIELDS = (
        "requests", "ok", "rate_limited", "failed", "dropped", "malformed", "rejected",
        "faults", "prompt_tokens", "completion_tokens", "packed", "ids_dropped",
        "ids_duplicated", "ids_unknown", "packs_reordered", "packs_truncated",
    )  # fmt: skip

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            for name in self._FIELDS:
                setattr(self, name, 0)
            self.by_prompt: Counter[str] = Counter()
            self.max_in_flight = self.in_flight

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snap: dict[str, Any] = {name: getattr(self, name) for name in self._FIELDS}
            snap.update(
                by_prompt=Counter(self.by_prompt),
                in_flight=self.in_flight,
                max_in_flight=self.max_in_flight,
            )
        return snap


# A route's handler in its dialect module, given the server and the request.
Handler = Callable[["ChatServer", web.Request], Awaitable[web.StreamResponse]]


class ChatServer:
    """The server's state and what its routes share; one per application.

    The chat routes' handlers live in their dialect modules and call back into
    :meth:`check_auth`, :meth:`key_matches`, :meth:`faulted` and :meth:`serve`.
    """

    def __init__(self, config: ServerConfig, clock: Clock) -> None:
        self.config = config
        self.stats = _Stats()
        self.faults = Faults(config)
        # A separate stream, so turning jitter on does not change which requests fail.
        self._jitter = random.Random(f"{config.seed}-jitter")
        self._ids = itertools.count(1)
        self._answered: Counter[str] = Counter()  # per prompt, for rotating answers
        self._buckets: list[tuple[str, float, TokenBucket]] = []
        for kind, per_minute in (("requests", config.rpm), ("tokens", config.tpm)):
            if per_minute is not None:
                rate = per_minute / 60.0
                bucket = TokenBucket(rate, max(1.0, rate * config.burst), clock=clock)
                self._buckets.append((kind, per_minute, bucket))
        self._key = config.api_key.encode() if config.api_key else None
        self._auth = f"Bearer {config.api_key}".encode() if config.api_key else None
        self._packed = PackedModel(config.pack_faults, config.seed, self.stats.add)

    # -- small endpoints ----------------------------------------------------------------

    def check_auth(self, request: web.Request) -> web.Response | None:
        """OpenAI's 401 unless the request carries the key as a bearer token (or none is set)."""
        if self._auth is None:
            return None
        given = request.headers.get("Authorization")
        if given is None:
            message = (
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
        elif hmac.compare_digest(given.encode(), self._auth):
            return None
        else:
            # OpenAI echoes a masked key here; we echo nothing, so no log ever holds it.
            message = "Incorrect API key provided. Check the key you passed to this server."
        return openai_error(401, message, code="invalid_api_key")

    def key_matches(self, request: web.Request, header: str) -> bool | None:
        """Whether ``header`` holds the key: ``None`` when it is missing (and one is needed)."""
        if self._key is None:
            return True
        given = request.headers.get(header)
        if given is None:
            return None
        return hmac.compare_digest(given.encode(), self._key)

    def faulted(
        self, request: web.Request, dialect: Any, fault: str, model: str, prompt_tokens: int
    ) -> web.Response:
        """The error response of a per-row ``fault`` (one of ``_faults.FAULTS``), counted."""
        self.stats.add(faults=1, failed=int(fault == "server_error"))
        return dialect.fault(fault, model, prompt_tokens, given_key(request))

    async def models(self, request: web.Request) -> web.Response:
        if (denied := self.check_auth(request)) is not None:
            return denied
        names = self.config.models or ("parrot-echo",)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "parrot"} for m in names]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.snapshot())

    async def reset_stats(self, request: web.Request) -> web.Response:
        snap = self.stats.snapshot()
        self.stats.reset()
        return web.json_response(snap)

    async def not_found(self, request: web.Request) -> web.Response:
        message = f"Invalid URL ({request.method} {request.path})"
        return openai_error(404, message)

    # -- the three routes -----------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: the OpenAI protocol (``_openai.py``)."""
        return await self._counted(request, _openai.chat)

    async def azure_chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /openai/deployments/{deployment}/chat/completions?api-version=``: Azure
        (``_azure.py``)."""
        return await self._counted(request, _azure.azure_chat)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages``: the Anthropic Messages API (``_anthropic.py``)."""
        return await self._counted(request, _anthropic.messages)

    async def _counted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        stats = self.stats
        with stats.lock:
            stats.requests += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            response = await handler(self, request)
            if response.status >= 400 and response.status not in (429, 500, 503, 529):
                stats.add(rejected=1)
            return response
        finally:
            with stats.lock:
                stats.in_flight -= 1

    # -- what every protocol shares: limits, latency, faults, the answer ---------------------

    async def serve(self, request: web.Request, dialect: Any, job: Job) -> web.StreamResponse:
        """Admit ``job`` (a request its dialect has read), wait, fault it or answer it."""
        cfg = self.config
        refused = self._admit(dialect, job.model, job.prompt_tokens + job.max_out)
        if refused is not None:
            return refused
        headers = dialect.limit_headers(self._buckets)

        # Drawn at admission, in arrival order, so a sequential client sees a fixed sequence.
        fault = self.faults.draw()
        if cfg.latency:
            delay = cfg.latency
            if cfg.latency_jitter:
                delay *= 1 + cfg.latency_jitter * (2 * self._jitter.random() - 1)
            await asyncio.sleep(delay)

        if fault == "fail":
            self.stats.add(failed=1)
            return dialect.server_error(self.faults.failure(), headers)
        if fault == "drop":
            self.stats.add(dropped=1)
            if request.transport is not None:
                request.transport.close()
            # Never sent: aiohttp's write to the closing transport fails, and it treats
            # that as a client disconnect (no traceback logged).
            return web.Response(status=204)
        plan = job.plan
        malformed = plan.structured and fault == "malformed"

        start = self._answered[job.prompt] if job.rotate else 0
        packed = self._packed.answer(job, malformed, start, self._row_answers)
        if packed is None:
            answers = self._answers(plan, job.prompt, job.n, malformed, start)
        else:
            answers, job = packed
        payload, completion_tokens = dialect.render(job, answers, self._ids)
        with self.stats.lock:
            self.stats.ok += 1
            self.stats.faults += job.fault is not None
            self.stats.malformed += malformed
            self.stats.prompt_tokens += job.prompt_tokens
            self.stats.completion_tokens += completion_tokens
            self.stats.by_prompt[job.prompt] += 1
        if job.rotate:
            self._answered[job.prompt] += 1
        return web.json_response(payload, headers=headers)

    def _admit(self, dialect: Any, model: str, cost: int) -> web.Response | None:
        """Take from every bucket if the request fits all of them, else a 429."""
        if not self._buckets:
            return None
        costs = {"requests": 1, "tokens": cost}
        waits = [(b.wait_time(costs[kind]), kind, limit, b) for kind, limit, b in self._buckets]
        wait, kind, limit, bucket = max(waits, key=lambda w: w[0])
        if wait == 0.0:
            for kind_, _limit, b in self._buckets:
                b.take(costs[kind_])
            return None
        self.stats.add(rate_limited=1)
        headers = dialect.limit_headers(self._buckets)
        return dialect.rate_limited(model, kind, limit, bucket, costs[kind], wait, headers)

    def _answers(
        self, plan: Plan, prompt: str, n: int, malformed: bool, start: int = 0
    ) -> list[str]:
        """The model's answer texts (``_model.answer_texts``), one unless ``honor_n``."""
        return answer_texts(plan, prompt, n if self.config.honor_n else 1, malformed, start)

    def _row_answers(
        self, prompt: str, props: dict[str, Any] | None, n: int, start: int
    ) -> list[str]:
        """One row of a packed request, answered as if it came alone (echo without props)."""
        plan = Plan("echo" if props is None else "json", props, ())
        return self._answers(plan, prompt, n, False, start)


_STATE = web.AppKey("parrot_fake_server", ChatServer)


def make_app(
    config: ServerConfig | None = None, *, clock: Clock = time.monotonic
) -> web.Application:
    """Build the fake server's aiohttp application, for embedding in your own runner.

    Parameters
    ----------
    config : ServerConfig, optional
        The behaviour; defaults to ``ServerConfig()`` (fast, unlimited, reliable).
    clock : callable, default time.monotonic
        Time source of the rate-limit buckets.

    Returns
    -------
    aiohttp.web.Application
        Routes ``GET /v1/models``, ``POST /v1/chat/completions`` (OpenAI),
        ``POST /v1/messages`` (Anthropic),
        ``POST /openai/deployments/{deployment}/chat/completions`` (Azure OpenAI),
        ``GET /_stats`` and ``POST /_reset`` (returns the stats as they were, then zeroes them).

    Examples
    --------
    >>> app = make_app(ServerConfig(rpm=60))
    >>> # aiohttp.web.run_app(app, port=8000)
    """
    server = ChatServer(config or ServerConfig(), clock)
    # Prompts are whole documents: allow bodies far beyond aiohttp's 1 MiB default.
    app = web.Application(client_max_size=64 * 1024**2)
    app[_STATE] = server
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/v1/messages", server.messages)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", server.azure_chat)
    app.router.add_get("/_stats", server.get_stats)
    app.router.add_post("/_reset", server.reset_stats)
    # Further protocol endpoints mount here, before the catch-all (routes match in order): the
    # Files and Batches endpoints of every protocol (issue 14).
    mount_batches(app, api_key=server.config.api_key)
    app.router.add_route("*", "/{tail:.*}", server.not_found)
    return app


class FakeServer:
    """A local OpenAI, Anthropic and Azure OpenAI server, run in a thread or on the current loop.

    Parameters
    ----------
    config : ServerConfig, optional
        The behaviour. Keyword arguments named like :class:`ServerConfig` fields build or
        override it: ``FakeServer(latency=0.2, rpm=1200)``.
    host : str, default "127.0.0.1"
    port : int, default 0
        0 picks a free port; read it back from :attr:`url` once started.
    clock : callable, default time.monotonic
        Time source of the rate-limit buckets.
    **fields
        :class:`ServerConfig` fields.

    Examples
    --------
    From synchronous code, the server runs in its own event loop in a daemon thread:

    >>> with FakeServer(rpm=600) as srv:  # doctest: +SKIP
    ...     out = df.llm.generate("${text}", base_url=srv.url, api_key="x")
    ...     print(srv.stats()["ok"])

    From async code (an async test), it runs on the current loop:

    >>> async with FakeServer(latency=0.1) as srv:  # doctest: +SKIP
    ...     ...
    """

    def __init__(
        self,
        config: ServerConfig | None = None,
        /,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
        **fields: Any,
    ) -> None:
        if config is None:
            config = ServerConfig(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        self.config = config
        self.host = host
        self.port = port
        self.app = make_app(config, clock=clock)
        self._server = self.app[_STATE]
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        where = self.url if self._runner is not None else "not started"
        return f"FakeServer({where}, {self.config!r})"

    @property
    def url(self) -> str:
        """The OpenAI base URL clients use, ``http://127.0.0.1:PORT/v1``."""
        return f"{self.origin}/v1"

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT``: the Anthropic base URL (Anthropic's SDK takes it without
        ``/v1``) and the Azure endpoint (``AZURE_OPENAI_ENDPOINT``)."""
        if self._runner is None:
            raise RuntimeError("the server is not running; use `with FakeServer() as srv:`")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters, safe to call from any thread.

        Returns
        -------
        dict
            ``requests`` (every POST to a chat route: OpenAI, Anthropic or Azure), ``ok``
            (200s, malformed ones included), ``rate_limited`` (429s), ``failed`` (injected
            5xx), ``dropped``, ``malformed``, ``rejected`` (other 4xx), ``faults`` (responses
            spoilt by ``ServerConfig.faults``, whatever their status), ``by_prompt`` (a
            ``Counter``: last user message -> 200 answers), ``in_flight``, ``max_in_flight``
            (peak concurrent requests in the handler), ``prompt_tokens`` and
            ``completion_tokens`` (of 200s); for packed requests, ``packed`` (answered row by
            row) and the pack faults done: ``ids_dropped``, ``ids_duplicated``,
            ``ids_unknown``, ``packs_reordered``, ``packs_truncated``.
        """
        return self._server.stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (rate-limit buckets and the fault sequence carry on)."""
        self._server.stats.reset()

    async def _astart(self) -> None:
        if self._runner is not None:
            raise RuntimeError("a FakeServer runs once; create a new one to serve again")
        # A short shutdown_timeout: in-flight requests of a test that ended are not worth
        # the 60 s aiohttp would wait for them.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeServer:
        await self._astart()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._astop()

    def start(self) -> FakeServer:
        """Start serving from a daemon thread with its own event loop; returns ``self``."""
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._astop())
            # Handlers still sleeping (a client that went away) must end before the loop closes,
            # or Python reports each as "Task was destroyed but it is pending" at exit.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="parrot-fake-server", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Stop the thread started by :meth:`start` (idempotent)."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = self._loop = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
