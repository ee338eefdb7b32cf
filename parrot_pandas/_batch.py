"""``batch=True``: rows through the provider's Batch API, at half the price of live calls.

Phase A (this module today) is the wire: :class:`BatchClient` sends what a provider's
:class:`~parrot_pandas.providers._batch.BatchProtocol` builds (upload, create, poll, cancel,
list, download results) through the run's HTTP session, with the run's key scrubbed from every
message. What each protocol sends and reads lives in ``providers/`` (``_batch.py`` for the
neutral objects, ``_openai_batch.py``, ``_azure_batch.py``, ``_anthropic_batch.py``).

How phase B wires it into a run
-------------------------------
Built in :mod:`parrot_pandas._batch_run` (the run) and :mod:`parrot_pandas._batches` (list
and cancel); what follows is the plan it implements. Where it differs: the record's key is
``(provider, redacted base URL, digest)``; one row always goes live first (the setup request,
also the prompt-cache warm-up, for every provider); lines worth retrying get one more batch,
then go live.

1. **Jobs become lines.** The run's :class:`~parrot_pandas._feed.Feed` yields the jobs still
   to send (cache hits never reach a batch), exactly as for a live run. Each job's
   :class:`~parrot_pandas.providers.base.Call` (packed rows included) becomes one line,
   ``custom_id`` = a short id derived from the job's cache key (``key[:48]``, plus ``-s<i>``
   for sample ``i`` where the protocol has no ``n``: Anthropic wants one line per sample).
   ``protocol.parts(items)`` splits the lines into the fewest batches the provider's limits
   allow (requests per batch, bytes per file; one model per OpenAI file).
2. **A batch record before the batch.** For each part, a row in the cache database keyed by
   ``(provider, base URL, part.digest)`` -- what was submitted, never the key -- holds the
   custom ids -> cache keys map, the provider's batch id once known, and its state. A re-run
   (another process, after kill -9 or a kernel restart) computes the same parts, finds their
   records and re-attaches to the batch id instead of submitting again. A record written
   before the create request and updated right after it narrows the "submitted but not
   recorded" window to one request; on re-attach with no batch id, ``list`` finds a batch
   whose metadata (OpenAI) names the digest, and only then is the part submitted.
3. **Waiting.** ``retrieve`` with backoff (e.g. 5 s doubling to 60 s, never a busy loop); the
   progress bar reads ``status.done`` / ``status.total``. Ctrl-C stops waiting, not the
   batch: the records stay, and the message says that re-running the call resumes.
4. **Answers land in the per-row cache.** Once a batch ends, ``results`` gives one
   :class:`~parrot_pandas.providers._batch.LineResult` per custom id; completions are parsed
   by the provider's own ``parse`` and written to the same cache as live answers, so a live
   re-run pays nothing. ``LineResult.cache`` carries the prompt-cache tokens for the cost.
5. **Partial failure.** A line whose verdict says ``retry`` (expired, cancelled, missing, 5xx)
   is resubmitted once in one more batch, or sent live when ``batch_deadline=`` has passed. A
   line with ``retry=False`` (a 400 context-length, a content filter) fails its row like a
   live answer with that verdict. A rejected batch (:func:`~.providers._batch.rejection`, an
   endpoint's 4xx via ``protocol.error``) fails the call with the provider's message before
   anything else is sent.
6. **Seeing and cancelling.** ``list_batches`` pages through the account's batches; the
   records say which are this project's (Anthropic batches carry no metadata).
7. **Prompt caching.** Lines carry ``provider.with_prompt_cache(call, body)`` already. For
   Anthropic, send one live request with the same prefix right before creating a batch: a
   cold batch reads nothing from the cache, a batch created after a warm request reads it all.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp

from ._client import Client, decode_body
from .errors import APIConnectionError, APIError, StructuredOutputError
from .providers import Call, Provider
from .providers._batch import (
    BatchPart,
    BatchProtocol,
    BatchStatus,
    LineResult,
    WireRequest,
    collect,
    rejection,
)

__all__ = ["BatchClient"]


class BatchClient(Client):
    """Send a provider's batch requests through one pooled ``aiohttp`` session.

    Parameters
    ----------
    provider : Provider
        A provider with a Batch API (its ``batch()`` gives the protocol).
    timeout : float
        Seconds for one request; uploads and result downloads can be large, so give them time.
    secret : str, optional
        The API key, scrubbed from every message a server sends back.
    protocol : BatchProtocol, optional
        Defaults to ``provider.batch()``.

    Examples
    --------
    >>> async with BatchClient(provider, secret=key) as client:  # doctest: +SKIP
    ...     status = await client.submit(part)
    ...     status = await client.retrieve(status.id)
    ...     if status.ended:
    ...         results = await client.results(status, calls)
    """

    def __init__(
        self,
        provider: Provider,
        *,
        timeout: float = 600.0,
        max_connections: int = 4,
        secret: str | None = None,
        protocol: BatchProtocol | None = None,
    ) -> None:
        super().__init__(provider, timeout=timeout, max_connections=max_connections, secret=secret)
        self.protocol: BatchProtocol = protocol or provider.batch()  # type: ignore[attr-defined]

    # -- one request ------------------------------------------------------------------------

    async def fetch(self, request: WireRequest) -> bytes:
        """Send ``request``; the body of a 2xx response, as bytes.

        Raises
        ------
        APIError
            The endpoint answered with an error status (``protocol.error``: a 4xx refuses the
            batch as a whole, with a ``run`` verdict).
        APIConnectionError
            No response: dropped or refused connection, timeout.
        """
        assert self._session is not None, "use `async with BatchClient(...)`"
        kwargs: dict[str, Any] = {"headers": dict(request.headers)}
        if request.upload is not None:
            form = aiohttp.FormData()
            for name, value in request.upload.fields.items():
                form.add_field(name, value)
            form.add_field(
                "file",
                request.upload.content,
                filename=request.upload.filename,
                content_type=request.upload.content_type,
            )
            kwargs["data"] = form
        elif request.data is not None:
            kwargs["data"] = request.data
            kwargs["headers"].setdefault("Content-Type", "application/json")
        elif request.json is not None:
            kwargs["json"] = request.json
        try:
            async with self._session.request(
                request.method, request.url, proxy=self._proxy(request.url), **kwargs
            ) as response:
                status, headers, raw = response.status, response.headers, await response.read()
        except asyncio.TimeoutError:
            raise APIConnectionError(
                f"no response within {self._timeout.total:g} s from {request.method} "
                "to the batch API"
            ) from None
        except aiohttp.ClientError as exc:
            raise APIConnectionError(self._scrub(f"{type(exc).__name__}: {exc}")) from None
        if 200 <= status < 300:
            return raw
        error = self.protocol.error(status, decode_body(raw), headers)
        error.message = self._scrub(error.message)
        error.args = (error.message,)
        raise error

    async def call(self, request: WireRequest) -> Any:
        """:meth:`fetch`, the body read as JSON."""
        raw = await self.fetch(request)
        try:
            return json.loads(raw)
        except ValueError:
            raise APIConnectionError(
                self._scrub(f"the batch API answered with an unreadable body: {raw[:200]!r}")
            ) from None

    # -- the batch life cycle ---------------------------------------------------------------

    async def submit(
        self, part: BatchPart, metadata: Mapping[str, str] | None = None
    ) -> BatchStatus:
        """Upload ``part`` (where the protocol uploads files) and create its batch.

        Returns
        -------
        BatchStatus
            The new batch (OpenAI: ``validating``; Anthropic: ``running``).

        Raises
        ------
        APIError
            The provider refused the file or the batch; the message is the provider's.
        """
        upload_id = None
        upload = self.protocol.upload_request(part)
        if upload is not None:
            upload_id = self.protocol.uploaded_id(await self.call(upload))
        body = await self.call(self.protocol.create_request(part, upload_id, metadata))
        return self.protocol.read_status(body)

    async def retrieve(self, batch_id: str) -> BatchStatus:
        """The batch as the provider describes it now.

        Raises
        ------
        APIError
            The provider rejected the batch as a whole (its status is ``failed``): the
            error carries the provider's reasons and a ``run`` verdict.
        """
        body = await self.call(self.protocol.retrieve_request(batch_id))
        status = self.protocol.read_status(body)
        error = rejection(status)
        if error is not None:
            error.message = self._scrub(error.message)
            error.args = (error.message,)
            raise error
        return status

    async def cancel(self, batch_id: str) -> BatchStatus:
        """Ask the provider to cancel the batch; what already ran stays paid for and readable."""
        return self.protocol.read_status(await self.call(self.protocol.cancel_request(batch_id)))

    async def list_batches(self, *, page_size: int = 100) -> AsyncIterator[BatchStatus]:
        """Every batch of the account, newest first, one page request at a time."""
        after = None
        while True:
            body = await self.call(self.protocol.list_request(after, page_size))
            statuses, after = self.protocol.read_list(body)
            for status in statuses:
                yield status
            if after is None:
                return

    async def results(
        self, status: BatchStatus, calls: Mapping[str, Call] | Sequence[tuple[str, Call]]
    ) -> dict[str, LineResult]:
        """One result for every request of an ended batch.

        Parameters
        ----------
        status : BatchStatus
            The ended batch (from :meth:`retrieve`).
        calls : mapping or sequence of (custom_id, Call)
            What was submitted in it: each answer is parsed as the reply to its call.

        Returns
        -------
        dict
            custom id -> :class:`~parrot_pandas.providers._batch.LineResult`, in submission
            order; a request without a result line has an error whose verdict says to
            resubmit it.
        """
        if not status.ended:
            raise ValueError(f"batch {status.id} has not ended ({status.provider_status})")
        calls = dict(calls)
        read: list[LineResult] = []
        for request in self.protocol.result_requests(status):
            text = await self.fetch(request)
            read.extend(self.protocol.read_results(text, calls))
        collected = collect(status, read, list(calls))
        return {cid: self._scrubbed(result) for cid, result in collected.items()}

    def _scrubbed(self, result: LineResult) -> LineResult:
        # A line's error body is the server's text like any other: the key never shows.
        error = result.error
        if isinstance(error, (APIError, StructuredOutputError)):
            error.message = self._scrub(error.message)
            error.args = (error.message,)
        return result
