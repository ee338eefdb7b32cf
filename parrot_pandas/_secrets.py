"""Keeping secrets out of everything a user sees: messages, URLs, reprs and logs.

Every text that reaches a user from a server (an error body on any status, a connection
error, a URL) passes through :func:`scrub` with the run's key, and every URL we show passes
through :func:`redact_url`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MIN_SECRET", "redact_url", "scrub"]

# A key of a few characters (a local server's "x") is no secret, and replacing it everywhere
# would mangle messages ("ma***imum").
MIN_SECRET = 8


def scrub(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret``, in any letter case, replaced by ``***``.

    Servers echo a key back in other cases (``Bearer SK-...``) or inside URLs, so the match
    ignores case; a secret shorter than :data:`MIN_SECRET` is left alone.

    Examples
    --------
    >>> scrub("bad key Sk-Secret-123 for BEARER sk-secret-123", "sk-secret-123")
    'bad key *** for BEARER ***'
    """
    if not secret or len(secret) < MIN_SECRET or not text:
        return text
    return re.sub(re.escape(secret), "***", text, flags=re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with a password and secret-looking query values replaced by ``***``.

    Examples
    --------
    >>> redact_url("https://me:hunter2@proxy.local/v1?api-key=abc&x=1")
    'https://me:***@proxy.local/v1?api-key=***&x=1'
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username}:***@{netloc.rpartition('@')[2]}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if _secret_name(k) else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable URL>"


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in ("key", "token", "secret", "sig", "password", "auth"))
