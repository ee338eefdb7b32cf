"""Rate-limit buckets and rate-limit header parsing. Pure: no HTTP here.

The scheduler asks a :class:`Budget` for permission before every request
(:meth:`~Budget.acquire`), reports what the request really cost
(:meth:`~Budget.settle`), feeds it what each response's headers say
(:meth:`~Budget.observe`) and stops everyone after a 429 (:meth:`~Budget.pause`).
:class:`RateBudget` is the in-process implementation: two token buckets, one for
requests per minute and one for tokens per minute.

The providers turn response headers into a :class:`LimitInfo`; the helpers
:func:`parse_duration` and :func:`parse_retry_after` read the formats they share.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Budget",
    "LimitInfo",
    "RateBudget",
    "TokenBucket",
    "parse_duration",
    "parse_retry_after",
]

# A server that asks for more than this is more likely broken than serious; the
# scheduler's retries (and their own backoff) take over after it.
MAX_PAUSE = 60.0
# How long a 429 pauses every worker when the response says nothing about when to come back:
# the one default of the 429 path (see LimitInfo.wait_after_429).
DEFAULT_429_WAIT = 1.0

# Float refills land a hair short of the target after sleeping exactly the computed
# wait; without this slack the waiter would wake again for a nanosecond.
_EPSILON = 1e-9

try:  # aiohttp's header mappings; aiohttp depends on multidict
    from multidict import CIMultiDict, CIMultiDictProxy

    CASE_INSENSITIVE: tuple[type, ...] = (CIMultiDict, CIMultiDictProxy)
except ImportError:  # pragma: no cover
    CASE_INSENSITIVE = ()

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# Go's time.Duration.String() format, which OpenAI uses for x-ratelimit-reset-*.
# "ms" must be tried before "m" and "s": "20ms" is twenty milliseconds, not 20 minutes.
_DURATION_PART = re.compile(rf"({_NUMBER})(ns|us|\u00b5s|\u03bcs|ms|h|m|s)")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ns|us|\u00b5s|\u03bcs|ms|h|m|s))+")
_PLAIN_NUMBER = re.compile(_NUMBER)
_UNIT_SECONDS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # MICRO SIGN, what Go prints
    "\u03bcs": 1e-6,  # GREEK SMALL LETTER MU, which Go also accepts
    "ns": 1e-9,
}


def parse_duration(value: str) -> float:
    """Seconds in a rate-limit reset duration such as ``"6m0s"`` or ``"20ms"``.

    OpenAI's ``x-ratelimit-reset-requests`` / ``-tokens`` headers use Go's duration
    format: a sequence of ``<number><unit>`` with units ``h``, ``m``, ``s``, ``ms``,
    ``us`` (or ``µs``) and ``ns``. A plain number is read as seconds, as some
    compatible servers send it that way.

    Parameters
    ----------
    value : str
        The header value. Surrounding whitespace is ignored.

    Returns
    -------
    float
        The duration in seconds (never negative).

    Raises
    ------
    ValueError
        If `value` is not a non-negative duration in one of those forms.

    Examples
    --------
    >>> parse_duration("6m0s")
    360.0
    >>> parse_duration("20ms")
    0.02
    >>> parse_duration("1h2m3.5s")
    3723.5
    >>> parse_duration("0.5")
    0.5
    """
    text = value.strip() if isinstance(value, str) else ""
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        raise ValueError(f"not a rate-limit duration: {value!r}")
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """`name` from `headers`, whatever the case of the keys."""
    # aiohttp's CIMultiDictProxy and lowercase dicts answer get() directly; the scan
    # is for hand-built dicts with "Retry-After" spelled as on the wire. A case-insensitive
    # mapping is never scanned: every response lacks these headers, and the scan of every
    # header per response was measurable.
    found = headers.get(name)
    if found is not None or isinstance(headers, CASE_INSENSITIVE):
        return found
    for key, val in headers.items():
        if key.lower() == name:
            return val
    return None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``retry-after``.

    ``retry-after-ms`` (milliseconds, possibly fractional; OpenAI and Azure send it)
    wins because it is more precise. Otherwise ``retry-after`` is read as
    delta-seconds or as an HTTP-date (RFC 9110, section 10.2.3).

    Parameters
    ----------
    headers : Mapping[str, str]
        Response headers: a case-insensitive mapping (aiohttp's ``CIMultiDictProxy``)
        or a plain dict.
    now : float, optional
        Wall-clock time (as from :func:`time.time`) that an HTTP-date is measured
        from; defaults to the current time.

    Returns
    -------
    float or None
        Seconds to wait, at least 0; ``None`` if neither header is present and
        parseable.

    Examples
    --------
    >>> parse_retry_after({"retry-after-ms": "1500", "retry-after": "2"})
    1.5
    >>> parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0)
    10.0
    >>> parse_retry_after({}) is None
    True
    """
    millis = _nonnegative_number(_header(headers, "retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = _header(headers, "retry-after")
    if value is None:
        return None
    seconds = _nonnegative_number(value)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are always GMT; "-0000" parses as naive.
        when = when.replace(tzinfo=timezone.utc)
    current = time.time() if now is None else now
    return max(when.timestamp() - current, 0.0)


def _nonnegative_number(value: str | None) -> float | None:
    """`value` as a finite float >= 0, or None."""
    if value is None:
        return None
    text = value.strip()
    return float(text) if _PLAIN_NUMBER.fullmatch(text) else None


@dataclass(frozen=True, init=False)
class LimitInfo:
    """What one response says about the rate limits (every field optional).

    Parameters
    ----------
    limit_requests, limit_tokens : int, optional
        The announced requests-per-minute and tokens-per-minute limits.
    remaining_requests, remaining_tokens : int, optional
        What the server says is left in its window (shared by every client of the key).
    reset_requests, reset_tokens : float, optional
        Seconds from now until that bucket is full again.
    retry_after : float, optional
        Seconds to wait, from ``retry-after-ms`` or ``retry-after``.
    """

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    retry_after: float | None = None

    def __init__(
        self,
        limit_requests: int | None = None,
        limit_tokens: int | None = None,
        remaining_requests: int | None = None,
        remaining_tokens: int | None = None,
        reset_requests: float | None = None,
        reset_tokens: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        # One is built for every response: filling the instance dict directly costs half of
        # the generated frozen __init__, which goes through object.__setattr__ per field.
        self.__dict__.update(
            limit_requests=limit_requests,
            limit_tokens=limit_tokens,
            remaining_requests=remaining_requests,
            remaining_tokens=remaining_tokens,
            reset_requests=reset_requests,
            reset_tokens=reset_tokens,
            retry_after=retry_after,
        )

    @property
    def empty(self) -> bool:
        """True if the response said nothing about rate limits."""
        return all(getattr(self, f.name) is None for f in fields(self))

    def wait_after_429(self) -> float:
        """Seconds a 429 should pause every worker, never more than 60.

        The server's ``retry-after`` if it gave one; otherwise the reset of the
        bucket that is exhausted (``remaining == 0``); otherwise the longest known
        reset; otherwise :data:`DEFAULT_429_WAIT` (1 second).

        Returns
        -------
        float
            Seconds, between 0 and 60.

        Examples
        --------
        >>> LimitInfo(remaining_requests=5, reset_requests=0.2,
        ...           remaining_tokens=0, reset_tokens=7.0).wait_after_429()
        7.0
        >>> LimitInfo().wait_after_429()
        1.0
        """
        if self.retry_after is not None:
            wait = self.retry_after
        else:
            buckets = [
                (self.remaining_requests, self.reset_requests),
                (self.remaining_tokens, self.reset_tokens),
            ]
            exhausted = [reset for left, reset in buckets if left == 0 and reset is not None]
            known = [reset for _, reset in buckets if reset is not None]
            wait = max(exhausted or known or [DEFAULT_429_WAIT])
        return min(max(wait, 0.0), MAX_PAUSE)


class TokenBucket:
    """A token bucket: `capacity` units, refilled continuously at `rate` units per second.

    The level starts full. ``take`` subtracts and may leave the level negative: a
    request larger than the capacity is let through once the bucket is full, so a
    single oversized request never deadlocks, and the debt delays the ones after
    it. Time comes from the injected `clock`, so tests need no real sleeping.

    Parameters
    ----------
    rate : float
        Units added per second (> 0).
    capacity : float
        Largest level (> 0): how much can be spent in one burst.
    clock : callable, optional
        Returns the current time in seconds; :func:`time.monotonic` by default.

    Examples
    --------
    >>> t = [0.0]
    >>> bucket = TokenBucket(rate=2.0, capacity=4.0, clock=lambda: t[0])
    >>> bucket.take(4)
    >>> bucket.wait_time(1)
    0.5
    >>> t[0] = 1.0
    >>> bucket.level
    2.0
    """

    def __init__(
        self, rate: float, capacity: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        _check_positive(rate=rate, capacity=capacity)
        self._clock = clock
        self._rate = float(rate)
        self._capacity = float(capacity)
        self._level = self._capacity
        self._last = clock()

    def __repr__(self) -> str:
        return (
            f"TokenBucket(rate={self._rate:g}, capacity={self._capacity:g}, level={self.level:g})"
        )

    @property
    def rate(self) -> float:
        """Units added per second."""
        return self._rate

    @property
    def capacity(self) -> float:
        """Largest level."""
        return self._capacity

    @property
    def level(self) -> float:
        """Units available now (refilled up to the present; negative while in debt)."""
        self._refill()
        return self._level

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(now - self._last, 0.0)
        self._last = now
        self._level = min(self._capacity, self._level + elapsed * self._rate)

    def take(self, amount: float) -> None:
        """Spend `amount` units now, even if that leaves the level negative."""
        self._refill()
        self._level -= amount

    def give(self, amount: float) -> None:
        """Return `amount` units (spent but not used), never above the capacity."""
        self._refill()
        self._level = min(self._capacity, self._level + amount)

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` fits: 0 if it fits now.

        An amount larger than the capacity fits when the bucket is full.
        """
        need = min(amount, self._capacity)
        missing = need - self.level
        return missing / self._rate if missing > _EPSILON else 0.0

    def drain(self, seconds: float = 0.0) -> None:
        """Empty the bucket, or make it reach empty only `seconds` from now.

        What follows is then paced by the refill. With `seconds`, the level becomes
        the debt the refill pays off in that time: a bucket drained at the start of a
        pause would otherwise be full again when the pause ends, and release a burst.
        A deeper debt is kept.
        """
        self._refill()
        self._level = min(self._level, -max(seconds, 0.0) * self._rate)

    def clamp(self, remaining: float) -> None:
        """Lower the level to `remaining`: the server counts fewer left than we do."""
        self._refill()
        self._level = min(self._level, remaining)

    def resize(self, rate: float, capacity: float) -> None:
        """Change rate and capacity, keeping the level (cut to the new capacity)."""
        _check_positive(rate=rate, capacity=capacity)
        self._refill()  # what accrued so far accrued at the old rate
        self._rate = float(rate)
        self._capacity = float(capacity)
        self._level = min(self._level, self._capacity)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@runtime_checkable
class Budget(Protocol):
    """What the scheduler needs from a rate budget; :class:`RateBudget` is one.

    A budget shared between processes (Dask workers) implements the same six methods.
    """

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request costing `tokens` may be sent, then count it."""

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the count once the real token cost of a request is known."""

    def observe(self, info: LimitInfo) -> None:
        """Take in what a response's headers say about the limits."""

    def pause(self, seconds: float) -> None:
        """Stop every acquirer for `seconds` (after a 429)."""

    def requests_per_second(self, tokens_per_request: float) -> float | None:
        """The request rate the limits sustain (None if unlimited): sizes the worker pool."""

    def snapshot(self) -> dict[str, Any]:
        """The limits in effect (at least ``"rpm"`` and ``"tpm"``), for logs and ``attrs``."""


class RateBudget:
    """The object the scheduler asks for permission before each request.

    Algorithm: two :class:`TokenBucket` s, one counting requests and one counting
    tokens, each refilled at ``limit * headroom / 60`` per second and holding
    ``burst`` seconds of refill (at least one request; at least the largest single
    token cost seen, so no request can wait forever). A limit of ``None`` means no
    bucket: unlimited. :meth:`acquire` waits until the budget is not paused and both
    buckets hold enough, then takes one request and the estimated tokens. Acquirers
    queue first come, first served, so a large request is not starved by small ones.

    The limits actually used are the lower of the user's and the server's: a limit
    the server announces (:meth:`observe`) replaces a guess, but a user can always
    choose to go slower. After a 429, :meth:`pause` stops everyone, empties both
    buckets and jitters the first waiter, so the restart is paced by the refill
    rate instead of every worker firing at once.

    Parameters
    ----------
    rpm, tpm : float, optional
        Requests and tokens per minute to respect when the server announces nothing;
        ``None`` (the default) for no limit.
    burst : float, default 1.0
        Seconds of refill the buckets can hold.
    headroom : float, default 0.98
        Fraction of each limit actually paced at, so clock skew against the
        server's window does not cause 429s.
    clock : callable, optional
        Current time in seconds; :func:`time.monotonic` by default.
    sleep : callable, optional
        Coroutine function that waits the given seconds; :func:`asyncio.sleep` by default.
    rng : random.Random, optional
        Source of the restart jitter.

    Examples
    --------
    >>> budget = RateBudget(rpm=500, tpm=200_000)
    >>> round(budget.requests_per_second(tokens_per_request=1000), 2)
    3.27
    """

    def __init__(
        self,
        rpm: float | None = None,
        tpm: float | None = None,
        *,
        burst: float = 1.0,
        headroom: float = 0.98,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        for name, limit in (("rpm", rpm), ("tpm", tpm)):
            if limit is not None:
                _check_positive(**{name: limit})
        _check_positive(burst=burst)
        if not 0 < headroom <= 1:
            raise ValueError(f"headroom must be in (0, 1], got {headroom!r}")
        self._user_rpm = rpm
        self._user_tpm = tpm
        self._announced_rpm: float | None = None
        self._announced_tpm: float | None = None
        self._burst = burst
        self._headroom = headroom
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._largest_cost = 0.0
        self._paused_until = -math.inf
        self._requests: TokenBucket | None = None
        self._tokens: TokenBucket | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._queued = 0  # acquirers holding or waiting for the lock
        self._resize()

    def __repr__(self) -> str:
        return f"RateBudget(rpm={self.rpm!r}, tpm={self.tpm!r})"

    @property
    def rpm(self) -> float | None:
        """Requests per minute in effect (before headroom), or None if unlimited."""
        return _lower(self._user_rpm, self._announced_rpm)

    @property
    def tpm(self) -> float | None:
        """Tokens per minute in effect (before headroom), or None if unlimited."""
        return _lower(self._user_tpm, self._announced_tpm)

    @property
    def paused_until(self) -> float | None:
        """Clock time until which every acquire waits, or None if not paused."""
        return self._paused_until if self._paused_until > self._clock() else None

    def _resize(self) -> None:
        """Make the buckets match the limits in effect."""
        self._requests = self._sized(self._requests, self.rpm, minimum=1.0)
        self._tokens = self._sized(self._tokens, self.tpm, minimum=self._largest_cost)

    def _sized(
        self, bucket: TokenBucket | None, per_minute: float | None, *, minimum: float
    ) -> TokenBucket | None:
        if per_minute is None:
            return None
        rate = per_minute * self._headroom / 60.0
        capacity = max(rate * self._burst, minimum)
        if bucket is None:
            return TokenBucket(rate, capacity, clock=self._clock)
        if (bucket.rate, bucket.capacity) != (rate, capacity):
            bucket.resize(rate, capacity)
        return bucket

    def _queue(self) -> asyncio.Lock:
        # asyncio.Lock binds to the loop it is first contended on; a budget that
        # outlives one asyncio.run() (sync calls in a script) gets a fresh lock.
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock = asyncio.Lock()
            self._lock_loop = loop
        return self._lock

    def _jitter(self) -> float:
        bound = 0.25
        if self._requests is not None:
            bound = min(bound, 1.0 / self._requests.rate)
        return self._rng.uniform(0.0, bound)

    async def acquire(self, tokens: int = 0) -> None:
        """Wait until one request costing `tokens` may be sent, then count it.

        Parameters
        ----------
        tokens : int, default 0
            Estimated tokens of the request (prompt plus expected completion).
        """
        if tokens > self._largest_cost:
            self._note_cost(tokens)
        if not self._queued and self._clock() >= self._paused_until:
            if self._requests is None and self._tokens is None:
                return  # no limit known: nothing to count
            if self._wait(tokens) <= 0:
                # Nobody is queued and the request fits now: what the lock would grant at
                # once, granted without it (most requests of an unhurried run).
                self._take(tokens)
                return
        # One waiter at a time sleeps on the buckets; the rest queue on a FIFO lock.
        # That is fair, and it is cheaper than waking every waiter for each slot.
        # A pause or resize during a nap is seen when the nap ends (the loop
        # re-checks): a pause can only lengthen the wait, a faster limit costs at
        # most one nap computed at the old rate.
        self._queued += 1
        try:
            async with self._queue():
                while True:
                    now = self._clock()
                    if now < self._paused_until:
                        delay = self._paused_until - now + self._jitter()
                    else:
                        delay = self._wait(tokens)
                        if delay <= 0:
                            break
                    await self._sleep(delay)
                self._take(tokens)
        finally:
            self._queued -= 1

    def _wait(self, tokens: float) -> float:
        """Seconds until both buckets hold one request costing `tokens` (0: now)."""
        requests, budget = self._requests, self._tokens
        if requests is None and budget is None:
            return 0.0
        return max(
            requests.wait_time(1) if requests is not None else 0.0,
            budget.wait_time(tokens) if budget is not None else 0.0,
        )

    def _take(self, tokens: float) -> None:
        if self._requests is not None:
            self._requests.take(1)
        if self._tokens is not None:
            self._tokens.take(tokens)

    def _note_cost(self, tokens: float) -> None:
        # A new largest cost; the callers compare first, so the request path makes no call
        # for a request no larger than the largest seen.
        self._largest_cost = float(tokens)
        self._resize()

    def settle(self, estimated: int, actual: int) -> None:
        """Correct the token count once a response reports its real usage.

        Parameters
        ----------
        estimated : int
            Tokens taken at :meth:`acquire`.
        actual : int
            Tokens the server counted. Fewer are given back; more are taken.
        """
        if actual > self._largest_cost:
            self._note_cost(actual)
        if self._tokens is None:
            return
        if actual > estimated:
            self._tokens.take(actual - estimated)
        elif estimated > actual:
            self._tokens.give(estimated - actual)

    def observe(self, info: LimitInfo) -> None:
        """Take in what one response says about the rate limits.

        An announced limit replaces the previous announcement (the lower of it and
        the user's own limit is used); then each bucket is lowered to what the
        server says remains, since other clients may share the key.

        Parameters
        ----------
        info : LimitInfo
            Read from the response's headers by the provider.
        """
        changed = False
        if info.limit_requests and info.limit_requests != self._announced_rpm:
            self._announced_rpm = float(info.limit_requests)
            changed = True
        if info.limit_tokens and info.limit_tokens != self._announced_tpm:
            self._announced_tpm = float(info.limit_tokens)
            changed = True
        if changed:
            self._resize()
        if self._requests is not None and info.remaining_requests is not None:
            self._requests.clamp(info.remaining_requests)
        if self._tokens is not None and info.remaining_tokens is not None:
            self._tokens.clamp(info.remaining_tokens)

    def pause(self, seconds: float) -> None:
        """Stop every acquirer for `seconds` and empty the buckets (after a 429).

        An existing longer pause is kept, never shortened. The buckets are left empty
        at the end of the pause, so the restart goes at the refill rate rather than
        as one burst.

        Parameters
        ----------
        seconds : float
            How long from now; see :meth:`LimitInfo.wait_after_429`.
        """
        now = self._clock()
        self._paused_until = max(self._paused_until, now + seconds)
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.drain(self._paused_until - now)

    def requests_per_second(self, tokens_per_request: float) -> float | None:
        """The request rate both limits sustain, or None if unlimited.

        Parameters
        ----------
        tokens_per_request : float
            Average tokens per request (prompt plus completion).

        Returns
        -------
        float or None
            Requests per second at the paced (headroom) rates; with Little's law
            (concurrency = rate x latency) it sizes the worker pool.
        """
        rates = []
        if self._requests is not None:
            rates.append(self._requests.rate)
        if self._tokens is not None and tokens_per_request > 0:
            rates.append(self._tokens.rate / tokens_per_request)
        return min(rates) if rates else None

    def snapshot(self) -> dict[str, Any]:
        """The limits in effect and the bucket levels, for logs and ``attrs``."""
        return {
            "rpm": self.rpm,
            "tpm": self.tpm,
            "paused_until": self.paused_until,
            "request_level": self._requests.level if self._requests else None,
            "token_level": self._tokens.level if self._tokens else None,
        }


def _lower(a: float | None, b: float | None) -> float | None:
    known = [x for x in (a, b) if x is not None]
    return min(known) if known else None
