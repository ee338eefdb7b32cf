"""Anthropic's Message Batches API: the requests inline in one create request.

The wire format, as Anthropic documents it (and its SDK's types declare):

- ``POST {base}/v1/messages/batches`` with ``{"requests": [{"custom_id", "params"}]}``, each
  ``params`` a whole Messages request. At most 100,000 requests or 256 MB a batch; a
  ``custom_id`` is 1-64 of ``[A-Za-z0-9_-]`` and unique within its batch. The ``params`` are
  validated only as each request runs: an invalid one comes back as an ``errored`` result.
- ``GET {base}/v1/messages/batches/{id}``, ``POST .../{id}/cancel``,
  ``GET {base}/v1/messages/batches?after_id=&limit=`` (``{"data", "has_more", "last_id"}``,
  newest first).
- A batch's ``processing_status`` is ``in_progress``, ``canceling`` or ``ended``;
  ``request_counts`` has ``processing``, ``succeeded``, ``errored``, ``canceled`` and
  ``expired``, and every request counts as ``processing`` until the whole batch has ended.
  Times are RFC 3339 strings; a batch expires 24 hours after its creation.
- Results: ``GET`` of the ended batch's ``results_url``, a JSONL file of
  ``{"custom_id", "result": {"type": ...}}``: ``succeeded`` with the ``message``, ``errored``
  with an error response (``{"type": "error", "error": {"type", "message"}}``), ``canceled``
  or ``expired``. Lines come in any order.
- Batches carry no metadata, so a project finds its own batches from its own records.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from ..errors import APIError
from ._batch import (
    NOT_RUN,
    BatchLimits,
    BatchPart,
    BatchStatus,
    LineResult,
    ProviderBatch,
    WireRequest,
    answered,
    line_error,
    read_page,
    result_lines,
    split,
)
from ._url import endpoint
from .base import Call, usage_count

if TYPE_CHECKING:
    from .anthropic import AnthropicProvider

__all__ = ["ANTHROPIC_ERROR_STATUS", "ANTHROPIC_LIMITS", "AnthropicBatch"]

ANTHROPIC_LIMITS = BatchLimits(max_requests=100_000, max_bytes=256 * 1024**2)

# The HTTP status of each error type (Anthropic's errors page). An errored batch result has
# only the type; the status lets the provider judge it exactly as it judges a live response.
ANTHROPIC_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_STATES = {"in_progress": "running", "canceling": "cancelling", "ended": "ended"}
# Result types of a request that never ran -> the error code every protocol gives it.
_NOT_RUN = {"canceled": "batch_cancelled", "expired": "batch_expired"}
_ENVELOPE = len(b'{"requests":[]}')


class AnthropicBatch(ProviderBatch):
    """The Message Batches API of an :class:`~parrot_pandas.providers.anthropic.AnthropicProvider`.

    Parameters
    ----------
    provider : AnthropicProvider
        Builds each request's ``params`` and reads each answer (``build``, ``parse``, ``error``).
    base_url : str
        The provider's base URL, without ``/v1`` (``https://api.anthropic.com``).
    headers : mapping
        The provider's headers (``x-api-key`` and ``anthropic-version`` among them).
    """

    name = "anthropic"
    limits = ANTHROPIC_LIMITS
    keeps_metadata = False
    _provider: AnthropicProvider

    def _url(self, path: str, **query: Any) -> str:
        extra = urlencode({k: v for k, v in query.items() if v is not None})
        return endpoint(self._base_url, "/v1/messages/batches" + path, extra)

    # -- building ---------------------------------------------------------------------------

    def line(self, custom_id: str, call: Call) -> bytes:
        params = self._provider.with_prompt_cache(call, dict(self._provider.build(call).json))
        request = {"custom_id": custom_id, "params": params}
        return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()

    def parts(
        self, items: Iterable[tuple[str, Call]], limits: BatchLimits | None = None
    ) -> list[BatchPart]:
        # A batch may mix models; the part's model is the first one's, for naming only.
        lines, model = [], None
        for custom_id, call in items:
            model = model or call.model
            lines.append((custom_id, self.line(custom_id, call)))
        return split(lines, limits or self.limits, model=model or "", overhead=_ENVELOPE)

    def upload_request(self, part: BatchPart) -> None:
        return None  # the requests go inline in the create request

    def uploaded_id(self, body: Any) -> str:
        raise TypeError("Message Batches upload no file")

    def create_request(
        self,
        part: BatchPart,
        upload_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> WireRequest:
        # The lines are already JSON: joined, not decoded and encoded again.
        data = b'{"requests":[' + b",".join(part.lines) + b"]}"
        return WireRequest("POST", self._url(""), self._json_headers, data=data)

    def retrieve_request(self, batch_id: str) -> WireRequest:
        return WireRequest("GET", self._url(f"/{quote(batch_id, safe='')}"), self._headers)

    def cancel_request(self, batch_id: str) -> WireRequest:
        return WireRequest("POST", self._url(f"/{quote(batch_id, safe='')}/cancel"), self._headers)

    def list_request(self, after: str | None = None, limit: int = 100) -> WireRequest:
        return WireRequest("GET", self._url("", after_id=after, limit=limit), self._headers)

    def result_requests(self, status: BatchStatus) -> list[WireRequest]:
        # results_url is absolute and needs the same key as every other request.
        return [WireRequest("GET", url, self._headers) for url in status.results]

    # -- reading ----------------------------------------------------------------------------

    def read_status(self, body: Any) -> BatchStatus:
        if not isinstance(body, Mapping) or not isinstance(body.get("id"), str):
            raise APIError(f"not a message batch object: {str(body)[:200]}")
        word = str(body.get("processing_status") or "")
        state = _STATES.get(word, "running")
        counts = body.get("request_counts")
        counts = counts if isinstance(counts, Mapping) else {}
        succeeded, errored, canceled, expired = (
            usage_count(counts.get(name))
            for name in ("succeeded", "errored", "canceled", "expired")
        )
        failed = errored + canceled + expired
        outcome = None
        if state == "ended":
            if body.get("cancel_initiated_at"):
                outcome = "cancelled"
            else:
                outcome = "expired" if expired else "completed"
        url = body.get("results_url")
        return BatchStatus(
            id=body["id"],
            state=state,  # type: ignore[arg-type]
            outcome=outcome,  # type: ignore[arg-type]
            total=usage_count(counts.get("processing")) + succeeded + failed,
            done=succeeded + failed,
            failed=failed,
            results=(url,) if state == "ended" and isinstance(url, str) and url else (),
            created_at=_time(body.get("created_at")),
            expires_at=_time(body.get("expires_at")),
            provider_status=word,
        )

    def read_list(self, body: Any) -> tuple[list[BatchStatus], str | None]:
        return read_page(body, self.read_status)

    def read_results(self, text: bytes, calls: Mapping[str, Call]) -> Iterator[LineResult]:
        for custom_id, call, line in result_lines(text, calls):
            result = line.get("result")
            yield self._read_result(custom_id, call, result if isinstance(result, Mapping) else {})

    def _read_result(self, custom_id: str, call: Call, result: Mapping[str, Any]) -> LineResult:
        kind = result.get("type")
        if kind == "succeeded" and isinstance(result.get("message"), Mapping):
            return answered(custom_id, self._provider, call, result["message"])
        if kind == "errored":
            body = result.get("error")
            inner = body.get("error") if isinstance(body, Mapping) else None
            error_type = inner.get("type") if isinstance(inner, Mapping) else None
            status = ANTHROPIC_ERROR_STATUS.get(str(error_type), 500)
            return LineResult(custom_id, error=self._provider.error(call, status, body, {}))
        code = _NOT_RUN.get(str(kind))
        if code is not None:
            return line_error(custom_id, NOT_RUN[code], code=code)
        return line_error(custom_id, f"unknown batch result {kind!r}", code="batch_error")


def _time(value: Any) -> float | None:
    from .anthropic import parse_reset_time  # here: anthropic.py imports this module

    # Seconds from the epoch to the timestamp: the epoch time itself.
    return parse_reset_time(value, 0.0) if isinstance(value, str) else None
