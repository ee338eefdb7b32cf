"""One frozen settings object per run, from keyword options and the environment.

:meth:`RunConfig.from_options` is a short sequence of named checks, each refusing bad input
with a :class:`ConfigurationError` that names the problem and the fix, before any request.
What differs between wire protocols (environment variables, default URLs, samples per request,
parameter renames) is not kept here: each provider class states it, and this module asks.
"""

from __future__ import annotations

import datetime
import difflib
import logging
import math
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

from ._secrets import redact_url
from .errors import ConfigurationError
from .providers import PROVIDERS, OpenAIProvider, Provider

__all__ = [
    "PROVIDERS",
    "REQUEST_PARAMETERS",
    "RUN_SETTINGS",
    "STRUCTURED_STRATEGIES",
    "RunConfig",
]

logger = logging.getLogger("parrot_pandas")

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_BASE_URL = OpenAIProvider.default_base_url
# The protocol of any OpenAI-compatible server: used when nothing names another.
_DEFAULT_PROVIDER = OpenAIProvider

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
        "rows_per_request",
        "batch",
        "batch_deadline",
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
    rows_per_request: int | str = 1
    batch: bool = False
    batch_deadline: Any = None

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
        """How many samples one request can return (the provider's fact: Anthropic has no
        ``n``, so 1), ``None`` for no limit."""
        return PROVIDERS[self.provider].samples_per_request

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

        Parameters
        ----------
        model, system, n
            As the accessor takes them (``model`` defaults to ``$PARROT_PANDAS_MODEL``).
        need_key : bool, default True
            False for a run that sends nothing (``estimate``): a missing key or Azure API
            version is then no error.
        **options
            Run settings (:data:`RUN_SETTINGS`) and request parameters
            (:data:`REQUEST_PARAMETERS`).

        Returns
        -------
        RunConfig

        Raises
        ------
        ConfigurationError
            For an unknown option (naming the closest valid one) or an invalid value.
        """
        settings, params = _split_options({k: _plain(v) for k, v in options.items()})
        model = _check_model(model)
        _check_system(system)
        n = _check_n(_plain(n))
        endpoint = _resolve_endpoint(settings, model, need_key=need_key)
        params = _check_request_params(params, PROVIDERS[endpoint.provider])
        _check_run_settings(settings)
        _check_batch(settings, endpoint.provider)
        return cls(
            model=model,
            system=system,
            n=n,
            params=tuple(sorted(params.items())),
            **endpoint._asdict(),
            **settings,
        )


# -- options ------------------------------------------------------------------------------------


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run settings, request parameters)``; an unknown name is refused with the closest
    valid one. A parameter given as None is left out (the server's default)."""
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
    return settings, params


# -- model, system, n ---------------------------------------------------------------------------


def _check_model(model: Any) -> str:
    model = model if model is not None else os.environ.get("PARROT_PANDAS_MODEL", DEFAULT_MODEL)
    if not isinstance(model, str) or not model:
        raise ConfigurationError(f"model must be a non-empty string, got {model!r}")
    return model


def _check_system(system: Any) -> None:
    if system is not None and not isinstance(system, str):
        raise ConfigurationError(f"system must be a string or None, got {type(system).__name__}")


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigurationError(f"n must be an integer >= 1 (samples per row), got {n!r}")
    return n


# -- provider, base URL, key --------------------------------------------------------------------


class _Endpoint(NamedTuple):
    """Where a run's requests go and what they carry (the RunConfig fields of that name)."""

    provider: str
    base_url: str
    api_key: str | None
    api_version: str | None


