"""The wire: one HTTP session per run, provider-neutral, mapping failures to our errors.

The provider judges what the server said (its verdicts); the client judges what only the wire
knows (no connection, a timeout, an unreadable body) and makes every message safe to show: the
API key is scrubbed in any letter case, and a URL is only ever shown redacted.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import urllib.parse
import urllib.request
from typing import Any

import aiohttp

from ._secrets import redact_url, scrub
from .errors import APIConnectionError, APIError, StructuredOutputError, Verdict
from .providers import Call, Completion, Provider
from .providers._prompt_cache import CacheUsage

__all__ = ["Client", "decode_body"]

# No connection at all (refused, no such host): retried, and if it never comes, no row can
# succeed. A certificate the client refuses will not change by asking again.
_UNREACHABLE = Verdict("run", True, "unreachable")
_BAD_CERTIFICATE = Verdict("run", False, "certificate")
_JSON = json.JSONDecoder()


class Client:
    """Send :class:`Call` objects through one pooled ``aiohttp`` session.

    Parameters
    ----------
    provider : Provider
        Builds the HTTP request and reads the response.
    timeout : float
        Seconds for one request, connection included.
    max_connections : int
        Size of the connection pool (the scheduler never has more requests in flight).
    secret : str, optional
        The API key, scrubbed from any error message a server echoes it in.

    Notes
    -----
    Use as ``async with Client(...) as client:``; the session lives for one run.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        timeout: float = 120.0,
        max_connections: int = 64,
        secret: str | None = None,
    ) -> None:
        self.provider = provider
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._secret = secret
        self._session: aiohttp.ClientSession | None = None
        self._proxies = _Proxies()
        # Prompt-cache tokens the live answers reported (read, written), summed.
        self.prompt_cache = CacheUsage()
        self._cache_usage = getattr(provider, "cache_usage", None)  # optional for a provider

    async def __aenter__(self) -> Client:
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0)
        # trust_env=True would make aiohttp look up netrc and proxies in a thread on every
        # request (measured: 3x the client's CPU); the environment is read once instead.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, trust_env=False
        )
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, call: Call) -> Completion:
        """Send one call and return its completion.

        Raises
        ------
        APIError
            The server refused the request (its message, never the key), with the provider's
            verdict; a run-level refusal also names the URL requested (redacted).
        APIConnectionError
            No usable response: dropped or refused connection, timeout, unreadable body.
        StructuredOutputError
            The response holds no answer at all.
        """
        assert self._session is not None, "use `async with Client(...)`"
        # The body comes encoded from the provider, built from parts made once per run
        # (aiohttp's json= would build and dump a dict per request: issue 12, CPU per row).
        url, sent, data = self.provider.encode(call)
        try:
            proxy = self._proxies[url]
            async with self._session.post(url, data=data, headers=sent, proxy=proxy) as response:
                status = response.status
                headers = response.headers
                raw = await response.read()
        except asyncio.TimeoutError:
            raise APIConnectionError(
                f"no response within {self._timeout.total:g} s (raise timeout= for long answers)"
            ) from None
        except aiohttp.ClientError as exc:
            raise self._shown(_connection_error(exc), url) from None
        try:
            # UTF-8 decoded first: json.loads on bytes detects the encoding per call (issue 12).
            body = _JSON.decode(raw.decode())
        except ValueError:
            body = decode_body(raw)
        try:
            if not 200 <= status < 300:
                raise self.provider.error(call, status, body, headers)
            if not isinstance(body, dict):
                raise APIConnectionError(f"HTTP {status} with an unreadable body: {raw[:200]!r}")
            completion = self.provider.parse(call, body, headers)
        except (APIError, StructuredOutputError) as exc:
            raise self._shown(exc, url) from None
        for problem in completion.problems:
            self._shown(problem, url)
        reader = self._cache_usage
        if reader is not None:
            # Prompt-cache tokens of live answers, for attrs["llm"] and the cost.
            usage = reader(body)
            if usage.read or usage.written:
                self.prompt_cache += usage
        return completion

    def _shown(
        self, exc: APIError | StructuredOutputError, url: str
    ) -> APIError | StructuredOutputError:
        # Everything a server says passes through here before a user can see it: error bodies on
        # any status (a 200 without choices too), connection errors, refusals.
        message = self._scrub(exc.message, url)
        if exc.verdict.scope == "run":
            # A wrong base_url or model shows as a 404: show where the request went.
            message += f" (POST {self._scrub(redact_url(url), url)})"
        exc.message = message
        exc.args = (message,)
        return exc

    def _proxy(self, url: str) -> str | None:
        return self._proxies[url]

    def _scrub(self, text: str, url: str | None = None) -> str:
        text = scrub(text, self._secret)
        if url is not None:
            for secret in _url_secrets(url):
                text = scrub(text, secret)
        return text


@functools.lru_cache(maxsize=64)
def _url_secrets(url: str) -> tuple[str, ...]:
    """What :func:`redact_url` hides in ``url``: a password, secret-looking query values."""
    try:
        parts = urllib.parse.urlsplit(url)
        shown = urllib.parse.urlsplit(redact_url(url))
    except ValueError:
        return ()
    secrets = [parts.password] if parts.password else []
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    hidden = urllib.parse.parse_qsl(shown.query, keep_blank_values=True)
    for (_, value), (_, redacted) in zip(pairs, hidden, strict=False):
        if value and redacted == "***" and value != "***":
            secrets.append(value)
    return tuple(secrets)


def _connection_error(exc: aiohttp.ClientError) -> APIConnectionError:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return APIConnectionError(text, verdict=_BAD_CERTIFICATE)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return APIConnectionError(text, verdict=_UNREACHABLE)
    return APIConnectionError(text)


class _Proxies(dict[str, str | None]):
    """URL -> the proxy to reach it through (``None``: directly), from the standard proxy
    variables (HTTPS_PROXY, NO_PROXY, ...), worked out once per URL.

    A lookup of a known URL is one plain dict lookup (the request path's, issue 12, CPU per
    row); only an unknown one calls :meth:`__missing__`.
    """

    def __missing__(self, url: str) -> str | None:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        # A local server (llama.cpp, the test server) is never reached through a proxy.
        bypass = _is_loopback(host) or urllib.request.proxy_bypass(host)
        proxy = self[url] = None if bypass else urllib.request.getproxies().get(parts.scheme)
        return proxy


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decode_body(raw: bytes) -> Any:
    """A response body the fast UTF-8 path could not read, for an error message: JSON in
    another Unicode encoding (``json.loads`` detects it), or else the text (an HTML page)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
