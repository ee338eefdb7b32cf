"""The OpenAI dialect: ``POST /v1/chat/completions`` read, checked and answered as OpenAI does.

OpenAI's request checks (model, messages, ``n``, ``max_tokens``, ``tools``, ``tool_choice``,
``response_format``, the context window), its response, error and ``x-ratelimit-*`` header
shapes (durations like ``6m0s``), and its bodies for each fault of ``_faults.FAULTS``. Azure
OpenAI (``_azure.py``) is this dialect with its own errors, headers and content filter.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._bucket import Buckets, TokenBucket
from ._config import ServerConfig
from ._faults import ANSWER_FAULTS
from ._model import (
    Job,
    Plan,
    count_tokens,
    item_properties,
    json_body,
    last_user_text,
    message_text,
    props_from_prompt,
)

if TYPE_CHECKING:
    from ._server import ChatServer

__all__ = [
    "OPENAI",
    "OpenAIDialect",
    "chat",
    "chat_body",
    "format_duration",
    "format_number",
    "openai_error",
]

_RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."


def format_duration(seconds: float) -> str:
    """OpenAI's duration format (Go's): ``20ms``, ``1.5s``, ``6m0s``, ``1h0m0s``."""
    # Rounded up to the millisecond: a client that waits this long is then sure to fit.
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    head = (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "")
    return f"{head}{secs}s"


def format_number(value: float) -> str:
    """A limit as the headers print it: ``600``, not ``600.0``."""
    return str(int(value)) if float(value).is_integer() else str(value)


def openai_error(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """OpenAI's error response: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


