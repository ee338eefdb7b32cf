"""The Anthropic dialect: ``POST /v1/messages``, the Messages API read, checked and answered.

Anthropic's request checks (``x-api-key`` or a bearer key, ``anthropic-version``, the fields
the API accepts, required ``max_tokens``, a top-level ``system``, ``tools`` / ``tool_choice``,
``output_config.format``, the context window), its response shapes (``tool_use`` blocks,
``stop_reason``), ``{"type": "error", ...}`` bodies (529 ``overloaded_error``) and
``anthropic-ratelimit-*`` headers with RFC 3339 resets. The API has no ``n``: repeated requests
for the same message rotate the echo model's answers instead.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import time
from collections.abc import Iterator, Mapping
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
from ._openai import format_number

if TYPE_CHECKING:
    from ._server import ChatServer

__all__ = ["messages"]


class _AnthropicDialect:
    """The Anthropic Messages API's response, error and ``anthropic-ratelimit-*`` shapes."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def error(
        self,
        status: int,
        type_: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        request_id = f"req_parrot{next(self._ids)}"
        body = {"type": "error", "error": {"type": type_, "message": message}}
        body["request_id"] = request_id
        return web.json_response(
            body, status=status, headers={**(headers or {}), "request-id": request_id}
        )

    def limit_headers(self, buckets: Buckets) -> dict[str, str]:
        # Every response of the API names its request.
        headers = {"request-id": f"req_parrot{next(self._ids)}"}
        now = time.time()
        for kind, limit, bucket in buckets:
            # This server has one token bucket; Anthropic announces input, output and the
            # tightest of them ("tokens"): all three carry it here.
            names = ("requests",) if kind == "requests" else _ANTHROPIC_TOKEN_KINDS
            for name in names:
                prefix = f"anthropic-ratelimit-{name}-"
                headers[prefix + "limit"] = format_number(limit)
                headers[prefix + "remaining"] = str(int(bucket.level))
                headers[prefix + "reset"] = rfc3339(now + bucket.time_to_full())
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
        unit = "requests" if kind == "requests" else "input tokens"
        message = (
            f"This request would exceed the rate limit for your organization (org-parrot) of "
            f"{format_number(limit)} {unit} per minute. For details, refer to: "
            "https://docs.claude.com/en/api/rate-limits."
        )
        if math.isinf(wait):
            message += f" (This request needs {requested}; the limit never admits it.)"
        else:
            headers["retry-after"] = str(math.ceil(wait))
        return self.error(429, "rate_limit_error", message, headers)

    def server_error(self, count: int, headers: dict[str, str]) -> web.Response:
        if count % 2:
            return self.error(500, "api_error", "Internal server error", headers)
        return self.error(529, "overloaded_error", "Overloaded", headers)

    def fault(self, name: str, model: str, prompt_tokens: int, key: str) -> web.Response:
        """The error response of fault ``name`` (see :data:`FAULTS`)."""
        invalid = "invalid_request_error"
        if name in ("context_length", "exceed_context"):
            message = f"prompt is too long: {200_000 + prompt_tokens} tokens > 200000 maximum"
            return self.error(400, invalid, message)
        if name == "server_error":
            return self.error(500, "api_error", "Internal server error")
        if name == "too_large":
            message = "Request exceeds the maximum allowed number of bytes."
            return self.error(413, "request_too_large", message)
        if name == "insufficient_quota":
            message = (
                "Your credit balance is too low to access the Anthropic API. Please go to "
                "Plans & Billing to upgrade or purchase credits."
            )
            return self.error(400, invalid, message)
        message = f"invalid x-api-key {key} ({key.upper()})"
        body = {"type": "error", "error": {"type": "authentication_error", "message": message}}
        return web.json_response(body, status=200)

    def render(
        self, job: Job, answers: list[str], ids: Iterator[int]
    ) -> tuple[dict[str, Any], int]:
        (answer,) = answers  # one answer per request: the API has no n
        plan = job.plan
        stop = plan.finish
        if job.max_out and count_tokens(answer) > job.max_out:
            answer, stop = answer[: job.max_out * 4], "max_tokens"
        elif job.fault == "truncate":
            answer, stop = answer[: max(1, len(answer) // 2)], "max_tokens"
        completion_tokens = count_tokens(answer)
        number = next(ids)
        if plan.kind == "tool":
            try:
                tool_input = json.loads(answer)
            except ValueError:
                # A malformed answer: tool input is always an object, so break its shape.
                tool_input = {"items": answer}
            block = {
                "type": "tool_use",
                "id": f"toolu_parrot{number}",
                "name": plan.tool,
                "input": tool_input if stop != "max_tokens" else {},
            }
        else:
            block = {"type": "text", "text": answer}
        content = [block]
        if job.fault == "content_filter":
            content, stop = [], "refusal"
        payload = {
            "id": f"msg_parrot{number}",
            "type": "message",
            "role": "assistant",
            "model": job.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": job.prompt_tokens, "output_tokens": completion_tokens},
        }
        return payload, completion_tokens


_ANTHROPIC = _AnthropicDialect()
_ANTHROPIC_TOKEN_KINDS = ("tokens", "input-tokens", "output-tokens")
# Top-level fields the Messages API accepts; any other is refused, as the API does.
_ANTHROPIC_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
        "temperature", "top_p", "top_k", "tools", "tool_choice", "service_tier", "thinking",
        "output_config", "container", "mcp_servers", "inference_geo", "cache_control",
    }
)  # fmt: skip


