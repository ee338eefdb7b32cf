"""One frozen settings object per run, from keyword options and the environment."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from ._secrets import redact_url
from .errors import ConfigurationError

__all__ = [
    "PROVIDERS",
    "REQUEST_PARAMETERS",
    "RUN_SETTINGS",
    "STRUCTURED_STRATEGIES",
    "RunConfig",
]

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
_OPENAI_HOST = "api.openai.com"
# As Anthropic's SDK: the base URL has no /v1 (the provider adds /v1/messages).
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# The Messages API requires max_tokens; this is used when the user gives none.
DEFAULT_ANTHROPIC_MAX_TOKENS = 1024

# The wire protocols a run can speak (see parrot_pandas.providers).
PROVIDERS = ("openai", "anthropic", "azure")


@dataclass(frozen=True)
class _ProviderEnvironment:
    """Where a provider's official SDK reads its settings from, and what it requires."""

    base_url_variable: str
    api_key_variable: str
    default_base_url: str | None
    # A missing key fails before any request when the base URL is on this host ("*": any).
    key_host: str


_ENVIRONMENT = {
    "openai": _ProviderEnvironment(
        "OPENAI_BASE_URL", "OPENAI_API_KEY", DEFAULT_BASE_URL, _OPENAI_HOST
    ),
    "anthropic": _ProviderEnvironment(
        "ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY", DEFAULT_ANTHROPIC_BASE_URL, "api.anthropic.com"
    ),
    # As the OpenAI SDK's AzureOpenAI client.
    "azure": _ProviderEnvironment("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", None, "*"),
}

# OpenAI request parameters the Anthropic Messages API has no equivalent for: refused before
# any request rather than by a 400 at the first one. (max_completion_tokens becomes max_tokens
# here; the provider sends stop as stop_sequences and user as metadata.user_id.)
_ANTHROPIC_UNSUPPORTED = frozenset(
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

# Passed through to the API as they are. `extra_body` is the escape hatch for anything a
# particular server accepts that is not listed (merged into the JSON body).
REQUEST_PARAMETERS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "stop",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "reasoning_effort",
        "service_tier",
        "top_k",
        "min_p",
        "repeat_penalty",
        "extra_body",
    }
)

# Run settings: how the run behaves, never sent to the server.
RUN_SETTINGS = frozenset(
    {
        "api_key",
        "base_url",
        "provider",
        "api_version",
        "max_concurrency",
        "max_retries",
        "timeout",
        "rpm",
        "tpm",
        "cache",
        "refresh",
        "errors",
        "progress",
        "running_loop",
        "structured",
    }
)

