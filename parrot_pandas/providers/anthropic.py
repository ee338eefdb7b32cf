"""The Anthropic Messages API (``POST {base_url}/v1/messages``), spoken natively.

What differs from the OpenAI protocol, and how each difference is met:

- The key goes in ``x-api-key``, with an ``anthropic-version`` header.
- ``system`` is a top-level field, not a message.
- ``max_tokens`` is required (:meth:`AnthropicProvider.prepare_params` supplies
  :data:`DEFAULT_MAX_TOKENS` before any request).
- There is no ``n``: one request gives one answer, and the scheduler asks again until a row
  has its ``n`` samples.
- ``extract`` strategies: ``"tools"`` forces one tool with ``tool_choice: {"type": "tool"}``;
  ``"json_schema"`` uses structured outputs (``output_config.format``); ``"json_object"`` and
  ``"prompt"`` send nothing extra, since the plan already put the schema in the system prompt
  (the API has no plain JSON mode).
- The answer is a list of ``content`` blocks (``text``, ``tool_use`` with an ``input`` object).
- Rate limits come in ``anthropic-ratelimit-*`` headers whose resets are RFC 3339 timestamps.

Verdicts (:meth:`AnthropicProvider.judge`) follow the API's error types: ``authentication_error``
(401), ``permission_error`` (403), ``billing_error`` (402), ``not_found_error`` (404) and a
credit balance too low (400) fail the run; ``request_too_large`` (413) and a prompt too long
fail the row; ``rate_limit_error`` (429) waits and retries, unless the spend limit is reached;
``api_error`` (500) and ``overloaded_error`` (529) are retried. ``stop_reason`` ``max_tokens``
and ``model_context_window_exceeded`` are truncations and ``refusal`` a declined answer: that
row's errors, never retried.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from .._limits import LimitInfo, parse_retry_after
from .._secrets import redact_url
from ..errors import RATE_LIMITED, APIError, ConfigurationError, StructuredOutputError, Verdict
from ._anthropic_batch import AnthropicBatch
from ._prompt_cache import CacheUsage, anthropic_cache_control, anthropic_cache_usage
from ._url import base_path, endpoint, with_path
from .base import (
    ROW_REFUSED,
    ROW_TOO_LARGE,
    ROW_TOO_LONG,
    RUN_BAD_PARAMETER,
    RUN_NOT_FOUND,
    RUN_QUOTA,
    RUN_REFUSED,
    UNSUPPORTED_STRATEGY,
    BodyEncoder,
    Call,
    Completion,
    ErrorBody,
    HTTPRequest,
    api_error,
    header_int,
    no_answer_body,
    no_structure,
    status_verdict,
    truncated,
    unstructured,
    usage_count,
)
from .openai import TOOL_NAME

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_MAX_TOKENS", "AnthropicProvider", "parse_reset_time"]

# The Messages API version every current model serves (sent as the anthropic-version header).
ANTHROPIC_VERSION = "2023-06-01"
# The Messages API requires max_tokens; this is used when the user gives none.
DEFAULT_MAX_TOKENS = 1024

# OpenAI request parameters the Messages API has no equivalent for: refused before any request
# rather than by a 400 at the first one. (max_completion_tokens becomes max_tokens; stop is sent
# as stop_sequences and user as metadata.user_id.)
_UNSUPPORTED = frozenset(
    {
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "reasoning_effort",
        "min_p",
        "repeat_penalty",
    }
)

_RATE_LIMIT_PREFIX = "anthropic-ratelimit-"
# Every token limit Anthropic announces; the tightest one is the run's token limit.
_TOKEN_LIMITS = ("tokens", "input-tokens", "output-tokens")

# Strategies that send a structured-output parameter (json_object and prompt send none here).
_PARAMETER_STRATEGIES = frozenset({"tools", "json_schema"})
# 400 texts that say the prompt does not fit: "prompt is too long: 210000 tokens > 200000
# maximum", "input length and `max_tokens` exceed context limit: ...".
_TOO_LONG = re.compile(r"prompt is too long|exceed context limit|context window", re.IGNORECASE)
# The 400 of an organisation without credit ("Your credit balance is too low to access the
# Anthropic API") or past its own spend limit ("You have reached your specified API usage
# limits"), and the 429 of the monthly spend limit (details.error_code).
_NO_CREDIT = re.compile(r"credit balance|usage limits", re.IGNORECASE)
_SPEND_LIMIT = "enforced_spend_limit_reached"
# A validation error names its field first ("tools.0.input_schema: Field required",
# "temperature: Input should be ..."): a request field every row sends belongs to the run.
_FIELD = re.compile(r"^([a-z_]+)(?=[.:])")
_STRUCTURED_FIELDS = re.compile(r"tool|output_config|output_format|structured output", re.I)
_ROW_FIELDS = frozenset({"messages", "system"})

# RFC 3339: 2025-01-01T12:00:30Z, 2025-01-01T12:00:30.25+01:00 (fromisoformat reads neither
# "Z" nor more than six fraction digits before Python 3.11).
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?\s*([Zz]|[+-]\d{2}:?\d{2})?"
)


class AnthropicProvider:
    """``POST {base_url}/v1/messages`` with an ``x-api-key`` header.

    Parameters
    ----------
    base_url : str
        Without ``/v1``, as Anthropic's SDK takes it (``ANTHROPIC_BASE_URL``), e.g.
        ``https://api.anthropic.com``. A trailing ``/v1`` is tolerated.
    api_key : str, optional
        Sent as ``x-api-key``; a local test server may need none.
    clock : callable, optional
        Wall-clock time (as :func:`time.time`) that reset timestamps are measured from.
    """

    name = "anthropic"
    label = "Anthropic"
    # As Anthropic's SDK reads them; its base URL has no /v1 (the path adds /v1/messages).
    api_key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    default_base_url = "https://api.anthropic.com"
    example_base_url = "https://api.anthropic.com"
    api_version_env = None
    example_api_version = None
    vendor_hosts = ("api.anthropic.com",)
    model_prefixes = ("claude-",)
    # The API has no n: one request is one sample, and the scheduler asks again.
    samples_per_request = 1
    no_key_hint = ""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._url = endpoint(self.normalize_base_url(base_url), "/v1/messages")
        self._headers = {
            "Content-Type": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
        }
        if api_key:
            self._headers["x-api-key"] = api_key
        self._clock = clock
        self._encoder = BodyEncoder(self.build)

    def __repr__(self) -> str:
        return f"AnthropicProvider({redact_url(self._url)!r})"

    @classmethod
    def from_config(cls, config: Any) -> AnthropicProvider:
        """The provider for a run's ``RunConfig``."""
        return cls(config.base_url, config.api_key)

    @classmethod
    def normalize_base_url(cls, base_url: str) -> str:
        """``base_url`` without a trailing ``/`` or ``/v1`` (forgiven, not doubled); its query
        kept."""
        return with_path(base_url, base_path(base_url).removesuffix("/v1"))

    @classmethod
    def prepare_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The request parameters as the Messages API takes them, before any request.

        ``max_completion_tokens`` becomes ``max_tokens``, which defaults to
        :data:`DEFAULT_MAX_TOKENS`: set here rather than when a request is built, so the token
        budget, ``estimate()`` and the cache key all see the limit that is really sent.

        Raises
        ------
        ConfigurationError
            For an OpenAI parameter the API has no equivalent for, or both token limits.
        """
        unsupported = sorted(_UNSUPPORTED & params.keys())
        if unsupported:
            raise ConfigurationError(
                f"{', '.join(unsupported)} not supported by the Anthropic Messages API "
                "(provider='anthropic'); remove them, or pass Anthropic request fields as "
                "extra_body={...}"
            )
        params = dict(params)
        if "max_completion_tokens" in params:
            if "max_tokens" in params:
                raise ConfigurationError("pass max_tokens or max_completion_tokens, not both")
            params["max_tokens"] = params.pop("max_completion_tokens")
        params.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        return params

    def build(self, call: Call) -> HTTPRequest:
        params = dict(call.params)
        extra = params.pop("extra_body", None) or {}
        body: dict[str, Any] = {"model": call.model}
        system = [m["content"] for m in call.messages if m.get("role") == "system"]
        if system:
            body["system"] = "\n\n".join(system)
        body["messages"] = [dict(m) for m in call.messages if m.get("role") != "system"]
        # call.n is not sent: the API has none, so one request is one sample.
        body.update(_translate(params))
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        if call.schema is not None:
            body.update(_structured_fields(call))
        body.update(extra)
        # The shared prefix first and byte-stable, marked for the provider's prompt cache.
        body = self.with_prompt_cache(call, body)
        return HTTPRequest(self._url, self._headers, body)

    def encode(self, call: Call) -> tuple[str, Mapping[str, str], bytes]:
        """``build(call)`` as sent: URL, headers, the JSON body encoded (see
        :class:`~.base.BodyEncoder`)."""
        return self._encoder(call)

    def parse(self, call: Call, body: Any, headers: Mapping[str, str]) -> Completion:
        content = body.get("content") if isinstance(body, Mapping) else None
        if not isinstance(content, list):
            fault = ErrorBody.read(body)
            if not fault.message:
                raise no_answer_body(body, "content")
            limits = self.limits(headers)
            raise api_error(fault.status, fault, self.judge(call, fault.status, fault), limits)
        structured = call.schema is not None
        stop = body.get("stop_reason")
        text = _answer_text(content, structured=structured)
        problem: StructuredOutputError | None = None
        if stop == "refusal":
            problem = StructuredOutputError(
                "the model declined to answer (stop_reason 'refusal')", verdict=ROW_REFUSED
            )
        elif stop == "max_tokens":
            # Free text cut short is as wrong as cut JSON: never a silent success.
            problem = truncated(call, "stop_reason 'max_tokens'", DEFAULT_MAX_TOKENS)
        elif stop == "model_context_window_exceeded":
            problem = StructuredOutputError(
                "the answer filled the model's context window (stop_reason "
                "'model_context_window_exceeded'); shorten the prompt",
                verdict=Verdict("row", False, "truncated"),
            )
        elif structured and unstructured(text):
            sends = call.strategy in _PARAMETER_STRATEGIES
            problem = no_structure(call, sends_parameter=sends)
        usage = body.get("usage")
        usage = usage if isinstance(usage, Mapping) else {}
        # input_tokens leaves out what was read from or written to the prompt cache.
        prompt_tokens = sum(
            usage_count(usage.get(name))
            for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        return Completion(
            texts=(text,) if text is not None and problem is None else (),
            prompt_tokens=prompt_tokens,
            completion_tokens=usage_count(usage.get("output_tokens")),
            limits=self.limits(headers),
            problems=(problem,) if problem is not None else (),
        )

    def error(self, call: Call, status: int, body: Any, headers: Mapping[str, str]) -> APIError:
        # {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        fault = ErrorBody.read(body)
        return api_error(status, fault, self.judge(call, status, fault), self.limits(headers))

    def judge(self, call: Call, status: int | None, fault: ErrorBody) -> Verdict:
        """The verdict on an error response (``status`` ``None``: an error inside a 200 body).

        Parameters
        ----------
        call : Call
            The request that failed.
        status : int or None
            The HTTP status.
        fault : ErrorBody
            What the body says (Anthropic names the error in ``type``).

        Returns
        -------
        Verdict
            ``run`` for a refused key, a missing model, no credit or a bad request field;
            ``strategy`` when the server refuses the tool or the output format; ``row``
            otherwise, retried only for a rate limit, 500, 529 and the like.
        """
        kind, message = fault.code, fault.message
        details = fault.details.get("details")
        if kind == "billing_error" or status == 402 or _NO_CREDIT.search(message):
            return RUN_QUOTA
        if isinstance(details, Mapping) and details.get("error_code") == _SPEND_LIMIT:
            return RUN_QUOTA
        if status in (401, 403) or kind in ("authentication_error", "permission_error"):
            return RUN_REFUSED
        if status == 404 or kind == "not_found_error":
            return RUN_NOT_FOUND
        if status == 413 or kind == "request_too_large":
            return ROW_TOO_LARGE
        if status == 429 or kind == "rate_limit_error":
            return RATE_LIMITED
        if status in (None, 400) or kind == "invalid_request_error":
            if _TOO_LONG.search(message):
                return ROW_TOO_LONG
            field = _FIELD.match(message)
            if call.strategy in _PARAMETER_STRATEGIES and call.schema is not None:
                if _STRUCTURED_FIELDS.search(field.group(1) if field else message):
                    return UNSUPPORTED_STRATEGY
            if status == 400 and field is not None and field.group(1) not in _ROW_FIELDS:
                return RUN_BAD_PARAMETER
        return status_verdict(status)

    def limits(self, headers: Mapping[str, str]) -> LimitInfo:
        now = self._clock()

        def read(kind: str) -> tuple[int | None, int | None, float | None]:
            prefix = f"{_RATE_LIMIT_PREFIX}{kind}-"
            return (
                header_int(headers.get(prefix + "limit")),
                header_int(headers.get(prefix + "remaining")),
                parse_reset_time(headers.get(prefix + "reset"), now),
            )

        limit_requests, remaining_requests, reset_requests = read("requests")
        limit_tokens, remaining_tokens, reset_tokens = _tightest(
            [read(kind) for kind in _TOKEN_LIMITS]
        )
        return LimitInfo(
            limit_requests=limit_requests,
            limit_tokens=limit_tokens,
            remaining_requests=remaining_requests,
            remaining_tokens=remaining_tokens,
            reset_requests=reset_requests,
            reset_tokens=reset_tokens,
            retry_after=parse_retry_after(headers),
        )

    # -- prompt caching and the Batch API (issue 14) -----------------------------------------

    def with_prompt_cache(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        """``body`` with ``cache_control`` on the end of its shared prefix (tools, system) when
        that prefix is long enough for the model to cache. Idempotent."""
        return anthropic_cache_control(body)

    def cache_usage(self, body: Any) -> CacheUsage:
        """Prompt-cache tokens of a Messages body (``cache_read_input_tokens``,
        ``cache_creation_input_tokens``)."""
        return anthropic_cache_usage(body)

    def batch(self) -> AnthropicBatch:
        """This provider's Message Batches API (:class:`~._anthropic_batch.AnthropicBatch`)."""
        # The base URL is the messages endpoint's, without its path.
        base = with_path(self._url, base_path(self._url).removesuffix("/v1/messages"))
        return AnthropicBatch(self, base, self._headers)