def _resolve_endpoint(settings: dict[str, Any], model: str, *, need_key: bool) -> _Endpoint:
    """The provider, base URL, key and API version, from the options (popped from
    ``settings``), else the provider's environment variables, else its defaults."""
    given_url = settings.pop("base_url", None)
    provider, implied_by = _choose_provider(settings.pop("provider", None), model, given_url)
    base_url = given_url or os.environ.get(provider.base_url_env) or provider.default_base_url
    if base_url is None:
        raise ConfigurationError(
            f"provider={provider.name!r} needs a base URL: set the {provider.base_url_env} "
            f"environment variable (e.g. {provider.example_base_url}) or pass base_url=..."
        )
    api_key, key_source = _api_key(provider, settings.pop("api_key", None))
    api_version = _api_version(provider, settings.pop("api_version", None), need_key)
    url = _check_base_url(provider, base_url)
    _check_model_is_served(provider, model, url, base_url)
    if (
        api_key is None
        and need_key
        and (provider.vendor_hosts is None or url.hostname in provider.vendor_hosts)
    ):
        raise ConfigurationError(_no_key_message(provider, implied_by))
    if api_key is not None and (url.username or url.password):
        # aiohttp refuses a request with both (ValueError at the first request).
        raise ConfigurationError(
            f"base_url {redact_url(base_url)!r} carries user:password credentials and an API "
            f"key is set too ({key_source}); a request can carry only one of them"
        )
    return _Endpoint(provider.name, provider.normalize_base_url(base_url), api_key, api_version)


