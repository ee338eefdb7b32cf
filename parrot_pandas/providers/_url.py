"""Endpoint URLs from a base URL: the path joined before the query, the text kept as given.

A base URL may carry a query (a gateway's ``?key=...`` or ``?tenant=...``). Appending the
endpoint path to the whole string would put it inside the query
(``https://host/v1?tenant=a/chat/completions``), so the base is split at ``?`` first. The
text is never re-encoded or lower-cased: the URL sent is the one the user gave.
"""

from __future__ import annotations

__all__ = ["base_path", "endpoint", "with_path"]


def _split(url: str) -> tuple[str, str]:
    """``(everything before the query, the query)``; a ``#fragment`` is never sent."""
    head = url.split("#", 1)[0]
    head, _, query = head.partition("?")
    return head, query


def base_path(url: str) -> str:
    """``url`` without its query and fragment, and without a trailing ``/``.

    Examples
    --------
    >>> base_path("https://host/v1/?tenant=a")
    'https://host/v1'
    """
    return _split(url)[0].rstrip("/")


def with_path(url: str, head: str) -> str:
    """``url`` with everything before its query replaced by ``head``; the query is kept.

    Examples
    --------
    >>> with_path("https://host/v1/?tenant=a", "https://host")
    'https://host?tenant=a'
    """
    query = _split(url)[1]
    return f"{head}?{query}" if query else head


def endpoint(url: str, path: str, *extra_query: str) -> str:
    """The endpoint ``path`` under base ``url``: the base's query after the path, then
    ``extra_query`` (already encoded ``name=value`` pairs).

    Examples
    --------
    >>> endpoint("https://host/v1?tenant=a", "/chat/completions")
    'https://host/v1/chat/completions?tenant=a'
    >>> endpoint("https://host?tenant=a", "/openai/chat", "api-version=2024-10-21")
    'https://host/openai/chat?tenant=a&api-version=2024-10-21'
    """
    query = "&".join(part for part in (_split(url)[1], *extra_query) if part)
    full = base_path(url) + path
    return f"{full}?{query}" if query else full
