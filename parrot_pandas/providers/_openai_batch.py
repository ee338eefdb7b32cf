"""OpenAI's Batch API: a JSONL file through the Files API, then a batch over it.

The wire format, as OpenAI documents it (and its SDK's types declare):

- Upload: ``POST {base}/files``, ``multipart/form-data`` with ``purpose=batch`` and ``file``;
  the answer is a file object whose ``id`` the batch names. At most 50,000 requests and
  200 MB a file, and one model a file.
- Each line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``, the
  body being exactly the live request's.
- ``POST {base}/batches`` with ``input_file_id``, ``endpoint`` (the lines' url),
  ``completion_window: "24h"`` and ``metadata`` (up to 16 string pairs).
- ``GET {base}/batches/{id}``, ``POST {base}/batches/{id}/cancel``,
  ``GET {base}/batches?after=&limit=`` (``{"data", "has_more", "last_id"}``, newest first).
- A batch's ``status``: ``validating``, ``failed`` (rejected, reasons in
  ``errors.data[]`` with ``code``, ``message``, ``line``), ``in_progress``, ``finalizing``,
  ``completed``, ``expired``, ``cancelling``, ``cancelled``; ``request_counts`` has ``total``,
  ``completed`` and ``failed``.
- Results: ``GET {base}/files/{output_file_id}/content`` holds one line per answered request,
  ``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``;
  the error file (``error_file_id``) holds the requests that got an error status (same shape,
  the error body in ``response.body``) and the ones that never ran
  (``"response": null, "error": {"code": "batch_expired" | "batch_cancelled", "message"}``).
  Lines come in any order: ``custom_id`` matches them to requests.
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
    BatchProblem,
    BatchStatus,
    LineResult,
    ProviderBatch,
    Upload,
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
    from .openai import OpenAIProvider

__all__ = ["OPENAI_LIMITS", "OpenAIBatch"]

OPENAI_LIMITS = BatchLimits(max_requests=50_000, max_bytes=200 * 1024**2)

_STATES: dict[str, tuple[str, str | None]] = {
    "validating": ("validating", None),
    "in_progress": ("running", None),
    "finalizing": ("running", None),
    "cancelling": ("cancelling", None),
    "completed": ("ended", "completed"),
    "failed": ("ended", "failed"),
    "expired": ("ended", "expired"),
    "cancelled": ("ended", "cancelled"),
}

# Error codes of a line that never got a response, all worth resubmitting: the batch ran out
# of time or was cancelled first, or the model call timed out inside the batch.
_LINE_CODES = {**NOT_RUN, "request_timeout": "the request timed out inside the batch"}


class OpenAIBatch(ProviderBatch):
    """The Batch API of an :class:`~parrot_pandas.providers.openai.OpenAIProvider`.

    Parameters
    ----------
    provider : OpenAIProvider
        Builds each line's body and reads each answer (``build``, ``parse``, ``error``).
    base_url : str
        The provider's base URL, up to the version (``https://api.openai.com/v1``).
    headers : mapping
        The provider's headers (its key among them).
    """

    name = "openai"
    limits = OPENAI_LIMITS
    keeps_metadata = True
    _provider: OpenAIProvider
    # The url in every line, and the batch's endpoint: they must be equal.
    line_url = "/v1/chat/completions"

    def _url(self, path: str, **query: Any) -> str:
        extra = urlencode({k: v for k, v in query.items() if v is not None})
        return endpoint(self._base_url, path, extra)

    def _body(self, call: Call) -> dict[str, Any]:
        body = dict(self._provider.build(call).json)
        return self._provider.with_prompt_cache(call, body)

    # -- building ---------------------------------------------------------------------------

    def line(self, custom_id: str, call: Call) -> bytes:
        line = {"custom_id": custom_id, "method": "POST", "url": self.line_url}
        line["body"] = self._body(call)
        return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode()

    def parts(
        self, items: Iterable[tuple[str, Call]], limits: BatchLimits | None = None
    ) -> list[BatchPart]:
        # One model a file: the calls are grouped by model, in first-seen order.
        groups: dict[str, list[tuple[str, bytes]]] = {}
        for custom_id, call in items:
            groups.setdefault(call.model, []).append((custom_id, self.line(custom_id, call)))
        parts: list[BatchPart] = []
        for model, lines in groups.items():
            parts += split(lines, limits or self.limits, model=model)
        return parts

    def upload_request(self, part: BatchPart) -> WireRequest:
        content = b"".join(line + b"\n" for line in part.lines)
        upload = Upload(f"parrot-{part.digest[:16]}.jsonl", content, {"purpose": "batch"})
        return WireRequest("POST", self._url("/files"), self._headers, upload=upload)

    def uploaded_id(self, body: Any) -> str:
        file_id = body.get("id") if isinstance(body, Mapping) else None
        if not isinstance(file_id, str) or not file_id:
            raise APIError(f"the file upload answered without a file id: {str(body)[:200]}")
        return file_id

    def create_request(
        self,
        part: BatchPart,
        upload_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> WireRequest:
        if not upload_id:
            raise ValueError("an OpenAI batch needs the id of its uploaded file")
        body: dict[str, Any] = {
            "input_file_id": upload_id,
            "endpoint": self.line_url,
            "completion_window": "24h",
        }
        if metadata:
            body["metadata"] = dict(metadata)
        return WireRequest("POST", self._url("/batches"), self._json_headers, json=body)

    def retrieve_request(self, batch_id: str) -> WireRequest:
        return WireRequest("GET", self._url(f"/batches/{quote(batch_id, safe='')}"), self._headers)

    def cancel_request(self, batch_id: str) -> WireRequest:
        url = self._url(f"/batches/{quote(batch_id, safe='')}/cancel")
        return WireRequest("POST", url, self._json_headers)

    def list_request(self, after: str | None = None, limit: int = 100) -> WireRequest:
        return WireRequest("GET", self._url("/batches", after=after, limit=limit), self._headers)

    def content_request(self, file_id: str) -> WireRequest:
        """The download of a file's content (an output or error file)."""
        url = self._url(f"/files/{quote(file_id, safe='')}/content")
        return WireRequest("GET", url, self._headers)

    def result_requests(self, status: BatchStatus) -> list[WireRequest]:
        return [self.content_request(file_id) for file_id in status.results]

    # -- reading ----------------------------------------------------------------------------

    def read_status(self, body: Any) -> BatchStatus:
        if not isinstance(body, Mapping) or not isinstance(body.get("id"), str):
            raise APIError(f"not a batch object: {str(body)[:200]}")
        word = str(body.get("status") or "")
        state, outcome = _STATES.get(word, ("running", None))
        counts = body.get("request_counts")
        counts = counts if isinstance(counts, Mapping) else {}
        completed, failed = usage_count(counts.get("completed")), usage_count(counts.get("failed"))
        results = tuple(
            file_id
            for file_id in (body.get("output_file_id"), body.get("error_file_id"))
            if isinstance(file_id, str) and file_id
        )
        errors = body.get("errors")
        data = errors.get("data") if isinstance(errors, Mapping) else None
        problems = tuple(
            BatchProblem(
                str(item.get("message") or ""),
                item.get("code") if isinstance(item.get("code"), str) else None,
                item.get("line") if isinstance(item.get("line"), int) else None,
            )
            for item in data or ()
            if isinstance(item, Mapping)
        )
        return BatchStatus(
            id=body["id"],
            state=state,  # type: ignore[arg-type]
            outcome=outcome,  # type: ignore[arg-type]
            total=usage_count(counts.get("total")),
            done=completed + failed,
            failed=failed,
            results=results if state == "ended" else (),
            created_at=_time(body.get("created_at")),
            expires_at=_time(body.get("expires_at")),
            problems=problems,
            provider_status=word,
        )

    def read_list(self, body: Any) -> tuple[list[BatchStatus], str | None]:
        return read_page(body, self.read_status)

    def read_results(self, text: bytes, calls: Mapping[str, Call]) -> Iterator[LineResult]:
        for custom_id, call, line in result_lines(text, calls):
            yield self._read_line(custom_id, call, line)

    def _read_line(self, custom_id: str, call: Call, line: Mapping[str, Any]) -> LineResult:
        response = line.get("response")
        if not isinstance(response, Mapping):
            error = line.get("error")
            error = error if isinstance(error, Mapping) else {}
            code = str(error.get("code") or "batch_error")
            message = str(error.get("message") or _LINE_CODES.get(code, "no response"))
            return line_error(custom_id, message, code=code)
        status = usage_count(response.get("status_code"))
        body = response.get("body")
        if 200 <= status < 300 and not isinstance(body, Mapping):
            # As a live 2xx with an unreadable body: worth asking again.
            message = f"HTTP {status} with an unreadable body: {str(body)[:200]}"
            return line_error(custom_id, message, code="batch_unreadable", status=status)
        if 200 <= status < 300:
            return answered(custom_id, self._provider, call, body)
        return LineResult(custom_id, error=self._provider.error(call, status or 500, body, {}))


def _time(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
