"""Provider Batch APIs, provider-neutral: the objects a batch run passes around, and the rules
every protocol shares.

A Batch API takes many requests at once and answers them within a day, at half the price of
live calls. Each protocol (:mod:`._openai_batch`, :mod:`._azure_batch`,
:mod:`._anthropic_batch`) implements :class:`BatchProtocol`: it encodes one
:class:`~parrot_pandas.providers.base.Call` as one request line, builds the HTTP requests that
upload, create, poll, cancel and list batches (:class:`WireRequest`), reads a batch object into
a :class:`BatchStatus`, and reads result lines into :class:`LineResult` s, each holding either
the :class:`~parrot_pandas.providers.base.Completion` the provider's own ``parse`` makes of
the answer (so finish reasons and verdicts are those of a live answer) or an error carrying
its :class:`~parrot_pandas.errors.Verdict`.

Everything here is pure: nothing sends, sleeps or reads a clock. The sending is
:class:`parrot_pandas._batch.BatchClient`, a thin layer over the run's HTTP client.

Verdicts of a line that has no answer
-------------------------------------
- expired (the batch ended before the line ran), cancelled (the batch was cancelled first),
  missing (the batch ended without a line for it): ``Verdict("row", True, ...)``, because
  the same request in another batch, or sent live, can succeed;
- a line whose response is an HTTP error: the provider's ``error`` verdict for that status and
  body, exactly as for a live response (a 400 context-length is the row's, never retried; a
  500 is transient);
- a batch the provider rejects as a whole (validation failed, file too large, too many
  requests): :func:`rejection` / :func:`endpoint_error`, an ``APIError`` with the provider's
  message and a ``run`` verdict; only a full queue of enqueued tokens is worth retrying.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .._secrets import redact_url
from ..errors import APIError, ConfigurationError, StructuredOutputError, Verdict
from ._prompt_cache import CacheUsage
from .base import Call, Completion

if TYPE_CHECKING:
    from .anthropic import AnthropicProvider
    from .openai import OpenAIProvider

__all__ = [
    "read_page",
    "result_lines",
    "answered",
    "ENDPOINT_CALL",
    "CUSTOM_ID",
    "NOT_RUN",
    "ProviderBatch",
    "BatchLimits",
    "BatchPart",
    "BatchProblem",
    "BatchProtocol",
    "BatchStatus",
    "LineResult",
    "Upload",
    "WireRequest",
    "collect",
    "endpoint_error",
    "line_error",
    "rejection",
    "split",
]

# Custom ids every protocol accepts: Anthropic's documented pattern (OpenAI documents none),
# so an id is portable between providers.
CUSTOM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

State = Literal["validating", "running", "cancelling", "ended"]
Outcome = Literal["completed", "failed", "expired", "cancelled"]

# Batch-level error codes that clear up by themselves: OpenAI refuses a batch whose tokens do
# not fit the organisation's queue ("Enqueued token limit reached ... try again once some
# in_progress batches have been completed").
_RETRYABLE_REJECTIONS = frozenset({"token_limit_exceeded"})
# The chat request behind a batch *endpoint's* error (upload, create, poll): there is none, so
# the provider judges it as a plain request that sent no structured-output parameter.
ENDPOINT_CALL = Call(model="", messages=())


@dataclass(frozen=True)
class BatchLimits:
    """What one batch may hold: requests, and bytes of its file (OpenAI, Azure) or of its
    create request (Anthropic)."""

    max_requests: int
    max_bytes: int

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_bytes < 1:
            raise ValueError(f"batch limits must be positive, got {self!r}")


@dataclass(frozen=True)
class Upload:
    """A ``multipart/form-data`` file upload: the file and the form's other fields."""

    filename: str
    content: bytes
    fields: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/jsonl"

    def __repr__(self) -> str:
        return f"Upload({self.filename!r}, {len(self.content)} bytes, fields={dict(self.fields)})"


@dataclass(frozen=True)
class WireRequest:
    """One HTTP request to a batch endpoint. The body is ``json`` (an object), ``data`` (bytes
    already encoded as JSON) or ``upload`` (a file); a GET has none."""

    method: str
    url: str
    headers: Mapping[str, str]
    json: Any = None
    data: bytes | None = None
    upload: Upload | None = None

    def __repr__(self) -> str:
        # Never the headers (they hold the API key) nor a password in the URL.
        body = ""
        if self.upload is not None:
            body = f", upload={self.upload!r}"
        elif self.data is not None:
            body = f", data=<{len(self.data)} bytes>"
        elif self.json is not None:
            body = f", json={self.json!r}"
        return f"WireRequest({self.method} {redact_url(self.url)!r}{body})"


