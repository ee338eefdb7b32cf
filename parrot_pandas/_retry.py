"""The one retry declaration: what is retried, how long we wait, what gives up.

- **What is retried:** an :class:`~parrot_pandas.errors.APIError` or
  :class:`~parrot_pandas.errors.StructuredOutputError` whose own verdict says sending again may
  help (``verdict.retry``: a 5xx, a dropped connection, a rate limit, invalid JSON). A failure
  that will repeat (a refused key, a content filter, a request larger than the limit, a
  truncation) costs one request. Nothing else is caught: a cancellation goes straight up.
- **How long:** exponential backoff with full jitter (``backoff.expo`` and
  ``backoff.full_jitter``): before retry ``k`` we sleep a uniform draw from
  ``[0, min(max_wait, factor * 2**(k-1))]``. A 429 also pauses the whole budget; that wait is
  the budget's (see ``LimitInfo.wait_after_429``), not this one.
- **What gives up:** the ``tries``-th failure (``max_retries + 1``), and, on the setup request,
  a ``strategy`` verdict at once: falling back to another strategy fixes it, asking again
  does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import backoff

from .errors import APIError, StructuredOutputError

__all__ = ["RETRIED", "RetryPolicy"]

T = TypeVar("T")

# The errors that carry a verdict; only these are ever judged for a retry.
RETRIED = (APIError, StructuredOutputError)

OnRetry = Callable[[int, float, Exception], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How one request is sent again after a failure its verdict calls retryable.

    Parameters
    ----------
    tries : int
        Attempts in all, the first included (``max_retries + 1``).
    factor : float
        Upper bound of the first wait, in seconds; each later bound doubles.
    max_wait : float
        Cap of the bound.
    sleep : coroutine function
        Waits the given seconds; inject a fake clock's sleep in tests.

    Examples
    --------
    >>> policy = RetryPolicy(tries=3)
    >>> from parrot_pandas.errors import APIError
    >>> policy.gives_up(APIError("overloaded", status=503), attempt=1)
    False
    >>> policy.gives_up(APIError("bad key", status=401), attempt=1)
    True
    """

    tries: int = 7
    factor: float = 0.5
    max_wait: float = 30.0
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep

    def gives_up(
        self, exc: APIError | StructuredOutputError, attempt: int, *, setup: bool = False
    ) -> bool:
        """Whether the failure of try number ``attempt`` (from 1) ends the retrying."""
        verdict = exc.verdict
        if setup and verdict.scope == "strategy":
            return True  # the scheduler falls back to the next strategy instead
        return not verdict.retry or attempt >= self.tries

    async def call(
        self,
        attempt: Callable[..., Awaitable[T]],
        *args: Any,
        setup: bool = False,
        on_retry: OnRetry | None = None,
        failed: APIError | StructuredOutputError | None = None,
    ) -> T:
        """Await ``attempt(*args)`` until it succeeds or the policy gives up (then re-raise).

        ``on_retry(attempt_number, wait, error)`` is called before each wait. ``failed`` is the
        error of a first try the caller made itself (the scheduler awaits a request's first try
        directly, so that one that succeeds never enters this loop): it is judged as try 1.
        """
        tries = 1
        error = failed
        waits: Iterator[float] | None = None
        while True:
            if error is None:
                try:
                    return await attempt(*args)
                except RETRIED as exc:
                    error = exc
            if self.gives_up(error, tries, setup=setup):
                raise error
            if waits is None:  # made on the first failure: most requests never need it
                waits = self._waits()
            wait = next(waits)
            if on_retry is not None:
                on_retry(tries, wait, error)
            await self.sleep(wait)
            tries += 1
            error = None

    def _waits(self) -> Iterator[float]:
        bounds = backoff.expo(factor=self.factor, max_value=self.max_wait)
        next(bounds)  # backoff's generators are primed with one send
        for bound in bounds:
            yield backoff.full_jitter(bound)
