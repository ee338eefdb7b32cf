"""The server's own token bucket: the admission control behind ``ServerConfig.rpm`` and ``tpm``.

It is a second token bucket on purpose, next to the client's ``parrot_pandas._limits.TokenBucket``:
the server must stay an independent oracle that never imports client code, so a bug in the
client's bucket cannot hide itself by being the server's bucket too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

__all__ = ["Buckets", "Clock", "TokenBucket"]

Clock = Callable[[], float]


class TokenBucket:
    """A token bucket: the server-side admission control behind ``rpm`` and ``tpm``.

    The bucket holds at most ``capacity`` tokens and refills continuously at ``rate`` tokens
    per second; it starts full. A request costing ``c`` is admitted when the level is at
    least ``c``, which then drops by ``c``; otherwise it must wait ``(c - level) / rate``
    seconds. A cost above ``capacity`` never fits.

    Parameters
    ----------
    rate : float
        Tokens added per second.
    capacity : float
        Maximum level.
    clock : callable, default time.monotonic
        Returns the current time in seconds; inject a fake one to test without sleeping.

    Examples
    --------
    >>> now = [0.0]
    >>> bucket = TokenBucket(rate=1.0, capacity=2.0, clock=lambda: now[0])
    >>> bucket.try_acquire(2), bucket.try_acquire(1)
    (0.0, 1.0)
    >>> now[0] = 1.0
    >>> bucket.try_acquire(1)
    0.0
    """

    def __init__(self, rate: float, capacity: float, *, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._level = self.capacity
        self._stamp = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._level

    @property
    def level(self) -> float:
        """Tokens available now."""
        return self._refill()

    def wait_time(self, cost: float) -> float:
        """Seconds until ``cost`` fits: ``0.0`` if it fits now, ``inf`` if it never will."""
        level = self._refill()
        if cost <= level:
            return 0.0
        if cost > self.capacity:
            return math.inf
        return (cost - level) / self.rate

    def take(self, cost: float) -> None:
        """Remove ``cost`` tokens unconditionally (after :meth:`wait_time` said it fits)."""
        self._refill()
        self._level -= cost

    def try_acquire(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if they fit and return ``0.0``; else return the wait, take none."""
        wait = self.wait_time(cost)
        if wait == 0.0:
            self._level -= cost
        return wait

    def time_to_full(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self._refill()) / self.rate


# (kind, limit per minute, bucket) for each configured limit: "requests" and/or "tokens".
Buckets = Sequence[tuple[str, float, TokenBucket]]