@dataclass(frozen=True)
class BatchPart:
    """One batch to submit: its requests, each encoded as the provider takes it.

    ``lines[i]`` is the request for ``custom_ids[i]``. :attr:`digest` names exactly what is
    submitted, so a batch record keyed by it finds the batch again after a restart.
    """

    custom_ids: tuple[str, ...]
    lines: tuple[bytes, ...]
    model: str

    @property
    def size(self) -> int:
        """Bytes of the lines, one separator each (a newline, or a comma)."""
        return sum(len(line) + 1 for line in self.lines)

    @property
    def digest(self) -> str:
        """SHA-256 of the lines in order: the same requests give the same digest."""
        h = hashlib.sha256()
        for line in self.lines:
            h.update(len(line).to_bytes(8, "big"))
            h.update(line)
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.custom_ids)

    def __repr__(self) -> str:
        return f"BatchPart({len(self)} requests, {self.size} bytes, model={self.model!r})"


@dataclass(frozen=True)
class BatchProblem:
    """One reason the provider gave for rejecting a batch (OpenAI's ``errors.data`` items)."""

    message: str
    code: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = f" (line {self.line})" if self.line is not None else ""
        code = f"{self.code}: " if self.code else ""
        return f"{code}{self.message}{where}"


@dataclass(frozen=True)
class BatchStatus:
    """A batch as the provider last described it, in the same words for every provider.

    Parameters
    ----------
    id : str
        The provider's batch id.
    state : {"validating", "running", "cancelling", "ended"}
        Where the batch is. ``"ended"`` means no request of it will run any more.
    outcome : {"completed", "failed", "expired", "cancelled"}, optional
        How an ended batch ended: ``"failed"`` is a batch the provider rejected as a whole
        (see :func:`rejection`); ``None`` while it runs.
    total, done, failed : int
        Requests in the batch; requests finished (answered or failed); requests failed.
        Anthropic reports ``done`` only once the whole batch has ended.
    results : tuple of str
        Where the result lines are: OpenAI's output and error file ids, Anthropic's
        ``results_url``. Empty until the batch has ended.
    created_at, expires_at : float, optional
        Unix times.
    problems : tuple of BatchProblem
        The provider's reasons for a rejected batch.
    provider_status : str
        The provider's own word for the state (``"finalizing"``, ``"canceling"``, ...).
    """

    id: str
    state: State
    outcome: Outcome | None = None
    total: int = 0
    done: int = 0
    failed: int = 0
    results: tuple[str, ...] = ()
    created_at: float | None = None
    expires_at: float | None = None
    problems: tuple[BatchProblem, ...] = ()
    provider_status: str = ""

    @property
    def ended(self) -> bool:
        """Whether the batch will change no more: its results can be read."""
        return self.state == "ended"


@dataclass(frozen=True)
class LineResult:
    """What one request of a batch came to: a completion, or an error with its verdict.

    ``error`` is an :class:`~parrot_pandas.errors.APIError` or a
    :class:`~parrot_pandas.errors.StructuredOutputError`; its ``verdict`` says whether the
    line is worth resubmitting (``verdict.retry``) and whose failure it is (``scope``).
    ``cache`` holds the prompt-cache tokens the answer reports.
    """

    custom_id: str
    completion: Completion | None = None
    error: Exception | None = None
    cache: CacheUsage = field(default_factory=CacheUsage)

    @property
    def ok(self) -> bool:
        return self.error is None and self.completion is not None


