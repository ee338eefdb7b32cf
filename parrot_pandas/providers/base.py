"""What every provider module offers: the one interface the client and scheduler use.

The rest of the package never branches on the provider: it builds a :class:`Call`, asks the
provider for the HTTP request, and gets a :class:`Completion` (or an ``APIError``) back. Every
failure carries the provider's :class:`~parrot_pandas.errors.Verdict`: the provider is the one
that can read its protocol's status codes, error bodies and finish reasons.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol

from .._limits import LimitInfo
from .._secrets import redact_url
from ..errors import TRANSIENT, APIError, StructuredOutputError, Verdict

__all__ = ["BodyEncoder", "Call", "Completion", "ErrorBody", "HTTPRequest", "Provider"]


@dataclass(frozen=True, init=False)
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

    def __init__(
        self,
        model: str,
        messages: tuple[Mapping[str, str], ...],
        n: int = 1,
        params: Mapping[str, Any] | None = None,
        schema: Mapping[str, Any] | None = None,
        strategy: str | None = None,
    ) -> None:
        # One is built for every request: filling the instance dict directly costs a fraction
        # of the generated frozen __init__, which goes through object.__setattr__ per field.
        self.__dict__.update(
            model=model,
            messages=messages,
            n=n,
            params={} if params is None else params,
            schema=schema,
            strategy=strategy,
        )


@dataclass(frozen=True)
class HTTPRequest:
    """What to send: the client adds nothing but the session and the timeout."""

    url: str
    headers: Mapping[str, str]
    json: Mapping[str, Any]

    def __repr__(self) -> str:
        # Never the headers (Authorization holds the API key) nor a password in the URL.
        return f"HTTPRequest(url={redact_url(self.url)!r}, json={self.json!r})"


@dataclass(frozen=True, init=False)
class Completion:
    """One successful response: the usable answer texts (raw JSON for structured calls), usage,
    limits, and the answers that came back unusable.

    ``problems`` holds one error per choice the provider judged unusable (cut at ``max_tokens``,
    withheld by a content filter, refused, no structure at all), each with its verdict; the
    texts of those choices are not in ``texts``.
    """

    texts: tuple[str, ...]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    limits: LimitInfo = field(default_factory=LimitInfo)
    problems: tuple[StructuredOutputError, ...] = ()

    def __init__(
        self,
        texts: tuple[str, ...],
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        limits: LimitInfo | None = None,
        problems: tuple[StructuredOutputError, ...] = (),
    ) -> None:
        # One per response: see Call.__init__.
        self.__dict__.update(
            texts=texts,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            limits=LimitInfo() if limits is None else limits,
            problems=problems,
        )


class Provider(Protocol):
    """A wire protocol: payload, headers, response parsing and judging, rate-limit headers.

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

    def encode(self, call: Call) -> tuple[str, Mapping[str, str], bytes]:
        """``build(call)`` as it goes on the wire: URL, headers and the JSON body encoded
        (the bytes of ``json.dumps(build(call).json)``); see :class:`BodyEncoder`."""

    def parse(self, call: Call, body: Any, headers: Mapping[str, str]) -> Completion:
        """A 2xx JSON body -> Completion.

        Unusable choices go to ``Completion.problems``. A body that holds an error instead of
        an answer raises that error, judged as if it had come with its own status
        (``APIError``); a body with neither raises ``StructuredOutputError``.
        """

    def error(self, call: Call, status: int, body: Any, headers: Mapping[str, str]) -> APIError:
        """A non-2xx response -> the ``APIError`` with the server's message and the verdict."""

    def limits(self, headers: Mapping[str, str]) -> LimitInfo:
        """The rate-limit facts in a response's headers."""