# How extract asks for structured answers, best first; "auto" starts at the top and moves
# down once per run when the server rejects or ignores a strategy.
STRUCTURED_STRATEGIES = ("tools", "json_schema", "json_object", "prompt")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs to know, validated before any request is sent.

    Built by :meth:`from_options`; the API key is kept out of ``repr`` and never logged.
    ``provider`` names the wire protocol (one of :data:`PROVIDERS`); ``base_url`` is what that
    provider's SDK calls its base URL (Anthropic's has no ``/v1``; Azure's is the resource
    endpoint); ``api_version`` is Azure's ``api-version``.
    """

    model: str
    base_url: str
    api_key: str | None = field(default=None, repr=False)
    provider: str = "openai"
    api_version: str | None = None
    system: str | None = None
    n: int = 1
    params: tuple[tuple[str, Any], ...] = ()
    max_concurrency: int = 64
    max_retries: int = 6
    timeout: float = 120.0
    rpm: float | None = None
    tpm: float | None = None
    cache: Any = True
    refresh: bool = False
    errors: str = "raise"
    progress: bool | None = None
    running_loop: str = "thread"
    structured: str = "auto"

    def __repr__(self) -> str:
        # A base_url may carry credentials (https://user:secret@host, ?key=...): never shown.
        shown = []
        for f in fields(self):
            if f.repr:
                value = getattr(self, f.name)
                if f.name == "base_url":
                    value = redact_url(value)
                shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def request_params(self) -> dict[str, Any]:
        """The pass-through request parameters as a fresh dict."""
        return dict(self.params)

    @property
    def samples_per_request(self) -> int | None:
        """How many samples one request can return: 1 for Anthropic (no ``n``), else no limit."""
        return 1 if self.provider == "anthropic" else None

    @property
    def max_output_tokens(self) -> int | None:
        """The completion budget the user set, which providers count against the token limit."""
        params = self.request_params
        value = params.get("max_completion_tokens", params.get("max_tokens"))
        return int(value) if value is not None else None

    @classmethod
    def from_options(
        cls,
        *,
        model: str | None = None,
        system: str | None = None,
        n: int = 1,
        need_key: bool = True,
        **options: Any,
    ) -> RunConfig:
        """Validate keyword options and fill the rest from the environment.

        Raises
        ------
        ConfigurationError
            For an unknown option (naming the closest valid one) or an invalid value.
        """
        n = _plain(n)
        options = {k: _plain(v) for k, v in options.items()}
        unknown = sorted(set(options) - REQUEST_PARAMETERS - RUN_SETTINGS)
        if unknown:
            valid = sorted(REQUEST_PARAMETERS | RUN_SETTINGS)
            parts = []
            for name in unknown:
                close = difflib.get_close_matches(name, valid, n=1)
                parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigurationError(
                f"unknown option(s) {', '.join(parts)}. Valid options: {', '.join(valid)}. "
                "Pass other server-specific request fields as extra_body={...}."
            )
        settings = {k: v for k, v in options.items() if k in RUN_SETTINGS}
        params = {k: v for k, v in options.items() if k in REQUEST_PARAMETERS and v is not None}

        model = model if model is not None else os.environ.get("PARROT_PANDAS_MODEL", DEFAULT_MODEL)
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"model must be a non-empty string, got {model!r}")
        if system is not None and not isinstance(system, str):
            raise ConfigurationError(
                f"system must be a string or None, got {type(system).__name__}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"n must be an integer >= 1 (samples per row), got {n!r}")

        provider, inferred = _choose_provider(
            settings.pop("provider", None), model, url_given=settings.get("base_url") is not None
        )
        env = _ENVIRONMENT[provider]
        base_url = (
            settings.pop("base_url", None)
            or os.environ.get(env.base_url_variable)
            or env.default_base_url
        )
        if base_url is None:
            raise ConfigurationError(
                "provider='azure' needs the resource endpoint: set the AZURE_OPENAI_ENDPOINT "
                "environment variable (e.g. https://my-resource.openai.azure.com) or pass "
                "base_url=..."
            )
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            shown = redact_url(base_url) if isinstance(base_url, str) else base_url
            raise ConfigurationError(
                f"base_url must be an http(s) URL such as {_EXAMPLE_URL[provider]!r}, got {shown!r}"
            )
        # An empty key variable (exported but unset) means no key, not an empty credential.
        api_key = settings.pop("api_key", None) or os.environ.get(env.api_key_variable) or None
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigurationError("api_key must be a string")
        api_version = _api_version(provider, settings.pop("api_version", None), need_key)
        try:
            url = urlsplit(base_url)
            _ = url.port  # reading the port is what validates it
        except ValueError as exc:
            raise ConfigurationError(
                f"base_url is not a valid URL ({exc}): {redact_url(base_url)!r}"
            ) from None
        if api_key is None and need_key and env.key_host in ("*", url.hostname):
            raise ConfigurationError(_no_key_message(provider, inferred))
        if api_key is not None and (url.username or url.password):
            # aiohttp refuses a request with both (ValueError at the first request).
            raise ConfigurationError(
                f"base_url {redact_url(base_url)!r} carries user:password credentials and an API "
                f"key is set too (api_key= or {env.api_key_variable}); a request can carry only "
                "one of them"
            )
        base_url = base_url.rstrip("/")
        if provider == "anthropic":
            # Anthropic's SDK takes the URL without /v1; one with it is forgiven, not doubled.
            base_url = base_url.removesuffix("/v1")

        _check_params(params)
        if provider == "anthropic":
            params = _anthropic_params(params)
        for name in ("max_concurrency", "max_retries"):
            if name in settings:
                value = settings[name]
                low = 1 if name == "max_concurrency" else 0
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("timeout", "rpm", "tpm"):
            value = settings.get(name)
            # `not value > 0` also refuses NaN.
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
            ):
                raise ConfigurationError(f"{name} must be a positive number or None, got {value!r}")
        if settings.get("errors", "raise") not in ("raise", "coerce"):
            raise ConfigurationError(
                "errors must be 'raise' or 'coerce' (as in pandas.to_numeric), "
                f"got {settings['errors']!r}"
            )
        if settings.get("running_loop", "thread") not in ("thread", "nest"):
            raise ConfigurationError(
                "running_loop must be 'thread' (run on a private loop in a worker thread when the "
                "caller's loop is busy) or 'nest' (nest_asyncio, same thread), "
                f"got {settings['running_loop']!r}"
            )
        if settings.get("structured", "auto") not in ("auto", *STRUCTURED_STRATEGIES):
            raise ConfigurationError(
                f"structured must be 'auto' or one of {list(STRUCTURED_STRATEGIES)}, "
                f"got {settings['structured']!r}"
            )
        cache = settings.get("cache", True)
        if not isinstance(cache, (bool, str, os.PathLike)):
            raise ConfigurationError(f"cache must be True, False or a file path, got {cache!r}")

        return cls(
            model=model,
            base_url=base_url,
            api_key=api_key,
            provider=provider,
            api_version=api_version,
            system=system,
            n=n,
            params=tuple(sorted(params.items())),
            **settings,
        )


_EXAMPLE_URL = {
    "openai": "http://127.0.0.1:8080/v1",
    "anthropic": DEFAULT_ANTHROPIC_BASE_URL,
    "azure": "https://my-resource.openai.azure.com",
}


def _choose_provider(provider: Any, model: str, *, url_given: bool) -> tuple[str, bool]:
    """The provider asked for, else the one the model name implies; and whether it was implied."""
    provider = provider or os.environ.get("PARROT_PANDAS_PROVIDER") or None
    if provider is None:
        # A claude- model goes to Anthropic unless base_url= points the run elsewhere (an
        # OpenAI-compatible gateway serving Claude models).
        implied = model.startswith("claude-") and not url_given
        return ("anthropic" if implied else "openai"), implied
    if provider not in PROVIDERS:
        close = difflib.get_close_matches(str(provider), PROVIDERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigurationError(
            f"provider must be one of {list(PROVIDERS)}, got {provider!r}{hint}. Any "
            "OpenAI-compatible server (vLLM, Ollama, llama.cpp, ...) is provider='openai'."
        )
    return provider, False


def _api_version(provider: str, value: Any, need_key: bool) -> str | None:
    if provider != "azure":
        if value is not None:
            raise ConfigurationError(
                f"api_version= applies to provider='azure' only (this run is {provider!r})"
            )
        return None
    value = value or os.environ.get("OPENAI_API_VERSION") or None
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(
            f"api_version must be a string such as '2024-10-21', got {value!r}"
        )
    if value is None and need_key:
        raise ConfigurationError(
            "provider='azure' needs an API version: set the OPENAI_API_VERSION environment "
            "variable (as the OpenAI SDK's AzureOpenAI client reads it, e.g. '2024-10-21') "
            "or pass api_version=..."
        )
    return value


def _no_key_message(provider: str, inferred: bool) -> str:
    if provider == "openai":
        return (
            "no API key: set the OPENAI_API_KEY environment variable or pass api_key=..., "
            "or point base_url= (or OPENAI_BASE_URL) at a local OpenAI-compatible server"
        )
    if provider == "azure":
        return (
            "no API key for Azure OpenAI: set the AZURE_OPENAI_API_KEY environment variable "
            "or pass api_key=..."
        )
    message = "no API key: set the ANTHROPIC_API_KEY environment variable or pass api_key=..."
    if inferred:
        message += (
            " (the Anthropic API was chosen because the model name starts with 'claude-'; pass "
            "provider='openai' and base_url=... to reach it through an OpenAI-compatible gateway)"
        )
    return message


def _anthropic_params(params: dict[str, Any]) -> dict[str, Any]:
    unsupported = sorted(_ANTHROPIC_UNSUPPORTED & params.keys())
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
    # Set here rather than by the provider alone, so the budget, estimate() and the cache key
    # all see the limit that is really sent.
    params.setdefault("max_tokens", DEFAULT_ANTHROPIC_MAX_TOKENS)
    return params


def _check_params(params: dict[str, Any]) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        value = params.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ConfigurationError(f"{name} must be a positive integer, got {value!r}")
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigurationError(f"{name} must be a number, got {value!r}")
    extra = params.get("extra_body")
    if extra is not None and not isinstance(extra, dict):
        raise ConfigurationError(
            f"extra_body must be a dict of JSON fields, got {type(extra).__name__}"
        )


def _plain(value: Any) -> Any:
    # numpy scalars (a count taken from a frame) would be refused as non-int and cannot be
    # JSON-encoded in the request body; use the Python value.
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return item()
    return value