class BatchProtocol(Protocol):
    """One provider's Batch API: the requests to build and the bodies to read.

    Submitting is :meth:`upload_request` (``None`` where the requests go inline, as in
    Anthropic's), then :meth:`create_request` with the uploaded file's id. Every method is
    pure; :class:`parrot_pandas._batch.BatchClient` sends what they build.
    """

    name: str
    limits: BatchLimits
    #: Whether a batch keeps the metadata given at its creation (and lists show it).
    keeps_metadata: bool

    def line(self, custom_id: str, call: Call) -> bytes:
        """``call`` encoded as one request of a batch, under ``custom_id``."""

    def parts(
        self, items: Iterable[tuple[str, Call]], limits: BatchLimits | None = None
    ) -> list[BatchPart]:
        """``(custom_id, call)`` pairs as the fewest batches the limits allow, in order."""

    def upload_request(self, part: BatchPart) -> WireRequest | None:
        """The file upload ``part`` needs first, or ``None``."""

    def uploaded_id(self, body: Any) -> str:
        """The file id in an upload's response body."""

    def create_request(
        self,
        part: BatchPart,
        upload_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> WireRequest:
        """The request that creates the batch (``metadata`` where the protocol keeps it)."""

    def retrieve_request(self, batch_id: str) -> WireRequest: ...

    def cancel_request(self, batch_id: str) -> WireRequest: ...

    def list_request(self, after: str | None = None, limit: int = 100) -> WireRequest:
        """One page of this account's batches, newest first, after the id ``after``."""

    def read_status(self, body: Any) -> BatchStatus:
        """A batch object (from create, retrieve, cancel or a list) -> :class:`BatchStatus`."""

    def read_list(self, body: Any) -> tuple[list[BatchStatus], str | None]:
        """A list page -> its batches and the cursor of the next page (``None``: the last)."""

    def result_requests(self, status: BatchStatus) -> list[WireRequest]:
        """The downloads that hold an ended batch's result lines."""

    def read_results(self, text: bytes, calls: Mapping[str, Call]) -> Iterator[LineResult]:
        """Result lines (one download) -> one :class:`LineResult` per line it can read."""

    def error(self, status: int, body: Any, headers: Mapping[str, str]) -> APIError:
        """A non-2xx response of a batch endpoint -> its ``APIError`` (:func:`endpoint_error`)."""


class ProviderBatch:
    """What every :class:`BatchProtocol` here shares: its provider, URL and headers, and the
    judging of an endpoint's error by the provider's own rules.

    Parameters
    ----------
    provider
        Builds each request's body and reads each answer (``build``, ``parse``, ``error``).
    base_url : str
        The provider's base URL.
    headers : mapping
        The provider's headers (its key among them).
    """

    def __init__(
        self,
        provider: AnthropicProvider | OpenAIProvider,
        base_url: str,
        headers: Mapping[str, str],
    ) -> None:
        self._provider = provider
        self._base_url = base_url
        self._json_headers = dict(headers)
        # multipart and GET requests carry their own Content-Type, or none.
        self._headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._provider!r})"

    def error(self, status: int, body: Any, headers: Mapping[str, str]) -> APIError:
        return endpoint_error(self._provider.error(ENDPOINT_CALL, status, body, headers))


def split(
    items: Iterable[tuple[str, bytes]],
    limits: BatchLimits,
    *,
    model: str,
    overhead: int = 0,
) -> list[BatchPart]:
    """Encoded requests -> batches that each fit ``limits``, filled in order.

    A batch's size is its lines plus one separator byte each, plus ``overhead`` (the bytes
    around the lines, e.g. Anthropic's ``{"requests": [...]}``).

    Parameters
    ----------
    items : iterable of (str, bytes)
        ``(custom_id, line)`` pairs.
    limits : BatchLimits
    model : str
        The model every line names (OpenAI takes one model per batch).
    overhead : int
        Bytes a batch needs beyond its lines.

    Raises
    ------
    ConfigurationError
        A custom id that is not 1-64 letters, digits, ``_`` or ``-``, or repeats; or one
        request larger than a whole batch may be.

    Examples
    --------
    >>> parts = split([("a", b"x" * 10), ("b", b"y" * 10)], BatchLimits(10, 15), model="m")
    >>> [p.custom_ids for p in parts]
    [('a',), ('b',)]
    """
    parts: list[BatchPart] = []
    ids: list[str] = []
    lines: list[bytes] = []
    size = overhead
    seen: set[str] = set()

    def close() -> None:
        if ids:
            parts.append(BatchPart(tuple(ids), tuple(lines), model))
            ids.clear()
            lines.clear()

    for custom_id, line in items:
        if not isinstance(custom_id, str) or CUSTOM_ID.fullmatch(custom_id) is None:
            raise ConfigurationError(
                f"batch custom_id {custom_id!r} must be 1-64 letters, digits, '_' or '-'"
            )
        if custom_id in seen:
            raise ConfigurationError(f"batch custom_id {custom_id!r} is used twice")
        seen.add(custom_id)
        cost = len(line) + 1
        if overhead + cost > limits.max_bytes:
            raise ConfigurationError(
                f"request {custom_id!r} takes {cost:,} bytes, more than a whole batch may "
                f"hold ({limits.max_bytes:,}); send it live (batch=False)"
            )
        if len(ids) >= limits.max_requests or size + cost > limits.max_bytes:
            close()
            size = overhead
        ids.append(custom_id)
        lines.append(line)
        size += cost
    close()
    return parts


def line_error(
    custom_id: str, message: str, *, code: str, retry: bool = True, status: int | None = None
) -> LineResult:
    """A line without an answer (expired, cancelled, missing, failed in the provider's queue)."""
    verdict = Verdict("row", retry, code)
    return LineResult(custom_id, error=APIError(message, status=status, code=code, verdict=verdict))


