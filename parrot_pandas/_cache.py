"""The response store: every answer is kept, so a re-run pays only for what is missing.

One row per ``(request key, sample number)`` in an SQLite file (its format and migrations:
:mod:`._cache_schema`; its keys: :mod:`._cache_key`). The sample number tells apart the ``n``
answers asked for one prompt.

How an answer is written
------------------------
- :meth:`ResponseCache.put` only buffers: one commit per answer would cap a fast run at the
  disk's commit rate.
- Inside an event loop, the first answer after a quiet spell schedules a commit
  ``flush_interval`` (50 ms) later with ``loop.call_later``. The commit runs in the cache's one
  writer thread, so the event loop never waits for the disk or for another process's lock.
  Answers that arrive during a commit go into the next one, due ``flush_interval`` after the
  first of them. A kill -9 therefore loses at most the last ~50 ms of answers.
- :meth:`ResponseCache.when_durable` runs a callback once everything put so far is committed:
  the scheduler counts a row as done only then. :meth:`ResponseCache.drain` awaits the same.
- Outside an event loop (plain synchronous use) a ``put`` commits in place once
  ``flush_size`` answers wait or ``flush_interval`` has passed; :meth:`~ResponseCache.flush`
  and :meth:`~ResponseCache.close` write the rest.
- A write that fails (disk full, a read-only file, another process holding the write lock for
  more than ``lock_timeout`` seconds) never fails a run: the cache warns once, stops writing,
  and keeps every answer of this run in memory, where reads still find it. Waiting callbacks
  fire as if the write had succeeded.

The file is shared safely by several processes (two notebooks, a script and a notebook): WAL
mode lets readers and one writer work at the same time, and every write is one short
``BEGIN IMMEDIATE`` transaction. Reads use their own connection, which in WAL mode never waits
for a writer. Network filesystems (NFS, SMB) do not support WAL's shared memory; keep the cache
on a local disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ._cache_paths import default_cache_path
from ._cache_schema import connect, open_plain, write_transaction
from .errors import ConfigurationError

__all__ = ["ResponseCache", "open_cache"]

logger = logging.getLogger("parrot_pandas")

# How long a commit waits for another process's write lock before the run goes on without
# the cache. Commits take milliseconds; a lock held this long is a stuck or very slow writer.
LOCK_TIMEOUT_S = 10.0
# SQLite builds before 3.32 allow at most 999 bound variables per statement; 500 keys
# plus the sample bound stays under it everywhere.
_KEYS_PER_QUERY = 500
_INSERT = (
    "INSERT OR REPLACE INTO responses (key, sample, value, model, prompt_tokens, "
    "completion_tokens, created) VALUES "
)
# Rows per INSERT: within the bound-variable limit (999 before SQLite 3.32, 32766 since).
_ROWS_PER_INSERT = 1000 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999 // 7

_Row = tuple[str, int, str, str | None, int | None, int | None, float]
_Rows = dict[tuple[str, int], _Row]


def _write(conn: sqlite3.Connection, rows: Collection[_Row]) -> None:
    """Commit ``rows`` in one transaction."""
    try:
        with write_transaction(conn):
            _insert_rows(conn, rows)
    except UnicodeEncodeError:
        # A lone surrogate (a server's broken "\\ud83d" escape) cannot be stored as text: that
        # answer stays out of the cache, and the others are written.
        with write_transaction(conn):
            _insert_rows(conn, [row for row in rows if _storable(row)])


def _storable(row: _Row) -> bool:
    try:
        for field in row:
            if isinstance(field, str):
                field.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _insert_rows(conn: sqlite3.Connection, rows: Iterable[_Row]) -> None:
    # Many rows per statement rather than executemany: the sqlite3 module releases and retakes
    # the GIL around every step, and each step handed the GIL back and forth with the event
    # loop's thread (measured, 50k answers: a fifth of the context switches, ~5% less CPU).
    batch = list(rows)
    for start in range(0, len(batch), _ROWS_PER_INSERT):
        chunk = batch[start : start + _ROWS_PER_INSERT]
        values = ",".join(["(?,?,?,?,?,?,?)"] * len(chunk))
        conn.execute(_INSERT + values, [field for row in chunk for field in row])


class ResponseCache:
    """An SQLite file of answers, keyed by request key and sample number.

    Reads see buffered answers too. Safe to share between threads, and between processes
    using the same file. See the module docstring for when answers are written.

    Parameters
    ----------
    path : str or os.PathLike
        The SQLite file; it and its parent directories are created if missing (unless
        ``readonly``).
    readonly : bool, default False
        Only read: nothing is created, migrated or written, and :meth:`put` is refused. A file
        that does not exist reads as empty.
    flush_interval : float, default 0.05
        Longest time, in seconds, an answer waits in memory before its commit starts.
    flush_size : int, default 256
        Outside an event loop: number of waiting answers that triggers a write at once.
    lock_timeout : float, optional
        Seconds a commit waits for another process's write lock before the cache gives up
        writing for the rest of its life (answers stay in memory); default
        :data:`LOCK_TIMEOUT_S` (10).
    clock : callable, default time.monotonic
        Returns seconds; decides when ``flush_interval`` has passed outside an event loop.
        Tests inject a fake one.

    Raises
    ------
    ConfigurationError
        If the file cannot be created or opened, is read-only, damaged, not an SQLite
        database, an SQLite database that is not a parrot_pandas cache (it is left
        untouched), or was written by a newer parrot_pandas. The message names the path.

    Examples
    --------
    >>> with ResponseCache("answers.sqlite3") as cache:  # doctest: +SKIP
    ...     key = request_key({"model": "gpt-4o-mini", "messages": [...]})
    ...     if cache.get(key) is None:
    ...         cache.put(key, 0, "an answer", model="gpt-4o-mini", usage=(12, 3))
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        flush_interval: float = 0.05,
        flush_size: int = 256,
        lock_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not flush_interval >= 0:
            raise ConfigurationError(f"flush_interval must be >= 0, got {flush_interval!r}")
        if flush_size < 1:
            raise ConfigurationError(f"flush_size must be >= 1, got {flush_size!r}")
        if lock_timeout is None:
            lock_timeout = LOCK_TIMEOUT_S
        if not 0 <= lock_timeout < float("inf"):
            raise ConfigurationError(f"lock_timeout must be >= 0 seconds, got {lock_timeout!r}")
        self.path = pathlib.Path(path).expanduser()
        self.readonly = readonly
        self.flush_interval = float(flush_interval)
        self.flush_size = int(flush_size)
        self.lock_timeout = float(lock_timeout)
        self._clock = clock
        # Guards everything below that both the caller's threads and the writer thread touch.
        self._lock = threading.Lock()
        # Waiting answers, keyed by (key, sample) so a repeated put replaces, as INSERT OR
        # REPLACE does; after a failed write, every answer of the run that is not on disk.
        self._pending: _Rows = {}
        # The answers the writer thread is committing now (reads still see them).
        self._writing: _Rows = {}
        # Callbacks waiting for the next commit, and for the one under way.
        self._pending_waiters: list[Callable[[], None]] = []
        self._writing_waiters: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._in_flight = False  # a commit started on the loop, its outcome not yet handled
        self._oldest = 0.0  # loop time of the first answer now waiting
        self._broken: BaseException | None = None  # the write error that stopped writing
        self._warned: set[str] = set()
        self._closed = False
        self._last_flush = clock()
        self._writer: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._read_lock = threading.Lock()
        if readonly:
            self._reader = connect(self.path, readonly=True, busy_timeout=self.lock_timeout)
            return
        self._writer = connect(self.path, busy_timeout=self.lock_timeout)
        try:
            self._reader = open_plain(self.path, busy_timeout=self.lock_timeout)
        except sqlite3.Error as exc:
            self._writer.close()
            raise ConfigurationError(
                f"cannot open the cache file {str(self.path)!r}: {exc}"
            ) from None
        # One writer thread: commits never run on the event loop, and never two at once.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parrot_pandas-cache")

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str, sample: int = 0) -> str | None:
        """Return the cached answer for ``key`` and ``sample``, or ``None``.

        Parameters
        ----------
        key : str
            A :func:`~parrot_pandas._cache_key.request_key`.
        sample : int, default 0
            Which of the ``n`` answers to the same request.

        Returns
        -------
        str or None
        """
        return self.get_many([key], sample + 1).get(key, {}).get(sample)

    def get_samples(self, key: str, n: int) -> dict[int, str]:
        """Return the cached answers among samples ``0 .. n-1`` of ``key``.

        Returns
        -------
        dict of int to str
            Sample number to answer, in sample order, for the samples that are cached;
            the missing ones are absent (they need not be contiguous).
        """
        return self.get_many([key], n).get(key, {})

    def get_many(self, keys: Sequence[str], n: int = 1) -> dict[str, dict[int, str]]:
        """Look up many keys at once (one query per 500 keys).

        A file that cannot be read (a damaged page, an I/O error) is warned about once and
        read as missing those answers: they are asked again instead of failing the run.

        Parameters
        ----------
        keys : sequence of str
            Request keys; duplicates are fine.
        n : int, default 1
            Samples ``0 .. n-1`` are looked up for every key.

        Returns
        -------
        dict of str to dict of int to str
            For every key with at least one cached sample: sample number to answer, in
            sample order. Keys with nothing cached are absent.
        """
        unique = list(dict.fromkeys(keys))
        # Buffered answers are taken before the file is read: one being committed meanwhile is
        # then found in one or both, never in neither.
        buffered = self._buffered(unique, n)
        found: dict[str, dict[int, str]] = {}
        with self._read_lock:
            conn = self._open_reader()
            if conn is not None:
                try:
                    for start in range(0, len(unique), _KEYS_PER_QUERY):
                        chunk = unique[start : start + _KEYS_PER_QUERY]
                        marks = ",".join("?" * len(chunk))
                        rows = conn.execute(
                            f"SELECT key, sample, value FROM responses "
                            f"WHERE key IN ({marks}) AND sample >= 0 AND sample < ?",
                            (*chunk, n),
                        )
                        for key, sample, value in rows:
                            found.setdefault(key, {})[sample] = value
                except sqlite3.Error as exc:
                    self._warn_once(
                        "read",
                        f"parrot_pandas could not read the cache {str(self.path)!r} ({exc}); "
                        "the answers it could not read are asked again. If this persists, "
                        "delete the file (it may be damaged) or pass cache=False.",
                    )
        for key, samples in buffered.items():
            found.setdefault(key, {}).update(samples)
        return {key: dict(sorted(samples.items())) for key, samples in found.items()}

    def _buffered(self, unique: list[str], n: int) -> dict[str, dict[int, str]]:
        found: dict[str, dict[int, str]] = {}
        with self._lock:
            if self._closed:
                raise ValueError(f"the cache {str(self.path)!r} is closed")
            # Newer wins: what waits was put after what is being written.
            layers = [layer for layer in (self._writing, self._pending) if layer]
            if not layers:
                return found
            if sum(map(len, layers)) <= len(unique) * n:
                wanted = set(unique)
                for layer in layers:
                    for (key, sample), row in layer.items():
                        if key in wanted and 0 <= sample < n:
                            found.setdefault(key, {})[sample] = row[2]
            else:
                # After a failed write the buffer holds the whole run: look up, don't scan.
                for layer in layers:
                    for key in unique:
                        for sample in range(n):
                            row = layer.get((key, sample))
                            if row is not None:
                                found.setdefault(key, {})[sample] = row[2]
        return found

    # -- writing ---------------------------------------------------------------------------

    def put(
        self,
        key: str,
        sample: int,
        value: str,
        *,
        model: str | None,
        usage: tuple[int, int] | None = None,
    ) -> None:
        """Cache one answer; it is written with the next commit.

        Never raises for a failed write: see the module docstring.

        Parameters
        ----------
        key : str
            A :func:`~parrot_pandas._cache_key.request_key`.
        sample : int
            Which of the ``n`` answers to the same request (0 for the first).
        value : str
            The answer, as the model returned it.
        model : str
            The model that answered (kept for ``cache_info`` and ``clear_cache``).
        usage : tuple of (int, int), optional
            ``(prompt_tokens, completion_tokens)`` the request cost.

        Raises
        ------
        TypeError
            If ``value`` is not a string.
        ValueError
            If the cache is closed or read-only.
        """
        if not isinstance(value, str):
            raise TypeError(f"a cached answer must be a str, got {type(value).__name__}")
        prompt_tokens, completion_tokens = usage if usage is not None else (None, None)
        row: _Row = (key, sample, value, model, prompt_tokens, completion_tokens, time.time())
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._check_writable()
            if loop is not None and not self._pending:
                self._oldest = loop.time()
            self._pending[(key, sample)] = row
            if self._broken is not None:
                return
            if loop is not None:
                if self._timer is None and not self._in_flight:
                    self._timer = loop.call_later(self.flush_interval, self._start_commit, loop)
                return
            due = (
                len(self._pending) >= self.flush_size
                or self._clock() - self._last_flush >= self.flush_interval
            )
        if due:
            self.flush()

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once every answer put so far is committed.

        It is called at once when nothing is waiting, or when writing has failed (the answers
        are then held in memory). Inside an event loop it is called on the loop; outside one,
        by the :meth:`flush` that writes the answers. Callbacks still waiting when the cache
        is closed are dropped.
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if self._pending and self._broken is None:
                self._pending_waiters.append(callback)
                if loop is not None and self._timer is None and not self._in_flight:
                    self._timer = loop.call_later(self.flush_interval, self._start_commit, loop)
                return
            if self._writing or self._in_flight:
                self._writing_waiters.append(callback)
                return
        callback()

    async def drain(self) -> None:
        """Commit every answer put so far now, and return once it is written (or held).

        Never raises for a failed write. Use it before counting a run as finished.
        """
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()

        def release() -> None:
            if not written.done():
                written.set_result(None)

        self.when_durable(release)
        with self._lock:
            start = not self._in_flight and bool(self._pending) and self._broken is None
            if start and self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if start:
            self._start_commit(loop)
        await written

    def flush(self) -> None:
        """Write every buffered answer now, in one transaction, and wait until it is written.

        Blocks until written; never raises for a failed write (the answers are held in memory
        and a warning is given once). Does nothing on a closed or read-only cache.
        """
        with self._lock:
            if self._closed or self.readonly or self._broken is not None:
                return
            executor = self._executor
        assert executor is not None
        error = executor.submit(self._commit).result()
        with self._lock:
            self._last_flush = self._clock()
            waiters = self._writing_waiters
            self._writing_waiters = []
            if error is not None:
                waiters += self._pending_waiters
                self._pending_waiters = []
        if error is not None:
            self._warn_write_failed(error)
        for waiter in waiters:
            waiter()

    def _start_commit(self, loop: asyncio.AbstractEventLoop) -> None:
        # On the loop: hand the waiting answers to the writer thread.
        with self._lock:
            self._timer = None
            if self._in_flight or self._closed or self._broken is not None or not self._pending:
                return
            self._in_flight = True
            executor = self._executor
        assert executor is not None
        future = loop.run_in_executor(executor, self._commit)
        future.add_done_callback(self._committed)

    def _commit(self) -> BaseException | None:
        # In the writer thread: one transaction for everything waiting now.
        with self._lock:
            rows, self._pending = self._pending, {}
            self._writing = rows
            self._writing_waiters += self._pending_waiters
            self._pending_waiters = []
        error: BaseException | None = None
        if rows:
            assert self._writer is not None
            try:
                _write(self._writer, rows.values())
            except Exception as exc:  # a cache must never fail a run, whatever went wrong
                error = exc
        with self._lock:
            self._writing = {}
            if error is not None:
                # Kept in memory for the rest of the run; what was put meanwhile is newer.
                rows.update(self._pending)
                self._pending = rows
                self._broken = error
        return error

    def _committed(self, future: asyncio.Future[BaseException | None]) -> None:
        # On the loop, after the writer thread is done: release the rows that are now durable.
        error = None if future.cancelled() else future.result()
        with self._lock:
            self._in_flight = False
            if self._closed:
                return
            waiters = self._writing_waiters
            self._writing_waiters = []
            if self._broken is not None:
                waiters += self._pending_waiters
                self._pending_waiters = []
            again = bool(self._pending) and self._broken is None
        loop = asyncio.get_running_loop()
        if again:
            # Answers that arrived during the commit are committed flush_interval after the
            # first of them, as any other: chaining commits back to back would write the same
            # index pages over and over in many small transactions (measured: 30% more CPU).
            delay = self._oldest + self.flush_interval - loop.time()
            if delay <= 0:
                self._start_commit(loop)
            else:
                with self._lock:
                    if self._timer is None:
                        self._timer = loop.call_later(delay, self._start_commit, loop)
        if error is not None:
            self._warn_write_failed(error)
        for waiter in waiters:
            try:
                waiter()
            except Exception as exc:  # one broken callback must not strand the others
                loop.call_exception_handler(
                    {"message": "a cache when_durable callback failed", "exception": exc}
                )

    def _warn_write_failed(self, error: BaseException) -> None:
        reason = str(error)
        if "locked" in reason:
            reason += f" (another process held the write lock for {self.lock_timeout:g} s)"
        self._warn_once(
            "write",
            f"parrot_pandas could not write to the cache {str(self.path)!r}: {reason}. The run "
            "goes on and returns every answer, but those not written yet are kept in memory "
            "only, and a re-run pays for them again.",
        )

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        logger.warning("%s", message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Write the buffered answers and close the file. Calling it again does nothing.

        Waits for a commit under way. Callbacks still waiting for a commit are dropped.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            executor = self._executor
        try:
            if executor is not None:
                executor.shutdown(wait=True)
                # The writer thread is gone: this thread may use the writer connection now.
                with self._lock:
                    rows = {**self._writing, **self._pending}
                    self._writing = {}
                    self._pending_waiters, self._writing_waiters = [], []
                    broken = self._broken
                if rows and broken is None and self._writer is not None:
                    try:
                        _write(self._writer, rows.values())
                    except Exception as exc:
                        self._warn_write_failed(exc)
                    else:
                        with self._lock:
                            self._pending = {}
        finally:
            for conn in (self._writer, self._reader):
                if conn is not None:
                    conn.close()
            self._writer = self._reader = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closed

    @property
    def writable(self) -> bool:
        """Whether answers still go to the file (``False`` if read-only or after a failed write)."""
        return not self.readonly and self._broken is None

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            if self._closed:
                raise ValueError(f"the cache {str(self.path)!r} is closed")
            buffered = [*self._writing, *self._pending]
        with self._read_lock:
            conn = self._open_reader()
            if conn is None:
                return len(set(buffered))
            stored = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
            new = sum(
                conn.execute(
                    "SELECT 1 FROM responses WHERE key = ? AND sample = ?", pair
                ).fetchone()
                is None
                for pair in set(buffered)
            )
        return stored + new

    def __repr__(self) -> str:
        if self._closed:
            return f"<ResponseCache {str(self.path)!r} (closed)>"
        return f"<ResponseCache {str(self.path)!r} entries={len(self)}>"

    def _open_reader(self) -> sqlite3.Connection | None:
        if self._closed:
            raise ValueError(f"the cache {str(self.path)!r} is closed")
        return self._reader

    def _check_writable(self) -> None:
        if self._closed:
            raise ValueError(f"the cache {str(self.path)!r} is closed")
        if self.readonly:
            raise ValueError(f"the cache {str(self.path)!r} was opened read-only")


def open_cache(
    setting: bool | str | os.PathLike[str] | None, *, readonly: bool = False
) -> ResponseCache | None:
    """Turn the ``cache=`` option into a cache.

    Parameters
    ----------
    setting : bool, str, os.PathLike or None
        ``True`` for the file at :func:`~parrot_pandas._cache_paths.default_cache_path`,
        ``False`` or ``None`` for no cache, a path for that file.
    readonly : bool, default False
        For an estimate: open the file only to read it. Nothing is created, migrated or
        written; ``None`` is returned when the file does not exist or holds nothing yet.

    Returns
    -------
    ResponseCache or None
        An open cache the caller must close, or ``None`` when caching is off.

    Raises
    ------
    ConfigurationError
        If ``setting`` is none of those, or the file cannot be used as a cache (the message
        names the path and the fix).

    Examples
    --------
    >>> open_cache(False) is None
    True
    """
    if setting is True:
        path = default_cache_path()
    elif setting is False or setting is None:
        return None
    elif isinstance(setting, str | os.PathLike) and os.fspath(setting) not in ("", b""):
        path = pathlib.Path(os.fspath(setting)).expanduser()
    else:
        raise ConfigurationError(f"cache must be True, False or a path, got {setting!r}")
    if readonly:
        cache = ResponseCache(path, readonly=True)
        if cache._reader is None:
            cache.close()
            return None
        return cache
    return ResponseCache(path)
