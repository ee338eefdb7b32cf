"""The OpenAI Chat Completions protocol, spoken by OpenAI, vLLM, Ollama, llama.cpp and others."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .._limits import LimitInfo, parse_duration, parse_retry_after
from .._secrets import redact_url
from ..errors import APIError, StructuredOutputError
from ._openai_batch import OpenAIBatch
from ._prompt_cache import CacheUsage, openai_cache_usage, prefix_key
from ._url import base_path, endpoint, with_path
from .base import (
    Call,
    Completion,
    HTTPRequest,
    api_error,
    error_message,
    header_int,
    usage_count,
)

__all__ = ["OpenAIProvider"]

TOOL_NAME = "record_items"


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
        return HTTPRequest(self._url_for(call), self._headers, body)

    def parse(self, call: Call, body: Any, headers: Mapping[str, str]) -> Completion:
        choices = body.get("choices") if isinstance(body, Mapping) else None
        if not isinstance(choices, list):
            # vLLM can answer 200 with `"choices": null`, or with an error body (context too long).
            message, _ = error_message(body)
            detail = f"the server said: {message}" if message else str(body)[:200]
            raise StructuredOutputError(f"response has no 'choices': {detail}")
        structured = call.schema is not None
        texts = []
        for choice in choices:
            message = choice.get("message") if isinstance(choice, Mapping) else None
            text = (
                _answer_text(message, structured=structured)
                if isinstance(message, Mapping)
                else None
            )
            if text is not None:
                texts.append(text)
        usage = body.get("usage")
        usage = usage if isinstance(usage, Mapping) else {}
        return Completion(
            texts=tuple(texts),
            prompt_tokens=usage_count(usage.get("prompt_tokens")),
            completion_tokens=usage_count(usage.get("completion_tokens")),
            limits=self.limits(headers),
        )

    def error(self, status: int, body: Any, headers: Mapping[str, str]) -> APIError:
        return api_error(status, body, headers)

    def limits(self, headers: Mapping[str, str]) -> LimitInfo:
        return LimitInfo(
            limit_requests=header_int(headers.get("x-ratelimit-limit-requests")),
            limit_tokens=header_int(headers.get("x-ratelimit-limit-tokens")),
            remaining_requests=header_int(headers.get("x-ratelimit-remaining-requests")),
            remaining_tokens=header_int(headers.get("x-ratelimit-remaining-tokens")),
            reset_requests=_duration(headers.get("x-ratelimit-reset-requests")),
            reset_tokens=_duration(headers.get("x-ratelimit-reset-tokens")),
            retry_after=parse_retry_after(headers),
        )

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
        return openai_cache_usage(body)

    def batch(self) -> OpenAIBatch:
        """This provider's Batch API (:class:`~._openai_batch.OpenAIBatch`)."""
        return OpenAIBatch(self, self._base_url, self._headers)

    def _is_vendor_host(self) -> bool:
        hosts = self.vendor_hosts
        return bool(hosts) and (urlsplit(self._base_url).hostname or "") in hosts


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
