"""The wire: one HTTP session per run, provider-neutral, mapping failures to our errors."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import urllib.parse
import urllib.request
from typing import Any

import aiohttp

from ._secrets import scrub
from .errors import APIConnectionError, APIError
from .providers import Call, Completion, Provider

__all__ = ["Client"]


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
        self._proxies: dict[str, str | None] = {}

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
            The server answered with an error status (its message, never the key).
        APIConnectionError
            No usable response: dropped or refused connection, timeout, unreadable body.
        StructuredOutputError
            The response holds no answer for a structured call.
        """
        assert self._session is not None, "use `async with Client(...)`"
        request = self.provider.build(call)
        try:
            async with self._session.post(
                request.url,
                json=request.json,
                headers=request.headers,
                proxy=self._proxy(request.url),
            ) as response:
                status = response.status
                headers = response.headers
                raw = await response.read()
        except asyncio.TimeoutError:
            raise APIConnectionError(
                f"no response within {self._timeout.total:g} s (raise timeout= for long answers)"
            ) from None
        except aiohttp.ClientError as exc:
            raise APIConnectionError(self._scrub(f"{type(exc).__name__}: {exc}")) from None
        body = _decode(raw)
        if 200 <= status < 300:
            if not isinstance(body, dict):
                raise APIConnectionError(
                    self._scrub(f"HTTP {status} with an unreadable body: {raw[:200]!r}")
                )
            return self.provider.parse(call, body, headers)
        error = self.provider.error(status, body, headers)
        if isinstance(error, APIError):
            error.message = self._scrub(error.message)
            error.args = (error.message,)
            error.limits = self.provider.limits(headers)
        raise error

    def _proxy(self, url: str) -> str | None:
        # The standard proxy variables (HTTPS_PROXY, NO_PROXY, ...), once per URL.
        if url not in self._proxies:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname or ""
            # A local server (llama.cpp, the test server) is never reached through a proxy.
            bypass = _is_loopback(host) or urllib.request.proxy_bypass(host)
            self._proxies[url] = None if bypass else urllib.request.getproxies().get(parts.scheme)
        return self._proxies[url]

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secret)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
