"""The Files and Batches endpoints of the test server, and its prompt-cache accounting.

:class:`FakeBatches` adds to a :class:`~parrot_pandas.testing.FakeServer` the Batch APIs of
the three protocols it speaks, each in its provider's shapes:

- OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}``,
  ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``; ``POST /v1/batches``,
  ``GET /v1/batches`` (``after``, ``limit``), ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``;
- Azure OpenAI: the same under ``/openai/files`` and ``/openai/batches``, with
  ``?api-version=`` and an ``api-key`` header, lines addressed to ``/chat/completions``;
- Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches`` (``after_id``,
  ``limit``), ``GET /v1/messages/batches/{id}``, ``POST .../{id}/cancel``,
  ``GET .../{id}/results``, ``DELETE .../{id}``.

Every request line is answered by the server's own live route (``/v1/chat/completions``,
``/openai/deployments/{model}/chat/completions`` or ``/v1/messages``), over HTTP: the same
echo and ``key=value`` model, the same validation, faults and limits as a live request. A line
the live route refuses with a 429 waits for the next step; any other error status becomes the
line's error result. This module imports nothing of the client: the server stays an
independent oracle.

Time
----
A batch moves one status per :attr:`FakeBatches.step` seconds of its clock (``0``: as far as
it can at every look). :meth:`FakeBatches.advance` moves the clock forward without sleeping.
OpenAI: ``validating`` -> ``in_progress`` (lines run, :attr:`lines_per_step` a step) ->
``finalizing`` -> ``completed``. Anthropic: ``in_progress`` (lines run) -> ``ended``. A batch
whose :attr:`window` (24 hours) passes before its lines have run ends ``expired`` (OpenAI) or
``ended`` with ``expired`` results (Anthropic), the lines that ran kept.

Faults
------
- A line whose body contains :attr:`fail_marker` (``"BATCH_FAIL"``) fails with a 500 the
  first :attr:`fail_times` times it runs; :attr:`fail_share` fails a seeded random share.
- A line whose body contains :attr:`expire_marker` (``"BATCH_EXPIRE"``) never runs in the
  first :attr:`expire_times` batches it is in: its batch can only expire (or be cancelled).
- :attr:`max_requests` and :attr:`max_bytes` reject a file or batch above them, as the
  providers do (``too_many_tasks``, a 400 on upload, Anthropic's 400 on create).

Prompt caching
--------------
Every 200 answer of the chat routes (live or batch) reports cached tokens:
``usage.prompt_tokens_details.cached_tokens`` (OpenAI, Azure) for a prefix -- every message
but the last, and the schema -- seen before; ``cache_creation_input_tokens`` then
``cache_read_input_tokens`` (Anthropic) for the prefix up to a ``cache_control`` block. Only
prefixes of :attr:`cache_min_tokens` tokens or more are cached. A batch line reads only what
was cached before its batch was created (a cold batch reads nothing: warm it with one live
request first).

Examples
--------
>>> from parrot_pandas.testing import FakeServer
>>> with FakeServer() as srv:  # doctest: +SKIP
...     batches = FakeBatches.of(srv.app)
...     batches.step = 60  # a minute per status
...     ...  # submit a batch
...     batches.advance(120)
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from ._anthropic import rfc3339
from ._azure import azure_error
from ._model import count_tokens, message_text
from ._openai import openai_error

__all__ = ["FakeBatches", "mount"]

Clock = Callable[[], float]
_Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]

_BATCH_HEADER = "x-parrot-batch-created"
_CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DAY = 24 * 3600.0
_STATE = web.AppKey("parrot_fake_batches", object)

_OPENAI_MAX_REQUESTS = 50_000
_AZURE_MAX_REQUESTS = 100_000
_ANTHROPIC_MAX_REQUESTS = 100_000
_OPENAI_MAX_BYTES = 200 * 1024**2
_ANTHROPIC_MAX_BYTES = 256 * 1024**2

_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
_SERVER_ERROR = (
    "The server had an error processing your request. Sorry about that! You can retry your "
    "request, or contact us through our help center if you keep seeing this error."
)


def mount(app: web.Application, *, api_key: str | None = None, **settings: Any) -> FakeBatches:
    """Add the Files and Batches endpoints (and prompt-cache accounting) to a server app.

    Call before the app's catch-all route is added (routes match in order) and before it
    starts.

    Parameters
    ----------
    app : aiohttp.web.Application
        The fake server's application.
    api_key : str, optional
        The key every request must carry (as the server's live routes require it).
    **settings
        :class:`FakeBatches` attributes (``step``, ``fail_marker``, ...).

    Returns
    -------
    FakeBatches
        Also found later with :meth:`FakeBatches.of`.
    """
    batches = FakeBatches(api_key=api_key, **settings)
    batches.install(app)
    return batches


@dataclasses.dataclass
class _File:
    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclasses.dataclass
class _Line:
    custom_id: str
    body: dict[str, Any]
    text: str  # the body as JSON, where the markers are looked for
    state: str = "pending"  # pending, ok, failed, expired, cancelled
    status: int = 0
    response: Any = None


@dataclasses.dataclass
class _Batch:
    id: str
    dialect: str  # "openai", "azure", "anthropic"
    created_at: float
    expires_at: float
    status: str
    lines: list[_Line]
    origin: str
    auth: dict[str, str]
    api_version: str | None = None
    endpoint: str = ""
    input_file_id: str | None = None
    metadata: dict[str, str] | None = None
    clock_mark: float = 0.0  # when the last step happened
    cache_epoch: int = 0  # prompt-cache entries older than this are warm for the batch
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)

    @property
    def ended(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled", "ended")


class FakeBatches:
    """The Batch APIs of a fake server: files, batches, their clock and their faults.

    Every parameter but ``api_key`` and ``clock`` is also an attribute of the same name, which
    a test may set on a running server: it applies from the next look at a batch.

    Parameters
    ----------
    api_key : str, optional
        The key every request must carry, each API's way (never echoed).
    clock : callable, default time.time
        Wall-clock seconds; the batches' times are this plus every :meth:`advance`.
    step : float
        Seconds of the clock per status change; ``0`` moves a batch as far as it can at
        every look (a batch is done when it is first retrieved).
    lines_per_step : int, optional
        Lines run per step while a batch is in progress; ``None`` runs them all in one step.
    window : float
        Seconds from creation until a batch expires (24 hours).
    fail_marker, fail_times, fail_share, seed
        Lines that fail with a 500 (see the module docstring).
    expire_marker, expire_times
        Lines that never run (see the module docstring).
    max_requests, max_bytes : int, optional
        Override the providers' limits (50,000 / 100,000 requests; 200 / 256 MB).
    cache_min_tokens : int
        The shortest prefix the prompt cache keeps (1,024 tokens).
    concurrency : int
        Lines of one batch sent to the live route at once.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        clock: Clock = time.time,
        step: float = 0.0,
        lines_per_step: int | None = None,
        window: float = _DAY,
        fail_marker: str = "BATCH_FAIL",
        fail_times: int = 1,
        fail_share: float = 0.0,
        expire_marker: str = "BATCH_EXPIRE",
        expire_times: int = 1,
        seed: int = 0,
        max_requests: int | None = None,
        max_bytes: int | None = None,
        cache_min_tokens: int = 1024,
        concurrency: int = 16,
    ) -> None:
        self.step = step
        self.lines_per_step = lines_per_step
        self.window = window
        self.fail_marker = fail_marker
        self.fail_times = fail_times
        self.fail_share = fail_share
        self.expire_marker = expire_marker
        self.expire_times = expire_times
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.cache_min_tokens = cache_min_tokens
        self.concurrency = concurrency
        self._key = api_key.encode() if api_key else None
        self._clock = clock
        self._offset = 0.0
        self._lock = threading.Lock()
        self._rng = random.Random(f"{seed}-batches")
        self._ids = itertools.count(1)
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}
        self._failures: Counter[str] = Counter()  # marker failures per line body
        self._expiries: Counter[str] = Counter()  # batches a marked line expired in
        self._warm: dict[str, int] = {}  # prompt-cache prefix -> epoch first cached
        self._epochs = itertools.count(1)
        self._counts: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None

    # -- the test hooks ---------------------------------------------------------------------

    @staticmethod
    def of(app: web.Application) -> FakeBatches:
        """The :class:`FakeBatches` mounted on ``app`` (``FakeServer(...).app``)."""
        return app[_STATE]  # type: ignore[return-value]

    def now(self) -> float:
        """The batches' clock: the injected clock plus every :meth:`advance`."""
        with self._lock:
            return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the batches' clock forward by ``seconds`` (no sleeping)."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += seconds

    def stats(self) -> dict[str, int]:
        """Counts: ``files`` uploaded, ``batches`` created, ``lines`` run (sent to the live
        route), ``cancels`` asked for, ``cache_reads`` and ``cache_writes`` reported."""
        with self._lock:
            return {
                name: self._counts[name]
                for name in ("files", "batches", "lines", "cancels", "cache_reads", "cache_writes")
            }

    def batch_ids(self) -> list[str]:
        """Ids of every batch created, oldest first."""
        return list(self._batches)

    # -- wiring -----------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Add the routes and the prompt-cache middleware to ``app`` (see :func:`mount`)."""
        app[_STATE] = self
        app.middlewares.append(self._prompt_cache)
        app.on_cleanup.append(self._close)
        r = app.router
        for prefix, dialect in (("/v1", "openai"), ("/openai", "azure")):
            r.add_post(f"{prefix}/files", self._route(dialect, self.upload))
            r.add_get(f"{prefix}/files/{{file_id}}", self._route(dialect, self.file_info))
            r.add_delete(f"{prefix}/files/{{file_id}}", self._route(dialect, self.delete_file))
            r.add_get(f"{prefix}/files/{{file_id}}/content", self._route(dialect, self.content))
            r.add_post(f"{prefix}/batches", self._route(dialect, self.create))
            r.add_get(f"{prefix}/batches", self._route(dialect, self.list_batches))
            r.add_get(f"{prefix}/batches/{{batch_id}}", self._route(dialect, self.retrieve))
            r.add_post(f"{prefix}/batches/{{batch_id}}/cancel", self._route(dialect, self.cancel))
        a = "/v1/messages/batches"
        r.add_post(a, self._route("anthropic", self.create))
        r.add_get(a, self._route("anthropic", self.list_batches))
        r.add_get(a + "/{batch_id}", self._route("anthropic", self.retrieve))
        r.add_delete(a + "/{batch_id}", self._route("anthropic", self.delete_batch))
        r.add_post(a + "/{batch_id}/cancel", self._route("anthropic", self.cancel))
        r.add_get(a + "/{batch_id}/results", self._route("anthropic", self.results))

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _route(self, dialect: str, handler: _Handler) -> Callable[..., Any]:
        async def route(request: web.Request) -> web.StreamResponse:
            denied = self._check(request, dialect)
            if denied is not None:
                return denied
            return await handler(request, dialect)

        return route

    def _check(self, request: web.Request, dialect: str) -> web.Response | None:
        """Authentication and version headers, in each API's own words."""
        if dialect == "azure":
            if not request.query.get("api-version"):
                return azure_error(404, "404", "Resource not found")
            if not self._matches(request.headers.get("api-key")):
                return azure_error(
                    401,
                    "401",
                    "Access denied due to invalid subscription key or wrong API endpoint.",
                )
            return None
        if dialect == "anthropic":
            given = request.headers.get("x-api-key")
            if given is None and request.headers.get("Authorization", "").startswith("Bearer "):
                given = request.headers["Authorization"][7:]
            if not self._matches(given):
                return _anthropic_error(401, "authentication_error", "invalid x-api-key")
            if not request.headers.get("anthropic-version"):
                return _anthropic_error(
                    400, "invalid_request_error", "anthropic-version: header is required"
                )
            return None
        auth = request.headers.get("Authorization", "")
        if not self._matches(auth[7:] if auth.startswith("Bearer ") else None):
            return openai_error(
                401,
                "Incorrect API key provided.",
                code="invalid_api_key",
                type_="invalid_request_error",
            )
        return None

    def _matches(self, given: str | None) -> bool:
        if self._key is None:
            return True
        return given is not None and hmac.compare_digest(given.encode(), self._key)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}parrot{next(self._ids):06d}"

    # -- files ------------------------------------------------------------------------------

    async def upload(self, request: web.Request, dialect: str) -> web.Response:
        try:
            form = await request.post()
        except ValueError:
            return openai_error(400, "The request body must be multipart/form-data.")
        purpose, upload = form.get("purpose"), form.get("file")
        if not isinstance(purpose, str) or not purpose:
            return openai_error(400, "Missing required parameter: 'purpose'.", param="purpose")
        if not isinstance(upload, web.FileField):
            return openai_error(400, "Missing required parameter: 'file'.", param="file")
        content = upload.file.read()
        limit = self.max_bytes or _OPENAI_MAX_BYTES
        if purpose == "batch" and len(content) > limit:
            return openai_error(
                400,
                f"File is too large: {len(content):,} bytes; files for batch may be at most "
                f"{limit:,} bytes.",
                param="file",
                code="file_too_large",
            )
        file = _File(
            self._new_id("file-"), upload.filename or "upload", purpose, content, int(self.now())
        )
        self._files[file.id] = file
        self._count("files")
        return web.json_response(file.info())

    def _file(self, request: web.Request) -> _File | web.Response:
        file = self._files.get(request.match_info["file_id"])
        if file is None:
            message = f"No such File object: {request.match_info['file_id']}"
            return openai_error(404, message, param="id")
        return file

    async def file_info(self, request: web.Request, dialect: str) -> web.Response:
        file = self._file(request)
        return file if isinstance(file, web.Response) else web.json_response(file.info())

    async def content(self, request: web.Request, dialect: str) -> web.Response:
        file = self._file(request)
        if isinstance(file, web.Response):
            return file
        return web.Response(body=file.content, content_type="application/octet-stream")

    async def delete_file(self, request: web.Request, dialect: str) -> web.Response:
        file = self._file(request)
        if isinstance(file, web.Response):
            return file
        del self._files[file.id]
        return web.json_response({"id": file.id, "object": "file", "deleted": True})

    # -- batches ----------------------------------------------------------------------------

    async def create(self, request: web.Request, dialect: str) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            if dialect == "anthropic":
                return _anthropic_error(400, "invalid_request_error", "The body must be JSON.")
            return openai_error(400, "We could not parse the JSON body of your request.")
        origin = f"{request.scheme}://{request.host}"
        auth = {
            name: request.headers[name]
            for name in ("Authorization", "api-key", "x-api-key", "anthropic-version")
            if name in request.headers
        }
        now = self.now()
        if dialect == "anthropic":
            made = self._create_anthropic(body, origin, auth, now)
        else:
            made = self._create_openai(
                body, dialect, request.query.get("api-version"), origin, auth, now
            )
        if isinstance(made, web.Response):
            return made
        with self._lock:
            made.cache_epoch = next(self._epochs)
        self._batches[made.id] = made
        self._count("batches")
        return web.json_response(self._render(made))

    def _create_openai(
        self,
        body: dict[str, Any],
        dialect: str,
        api_version: str | None,
        origin: str,
        auth: dict[str, str],
        now: float,
    ) -> _Batch | web.Response:
        endpoint = "/chat/completions" if dialect == "azure" else "/v1/chat/completions"
        if body.get("endpoint") != endpoint:
            return openai_error(
                400,
                f"Invalid value for 'endpoint': {body.get('endpoint')!r}; this server supports "
                f"{endpoint!r}.",
                param="endpoint",
                code="invalid_value",
            )
        if body.get("completion_window") != "24h":
            return openai_error(
                400,
                "Invalid value for 'completion_window': only '24h' is supported.",
                param="completion_window",
                code="invalid_value",
            )
        file = self._files.get(str(body.get("input_file_id")))
        if file is None or file.purpose != "batch":
            return openai_error(
                400,
                f"Cannot find file {body.get('input_file_id')}, or it was not uploaded with "
                "purpose 'batch'.",
                param="input_file_id",
            )
        metadata = body.get("metadata")
        return _Batch(
            id=self._new_id("batch_"),
            dialect=dialect,
            created_at=now,
            expires_at=now + self.window,
            status="validating",
            lines=[],
            origin=origin,
            auth=auth,
            api_version=api_version,
            endpoint=endpoint,
            input_file_id=file.id,
            metadata=dict(metadata) if isinstance(metadata, dict) else None,
            clock_mark=now,
        )

    def _create_anthropic(
        self, body: dict[str, Any], origin: str, auth: dict[str, str], now: float
    ) -> _Batch | web.Response:
        def invalid(message: str) -> web.Response:
            return _anthropic_error(400, "invalid_request_error", message)

        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return invalid("requests: at least one request is required")
        limit = self.max_requests or _ANTHROPIC_MAX_REQUESTS
        if len(requests) > limit:
            return invalid(f"requests: a batch may hold at most {limit:,} requests")
        size = len(json.dumps(body))
        if size > (self.max_bytes or _ANTHROPIC_MAX_BYTES):
            return _anthropic_error(413, "request_too_large", "Request exceeds the maximum size")
        lines, seen = [], set()
        for i, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            params = item.get("params") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or _CUSTOM_ID.fullmatch(custom_id) is None:
                return invalid(
                    f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
                )
            if custom_id in seen:
                return invalid(f"requests: custom_id {custom_id!r} is not unique")
            if not isinstance(params, dict):
                return invalid(f"requests.{i}.params: Field required")
            seen.add(custom_id)
            lines.append(_Line(custom_id, params, json.dumps(params)))
        return _Batch(
            id=self._new_id("msgbatch_"),
            dialect="anthropic",
            created_at=now,
            expires_at=now + self.window,
            status="in_progress",
            lines=lines,
            origin=origin,
            auth=auth,
            clock_mark=now,
        )

    async def _batch(self, request: web.Request, dialect: str) -> _Batch | web.Response:
        """The batch the path names, moved up to now (:meth:`_sync`); or the API's 404."""
        batch = self._batches.get(request.match_info["batch_id"])
        family = "anthropic" if dialect == "anthropic" else "openai"
        if batch is None or ("anthropic" if batch.dialect == "anthropic" else "openai") != family:
            if dialect == "anthropic":
                return _anthropic_error(404, "not_found_error", "Message batch not found")
            message = f"No batch found with id '{request.match_info['batch_id']}'."
            return openai_error(404, message, param="batch_id")
        await self._sync(batch)
        return batch

    async def retrieve(self, request: web.Request, dialect: str) -> web.Response:
        batch = await self._batch(request, dialect)
        if isinstance(batch, web.Response):
            return batch
        return web.json_response(self._render(batch))

    async def cancel(self, request: web.Request, dialect: str) -> web.Response:
        batch = await self._batch(request, dialect)
        if isinstance(batch, web.Response):
            return batch
        async with batch.lock:
            if batch.ended:
                if dialect == "anthropic":
                    return _anthropic_error(
                        400, "invalid_request_error", f"Batch {batch.id} has already ended"
                    )
                return openai_error(
                    409, f"Cannot cancel a batch with status '{batch.status}'.", code=None
                )
            batch.status = "canceling" if dialect == "anthropic" else "cancelling"
            batch.times["cancel"] = self.now()
            batch.clock_mark = self.now()
            self._count("cancels")
        return web.json_response(self._render(batch))

    async def list_batches(self, request: web.Request, dialect: str) -> web.Response:
        family = {"anthropic"} if dialect == "anthropic" else {"openai", "azure"}
        chosen = [b for b in reversed(self._batches.values()) if b.dialect in family]
        after = request.query.get("after_id" if dialect == "anthropic" else "after")
        if after:
            ids = [b.id for b in chosen]
            chosen = chosen[ids.index(after) + 1 :] if after in ids else []
        try:
            limit = max(1, min(int(request.query.get("limit", 20)), 1000))
        except ValueError:
            limit = 20
        page, more = chosen[:limit], len(chosen) > limit
        for batch in page:
            await self._sync(batch)
        data = [self._render(b) for b in page]
        first = data[0]["id"] if data else None
        last = data[-1]["id"] if data else None
        if dialect == "anthropic":
            return web.json_response(
                {"data": data, "has_more": more, "first_id": first, "last_id": last}
            )
        return web.json_response(
            {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more}
        )

    async def results(self, request: web.Request, dialect: str) -> web.Response:
        batch = await self._batch(request, dialect)
        if isinstance(batch, web.Response):
            return batch
        if not batch.ended:
            return _anthropic_error(
                400, "invalid_request_error", f"Batch {batch.id} is still {batch.status}"
            )
        text = "".join(
            json.dumps({"custom_id": line.custom_id, "result": _anthropic_result(line)}) + "\n"
            for line in batch.lines
        )
        return web.Response(body=text.encode(), content_type="application/binary")

    async def delete_batch(self, request: web.Request, dialect: str) -> web.Response:
        batch = await self._batch(request, dialect)
        if isinstance(batch, web.Response):
            return batch
        if not batch.ended:
            return _anthropic_error(
                400, "invalid_request_error", "Only an ended batch can be deleted; cancel it first"
            )
        del self._batches[batch.id]
        return web.json_response({"id": batch.id, "type": "message_batch_deleted"})

    # -- the state machine ------------------------------------------------------------------

    async def _sync(self, batch: _Batch) -> None:
        """Move ``batch`` as far as its clock allows: every step due before now, in order,
        and expiry once the window has passed with lines still waiting."""
        # Azure keeps running a batch past its 24-hour target.
        expires = batch.dialect != "azure"
        async with batch.lock:
            for _ in range(10_000):  # a bound, never reached: each step changes something
                if batch.ended:
                    return
                now = self.now()
                # With step 0 every step is due at once (at the batch's last mark).
                due = batch.clock_mark + self.step
                if expires and now >= batch.expires_at and due >= batch.expires_at:
                    self._end(batch, "expired", batch.expires_at)
                    return
                if now < due:
                    return
                if not await self._step(batch, due):
                    if expires and now >= batch.expires_at:
                        self._end(batch, "expired", batch.expires_at)
                    return
                batch.clock_mark = due

    async def _step(self, batch: _Batch, now: float) -> bool:
        """One status change (or one round of lines); ``False`` when nothing can happen."""
        status = batch.status
        if status in ("cancelling", "canceling"):
            self._end(batch, "cancelled", now)
            return True
        if status == "validating":
            problems = self._validate(batch)
            if problems:
                batch.status, batch.errors = "failed", problems
                batch.times["failed"] = now
            else:
                batch.status = "in_progress"
                batch.times["in_progress"] = now
            return True
        if status == "finalizing":
            self._end(batch, "completed", now)
            return True
        # in_progress: run a round of the lines that can run.
        runnable = [
            line for line in batch.lines if line.state == "pending" and not self._held(line)
        ]
        if self.lines_per_step is not None:
            runnable = runnable[: self.lines_per_step]
        if runnable:
            # No progress (every line refused with a 429, or dropped): try again next look.
            return await self._run(batch, runnable) > 0
        if any(line.state == "pending" for line in batch.lines):
            return False  # only held lines (or lines refused with 429 this round) remain
        if batch.dialect == "anthropic":
            self._end(batch, "completed", now)
        else:
            batch.status = "finalizing"
            batch.times["finalizing"] = now
        return True

    def _held(self, line: _Line) -> bool:
        marker = self.expire_marker
        return (
            bool(marker) and marker in line.text and self._expiries[line.text] < self.expire_times
        )

    def _validate(self, batch: _Batch) -> list[dict[str, Any]]:
        """Read and check an OpenAI batch's input file, as OpenAI's ``validating`` does."""
        file = self._files.get(batch.input_file_id or "")
        if file is None:
            return [_problem("invalid_file", "The input file no longer exists.")]
        raw_lines = file.content.decode("utf-8", "replace").splitlines()
        if not any(raw.strip() for raw in raw_lines):
            return [_problem("empty_file", "The input file is empty.")]
        limit = self.max_requests or (
            _AZURE_MAX_REQUESTS if batch.dialect == "azure" else _OPENAI_MAX_REQUESTS
        )
        if len(raw_lines) > limit:
            message = f"The input file has {len(raw_lines):,} requests; at most {limit:,} fit."
            return [_problem("too_many_tasks", message)]
        problems, seen, models = [], set(), set()
        for number, raw in enumerate(raw_lines, start=1):
            try:
                item = json.loads(raw)
            except ValueError:
                item = None
            if not isinstance(item, dict):
                message = "This line is not parseable as valid JSON."
                problems.append(_problem("invalid_json_line", message, number))
                continue
            custom_id, body = item.get("custom_id"), item.get("body")
            if item.get("url") != batch.endpoint:
                message = f"The url must be the batch's endpoint, {batch.endpoint!r}."
                problems.append(_problem("url_mismatch", message, number))
            elif not isinstance(custom_id, str) or not custom_id or not isinstance(body, dict):
                message = "Each line needs a custom_id and a body."
                problems.append(_problem("invalid_request", message, number))
            elif custom_id in seen:
                message = f"The custom_id {custom_id!r} is used by more than one request."
                problems.append(_problem("duplicate_custom_id", message, number))
            else:
                seen.add(custom_id)
                models.add(body.get("model"))
                batch.lines.append(_Line(custom_id, body, json.dumps(body)))
        if len(models) > 1 and not problems:
            message = "All requests in a batch must use the same model."
            problems.append(_problem("model_mismatch", message))
        if problems:
            batch.lines.clear()
        return problems

    async def _run(self, batch: _Batch, lines: list[_Line]) -> int:
        """Run ``lines``; how many of them finished (the rest wait for the next step)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        gate = asyncio.Semaphore(max(1, self.concurrency))

        async def run(line: _Line) -> None:
            async with gate:
                await self._run_line(batch, line)

        await asyncio.gather(*(run(line) for line in lines))
        return sum(line.state != "pending" for line in lines)

    async def _run_line(self, batch: _Batch, line: _Line) -> None:
        marker = self.fail_marker
        if marker and marker in line.text and self._failures[line.text] < self.fail_times:
            self._failures[line.text] += 1
            self._fail(batch, line)
            return
        if self.fail_share and self._rng.random() < self.fail_share:
            self._fail(batch, line)
            return
        headers = {**batch.auth, _BATCH_HEADER: str(batch.cache_epoch)}
        if batch.dialect == "anthropic":
            url = f"{batch.origin}/v1/messages"
        elif batch.dialect == "azure":
            model = quote(str(line.body.get("model") or ""), safe="")
            url = (
                f"{batch.origin}/openai/deployments/{model}/chat/completions"
                f"?api-version={quote(batch.api_version or '', safe='')}"
            )
        else:
            url = f"{batch.origin}/v1/chat/completions"
        assert self._session is not None
        try:
            async with self._session.post(url, json=line.body, headers=headers) as response:
                status, raw = response.status, await response.read()
        except aiohttp.ClientError:
            return  # a dropped connection: the line runs again at the next step
        self._count("lines")
        if status == 429:
            return  # the queue waits for capacity: the line runs at a later step
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"error": {"message": raw.decode("utf-8", "replace")[:500]}}
        line.status, line.response = status, payload
        line.state = "ok" if 200 <= status < 300 else "failed"

    def _fail(self, batch: _Batch, line: _Line) -> None:
        line.state, line.status = "failed", 500
        if batch.dialect == "anthropic":
            line.response = {
                "type": "error",
                "error": {"type": "api_error", "message": "Internal server error"},
            }
        else:
            line.response = {
                "error": {
                    "message": _SERVER_ERROR,
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }

    def _end(self, batch: _Batch, how: str, now: float) -> None:
        """End ``batch``: its pending lines expired or cancelled, its result files written."""
        for line in batch.lines:
            if line.state == "pending":
                line.state = "expired" if how == "expired" else "cancelled"
                if how == "expired" and self.expire_marker and self.expire_marker in line.text:
                    self._expiries[line.text] += 1
        batch.times["ended"] = now
        if batch.dialect == "anthropic":
            batch.status = "ended"
            return
        batch.status = how
        output = [self._openai_line(b, ok=True) for b in batch.lines if b.state == "ok"]
        errors = [self._openai_line(b, ok=False) for b in batch.lines if b.state != "ok"]
        if output:
            batch.output_file_id = self._write(batch, "output", output)
        if errors:
            batch.error_file_id = self._write(batch, "error", errors)

    def _openai_line(self, line: _Line, *, ok: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"id": self._new_id("batch_req_"), "custom_id": line.custom_id}
        if line.state in ("ok", "failed"):
            entry["response"] = {
                "status_code": line.status,
                "request_id": self._new_id("req_"),
                "body": line.response,
            }
            entry["error"] = None
        else:
            code = "batch_expired" if line.state == "expired" else "batch_cancelled"
            message = _EXPIRED_MESSAGE if line.state == "expired" else _CANCELLED_MESSAGE
            entry["response"] = None
            entry["error"] = {"code": code, "message": message}
        return entry

    def _write(self, batch: _Batch, kind: str, lines: list[dict[str, Any]]) -> str:
        content = "".join(json.dumps(line) + "\n" for line in lines).encode()
        name = f"{batch.id}_{kind}.jsonl"
        file = _File(self._new_id("file-"), name, "batch_output", content, int(self.now()))
        self._files[file.id] = file
        return file.id

    # -- rendering --------------------------------------------------------------------------

    def _render(self, batch: _Batch) -> dict[str, Any]:
        if batch.dialect == "anthropic":
            return self._render_anthropic(batch)
        counts = Counter(line.state for line in batch.lines)
        t = {k: int(v) for k, v in batch.times.items()}
        ended = t.get("ended")
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_at),
            "in_progress_at": t.get("in_progress"),
            "expires_at": int(batch.expires_at),
            "finalizing_at": t.get("finalizing"),
            "completed_at": ended if batch.status == "completed" else None,
            "failed_at": t.get("failed"),
            "expired_at": ended if batch.status == "expired" else None,
            "cancelling_at": t.get("cancel"),
            "cancelled_at": ended if batch.status == "cancelled" else None,
            "request_counts": {
                "total": len(batch.lines),
                "completed": counts["ok"],
                "failed": len(batch.lines) - counts["ok"] - counts["pending"],
            },
            "metadata": batch.metadata,
        }

    def _render_anthropic(self, batch: _Batch) -> dict[str, Any]:
        ended = batch.status == "ended"
        counts = Counter(line.state for line in batch.lines)
        # Every request counts as processing until the whole batch has ended (as documented).
        request_counts = {
            "processing": 0 if ended else len(batch.lines),
            "succeeded": counts["ok"] if ended else 0,
            "errored": counts["failed"] if ended else 0,
            "canceled": counts["cancelled"] if ended else 0,
            "expired": counts["expired"] if ended else 0,
        }
        cancel = batch.times.get("cancel")
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": request_counts,
            "ended_at": rfc3339(batch.times["ended"]) if ended else None,
            "created_at": rfc3339(batch.created_at),
            "expires_at": rfc3339(batch.expires_at),
            "archived_at": None,
            "cancel_initiated_at": rfc3339(cancel) if cancel is not None else None,
            "results_url": f"{batch.origin}/v1/messages/batches/{batch.id}/results"
            if ended
            else None,
        }

    # -- prompt-cache accounting ------------------------------------------------------------

    @web.middleware
    async def _prompt_cache(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        if request.method != "POST":
            return await handler(request)
        if path == "/v1/messages":
            kind = "anthropic"
        elif path == "/v1/chat/completions" or (
            path.startswith("/openai/deployments/") and path.endswith("/chat/completions")
        ):
            kind = "openai"
        else:
            return await handler(request)
        try:
            body = await request.json()  # aiohttp keeps the bytes: the handler reads them again
        except ValueError:
            body = None
        response = await handler(request)
        if not isinstance(body, dict) or not isinstance(response, web.Response):
            return response
        if response.status != 200 or not isinstance(response.body, (bytes, bytearray)):
            return response
        try:
            payload = json.loads(response.body)
        except ValueError:
            return response
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return response
        epoch = request.headers.get(_BATCH_HEADER)
        batch_epoch = int(epoch) if epoch and epoch.isdigit() else None
        if kind == "openai":
            self._openai_cache(body, usage, batch_epoch)
        else:
            self._anthropic_cache(body, usage, batch_epoch)
        response.body = json.dumps(payload).encode()
        return response

    def _lookup(self, prefix: Any, tokens: int, batch_epoch: int | None) -> str:
        """``"read"``, ``"write"`` or ``""`` (not cacheable) for a prefix of ``tokens``."""
        if tokens < self.cache_min_tokens:
            return ""
        key = hashlib.sha256(json.dumps(prefix, sort_keys=True).encode()).hexdigest()
        with self._lock:
            first = self._warm.get(key)
            if first is None:
                self._warm[key] = next(self._epochs)
            # A batch line reads only what was cached before its batch was created: the lines
            # of a cold batch run side by side, none of them sees another's cache write.
            hit = first is not None and (batch_epoch is None or first < batch_epoch)
            self._counts["cache_reads" if hit else "cache_writes"] += 1
        return "read" if hit else "write"

    def _openai_cache(self, body: dict[str, Any], usage: dict[str, Any], batch: int | None) -> None:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        schemas = [
            (t.get("function") or {}).get("parameters")
            for t in body.get("tools") or ()
            if isinstance(t, dict)
        ]
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schemas.append((fmt.get("json_schema") or {}).get("schema"))
        schemas = [s for s in schemas if s]
        head = messages[:-1]
        tokens = sum(
            count_tokens(message_text(m.get("content"))) for m in head if isinstance(m, dict)
        )
        tokens += sum(count_tokens(json.dumps(s)) for s in schemas)
        tokens = min(tokens, int(usage.get("prompt_tokens") or 0))
        prefix = {"model": body.get("model"), "head": head, "schemas": schemas}
        cached = tokens if self._lookup(prefix, tokens, batch) == "read" else 0
        usage["prompt_tokens_details"] = {"cached_tokens": cached, "audio_tokens": 0}

    def _anthropic_cache(
        self, body: dict[str, Any], usage: dict[str, Any], batch: int | None
    ) -> None:
        usage.setdefault("cache_creation_input_tokens", 0)
        usage.setdefault("cache_read_input_tokens", 0)
        # The API's cache order: tools, then system, then messages; the prefix ends at the
        # last block marked cache_control (a top-level marker: everything but the last turn).
        tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
        system = body.get("system")
        system_blocks = (
            [{"type": "text", "text": system}]
            if isinstance(system, str)
            else [b for b in system or () if isinstance(b, dict)]
        )
        messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
        parts: list[tuple[Any, int, bool]] = []
        for tool in tools:
            parts.append(
                (tool, count_tokens(json.dumps(tool.get("input_schema"))), "cache_control" in tool)
            )
        for block in system_blocks:
            parts.append(
                (block, count_tokens(str(block.get("text") or "")), "cache_control" in block)
            )
        for message in messages:
            content = message.get("content")
            blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
            for block in blocks:
                if isinstance(block, dict):
                    marked = "cache_control" in block
                    parts.append((block, count_tokens(message_text([block])), marked))
        end = max((i for i, (_, _, marked) in enumerate(parts) if marked), default=None)
        if end is None and "cache_control" in body and messages:
            last = messages[-1].get("content")
            last_blocks = len(last) if isinstance(last, list) else 1
            end = len(parts) - last_blocks - 1
        if end is None or end < 0:
            return
        tokens = sum(t for _, t, _ in parts[: end + 1])
        tokens = min(tokens, int(usage.get("input_tokens") or 0))
        prefix = {"model": body.get("model"), "blocks": [p for p, _, _ in parts[: end + 1]]}
        kind = self._lookup(prefix, tokens, batch)
        if not kind:
            return
        usage["input_tokens"] = int(usage.get("input_tokens") or 0) - tokens
        usage["cache_read_input_tokens" if kind == "read" else "cache_creation_input_tokens"] = (
            tokens
        )

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n


def _problem(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def _anthropic_result(line: _Line) -> dict[str, Any]:
    if line.state == "ok":
        return {"type": "succeeded", "message": line.response}
    if line.state == "failed":
        return {"type": "errored", "error": line.response}
    return {"type": "canceled" if line.state == "cancelled" else "expired"}


def _anthropic_error(status: int, type_: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return web.json_response(body, status=status)
