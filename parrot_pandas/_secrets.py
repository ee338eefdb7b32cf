"""Keeping secrets out of everything a user sees: messages, URLs, reprs and logs.

Every text that reaches a user from a server (an error body on any status, a connection
error, a URL) passes through :func:`scrub` with the run's key, and every URL we show passes
through :func:`redact_url`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit

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

    Nothing else is changed: the scheme keeps its letter case and other query values their
    encoding, so the URL shown is the one the user gave.

    Examples
    --------
    >>> redact_url("https://me:hunter2@proxy.local/v1?api-key=abc&x=1")
    'https://me:***@proxy.local/v1?api-key=***&x=1'
    >>> redact_url("HTTP://Host/v1?tenant=a+b")
    'HTTP://Host/v1?tenant=a+b'
    """
    try:
        urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    # Redacted on the text itself: urlsplit drops tabs and newlines, so its parts may not be
    # found in the URL again, and a secret would stay.
    head, question, rest = url.partition("?")
    if question:
        query, hash_, fragment = rest.partition("#")
        rest = "&".join(_redact_pair(pair) for pair in query.split("&")) + hash_ + fragment
    scheme, slashes, after = head.partition("//")
    if slashes:
        netloc, slash, path = after.partition("/")
        userinfo, at, host = netloc.rpartition("@")
        if at and ":" in userinfo:
            head = f"{scheme}//{userinfo.partition(':')[0]}:***@{host}{slash}{path}"
    return head + question + rest


def _redact_pair(pair: str) -> str:
    name, equals, _ = pair.partition("=")
    # Whitespace is ignored in the name as urlsplit (and so the request) ignores it.
    plain = re.sub(r"\s", "", unquote_plus(name))
    return f"{name}=***" if equals and _secret_name(plain) else pair


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in ("key", "token", "secret", "sig", "password", "auth"))