def _choose_provider(asked: Any, model: str, given_url: Any) -> tuple[type[Provider], str | None]:
    """The provider asked for, else the one the model name implies; and, when implied, why.

    A model another protocol's vendor serves (``claude-``) goes to that vendor, unless
    ``base_url=`` points the run elsewhere: an OpenAI-compatible gateway serving such models.
    (A base URL on the OpenAI API itself is refused later, by :func:`_check_model_is_served`.)
    """
    asked = asked or os.environ.get("PARROT_PANDAS_PROVIDER") or None
    if asked is not None:
        if asked not in PROVIDERS:
            close = difflib.get_close_matches(str(asked), list(PROVIDERS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"provider must be one of {list(PROVIDERS)}, got {asked!r}{hint}. Any "
                "OpenAI-compatible server (vLLM, Ollama, llama.cpp, ...) is provider='openai'."
            )
        return PROVIDERS[asked], None
    implied, prefix = _implied_provider(model)
    if implied is None:
        return _DEFAULT_PROVIDER, None
    reason = f"the model name starts with {prefix!r}"
    host = _hostname(given_url)
    if given_url is None or (host is not None and host in (implied.vendor_hosts or ())):
        logger.info("provider=%r: %s", implied.name, reason)
        return implied, reason
    logger.info(
        "model %r goes over the OpenAI protocol to base_url=%r, taken as an OpenAI-compatible "
        "gateway; pass provider=%r for the %s API itself",
        model,
        redact_url(given_url) if isinstance(given_url, str) else given_url,
        implied.name,
        implied.label,
    )
    return _DEFAULT_PROVIDER, None


def _implied_provider(model: str) -> tuple[type[Provider] | None, str | None]:
    for provider in PROVIDERS.values():
        for prefix in provider.model_prefixes:
            if model.startswith(prefix):
                return provider, prefix
    return None, None


def _check_model_is_served(
    provider: type[Provider], model: str, url: SplitResult, base_url: str
) -> None:
    """Refuse a model of one vendor sent to another vendor's own API (``claude-`` to
    api.openai.com), which could only answer "model not found" at the first request."""
    implied, prefix = _implied_provider(model)
    if implied is None or implied is provider or url.hostname not in (provider.vendor_hosts or ()):
        return
    raise ConfigurationError(
        f"model {model!r} (a name starting with {prefix!r}) is served by the {implied.label} "
        f"API, not by {redact_url(base_url)!r}: pass provider={implied.name!r} (without "
        f"base_url=, it goes to {implied.default_base_url}), or point base_url= at an "
        "OpenAI-compatible gateway that serves it"
    )


def _api_key(provider: type[Provider], value: Any) -> tuple[str | None, str]:
    """The key and where it came from (for messages, never the key itself)."""
    source = "api_key="
    if not value:
        # An empty key variable (exported but unset) means no key, not an empty credential.
        value, source = os.environ.get(provider.api_key_env) or None, provider.api_key_env
    if value is None:
        return None, source
    if not isinstance(value, str):
        raise ConfigurationError("api_key must be a string")
    bad = [i for i, ch in enumerate(value) if _unsafe(ch)]
    if bad:
        # A header cannot carry it (a raw ValueError at the first request); never shown.
        if bad == list(range(len(value) - len(bad), len(value))):
            where = "at its end"
        elif bad == list(range(len(bad))):
            where = "at its start"
        else:
            where = "inside it"
        chars = ", ".join(repr(ch) for ch in dict.fromkeys(value[i] for i in bad))
        raise ConfigurationError(
            f"the API key ({source}) has whitespace or control characters ({chars}) {where}, "
            "which no HTTP header can carry; strip them (a key read from a file keeps its "
            "trailing newline: open(...).read().strip())"
        )
    return value, source


def _api_version(provider: type[Provider], value: Any, need_key: bool) -> str | None:
    if provider.api_version_env is None:
        if value is not None:
            takers = [p.name for p in PROVIDERS.values() if p.api_version_env is not None]
            raise ConfigurationError(
                f"api_version= applies to provider={' or '.join(map(repr, takers))} only "
                f"(this run is {provider.name!r})"
            )
        return None
    value = value or os.environ.get(provider.api_version_env) or None
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(
            f"api_version must be a string such as {provider.example_api_version!r}, got {value!r}"
        )
    if value is None and need_key:
        raise ConfigurationError(
            f"provider={provider.name!r} needs an API version: set the "
            f"{provider.api_version_env} environment variable (e.g. "
            f"{provider.example_api_version!r}) or pass api_version=..."
        )
    return value


def _check_base_url(provider: type[Provider], base_url: Any) -> SplitResult:
    """``base_url`` split, once it is an http(s) URL with a host and a valid port.

    The scheme is matched in any letter case, as URLs are; a message shows the URL as given,
    its credentials and secret query values redacted.
    """
    example = provider.example_base_url
    if not isinstance(base_url, str):
        raise ConfigurationError(
            f"base_url must be an http(s) URL such as {example!r}, got {base_url!r}"
        )
    shown = redact_url(base_url)
    if any(_unsafe(ch) for ch in base_url):
        raise ConfigurationError(
            f"base_url contains whitespace or a control character: {shown!r}; strip it "
            "(a value read from a file or an environment variable may end in a newline)"
        )
    try:
        url = urlsplit(base_url)
        _ = url.port  # reading the port is what validates it
    except ValueError as exc:
        raise ConfigurationError(f"base_url is not a valid URL ({exc}): {shown!r}") from None
    if url.scheme not in ("http", "https"):  # urlsplit lower-cases the scheme
        raise ConfigurationError(
            f"base_url must be an http(s) URL such as {example!r}, got {shown!r}"
        )
    if not url.hostname:
        raise ConfigurationError(f"base_url has no host: {shown!r}; e.g. {example!r}")
    return url


def _unsafe(ch: str) -> bool:
    """Whitespace or a control, format or unassigned character (a newline, a zero-width
    space): never part of a key or a URL, and invisible when printed."""
    return ch.isspace() or unicodedata.category(ch)[0] == "C"


def _hostname(url: Any) -> str | None:
    try:
        return urlsplit(url).hostname if isinstance(url, str) else None
    except ValueError:
        return None


def _no_key_message(provider: type[Provider], implied_by: str | None) -> str:
    message = (
        f"no API key for {provider.label}: set the {provider.api_key_env} environment variable "
        f"or pass api_key=...{provider.no_key_hint}"
    )
    if implied_by is not None:
        message += (
            f" (provider={provider.name!r} was chosen because {implied_by}; pass "
            "provider='openai' and base_url=... to reach it through an OpenAI-compatible gateway)"
        )
    return message


# -- request parameters -------------------------------------------------------------------------


def _check_request_params(params: dict[str, Any], provider: type[Provider]) -> dict[str, Any]:
    """The parameters checked, made JSON-safe, then renamed and defaulted by the provider."""
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
    params = {name: _json_value(value, name) for name, value in params.items()}
    return provider.prepare_params(params)


def _json_value(value: Any, where: str) -> Any:
    """``value`` as the request body will encode it: numpy scalars made plain, and refused
    if JSON cannot hold it (NaN and infinity would go out as invalid JSON)."""
    value = _plain(value)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigurationError(
                f"{where} is {value!r}, which JSON cannot carry (the server would get invalid "
                "JSON); pass a finite number"
            )
        return value
    if isinstance(value, Mapping):
        items = {}
        for key, item in value.items():
            key = _plain(key)
            if not isinstance(key, (str, int, float, bool)):
                raise ConfigurationError(
                    f"{where} has a key of type {type(key).__name__} ({key!r}); JSON keys are "
                    "strings or numbers"
                )
            items[key] = _json_value(item, f"{where}[{key!r}]")
        return items
    if isinstance(value, (list, tuple)):
        return type(value)(_json_value(item, f"{where}[{i}]") for i, item in enumerate(value))
    raise ConfigurationError(
        f"{where} is a {type(value).__name__}, which a JSON request body cannot hold; pass "
        "strings, numbers, booleans, None, lists and dicts"
    )


# -- run settings -------------------------------------------------------------------------------


def _check_run_settings(settings: Mapping[str, Any]) -> None:
    for name in ("max_concurrency", "max_retries"):
        if name in settings:
            value = settings[name]
            low = 1 if name == "max_concurrency" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an integer >= {low}, got {value!r}")
    for name in ("timeout", "rpm", "tpm"):
        value = settings.get(name)
        # `not 0 < value < inf` also refuses NaN; None is the way to say "no limit".
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < math.inf
        ):
            hint = " (pass None for no limit)" if value == math.inf else ""
            raise ConfigurationError(
                f"{name} must be a positive number or None, got {value!r}{hint}"
            )
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
    _check_rows_per_request(settings.get("rows_per_request", 1))
    cache = settings.get("cache", True)
    if not isinstance(cache, (bool, str, os.PathLike)):
        raise ConfigurationError(f"cache must be True, False or a file path, got {cache!r}")


