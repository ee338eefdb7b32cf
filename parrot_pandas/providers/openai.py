"""The OpenAI Chat Completions protocol, spoken by OpenAI, vLLM, Ollama, llama.cpp and others."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .._limits import LimitInfo, parse_duration, parse_retry_after
from .._secrets import redact_url
from ..errors import APIError, StructuredOutputError
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
        Up to and including the version segment, e.g. ``https://api.openai.com/v1``.
    api_key : str, optional
        Sent as ``Authorization: Bearer``; local servers often need none.
    """

    name = "openai"

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self._base_url = base_url.rstrip("/")
        self._url = self._base_url + "/chat/completions"
        self._headers = {"Content-Type": "application/json", **self._auth_headers(api_key)}

    def __repr__(self) -> str:
        return f"OpenAIProvider({redact_url(self._url)!r})"

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