# Why a line of a batch has no answer, by its error code: the same words for every provider.
NOT_RUN = {
    "batch_expired": "the batch expired before this request ran",
    "batch_cancelled": "the batch was cancelled before this request ran",
}
# A line missing from an ended batch's results: the code by how the batch ended.
_NO_LINE = {"expired": "batch_expired", "cancelled": "batch_cancelled"}


def collect(
    status: BatchStatus, results: Iterable[LineResult], custom_ids: Sequence[str]
) -> dict[str, LineResult]:
    """Exactly one result for every request submitted in an ended batch.

    The first result read for a custom id counts; results for ids not submitted are dropped;
    an id with no result line gets an error whose verdict says to resubmit it (the batch
    expired or was cancelled first, or the provider lost it).

    Parameters
    ----------
    status : BatchStatus
        The ended batch.
    results : iterable of LineResult
        What :meth:`BatchProtocol.read_results` read from every result download.
    custom_ids : sequence of str
        The ids submitted in this batch.

    Returns
    -------
    dict
        custom id -> LineResult, in the order of ``custom_ids``.
    """
    wanted = set(custom_ids)
    found: dict[str, LineResult] = {}
    for result in results:
        if result.custom_id in wanted and result.custom_id not in found:
            found[result.custom_id] = result
    code = _NO_LINE.get(status.outcome or "", "batch_missing")
    message = NOT_RUN.get(code, "the batch ended without a result for this request")
    message = f"{message} (batch {status.id})"
    return {cid: found.get(cid) or line_error(cid, message, code=code) for cid in custom_ids}


def rejection(status: BatchStatus) -> APIError | None:
    """The run's error for a batch the provider rejected as a whole, ``None`` otherwise.

    Carries the provider's own reasons. Its verdict is ``run``: every row of the batch would
    fail alike. Only a full queue (OpenAI's ``token_limit_exceeded``) is worth retrying later.
    """
    if status.outcome != "failed":
        return None
    problems = status.problems or (BatchProblem("the provider gave no reason"),)
    codes = [p.code for p in problems if p.code]
    retry = bool(codes) and all(code in _RETRYABLE_REJECTIONS for code in codes)
    reasons = "; ".join(str(p) for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return APIError(
        f"the provider rejected batch {status.id}: {reasons}{more}",
        code=codes[0] if codes else "batch_failed",
        verdict=Verdict("run", retry, "batch_rejected"),
    )


def read_page(
    body: Any, read_status: Callable[[Any], BatchStatus]
) -> tuple[list[BatchStatus], str | None]:
    """A list response (``data``, ``has_more``, both protocols) -> its statuses and the cursor
    of the next page (the last id), ``None`` on the last page."""
    data = body.get("data") if isinstance(body, Mapping) else None
    statuses = [read_status(item) for item in data or () if isinstance(item, Mapping)]
    more = isinstance(body, Mapping) and body.get("has_more") and statuses
    return statuses, (statuses[-1].id if more else None)


def result_lines(text: bytes, calls: Mapping[str, Call]) -> Iterator[tuple[str, Call, dict]]:
    """Each JSONL result line of ours: its custom id, the call it answers, the parsed line.

    A torn line is skipped (its request is reported missing), and so is a line for a custom
    id this run did not submit.
    """
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        call = calls.get(custom_id) if isinstance(custom_id, str) else None
        if call is not None:
            yield custom_id, call, line


def answered(
    custom_id: str, provider: AnthropicProvider | OpenAIProvider, call: Call, body: Any
) -> LineResult:
    """A line the provider answered, read by the provider's own ``parse``: its completion, or,
    when the body is unreadable or no choice is usable (cut at max_tokens, filtered, refused),
    the error, with the verdict a live answer gets."""
    try:
        completion = provider.parse(call, body, {})
    except (APIError, StructuredOutputError) as exc:
        return LineResult(custom_id, error=exc)
    cache = provider.cache_usage(body)
    if not completion.texts and completion.problems:
        return LineResult(custom_id, error=completion.problems[0], cache=cache)
    return LineResult(custom_id, completion, cache=cache)


def endpoint_error(error: APIError) -> APIError:
    """A batch endpoint's error response, judged for a batch rather than a row.

    A batch endpoint that refuses a request with a 4xx (a file too large, too many requests,
    an invalid create body) refuses the whole batch, so a ``row`` verdict becomes ``run``;
    rate limits, 5xx and connection errors keep their (retryable) verdict.
    """
    verdict = error.verdict
    if verdict.scope == "row" and not verdict.retry:
        error.verdict = Verdict("run", False, "batch_rejected")
    return error
