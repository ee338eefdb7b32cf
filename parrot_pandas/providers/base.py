"""What every provider module offers: the one interface the client and scheduler use.

The rest of the package never branches on the provider: it builds a :class:`Call`, asks the
provider for the HTTP request, and gets a :class:`Completion` (or an ``APIError``) back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._limits import LimitInfo, parse_retry_after
from .._secrets import redact_url
from ..errors import APIError

__all__ = ["Call", "Completion", "HTTPRequest", "Provider"]


@dataclass(frozen=True)
class Call:
    """One request's content, provider-neutral.

    ``schema`` is the JSON Schema of a structured answer (``extract``), ``None`` for free text;
    ``strategy`` says how to ask for it: ``"tools"`` (a forced function call), ``"json_schema"``,
    ``"json_object"`` or ``"prompt"`` (the schema is already in the messages).
    """

    model: str
    messages: tuple[Mapping[str, str], ...]
    n: int = 1
    params: Mapping[str, Any] = field(default_factory=dict)
    schema: Mapping[str, Any] | None = None
    strategy: str | None = None


@dataclass(frozen=True)
class HTTPRequest:
    """What to send: the client adds nothing but the session and the timeout."""

    url: str
    headers: Mapping[str, str]
    json: Mapping[str, Any]

    def __repr__(self) -> str:
        # Never the headers (Authorization holds the API key) nor a password in the URL.
        return f"HTTPRequest(url={redact_url(self.url)!r}, json={self.json!r})"


@dataclass(frozen=True)
class Completion:
    """One successful response: the answer texts (raw JSON for structured calls), usage, limits."""

    texts: tuple[str, ...]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    limits: LimitInfo = field(default_factory=LimitInfo)


class Provider(Protocol):
    """A wire protocol: payload, headers, response parsing, rate-limit header reading.

    Its class attributes are the protocol's facts, which the configuration reads (see
    :class:`~parrot_pandas.providers.openai.OpenAIProvider` for what each one means).
    """

    name: str
    label: str
    api_key_env: str
    base_url_env: str
    default_base_url: str | None
    example_base_url: str
    api_version_env: str | None
    example_api_version: str | None
    vendor_hosts: tuple[str, ...] | None
    model_prefixes: tuple[str, ...]
    samples_per_request: int | None
    no_key_hint: str

    @classmethod
    def from_config(cls, config: Any) -> Provider:
        """The provider for a run's ``RunConfig``."""

    @classmethod
    def normalize_base_url(cls, base_url: str) -> str:
        """``base_url`` as a run keeps it (trailing ``/`` dropped, query kept)."""

    @classmethod
    def prepare_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Request parameters renamed and defaulted for the protocol (``ConfigurationError``
        for one it cannot send)."""

    def build(self, call: Call) -> HTTPRequest:
        """The HTTP request for ``call``."""

    def parse(self, call: Call, body: Any, headers: Mapping[str, str]) -> Completion:
        """A 2xx JSON body -> Completion; raises ``StructuredOutputError`` if it holds no answer."""

    def error(self, status: int, body: Any, headers: Mapping[str, str]) -> Exception:
        """A non-2xx response -> the ``APIError`` carrying the server's own message."""

    def limits(self, headers: Mapping[str, str]) -> LimitInfo:
        """The rate-limit facts in a response's headers."""


# Small readers the provider modules share.


def api_error(status: int, body: Any, headers: Mapping[str, str]) -> APIError:
    """A non-2xx response -> the APIError carrying the server's own message and retry-after."""
    message, code = error_message(body)
    return APIError(
        message or f"the server answered HTTP {status} with no error message",
        status=status,
        code=code,
        retry_after=parse_retry_after(headers),
    )


def error_message(body: Any) -> tuple[str, str | None]:
    """The server's error message and machine-readable code, from whatever shape it used.

    Reads OpenAI's ``{"error": {"message", "code", "type"}}``, Anthropic's
    ``{"type": "error", "error": {"type", "message"}}``, and the shapes of compatible servers.
    """
    if isinstance(body, Mapping):
        error = body.get("error") or body
        if isinstance(error, Mapping):
            # vLLM puts the HTTP status in `code` (400) and the useful name in `type`; Anthropic
            # has only `type`.
            code = error.get("code")
            if not isinstance(code, str) or not code:
                code = error.get("type") or code
            message = error.get("message") or error.get("detail") or ""
            return str(message), (str(code) if code is not None else None)
        if isinstance(error, str):
            return error, None
    if isinstance(body, str):
        return body.strip()[:500], None
    return "", None


def header_int(value: str | None) -> int | None:
    """A count from a header, ``None`` when absent or unreadable."""
    try:
        return int(float(value)) if value is not None else None
    except (ValueError, OverflowError):  # "abc", "nan", "inf"
        return None


def usage_count(value: Any) -> int:
    """A token count from a usage object, 0 when absent or unreadable."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0
