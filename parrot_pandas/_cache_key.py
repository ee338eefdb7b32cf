"""Cache keys: a hash of everything that shapes an answer, and never a credential.

A key is the SHA-256 of the request's canonical JSON (:func:`request_key`). What a run puts in
it is decided here too (:func:`answer_key_function`): the base URL without its user and
password, the model, the request parameters, the schema of an extracted answer, the provider
when it is not OpenAI, and the messages. The structured-output strategy is left out on
purpose, so a run that falls back from one strategy to another keeps its cached answers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["answer_key_function", "key_function", "request_key"]


def request_key(payload: Mapping[str, Any]) -> str:
    """Hash everything that shapes an answer into a cache key.

    The key is the SHA-256 of the payload's canonical JSON (sorted keys, compact
    separators, UTF-8), so the same request gives the same key whatever order its
    dictionaries were built in, across processes and Python versions.

    Parameters
    ----------
    payload : Mapping
        JSON-serialisable description of the request, for example
        ``{"base_url": ..., "model": ..., "messages": [...], "params": {...},
        "schema": ...}``. It must not contain credentials.

    Returns
    -------
    str
        64 lowercase hexadecimal characters.

    Raises
    ------
    ValueError
        If a key anywhere in the payload is named like a credential (``api_key``,
        ``x-api-key``, ``Authorization``, ...) and holds a scalar value.
    TypeError
        If the payload is not JSON-serialisable.

    Examples
    --------
    >>> a = request_key({"model": "m", "params": {"temperature": 0, "seed": 1}})
    >>> b = request_key({"params": {"seed": 1, "temperature": 0}, "model": "m"})
    >>> a == b
    True
    """
    _reject_credentials(payload, "payload")
    return _digest(_canonical(payload))


def key_function(fixed: Mapping[str, Any], varying: str) -> Callable[[Any], str]:
    """A fast :func:`request_key` for many payloads that differ in one field only.

    ``key_function(fixed, "messages")(m) == request_key({**fixed, "messages": m})``, but the
    fixed part is checked for credentials and encoded once, not once per row.

    Examples
    --------
    >>> key = key_function({"model": "m", "params": {}}, "messages")
    >>> key(["hi"]) == request_key({"model": "m", "params": {}, "messages": ["hi"]})
    True
    """
    _reject_credentials(fixed, "payload")
    names = sorted([*fixed, varying])
    cut = names.index(varying)

    def member(name: str) -> str:
        return f"{_canonical(name)}:{_canonical(fixed[name])}"

    before = "".join(member(name) + "," for name in names[:cut])
    after = "".join("," + member(name) for name in names[cut + 1 :])
    head = "{" + before + _canonical(varying) + ":"
    tail = after + "}"

    def key(value: Any) -> str:
        return _digest(head + _canonical(value) + tail)

    return key


def answer_key_function(
    *,
    base_url: str,
    model: str,
    params: Mapping[str, Any],
    schema: Mapping[str, Any] | None,
    provider: str,
) -> Callable[[Any], str]:
    """The cache key of one run's requests, as a function of their chat messages.

    Parameters
    ----------
    base_url : str
        The server; a user name and password in it (``https://me:secret@host``) are dropped.
    model : str
    params : Mapping
        The request parameters that shape an answer (temperature, max_tokens, ...).
    schema : Mapping or None
        The JSON Schema of an extracted answer, ``None`` for free text.
    provider : str
        The wire protocol. Anthropic's and Azure's answers never share a key with another
        protocol's; OpenAI's keys leave it out, so caches written before it was added stay valid.

    Returns
    -------
    callable
        Chat messages (a list of ``{"role", "content"}`` dicts) to a 64-character key.

    Examples
    --------
    >>> key = answer_key_function(
    ...     base_url="https://me:pw@h/v1", model="m", params={}, schema=None, provider="openai"
    ... )
    >>> key([{"role": "user", "content": "hi"}]) == request_key(
    ...     {"base_url": "https://h/v1", "model": "m", "params": {}, "schema": None,
    ...      "messages": [{"role": "user", "content": "hi"}]}
    ... )
    True
    """
    # No strategy: any strategy's valid answer to the same schema serves, so a fallback from
    # one strategy to the next in a run does not void the cache.
    fixed: dict[str, Any] = {
        "base_url": _without_credentials(base_url),
        "model": model,
        "params": params,
        "schema": schema,
    }
    if provider != "openai":
        fixed["provider"] = provider
    return key_function(fixed, "messages")


def _without_credentials(url: str) -> str:
    # Credentials in a URL (https://user:secret@host) must never reach a key's payload.
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


# One encoder for every key: json.dumps with options builds a new encoder per call.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _digest(text: str) -> str:
    # Text from a DataFrame can hold lone surrogates; they must hash, not crash.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _is_credential_name(name: object) -> bool:
    if not isinstance(name, str):
        return False
    normalized = "".join(ch for ch in name.lower() if ch.isalnum())
    return normalized.endswith("apikey") or normalized.endswith("authorization")


def _reject_credentials(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            # Only a scalar can be a secret; a mapping under such a name is data, e.g. the
            # JSON Schema of an extracted field the user named "authorization".
            if _is_credential_name(name) and not isinstance(item, Mapping | list | tuple):
                raise ValueError(
                    f"the request payload holds a credential-like key {name!r} at "
                    f"{where}.{name}; credentials must never be part of a cache key"
                )
            _reject_credentials(item, f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _reject_credentials(item, f"{where}[{index}]")
