"""The Azure OpenAI dialect: ``POST /openai/deployments/{deployment}/chat/completions``.

OpenAI's request and response bodies (``_openai.py``), with what Azure does its own way: the
``api-version`` query and ``api-key`` header, the deployment as the model, its 401/404/429
bodies, ``x-ratelimit-remaining-*`` headers only, and its content filter (the ``content_filter``
400 for ``ServerConfig.filtered`` words, ``content_filter_results`` on every answer).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ._bucket import Buckets, TokenBucket
from ._model import Job, json_body
from ._openai import OpenAIDialect, chat_body, openai_error

if TYPE_CHECKING:
    from ._server import ChatServer

__all__ = ["azure_chat", "azure_error"]

_NO_FILTER = {"filtered": False, "severity": "safe"}
_FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


def azure_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Azure's own error response: ``{"error": {"code", "message"}}``."""
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


class _AzureDialect(OpenAIDialect):
    """Azure OpenAI: OpenAI's bodies, Azure's own 401/404/429 errors, headers and content filter."""

    def __init__(self, api_version: str) -> None:
        self.api_version = api_version

    error = staticmethod(azure_error)

    def screen(self, filtered: Sequence[str], texts: Sequence[str]) -> web.Response | None:
        lowered = [t.lower() for t in texts]
        if not any(word.lower() in t for word in filtered for t in lowered):
            return None
        results = {c: dict(_NO_FILTER) for c in _FILTER_CATEGORIES}
        results["violence"] = {"filtered": True, "severity": "high"}
        body = {
            "error": {
                "message": (
                    "The response was filtered due to the prompt triggering Azure OpenAI's content "
                    "management policy. Please modify your prompt and retry. To learn more about "
                    "our content filtering policies please read our documentation: "
                    "https://go.microsoft.com/fwlink/?linkid=2198766"
                ),
                "type": None,
                "param": "prompt",
                "code": "content_filter",
                "status": 400,
                "innererror": {
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": results,
                },
            }
        }
        return web.json_response(body, status=400)

    def limit_headers(self, buckets: Buckets) -> dict[str, str]:
        # Azure announces what is left, not the limit nor its reset.
        return {
            f"x-ratelimit-remaining-{kind}": str(int(bucket.level)) for kind, _, bucket in buckets
        }

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
        what = "call" if kind == "requests" else "token"
        where = (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
            f"{self.api_version} have exceeded {what} rate limit of your current OpenAI S0 "
            "pricing tier."
        )
        if math.isinf(wait):
            message = f"{where} This request asks for {requested} tokens, more than ever fit."
        else:
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            headers["retry-after"] = str(math.ceil(wait))
            message = (
                f"{where} Please retry after {math.ceil(wait)} seconds. Please go here: "
                "https://aka.ms/oai/quotaincrease if you would like to further increase the "
                "default rate limit."
            )
        return self.error(429, "429", message, headers)

    def render(
        self, job: Job, answers: list[str], ids: Iterator[int]
    ) -> tuple[dict[str, Any], int]:
        payload, completion_tokens = super().render(job, answers, ids)
        clean = {c: dict(_NO_FILTER) for c in _FILTER_CATEGORIES}
        payload["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": clean}]
        for choice in payload["choices"]:
            choice["content_filter_results"] = clean
            if choice["finish_reason"] == "content_filter":
                flagged = {**clean, "violence": {"filtered": True, "severity": "high"}}
                choice["content_filter_results"] = flagged
        return payload, completion_tokens


async def azure_chat(server: ChatServer, request: web.Request) -> web.StreamResponse:
    """``POST /openai/deployments/{deployment}/chat/completions?api-version=``: Azure."""
    api_version = request.query.get("api-version")
    if not api_version:
        return _AzureDialect.error(404, "404", "Resource not found")
    if not server.key_matches(request, "api-key"):
        message = (
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
            "to provide a valid key for an active subscription and use a correct regional "
            "API endpoint for your resource."
        )
        return _AzureDialect.error(401, "401", message)
    deployment = request.match_info["deployment"]
    if server.config.models is not None and deployment not in server.config.models:
        message = (
            "The API deployment for this resource does not exist. If you created the "
            "deployment within the last 5 minutes, please wait a moment and try again."
        )
        return _AzureDialect.error(404, "DeploymentNotFound", message)
    body = await json_body(request)
    if body is None:
        return openai_error(400, "We could not parse the JSON body of your request.")
    # The deployment decides the model; Azure ignores a `model` in the body.
    return await chat_body(
        server, request, {**body, "model": deployment}, _AzureDialect(api_version)
    )
