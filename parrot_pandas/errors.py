"""The exception tree: one base class and a few a user can catch meaningfully."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "APIConnectionError",
    "APIError",
    "ConfigurationError",
    "ParrotError",
    "RowsFailedError",
    "StructuredOutputError",
]

RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


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
        Seconds the server asked us to wait before the next request.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        # What the response's headers said about the rate limits (a LimitInfo), set by the client.
        self.limits: Any = None

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may succeed (429, 408, 409, 5xx)."""
        return self.status in RETRYABLE_STATUS

    def __str__(self) -> str:
        prefix = f"HTTP {self.status}: " if self.status is not None else ""
        return f"{prefix}{self.message}"


class APIConnectionError(APIError):
    """Raised when no response arrived: a dropped connection, a refused connection or a timeout."""

    @property
    def retryable(self) -> bool:
        return True


class StructuredOutputError(ParrotError):
    """Raised when an answer is not the JSON that ``extract`` asked for; the request is retried."""

    retryable = True


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
