"""The OpenAI Chat Completions protocol, spoken by OpenAI, vLLM, Ollama, llama.cpp and others.

Every failure gets its verdict here (:meth:`OpenAIProvider.judge`, and ``finish_reason`` in
:meth:`OpenAIProvider.parse`), read from what this protocol's servers actually send:

- OpenAI: ``invalid_api_key`` (401), ``model_not_found`` (404), ``insufficient_quota`` and the
  billing codes (429, nothing to wait for), ``rate_limit_exceeded`` (429; "Request too large
  ... Limit 30000, Requested 45000" when one request exceeds the limit itself, so waiting never
  helps), ``context_length_exceeded`` (400, whose text may mention "functions"), and
  ``param`` naming the parameter a 400 is about;
- llama.cpp: ``exceed_context_size_error`` (400), ``not_supported_error``;
- vLLM: the status in ``code`` and the name in ``type``, errors inside a 200 body;
- Azure: ``content_filter`` (400), see :mod:`.azure`.

``finish_reason`` ``length`` is a truncation and ``content_filter`` a withheld answer (that
row's errors, not retried); ``message.refusal`` is the model declining a structured answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .._limits import CASE_INSENSITIVE, LimitInfo, parse_duration, parse_retry_after
from .._secrets import redact_url
from ..errors import RATE_LIMITED, APIError, StructuredOutputError, Verdict
from ._openai_batch import OpenAIBatch
from ._prompt_cache import CacheUsage, openai_cache_usage, prefix_key
from ._url import base_path, endpoint, with_path
from .base import (
    ROW_FILTERED,
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

__all__ = ["OpenAIProvider"]

TOOL_NAME = "record_items"

# Strategies that send a structured-output parameter the server may refuse or ignore.
_PARAMETER_STRATEGIES = frozenset({"tools", "json_schema", "json_object"})
# OpenAI's billing failures: type insufficient_quota, with the cause in `code`.
_QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
        "project_spend_limit_exceeded",
        "organization_usage_limit_exceeded",
    }
)
_AUTH_CODES = frozenset({"invalid_api_key", "authentication_error", "permission_error"})
_NOT_FOUND_CODES = frozenset({"model_not_found", "not_found_error", "NotFoundError"})
# OpenAI's context_length_exceeded, llama.cpp's exceed_context_size_error; vLLM and others say
# it only in words ("This model's maximum context length is ...").
_CONTEXT_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
_CONTEXT_WORDS = re.compile(
    r"maximum context length|context (size|window|length)|too many (input )?tokens", re.IGNORECASE
)
# OpenAI's 429 for one request above the limit itself: "Request too large for gpt-4o ... on
# tokens per min (TPM): Limit 30000, Requested 45000."
_TOO_LARGE = re.compile(r"request too large", re.IGNORECASE)
# What a server says when it refuses a structured-output parameter: OpenAI names it in `param`,
# the others in the text ("tools param requires --jinja flag", "response_format of type
# 'json_schema' is not supported", "does not support tools").
_STRUCTURED_PARAM = re.compile(r"^(tools?|tool_choice|functions?|function_call|response_format)")
_STRUCTURED_WORDS = re.compile(
    r"tool|function|response_format|json_schema|json_object|grammar|guided_|structured output",
    re.IGNORECASE,
)
# A 400 about the messages belongs to that row; about any other parameter, to every row.
_ROW_PARAMS = re.compile(r"^(messages|prompt|input)\b")


_NO_CACHE_USAGE = CacheUsage()


class OpenAIProvider:
    """``POST {base_url}/chat/completions`` with a bearer key.

    Parameters
    ----------
    base_url : str
        Up to and including the version segment, e.g. ``https://api.openai.com/v1``. A query
        (``?tenant=a``) is kept, after the endpoint path.
    api_key : str, optional
        Sent as ``Authorization: Bearer``; local servers often need none.

    Notes
    -----
    The class attributes are the protocol's facts the configuration asks for (a new provider
    states its own and changes no other module).
    """

    name = "openai"
    label = "OpenAI"
    # Where the official SDK reads its settings from.
    api_key_env = "OPENAI_API_KEY"
    base_url_env = "OPENAI_BASE_URL"
    default_base_url: str | None = "https://api.openai.com/v1"
    example_base_url = "http://127.0.0.1:8080/v1"
    # Azure's api-version: None where the protocol has none.
    api_version_env: str | None = None
    example_api_version: str | None = None
    # The vendor's own API hosts: there a missing key fails before any request (a local server
    # needs none), and a model that implies another provider is refused. None: every host.
    vendor_hosts: tuple[str, ...] | None = ("api.openai.com",)
    # Model names that imply this provider when none is given.
    model_prefixes: tuple[str, ...] = ()
    # Most samples one request returns (None: any n, sent as n).
    samples_per_request: int | None = None
    no_key_hint = ", or point base_url= (or OPENAI_BASE_URL) at a local OpenAI-compatible server"

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self._base_url = self.normalize_base_url(base_url)
        self._url = endpoint(self._base_url, "/chat/completions")
        self._headers = {"Content-Type": "application/json", **self._auth_headers(api_key)}
        # Read once: every request asks whether it goes to the vendor (issue 12, CPU per row).
        self._host = urlsplit(self._base_url).hostname or ""
        self._encoder = BodyEncoder(self.build)
        # The rate-limit header values of the last response without a retry-after, and what
        # they said (see limits).
        self._last_limits: tuple[tuple[str | None, ...], LimitInfo] = ((None,) * 6, LimitInfo())

    def __repr__(self) -> str:
        return f"OpenAIProvider({redact_url(self._url)!r})"

    @classmethod
    def from_config(cls, config: Any) -> OpenAIProvider:
        """The provider for a run's ``RunConfig``."""
        return cls(config.base_url, config.api_key)

    @classmethod
    def normalize_base_url(cls, base_url: str) -> str:
        """``base_url`` as the run keeps it: no trailing ``/`` on its path, its query kept."""
        return with_path(base_url, base_path(base_url))

    @classmethod
    def prepare_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The request parameters as this protocol takes them, before any request.

        Renames and defaults happen here rather than when a request is built, so the token
        budget, ``estimate()`` and the cache key all see what is really sent.

        Raises
        ------
        ConfigurationError
            For a parameter the protocol has no equivalent for.
        """
        return dict(params)

    @staticmethod
    def _auth_headers(api_key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _url_for(self, call: Call) -> str:
        return self._url

    def build(self, call: Call) -> HTTPRequest:
        params = dict(call.params)
        extra = params.pop("extra_body", None) or {}
        body: dict[str, Any] = {"model": call.model, "messages": list(call.messages), **params}
        if call.n != 1:
            body["n"] = call.n
        if call.schema is not None:
            body.update(_structured_fields(call))
        body.update(extra)
        # The shared prefix first and byte-stable, marked for the provider's prompt cache.
        body = self.with_prompt_cache(call, body)
        return HTTPRequest(self._url_for(call), self._headers, body)

    def encode(self, call: Call) -> tuple[str, Mapping[str, str], bytes]:
        """``build(call)`` as sent: URL, headers, the JSON body encoded (see
        :class:`~.base.BodyEncoder`)."""
        return self._encoder(call)

    def parse(self, call: Call, body: Any, headers: Mapping[str, str]) -> Completion:
        # `type(x) is dict` first: JSON bodies are dicts, and an ABC isinstance check costs
        # several times more (issue 12, CPU per row).
        choices = body.get("choices") if type(body) is dict or isinstance(body, Mapping) else None
        if not isinstance(choices, list):
            # vLLM can answer 200 with `"choices": null`, or with an error body (context too
            # long): that error is judged as if it had come with its own status.
            fault = ErrorBody.read(body)
            if not fault.message:
                raise no_answer_body(body, "choices")
            fault = dataclasses.replace(
                fault,
                message=f"the server answered 200 with an error and no 'choices': {fault.message}",
            )
            limits = self.limits(headers)
            raise api_error(fault.status, fault, self.judge(call, fault.status, fault), limits)
        structured = call.schema is not None
        texts: list[str] = []
        problems: list[StructuredOutputError] = []
        for choice in choices:
            if not (type(choice) is dict or isinstance(choice, Mapping)):
                continue
            message = choice.get("message")
            if not (type(message) is dict or isinstance(message, Mapping)):
                message = {}
            finish = choice.get("finish_reason")
            # Asked only when something may be wrong: most choices stop on their own.
            if finish == "length" or finish == "content_filter" or message.get("refusal"):
                problem = self._finished_badly(call, finish, message)
                if problem is not None:
                    problems.append(problem)
                    continue
            text = None if structured else message.get("content")
            if type(text) is not str:  # a tool call, content parts, or nothing
                text = _answer_text(message, structured=structured)
            if structured and unstructured(text):
                sends = call.strategy in _PARAMETER_STRATEGIES
                problems.append(no_structure(call, sends_parameter=sends))
            elif text is not None:
                texts.append(text)
        usage = body.get("usage")
        if not (type(usage) is dict or isinstance(usage, Mapping)):
            usage = {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        return Completion(
            tuple(texts),
            prompt if type(prompt) is int and prompt >= 0 else usage_count(prompt),
            completion if type(completion) is int and completion >= 0 else usage_count(completion),
            self.limits(headers),
            tuple(problems),
        )

    def _finished_badly(
        self, call: Call, finish: Any, message: Mapping[str, Any]
    ) -> StructuredOutputError | None:
        # The answer is whole only when the model stopped on its own (stop, tool_calls).
        if finish == "length":
            return truncated(call, "finish_reason 'length'")
        if finish == "content_filter":
            return StructuredOutputError(
                "the content filter withheld the answer (finish_reason 'content_filter')",
                verdict=ROW_FILTERED,
            )
        refusal = message.get("refusal")
        if isinstance(refusal, str) and refusal and not message.get("content"):
            return StructuredOutputError(
                f"the model refused to answer: {refusal[:300]}", verdict=ROW_REFUSED
            )
        return None

    def error(self, call: Call, status: int, body: Any, headers: Mapping[str, str]) -> APIError:
        fault = ErrorBody.read(body)
        return api_error(status, fault, self.judge(call, status, fault), self.limits(headers))

    def judge(self, call: Call, status: int | None, fault: ErrorBody) -> Verdict:
        """The verdict on an error response (``status`` ``None``: an error inside a 200 body).

        Parameters
        ----------
        call : Call
            The request that failed (whether it sent a structured-output parameter matters).
        status : int or None
            The HTTP status.
        fault : ErrorBody
            What the body says.

        Returns
        -------
        Verdict
            ``run`` for a refused key, an unknown model or URL, an exhausted quota or a
            parameter every row sends; ``strategy`` when the server refuses the structured-output
            parameter; ``row`` otherwise, retried only when waiting can help (a rate limit, 5xx,
            408, 409).
        """
        code, kind, message = fault.code, fault.type, fault.message
        names = {code, kind}
        if names & _QUOTA_CODES:
            return RUN_QUOTA
        if status in (401, 403) or names & _AUTH_CODES:
            return RUN_REFUSED
        if status == 404 or names & _NOT_FOUND_CODES:
            return RUN_NOT_FOUND
        # A 429's words are about the rate limit, never the context window.
        client_error = status is None or (400 <= status < 500 and status != 429)
        if names & _CONTEXT_CODES or (client_error and _CONTEXT_WORDS.search(message)):
            return ROW_TOO_LONG
        if "content_filter" in names:
            return ROW_FILTERED
        if status == 429:
            return ROW_TOO_LARGE if _TOO_LARGE.search(message) else RATE_LIMITED
        if status in (None, 400, 422, 500, 501) and self._refuses_strategy(call, fault):
            return UNSUPPORTED_STRATEGY
        if status in (400, 422) and fault.param and not _ROW_PARAMS.match(fault.param):
            return RUN_BAD_PARAMETER
        return status_verdict(status)

    @staticmethod
    def _refuses_strategy(call: Call, fault: ErrorBody) -> bool:
        if call.schema is None or call.strategy not in _PARAMETER_STRATEGIES:
            return False
        if fault.param:
            return bool(_STRUCTURED_PARAM.match(fault.param))
        return bool(_STRUCTURED_WORDS.search(fault.message))

    def limits(self, headers: Mapping[str, str]) -> LimitInfo:
        get = headers.get
        raw = (
            get("x-ratelimit-limit-requests"),
            get("x-ratelimit-limit-tokens"),
            get("x-ratelimit-remaining-requests"),
            get("x-ratelimit-remaining-tokens"),
            get("x-ratelimit-reset-requests"),
            get("x-ratelimit-reset-tokens"),
        )
        # Most responses repeat the previous one's values (or carry none): then its LimitInfo
        # serves again. Never with a retry-after, whose HTTP-date form depends on the time.
        last = self._last_limits
        if (
            raw == last[0]
            and isinstance(headers, CASE_INSENSITIVE)
            and get("retry-after-ms") is None
            and get("retry-after") is None
        ):
            return last[1]
        info = LimitInfo(
            limit_requests=header_int(raw[0]),
            limit_tokens=header_int(raw[1]),
            remaining_requests=header_int(raw[2]),
            remaining_tokens=header_int(raw[3]),
            reset_requests=_duration(raw[4]),
            reset_tokens=_duration(raw[5]),
            retry_after=parse_retry_after(headers),
        )
        if info.retry_after is None:
            self._last_limits = (raw, info)
        return info

    # -- prompt caching and the Batch API (issue 14) -----------------------------------------

    def with_prompt_cache(self, call: Call, body: Mapping[str, Any]) -> dict[str, Any]:
        """``body`` with OpenAI's ``prompt_cache_key``: a hash of ``call``'s shared prefix.

        Sent only to the vendor's own hosts (:attr:`vendor_hosts`): a compatible server may
        refuse or warn about a field it does not know. Idempotent.
        """
        out = dict(body)
        if self._is_vendor_host():
            out.setdefault("prompt_cache_key", prefix_key(call))
        return out

    def cache_usage(self, body: Any) -> CacheUsage:
        """Prompt-cache tokens of a response body (``prompt_tokens_details.cached_tokens``)."""
        # Most answers read nothing from the cache: said without a CacheUsage of their own.
        usage = body.get("usage") if type(body) is dict else body
        if usage is None:
            return _NO_CACHE_USAGE
        if type(usage) is dict:
            details = usage.get("prompt_tokens_details")
            if details is None or (type(details) is dict and not details.get("cached_tokens")):
                return _NO_CACHE_USAGE
        return openai_cache_usage(body)

    def batch(self) -> OpenAIBatch:
        """This provider's Batch API (:class:`~._openai_batch.OpenAIBatch`)."""
        return OpenAIBatch(self, self._base_url, self._headers)

    def _is_vendor_host(self) -> bool:
        hosts = self.vendor_hosts
        return bool(hosts) and self._host in hosts


def _structured_fields(call: Call) -> dict[str, Any]:
    schema = dict(call.schema or {})
    if call.strategy == "tools":
        return {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": TOOL_NAME,
                        "description": "Record every object found, as the items array.",
                        "parameters": schema,
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": TOOL_NAME}},
        }
    if call.strategy == "json_schema":
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": TOOL_NAME, "schema": schema, "strict": True},
            }
        }
    if call.strategy == "json_object":
        return {"response_format": {"type": "json_object"}}
    return {}


def _answer_text(message: Mapping[str, Any], *, structured: bool) -> str | None:
    if structured:
        for tool_call in message.get("tool_calls") or ():
            arguments = (tool_call.get("function") or {}).get("arguments")
            if arguments is not None:
                # Some servers send the arguments as an object rather than a JSON string.
                return arguments if isinstance(arguments, str) else json.dumps(arguments)
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(
            p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)
        )
    return content if isinstance(content, str) else None


def _duration(value: str | None) -> float | None:
    try:
        return parse_duration(value) if value is not None else None
    except ValueError:
        return None