def parse_reset_time(value: str | None, now: float) -> float | None:
    """Seconds from ``now`` until an RFC 3339 timestamp (never negative); ``None`` if unreadable.

    Examples
    --------
    >>> parse_reset_time("1970-01-01T00:01:00Z", now=30.0)
    30.0
    >>> parse_reset_time("1970-01-01T01:00:00.5+01:00", now=0.0)
    0.5
    >>> parse_reset_time("6m0s", now=0.0) is None
    True
    """
    match = _RFC3339.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        return None
    day, clock, fraction, offset = match.groups()
    try:
        when = datetime.fromisoformat(f"{day}T{clock}")
    except ValueError:
        return None
    if fraction:
        when += timedelta(seconds=float(f"0.{fraction}"))
    zone = timezone.utc
    if offset and offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[-2:])
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    return max(when.replace(tzinfo=zone).timestamp() - now, 0.0)


def _tightest(
    limits: list[tuple[int | None, int | None, float | None]],
) -> tuple[int | None, int | None, float | None]:
    """One token limit from Anthropic's several: the lowest limit and remaining, and the reset
    of the bucket with the least left (the longest one among equals)."""
    known = [entry for entry in limits if any(v is not None for v in entry)]
    if not known:
        return None, None, None
    limit = min((entry[0] for entry in known if entry[0] is not None), default=None)
    with_remaining = [entry for entry in known if entry[1] is not None]
    if not with_remaining:
        return limit, None, max((e[2] for e in known if e[2] is not None), default=None)
    least = min(entry[1] for entry in with_remaining)
    resets = [e[2] for e in with_remaining if e[1] == least and e[2] is not None]
    return limit, least, max(resets, default=None)