def _check_rows_per_request(value: Any) -> None:
    if value == "auto" and isinstance(value, str):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            "rows_per_request must be an integer >= 1 (rows sent in one request; 1, the "
            f'default, sends each row alone) or "auto" (sized from the limits), got {value!r}'
        )


def _check_batch(settings: Mapping[str, Any], provider: str) -> None:
    """``batch=`` and ``batch_deadline=``: refused before any request when they cannot work."""
    batch = settings.get("batch", False)
    if not isinstance(batch, bool):
        raise ConfigurationError(
            f"batch must be True (send rows through the provider's Batch API, at half the "
            f"price) or False (live requests), got {batch!r}"
        )
    deadline = settings.get("batch_deadline")
    if deadline is not None:
        if not batch:
            raise ConfigurationError(
                "batch_deadline only applies to batch=True; pass batch=True, or drop batch_deadline"
            )
        ok = isinstance(deadline, (datetime.datetime, datetime.timedelta)) or (
            isinstance(deadline, (int, float))
            and not isinstance(deadline, bool)
            and 0 < deadline < math.inf
        )
        if isinstance(deadline, datetime.timedelta) and deadline.total_seconds() <= 0:
            ok = False
        if not ok:
            raise ConfigurationError(
                "batch_deadline must be a positive number of seconds, a datetime.timedelta or "
                f"a datetime.datetime (after it, failed lines go live), got {deadline!r}"
            )
    if batch and not hasattr(PROVIDERS[provider], "batch"):
        raise ConfigurationError(
            f"provider {provider!r} has no Batch API; pass batch=False, or use provider "
            "'openai', 'azure' or 'anthropic'"
        )
    if batch and settings.get("cache", True) is False:
        raise ConfigurationError(
            "batch=True keeps its batch records and answers in the cache database, so that a "
            "re-run resumes instead of submitting again; pass cache=True (or a file path), or "
            "batch=False"
        )


def _plain(value: Any) -> Any:
    # numpy scalars (a count taken from a frame) would be refused as non-int and cannot be
    # JSON-encoded in the request body; use the Python value.
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        return item()
    return value