class OpenAIDialect:
    """OpenAI's response, error and ``x-ratelimit-*`` header shapes."""

    def screen(self, filtered: Sequence[str], texts: Sequence[str]) -> web.Response | None:
        return None  # only Azure runs a content filter

    def limit_headers(self, buckets: Buckets) -> dict[str, str]:
        headers = {}
        for kind, limit, bucket in buckets:
            headers[f"x-ratelimit-limit-{kind}"] = format_number(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(int(bucket.level))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration(bucket.time_to_full())
        return headers

    def rate_limited(
        self,
        model: str,
        kind: str,
        limit: float,
        bucket: TokenBucket,
        requested: int,
        wait: float,
        headers: dict[str, str],
    ) -> web.Response:
        unit = "RPM" if kind == "requests" else "TPM"
        where = f"for {model} in organization org-parrot on {kind} per min ({unit})"
        if math.isinf(wait):
            # No retry-after: waiting never helps, as with OpenAI's own "too large" 429.
            message = (
                f"Request too large {where}: Limit {format_number(limit)}, Requested {requested}. "
                "The input or output tokens must be reduced in order to run successfully. "
                f"(This server's bucket holds tpm / 60 * burst = {format_number(bucket.capacity)} "
                "tokens; raise burst to admit larger requests.)"
            )
        else:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            headers["retry-after"] = str(math.ceil(wait))
            used = limit - int(bucket.level)
            message = (
                f"Rate limit reached {where}: Limit {format_number(limit)}, "
                f"Used {format_number(used)}, Requested {requested}. "
                f"Please try again in {format_duration(wait)}. {_RATE_LIMIT_DOCS}"
            )
        return openai_error(429, message, kind, code="rate_limit_exceeded", headers=headers)

    def server_error(self, count: int, headers: dict[str, str]) -> web.Response:
        if count % 2:
            message = "The server had an error while processing your request. Sorry about that!"
            return openai_error(500, message, "server_error", headers=headers)
        message = "The engine is currently overloaded, please try again later."
        return openai_error(503, message, "server_error", headers=headers)

    def fault(self, name: str, model: str, prompt_tokens: int, key: str) -> web.Response:
        """The error response of fault ``name`` (see :data:`FAULTS`)."""
        if name == "context_length":
            message = (
                f"This model's maximum context length is 8192 tokens. However, your messages "
                f"resulted in {8192 + prompt_tokens} tokens ({8000 + prompt_tokens} in the "
                "messages, 192 in the functions). Please reduce the length of the messages or "
                "functions."
            )
            return openai_error(400, message, param="messages", code="context_length_exceeded")
        if name == "exceed_context":
            n_ctx = 4096
            body = {
                "error": {
                    "code": 400,
                    "message": f"request ({n_ctx + prompt_tokens} tokens) exceeds the available "
                    f"context size ({n_ctx} tokens), try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": n_ctx + prompt_tokens,
                    "n_ctx": n_ctx,
                }
            }
            return web.json_response(body, status=400)
        if name == "server_error":
            message = "The server had an error while processing your request. Sorry about that!"
            return openai_error(500, message, "server_error")
        if name == "too_large":
            message = (
                f"Request too large for {model} in organization org-parrot on tokens per min "
                "(TPM): Limit 30000, Requested 45000. The input or output tokens must be "
                f"reduced in order to run successfully. {_RATE_LIMIT_DOCS}"
            )
            return openai_error(429, message, "tokens", code="rate_limit_exceeded")
        if name == "insufficient_quota":
            message = (
                "You exceeded your current quota, please check your plan and billing details. "
                "For more information on this error, read the docs: "
                "https://platform.openai.com/docs/guides/error-codes/api-errors."
            )
            return openai_error(429, message, "insufficient_quota", code="insufficient_quota")
        # echo_key: a proxy answering 200 with an error that repeats what it was sent.
        message = f"Authentication failed for Bearer {key} (BEARER {key.upper()})"
        return web.json_response({"error": {"message": message}}, status=200)

    def render(
        self, job: Job, answers: list[str], ids: Iterator[int]
    ) -> tuple[dict[str, Any], int]:
        plan = job.plan
        choices, completion_tokens = [], 0
        call_id = f"call_parrot{next(ids)}"
        for i, answer in enumerate(answers):
            finish = plan.finish
            if job.max_out and count_tokens(answer) > job.max_out:
                answer, finish = answer[: job.max_out * 4], "length"
            elif job.fault == "truncate":
                answer, finish = answer[: max(1, len(answer) // 2)], "length"
            completion_tokens += count_tokens(answer)
            message: dict[str, Any] = {"role": "assistant", "content": answer, "refusal": None}
            if job.fault == "content_filter":
                message["content"], finish = None, "content_filter"
            elif plan.kind == "tool":
                call = {"name": plan.tool, "arguments": answer}
                message["content"] = None
                message["tool_calls"] = [
                    {"id": f"{call_id}_{i}", "type": "function", "function": call}
                ]
            choices.append(
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
            )
        payload = {
            "id": f"chatcmpl-parrot{next(ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": job.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": job.prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_parrot",
        }
        return payload, completion_tokens


OPENAI = OpenAIDialect()


async def chat(server: ChatServer, request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: the OpenAI protocol."""
    if (denied := server.check_auth(request)) is not None:
        return denied
    body = await json_body(request)
    if body is None:
        return openai_error(400, "We could not parse the JSON body of your request.")
    return await chat_body(server, request, body, OPENAI)


async def chat_body(
    server: ChatServer, request: web.Request, body: dict[str, Any], dialect: OpenAIDialect
) -> web.StreamResponse:
    """Answer a chat completions ``body`` in ``dialect`` (OpenAI's, or Azure's)."""
    cfg = server.config
    problem = _validate(cfg, body)
    if problem is not None:
        return problem
    model = body["model"]
    messages = body["messages"]
    n = body.get("n") or 1
    max_out = body.get("max_tokens") or body.get("max_completion_tokens") or 0

    plan = _plan(cfg, body, messages)
    if isinstance(plan, web.Response):
        return plan
    texts = [message_text(m.get("content")) for m in messages]
    refused = dialect.screen(cfg.filtered, texts)
    if refused is not None:
        return refused
    prompt = last_user_text(messages)
    prompt_tokens = sum(count_tokens(t) for t in texts)
    for schema in plan.schemas:
        prompt_tokens += count_tokens(json.dumps(schema))
    fault = server.faults.row_fault(prompt)
    if fault is not None and fault not in ANSWER_FAULTS:
        return server.faulted(request, dialect, fault, model, prompt_tokens)

    if cfg.context_window is not None and prompt_tokens + max_out > cfg.context_window:
        if max_out:
            detail = (
                f"However, you requested {prompt_tokens + max_out} tokens ({prompt_tokens} "
                f"in the messages, {max_out} in the completion). Please reduce the length "
                "of the messages or completion."
            )
        else:
            detail = (
                f"However, your messages resulted in {prompt_tokens} tokens. Please reduce "
                "the length of the messages."
            )
        message = f"This model's maximum context length is {cfg.context_window} tokens. "
        return openai_error(400, message + detail, param="messages", code="context_length_exceeded")
    job = Job(model, prompt, prompt_tokens, max_out, n, plan, fault=fault)
    return await server.serve(request, dialect, job)


def _validate(cfg: ServerConfig, body: dict[str, Any]) -> web.Response | None:
    """OpenAI's 400/404 for a body it would refuse, or ``None``."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return openai_error(400, "you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return openai_error(400, "[] is too short - 'messages'", param="messages")
    if not all(isinstance(m, dict) for m in messages):
        return openai_error(400, "Each message must be an object.", param="messages")
    if cfg.models is not None and model not in cfg.models:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return openai_error(404, message, code="model_not_found")
    if body.get("stream"):
        return openai_error(400, "stream is not supported by this server", param="stream")
    for name, low in (("n", 1), ("max_tokens", 1), ("max_completion_tokens", 1)):
        value = body.get(name)
        if value is not None and (type(value) is not int or value < low):
            message = f"Invalid '{name}': expected an integer >= {low}, got {value!r}."
            return openai_error(400, message, param=name, code="invalid_value")
    return None


def _plan(
    cfg: ServerConfig, body: dict[str, Any], messages: list[dict[str, Any]]
) -> Plan | web.Response:
    """Decide how to answer: echo text, a tool call, JSON content, or fenced JSON."""
    tools = body.get("tools")
    fmt = body.get("response_format")
    functions = [t.get("function") or {} for t in tools or () if isinstance(t, dict)]
    # Tool schemas are prompt tokens even when the model is told not to call them.
    schemas = [f["parameters"] for f in functions if f.get("parameters")]
    if tools:
        if not cfg.supports_tools:
            return openai_error(400, "tools is not supported by this server", param="tools")
        choice = body.get("tool_choice")
        if choice != "none":
            forced = choice.get("function") if isinstance(choice, dict) else None
            forced = forced.get("name") if isinstance(forced, dict) else None
            if forced is None:
                chosen = functions[0] if functions else {}
            else:
                chosen = next((f for f in functions if f.get("name") == forced), None)
                if chosen is None:
                    message = (
                        f"Invalid value for 'tool_choice': 'tool_choice' refers to '{forced}' "
                        "that is not present in the 'tools' parameter."
                    )
                    return openai_error(400, message, param="tool_choice", code="invalid_value")
            props = item_properties(chosen.get("parameters"))
            # OpenAI answers a forced named function with finish_reason "stop", not
            # "tool_calls"; clients must not rely on the latter.
            finish = "stop" if forced else "tool_calls"
            return Plan("tool", props, schemas, chosen.get("name"), finish)
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        kind = fmt.get("type")
        supported = {
            "json_schema": cfg.supports_json_schema,
            "json_object": cfg.supports_json_object,
        }
        if supported.get(kind) is False:
            message = f"response_format of type '{kind}' is not supported by this server"
            return openai_error(400, message, param="response_format")
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            schemas += [schema] if schema else []
            return Plan("json", item_properties(schema), schemas)
        if kind == "json_object":
            return Plan("json", props_from_prompt(messages), schemas)
        message = (
            f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', "
            "and 'text'."
        )
        return openai_error(400, message, param="response_format.type", code="invalid_value")
    texts = [
        message_text(m.get("content")) for m in messages if m.get("role") in ("system", "user")
    ]
    if any("json" in t.lower() for t in texts):
        return Plan("fenced", props_from_prompt(messages), schemas)
    return Plan("echo", None, schemas)
