"""The exception tree: one base class and a few a user can catch meaningfully."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "APIConnectionError",
    "APIError",
    "ConfigurationError",
    "ParrotError",
    "RowsFailedError",
    "StructuredOutputError",
    "Verdict",
]

RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))

Scope = Literal["run", "row", "strategy"]


@dataclass(frozen=True)
class Verdict:
    """What a failure means: who it belongs to, and whether sending again can help.

    Decided by the provider that understands the protocol (its status codes, error bodies and
    finish reasons); the scheduler only acts on it and never looks at the message.

    Parameters
    ----------
    scope : {"run", "row", "strategy"}
        ``"run"``: no row can succeed (bad key, unknown model, wrong URL, quota gone): the run
        stops at once. ``"row"``: this request's prompt or answer is the problem (too long,
        filtered, truncated, an answer that does not validate): that row fails, the others go
        on. ``"strategy"``: the server refuses the structured-output parameter (or ignores it):
        the run falls back to the next strategy.
    retry : bool
        Whether the same request may succeed when sent again (a 5xx, a dropped connection, a
        429 with room left, invalid JSON). A failure that will repeat costs one request.
    reason : str
        A short, stable tag for logs and tests (``"rate_limited"``, ``"truncated"``, ...).
    """

    scope: Scope
    retry: bool
    reason: str = ""


# A fault of the moment (5xx, dropped connection): the same request may succeed when sent again.
TRANSIENT = Verdict("row", True, "transient")
# The server's rate limit: the request is retried, and every worker waits first (the limit is
# shared by every request of the key). The scheduler pauses the budget on this verdict alone.
RATE_LIMITED = Verdict("row", True, "rate_limited")


class ParrotError(Exception):
    """Base class of every error parrot_pandas raises on purpose."""


class ConfigurationError(ParrotError, ValueError):
    """Raised before any request is sent: a bad template, option, input frame or ``fields``."""


class APIError(ParrotError):
    """Raised when the server refuses a request; carries the server's own message.

    Parameters
    ----------
    message : str
        The server's error message (never contains the API key: the key is never echoed).
    status : int, optional
        The HTTP status, or ``None`` when no response arrived.
    code : str, optional
        The provider's machine-readable error code (``"invalid_api_key"``, ...).
    retry_after : float, optional
        Seconds the server asked us to wait before the next request, for an error built
        without response headers; once :attr:`limits` is set, they are the one source.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self._retry_after = retry_after
        # The provider's judgement; a bare APIError falls back to the shared status rules.
        self.verdict = verdict if verdict is not None else _status_verdict(status)
        # What the response's headers said about the rate limits (a LimitInfo), set by the client.
        self.limits: Any = None

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked us to wait, as parsed once into :attr:`limits`."""
        if self.limits is not None:
            return self.limits.retry_after
        return self._retry_after

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may succeed (the verdict's ``retry``)."""
        return self.verdict.retry

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{prefix}{self.message}"


class APIConnectionError(APIError):
    """Raised when no response arrived: a dropped connection, a refused connection or a timeout."""

    def __init__(self, message: str, *, verdict: Verdict | None = None) -> None:
        super().__init__(message, verdict=verdict or Verdict("row", True, "connection"))


class StructuredOutputError(ParrotError):
    """Raised when an answer is not usable (not the JSON ``extract`` asked for, cut short,
    withheld); its verdict says whether asking again can help."""

    def __init__(self, message: str, *, verdict: Verdict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.verdict = verdict if verdict is not None else Verdict("row", True, "invalid_answer")

    @property
    def retryable(self) -> bool:
        """Whether asking again may give a usable answer (the verdict's ``retry``)."""
        return self.verdict.retry

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.verdict))


def _rebuild(cls: type, message: str, verdict: Verdict) -> Exception:
    return cls(message, verdict=verdict)


def _status_verdict(status: int | None) -> Verdict:
    if status == 429:
        return RATE_LIMITED
    if status is None or status in RETRYABLE_STATUS:
        return TRANSIENT
    if status in (401, 403, 404):
        return Verdict("run", False, "refused")
    return Verdict("row", False, "rejected")


class RowsFailedError(ParrotError):
    """Raised at the end of a run with ``errors="raise"`` when some rows failed after retries.

    Attributes
    ----------
    result : pandas.DataFrame
        The partial result: every row that succeeded, NaN and an ``llm_error`` message for
        the rows that failed (the frame ``errors="coerce"`` would have returned).
    errors : pandas.Series
        One error message per failed input row, indexed by the input's index labels.
    """

    def __init__(self, result: pd.DataFrame, errors: pd.Series) -> None:
        self.result = result
        self.errors = errors
        shown = "; ".join(f"row {label!r}: {msg}" for label, msg in list(errors.items())[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        super().__init__(
            f"{len(errors)} row(s) failed after retries: {shown}{more}. "
            'The finished rows are in `exc.result`; pass errors="coerce" to get them back '
            "with an llm_error column instead of this exception."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.result, self.errors))