def rfc3339(when: float) -> str:
    """Anthropic's reset format, rounded up to the second: ``2025-01-01T12:00:31Z``."""
    stamp = datetime.datetime.fromtimestamp(math.ceil(when), tz=datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


async def messages(server: ChatServer, request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: the Anthropic Messages API."""
    cfg = server.config
    error = _ANTHROPIC.error
    matches = server.key_matches(request, "x-api-key")
    if matches is None:
        # The API also takes the key as a bearer token (Anthropic's newer SDKs send it so).
        matches = server.check_auth(request) is None if "Authorization" in request.headers else None
    if matches is None:
        return error(401, "authentication_error", "x-api-key header is required")
    if not matches:
        return error(401, "authentication_error", "invalid x-api-key")
    if not request.headers.get("anthropic-version"):
        return error(400, "invalid_request_error", "anthropic-version: header is required")
    body = await json_body(request)
    if body is None:
        message = "There was an error parsing the body of your request as JSON."
        return error(400, "invalid_request_error", message)
    problem = _validate_messages(cfg, body)
    if problem is not None:
        return problem
    model, messages, max_out = body["model"], body["messages"], body["max_tokens"]
    system = message_text(body.get("system"))
    plan = _messages_plan(cfg, body, system, messages)
    if isinstance(plan, web.Response):
        return plan
    prompt = last_user_text(messages)
    prompt_tokens = count_tokens(system) + sum(
        count_tokens(message_text(m.get("content"))) for m in messages
    )
    for schema in plan.schemas:
        prompt_tokens += count_tokens(json.dumps(schema))
    fault = server.faults.row_fault(prompt)
    if fault is not None and fault not in ANSWER_FAULTS:
        return server.faulted(request, _ANTHROPIC, fault, model, prompt_tokens)
    window = cfg.context_window
    if window is not None and prompt_tokens > window:
        message = f"prompt is too long: {prompt_tokens} tokens > {window} maximum"
        return error(400, "invalid_request_error", message)
    if window is not None and prompt_tokens + max_out > window:
        message = (
            f"input length and `max_tokens` exceed context limit: {prompt_tokens} + "
            f"{max_out} > {window}, decrease input length or `max_tokens` and try again"
        )
        return error(400, "invalid_request_error", message)
    job = Job(model, prompt, prompt_tokens, max_out, 1, plan, rotate=True, fault=fault)
    return await server.serve(request, _ANTHROPIC, job)


def _validate_messages(cfg: ServerConfig, body: Any) -> web.Response | None:
    """The API's 400/404 for a body it would refuse, or ``None``."""

    def invalid(message: str) -> web.Response:
        return _ANTHROPIC.error(400, "invalid_request_error", message)

    if not isinstance(body, dict):
        return invalid("The request body must be a JSON object.")
    for name in body:
        if name not in _ANTHROPIC_FIELDS:
            return invalid(f"{name}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return invalid("model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return invalid("max_tokens: Field required")
    if type(max_tokens) is not int or max_tokens < 1:
        return invalid(f"max_tokens: Input should be an integer >= 1, got {max_tokens!r}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return invalid("messages: at least one message is required")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "system":
            return invalid(
                'messages: Unexpected role "system". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            return invalid(f"messages.{i}.role: Input should be 'user' or 'assistant'")
    if body.get("stream"):
        return invalid("stream: streaming is not supported by this server")
    if cfg.models is not None and model not in cfg.models:
        return _ANTHROPIC.error(404, "not_found_error", f"model: {model}")
    return None


def _messages_plan(
    cfg: ServerConfig, body: dict[str, Any], system: str, messages: list[dict[str, Any]]
) -> Plan | web.Response:
    """Decide how to answer a Messages request: echo, a tool_use block, or JSON text."""

    def invalid(message: str) -> web.Response:
        return _ANTHROPIC.error(400, "invalid_request_error", message)

    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return invalid("tools: Input should be a list of tool objects")
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("input_schema"), dict):
            return invalid(f"tools.{i}.input_schema: Field required")
    schemas = [t["input_schema"] for t in tools]
    choice = body.get("tool_choice") or {"type": "auto"}
    if tools and choice.get("type") != "none":
        if not cfg.supports_tools:
            return invalid("tools: tool use is not supported by this server")
        if choice.get("type") == "tool":
            chosen = next((t for t in tools if t.get("name") == choice.get("name")), None)
            if chosen is None:
                return invalid(f"tool_choice: Tool '{choice.get('name')}' not found in tools")
        else:  # "auto" or "any": this model always uses the first tool
            chosen = tools[0]
        props = item_properties(chosen["input_schema"])
        return Plan("tool", props, schemas, chosen.get("name"), "tool_use")
    output = body.get("output_config")
    fmt = output.get("format") if isinstance(output, dict) else None
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return invalid("output_config.format.type: Input should be 'json_schema'")
        if not cfg.supports_json_schema:
            return invalid(
                "output_config.format: json_schema structured outputs are not supported by "
                "this server"
            )
        schema = fmt.get("schema")
        schemas += [schema] if schema else []
        return Plan("json", item_properties(schema), schemas, finish="end_turn")
    chat = [{"role": "system", "content": system}, *messages]
    texts = [system] + [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
    if any("json" in t.lower() for t in texts):
        return Plan("fenced", props_from_prompt(chat), schemas, finish="end_turn")
    return Plan("echo", None, schemas, finish="end_turn")


# -- what every protocol shares: limits, latency, faults, the answer ---------------------