class BodyEncoder:
    """``build(call)`` encoded, from parts made once per request shape (issue 12, CPU per row).

    Every request of a run is the same JSON but for the row's own text, the content of the
    last message: the shared prefix (model, system message, parameters, schema, the prompt-cache
    marker) is byte-stable. So the body is encoded once per shape with a placeholder for that
    text, split there, and each request is the two parts around its escaped text: the same
    bytes as ``json.dumps(build(call).json)``, without building or walking a dict per request.

    A shape is everything of a call but that text: model, ``n``, strategy, parameters, schema
    and the other messages. A shape whose body does not hold the text exactly once as a plain
    string, or changes with it, is encoded in full every time.

    Parameters
    ----------
    build : callable
        The provider's ``build``: a call -> its :class:`HTTPRequest`.
    """

    # Placeholders no row text holds: control characters are escaped in JSON as \u0000.
    _MARKS = ("\x00parrot-row-a\x00", "\x00parrot-row-b\x00")
    # Shapes remembered; a run has one or two (a strategy fallback, fewer samples on a retry).
    _MAX_SHAPES = 64

    def __init__(self, build: Callable[[Call], HTTPRequest]) -> None:
        self._build = build
        self._shapes: dict[Any, tuple[Any, Any, str, Mapping[str, str], str, str] | None] = {}

    def __call__(self, call: Call) -> tuple[str, Mapping[str, str], bytes]:
        messages = call.messages
        if not messages:
            return self._full(call)
        last = messages[-1]
        text = last.get("content") if len(last) == 2 else None
        if type(text) is not str:
            return self._full(call)
        params, schema = call.params, call.schema
        shape: tuple[Any, ...] = (call.model, call.n, call.strategy, id(params), id(schema))
        if len(messages) == 1:
            shape += (last.get("role"),)
        else:
            shape += (last.get("role"), *map(_items, messages[:-1]))
        try:
            parts = self._shapes[shape]
        except KeyError:
            parts = self._learn(shape, call)
        except TypeError:  # an unhashable message value: no shape to remember
            return self._full(call)
        # The ids are only valid while the same objects are alive: the parts keep them.
        if parts is None or parts[0] is not params or parts[1] is not schema:
            return self._full(call)
        _, _, url, headers, head, tail = parts
        return url, headers, (head + encode_basestring_ascii(text) + tail).encode()

    def _full(self, call: Call) -> tuple[str, Mapping[str, str], bytes]:
        request = self._build(call)
        return request.url, request.headers, json.dumps(request.json).encode()

    def _learn(
        self, shape: Any, call: Call
    ) -> tuple[Any, Any, str, Mapping[str, str], str, str] | None:
        if len(self._shapes) >= self._MAX_SHAPES:
            self._shapes.clear()
        texts = []
        for mark in self._MARKS:
            last = {**call.messages[-1], "content": mark}
            request = self._build(dataclasses.replace(call, messages=(*call.messages[:-1], last)))
            texts.append(json.dumps(request.json))
        a, b = (encode_basestring_ascii(mark) for mark in self._MARKS)
        parts = None
        if texts[0].count(a) == 1 and texts[0].replace(a, b) == texts[1]:
            head, tail = texts[0].split(a)
            parts = (call.params, call.schema, request.url, request.headers, head, tail)
        self._shapes[shape] = parts
        return parts