def _translate(params: dict[str, Any]) -> dict[str, Any]:
    """OpenAI-named request parameters -> the Messages API's names."""
    out = dict(params)
    max_completion_tokens = out.pop("max_completion_tokens", None)
    if max_completion_tokens is not None:
        out.setdefault("max_tokens", max_completion_tokens)
    stop = out.pop("stop", None)
    if stop is not None:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    user = out.pop("user", None)
    if user is not None:
        out["metadata"] = {"user_id": user}
    return out


def _structured_fields(call: Call) -> dict[str, Any]:
    schema = dict(call.schema or {})
    if call.strategy == "tools":
        return {
            "tools": [
                {
                    "name": TOOL_NAME,
                    "description": "Record every object found, as the items array.",
                    "input_schema": schema,
                }
            ],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
        }
    if call.strategy == "json_schema":
        return {"output_config": {"format": {"type": "json_schema", "schema": schema}}}
    return {}


def _answer_text(content: list[Any], *, structured: bool) -> str | None:
    blocks = [b for b in content if isinstance(b, Mapping)]
    if structured:
        for block in blocks:
            if block.get("type") == "tool_use" and "input" in block:
                tool_input = block["input"]
                return tool_input if isinstance(tool_input, str) else json.dumps(tool_input)
    texts = [
        b["text"] for b in blocks if b.get("type") == "text" and isinstance(b.get("text"), str)
    ]
    return "".join(texts) if texts else None