def _items(message: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(message.items())


# -- what provider modules share -------------------------------------------------------------

# Verdicts every protocol hands out.
RUN_REFUSED = Verdict("run", False, "refused")  # bad key, no permission
RUN_NOT_FOUND = Verdict("run", False, "not_found")  # unknown model or wrong URL
RUN_QUOTA = Verdict("run", False, "quota")  # credit or spend limit exhausted
RUN_BAD_PARAMETER = Verdict("run", False, "bad_parameter")  # every row sends it
ROW_TOO_LONG = Verdict("row", False, "context_length")
ROW_TOO_LARGE = Verdict("row", False, "request_too_large")
ROW_FILTERED = Verdict("row", False, "content_filter")
ROW_REFUSED = Verdict("row", False, "refusal")
ROW_TRUNCATED = Verdict("row", False, "truncated")
ROW_REJECTED = Verdict("row", False, "rejected")
UNSUPPORTED_STRATEGY = Verdict("strategy", False, "unsupported_strategy")


@dataclass(frozen=True)
class ErrorBody:
    """An error response's fields, from whatever shape the server used.

    Reads OpenAI's ``{"error": {"message", "type", "param", "code"}}``, Anthropic's
    ``{"type": "error", "error": {"type", "message"}}``, llama.cpp's and vLLM's (which put the
    HTTP status in ``code``), FastAPI's ``{"detail": ...}`` and plain text.
    """

    message: str = ""
    code: str | None = None  # the machine-readable name: `code` when it is a word, else `type`
    type: str | None = None
    param: str | None = None
    status: int | None = None  # a status the body names itself (vLLM's "code": 400)
    details: Mapping[str, Any] = field(default_factory=dict)  # the whole error object

    @classmethod
    def read(cls, body: Any) -> ErrorBody:
        """The fields of ``body`` (a decoded JSON body or a text)."""
        if isinstance(body, str):
            return cls(message=body.strip()[:500])
        if not isinstance(body, Mapping):
            return cls()
        error = body.get("error") or body
        if isinstance(error, str):
            return cls(message=error)
        if not isinstance(error, Mapping):
            return cls()
        code, kind = error.get("code"), error.get("type")
        kind = str(kind) if isinstance(kind, str) and kind else None
        status = code if type(code) is int and 100 <= code < 600 else None
        name = code if isinstance(code, str) and code else kind
        message = error.get("message") or error.get("detail") or ""
        param = error.get("param")
        return cls(
            message=str(message),
            code=name,
            type=kind,
            param=str(param) if param else None,
            status=status,
            details=error,
        )


def api_error(
    status: int | None, fault: ErrorBody, verdict: Verdict, limits: LimitInfo
) -> APIError:
    """The APIError for a judged error response, carrying its limits and retry-after."""
    error = APIError(
        fault.message or f"the server answered HTTP {status} with no error message",
        status=status,
        code=fault.code,
        verdict=verdict,
    )
    # The limits hold the retry-after, parsed once; error.retry_after reads it from there.
    error.limits = limits
    return error


def status_verdict(status: int | None) -> Verdict:
    """What a status means when nothing else in the response says more."""
    if status in (401, 403):
        return RUN_REFUSED
    if status == 404:
        return RUN_NOT_FOUND
    if status == 413:
        return ROW_TOO_LARGE
    if status is None or status in (408, 409) or status >= 500:
        return TRANSIENT
    return ROW_REJECTED


def no_answer_body(body: Any, field_name: str) -> StructuredOutputError:
    """A 2xx body with neither an answer nor an error: asking again may help."""
    return StructuredOutputError(f"response has no {field_name!r}: {str(body)[:200]}")


def truncated(call: Call, why: str, default_max: int | None = None) -> StructuredOutputError:
    """An answer cut at the output limit: a row error that says what to raise it to."""
    name = "max_completion_tokens" if "max_completion_tokens" in call.params else "max_tokens"
    limit = call.params.get(name) or default_max
    if isinstance(limit, int) and limit > 0:
        fix = f"pass {name}={2 * limit} (twice the current {limit}) or ask for a shorter answer"
    else:
        fix = f"no {name} was set, so the server's own limit applied: pass a larger {name}="
    return StructuredOutputError(
        f"the answer was cut off at {name} ({why}); {fix}", verdict=ROW_TRUNCATED
    )


def no_structure(call: Call, *, sends_parameter: bool) -> StructuredOutputError:
    """A structured call answered with no JSON at all.

    When the strategy sent a structured-output parameter (a forced tool, a response format),
    an answer without a brace or a bracket means the server ignored it: a ``strategy`` verdict,
    which moves the setup request of ``structured="auto"`` to the next strategy. Otherwise the
    model simply did not follow the prompt: that row's error, worth one more try.
    """
    scope = "strategy" if sends_parameter else "row"
    return StructuredOutputError(
        f"the answer holds no JSON at all (structured={call.strategy!r})",
        verdict=Verdict(scope, True, "unstructured"),
    )


def unstructured(text: str | None) -> bool:
    """True when ``text`` cannot hold any JSON object or array (what every parse needs)."""
    return text is None or ("{" not in text and "[" not in text)


def header_int(value: str | None) -> int | None:
    """A count from a header, ``None`` when absent or unreadable."""
    try:
        return int(float(value)) if value is not None else None
    except (ValueError, OverflowError):  # "abc", "nan", "inf"
        return None


def usage_count(value: Any) -> int:
    """A count from a response body (tokens, batch requests), 0 when absent or unreadable."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0
