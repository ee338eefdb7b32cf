"""The SQLite response cache: every answer is kept, so a re-run pays only for what is missing.

One row per ``(request key, sample number)``. The request key is a hash of everything
that shapes an answer (:func:`request_key`); the sample number tells apart the ``n``
answers asked for one prompt. Answers are buffered in memory and written in batches
(:meth:`ResponseCache.put`), because one commit per answer would cap a fast run at the
disk's fsync rate; a batch is at most ``flush_interval`` seconds old, so a crash loses
at most about a second of answers.

The file is shared safely by several processes (two notebooks, a script and a notebook):
WAL mode lets readers and one writer work at the same time, every write is one short
``BEGIN IMMEDIATE`` transaction, and a writer waits up to 30 seconds for the lock.
Network filesystems (NFS, SMB) do not support WAL's shared memory; keep the cache on a
local disk.

The module owns its schema: ``PRAGMA user_version`` records how many of the numbered
functions in ``_MIGRATIONS`` have run, and opening a cache runs the missing ones.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from parrot_pandas.errors import ConfigurationError

__all__ = [
    "ResponseCache",
    "cache_info",
    "clear_cache",
    "default_cache_path",
    "open_cache",
    "key_function",
    "request_key",
]

CACHE_ENV_VAR = "PARROT_PANDAS_CACHE"
_APP_DIR = "parrot_pandas"
_FILE_NAME = "responses.sqlite3"
_BUSY_TIMEOUT_S = 30.0
# SQLite builds before 3.32 allow at most 999 bound variables per statement; 500 keys
# plus the sample bound stays under it everywhere.
_KEYS_PER_QUERY = 500


# --------------------------------------------------------------------------- keys


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
        "schema": ..., "strategy": ...}``. It must not contain credentials.

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


# --------------------------------------------------------------------------- paths


def default_cache_path() -> pathlib.Path:
    """Where ``cache=True`` keeps its answers.

    Returns
    -------
    pathlib.Path
        ``$PARROT_PANDAS_CACHE`` if set (the path of the file itself), otherwise
        ``responses.sqlite3`` in the user cache directory:

        - Linux and other Unix: ``$XDG_CACHE_HOME/parrot_pandas/`` or
          ``~/.cache/parrot_pandas/``
        - macOS: ``~/Library/Caches/parrot_pandas/``
        - Windows: ``%LOCALAPPDATA%\\parrot_pandas\\Cache\\``

    Examples
    --------
    >>> default_cache_path().name  # doctest: +SKIP
    'responses.sqlite3'
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return pathlib.Path(override).expanduser()
    return _user_cache_dir() / _FILE_NAME


def _user_cache_dir() -> pathlib.Path:
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA") or str(pathlib.Path.home() / "AppData" / "Local")
        return pathlib.Path(local) / _APP_DIR / "Cache"
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Caches" / _APP_DIR
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg) / _APP_DIR
    return pathlib.Path.home() / ".cache" / _APP_DIR


# --------------------------------------------------------------------------- schema

_MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = []


def _migration(step: Callable[[sqlite3.Connection], None]) -> Callable[[sqlite3.Connection], None]:
    _MIGRATIONS.append(step)
    return step


@_migration
def _m001_responses(conn: sqlite3.Connection) -> None:
    conn.execute(
        """
        CREATE TABLE responses (
            key TEXT NOT NULL,
            sample INTEGER NOT NULL,
            value TEXT NOT NULL,
            model TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            created REAL,
            PRIMARY KEY (key, sample)
        ) WITHOUT ROWID
        """
    )
    conn.execute("CREATE INDEX responses_model ON responses (model)")
    conn.execute("CREATE INDEX responses_created ON responses (created)")


@_migration
def _m002_rowid_responses(conn: sqlite3.Connection) -> None:
    # A WITHOUT ROWID table keeps whole rows in the primary-key B-tree: with random SHA-256
    # keys and ~1 KB answers its pages split everywhere and stay part empty. A rowid table
    # appends rows in insertion order and only the small (key, sample) index takes the random
    # inserts (measured, 10k answers of 1 KB: file 4.5x -> 1.4x the data, writes 5x faster).
    conn.execute(
        """
        CREATE TABLE responses_v2 (
            key TEXT NOT NULL,
            sample INTEGER NOT NULL,
            value TEXT NOT NULL,
            model TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            created REAL,
            UNIQUE (key, sample)
        )
        """
    )
    conn.execute(
        "INSERT INTO responses_v2 (key, sample, value, model, prompt_tokens, completion_tokens, "
        "created) SELECT key, sample, value, model, prompt_tokens, completion_tokens, created "
        "FROM responses"
    )
    conn.execute("DROP TABLE responses")  # and its indexes
    conn.execute("ALTER TABLE responses_v2 RENAME TO responses")
    conn.execute("CREATE INDEX responses_model ON responses (model)")
    conn.execute("CREATE INDEX responses_created ON responses (created)")


@_migration
def _m003_batches(conn: sqlite3.Connection) -> None:
    # batch=True: one record per submitted batch, keyed by what was submitted (the part's
    # digest), so a re-run in another process re-attaches instead of submitting again
    # (parrot_pandas._batch_run owns the rows).
    conn.execute(
        """
        CREATE TABLE batches (
            provider TEXT NOT NULL,
            base_url TEXT NOT NULL,
            digest TEXT NOT NULL,
            batch_id TEXT,
            state TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            model TEXT,
            custom_ids TEXT NOT NULL,
            PRIMARY KEY (provider, base_url, digest)
        )
        """
    )


def _user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


@contextlib.contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    # IMMEDIATE takes the write lock up front, where the busy timeout applies; a deferred
    # transaction that has read first can fail with SQLITE_BUSY when it upgrades.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate(conn: sqlite3.Connection, path: pathlib.Path) -> None:
    latest = len(_MIGRATIONS)
    version = _user_version(conn)
    if version > latest:
        raise ConfigurationError(
            f"the cache file {str(path)!r} was written by a newer parrot_pandas (schema "
            f"version {version}, this one knows {latest}); upgrade parrot_pandas, or pass "
            "cache=False or another path"
        )
    migrated = False
    for number in range(version + 1, latest + 1):
        with _write_transaction(conn):
            # Another process may have run this step while we waited for the write lock.
            if _user_version(conn) >= number:
                continue
            _MIGRATIONS[number - 1](conn)
            # PRAGMA takes no bound parameters; number is an int we computed.
            conn.execute(f"PRAGMA user_version = {number:d}")
            migrated = True
    if migrated and version > 0:
        # A step that copies a table leaves the old pages free in the file (measured, step 2
        # on 100k answers: 465 MB before, 600 MB after the copy, 140 MB compacted in 0.7 s).
        _compact(conn)


def _compact(conn: sqlite3.Connection) -> None:
    """Give free pages back to the disk, if no other process is in the way right now."""
    try:
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError:
        pass  # another process mid-write: the file keeps its free pages for later rows


def _enable_wal(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    # Switching a fresh file to WAL fails at once with "database is locked", without
    # waiting for the busy timeout, while another process opening the same new file
    # holds a lock; two notebooks started together hit this.
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _connect(path: pathlib.Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _write_transaction).
        # check_same_thread=False: the sync API may run the event loop in a worker thread;
        # ResponseCache serialises every use of the connection with its lock.
        conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    except (OSError, sqlite3.Error) as exc:
        raise ConfigurationError(f"cannot open the cache file {str(path)!r}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000):d}")
        _enable_wal(conn)
        # NORMAL in WAL mode stays consistent after a crash or power loss; it can only
        # lose the last commits on power loss, which a cache can afford.
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn, path)
    except sqlite3.OperationalError:
        # Locked for 30 s or an I/O error: a passing condition, not a wrong setting.
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        # "file is not a database", "database disk image is malformed"
        conn.close()
        raise ConfigurationError(
            f"cannot use {str(path)!r} as a response cache: {exc}; pass cache=False or another path"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_readonly(path: pathlib.Path) -> sqlite3.Connection:
    # mode=ro: no migration, no VACUUM, no switch to WAL, never a new file; the database file
    # itself is never written. (In WAL mode SQLite may still create its -wal/-shm side files,
    # which readers need to see answers not yet checkpointed.)
    uri = path.resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(
        uri, uri=True, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        version = _user_version(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if isinstance(exc, sqlite3.OperationalError):
            raise  # locked, or an I/O error: passing, not a wrong setting
        raise ConfigurationError(
            f"cannot use {str(path)!r} as a response cache: {exc}; pass cache=False or another path"
        ) from exc
    if version > len(_MIGRATIONS):
        conn.close()
        raise ConfigurationError(
            f"the cache file {str(path)!r} was written by a newer parrot_pandas (schema "
            f"version {version}, this one knows {len(_MIGRATIONS)}); upgrade parrot_pandas, or "
            "pass cache=False or another path"
        )
    return conn


# --------------------------------------------------------------------------- the cache

_Row = tuple[str, int, str, str | None, int | None, int | None, float]


class ResponseCache:
    """An SQLite file of answers, keyed by request key and sample number.

    Writes are buffered and committed in one transaction when ``flush_size`` answers
    are waiting, when a :meth:`put` finds ``flush_interval`` seconds have passed since
    the last write, or at the latest ``flush_interval`` seconds after the first waiting
    answer arrived (a background timer), so a killed process loses at most about
    ``flush_interval`` seconds of answers. Reads see buffered answers too.

    Safe to share between threads, and between processes using the same file.

    Parameters
    ----------
    path : str or os.PathLike
        The SQLite file; it and its parent directories are created if missing.
    flush_interval : float, default 0.5
        Longest time, in seconds, an answer waits in memory before it is written.
    flush_size : int, default 256
        Number of waiting answers that triggers a write at once.
    clock : callable, default time.monotonic
        Returns seconds; used to decide when ``flush_interval`` has passed. Tests inject
        a fake one.
    readonly : bool, default False
        Open an existing file for reading only: nothing is migrated or written, and
        :meth:`put` raises ``ValueError``.

    Raises
    ------
    ConfigurationError
        If the file cannot be created or opened, is not an SQLite database, or was
        written by a newer parrot_pandas.

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
        flush_interval: float = 0.5,
        flush_size: int = 256,
        clock: Callable[[], float] = time.monotonic,
        readonly: bool = False,
    ) -> None:
        if flush_interval < 0:
            raise ConfigurationError(f"flush_interval must be >= 0, got {flush_interval!r}")
        if flush_size < 1:
            raise ConfigurationError(f"flush_size must be >= 1, got {flush_size!r}")
        self.path = pathlib.Path(path).expanduser()
        self.flush_interval = float(flush_interval)
        self.flush_size = int(flush_size)
        self._clock = clock
        self._lock = threading.Lock()
        # Keyed by (key, sample) so a repeated put replaces, as INSERT OR REPLACE does.
        self._pending: dict[tuple[str, int], _Row] = {}
        self._timer: threading.Timer | None = None
        self._readonly = readonly
        self._conn: sqlite3.Connection | None = (
            _connect_readonly(self.path) if readonly else _connect(self.path)
        )
        # A file no parrot_pandas has migrated yet (user_version 0) holds no answers.
        self._empty = readonly and _user_version(self._conn) == 0
        self._last_flush = clock()

    # -- reading

    def get(self, key: str, sample: int = 0) -> str | None:
        """Return the cached answer for ``key`` and ``sample``, or ``None``.

        Parameters
        ----------
        key : str
            A :func:`request_key`.
        sample : int, default 0
            Which of the ``n`` answers to the same request.

        Returns
        -------
        str or None
        """
        with self._lock:
            conn = self._open_conn()
            row = self._pending.get((key, sample))
            if row is not None:
                return row[2]
            found = conn.execute(
                "SELECT value FROM responses WHERE key = ? AND sample = ?", (key, sample)
            ).fetchone()
        return None if found is None else found[0]

    def get_samples(self, key: str, n: int) -> dict[int, str]:
        """Return the cached answers among samples ``0 .. n-1`` of ``key``.

        Parameters
        ----------
        key : str
            A :func:`request_key`.
        n : int
            Number of samples asked for.

        Returns
        -------
        dict of int to str
            Sample number to answer, in sample order, for the samples that are cached;
            the missing ones are absent (they need not be contiguous).
        """
        return self.get_many([key], n).get(key, {})

    def get_many(self, keys: Sequence[str], n: int = 1) -> dict[str, dict[int, str]]:
        """Look up many keys at once (one query per 500 keys).

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
        found: dict[str, dict[int, str]] = {}
        with self._lock:
            conn = self._open_conn()
            if self._empty:
                return {}
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
            if self._pending:
                wanted = set(unique)
                for (key, sample), row in self._pending.items():
                    if key in wanted and 0 <= sample < n:
                        found.setdefault(key, {})[sample] = row[2]
        return {key: dict(sorted(samples.items())) for key, samples in found.items()}

    # -- writing

    def put(
        self,
        key: str,
        sample: int,
        value: str,
        *,
        model: str | None,
        usage: tuple[int, int] | None = None,
    ) -> None:
        """Cache one answer; it is written with the next batch.

        Parameters
        ----------
        key : str
            A :func:`request_key`.
        sample : int
            Which of the ``n`` answers to the same request (0 for the first).
        value : str
            The answer, as the model returned it.
        model : str
            The model that answered (kept for :func:`cache_info` and :func:`clear_cache`).
        usage : tuple of (int, int), optional
            ``(prompt_tokens, completion_tokens)`` the request cost.

        Raises
        ------
        TypeError
            If ``value`` is not a string.
        sqlite3.OperationalError
            If a batch write this call triggers fails (the file stayed locked for 30 s,
            the disk is full); the answers stay buffered and are retried later.
        """
        if not isinstance(value, str):
            raise TypeError(f"a cached answer must be a str, got {type(value).__name__}")
        if self._readonly:
            raise ValueError(f"the cache {str(self.path)!r} was opened read-only")
        prompt_tokens, completion_tokens = usage if usage is not None else (None, None)
        row: _Row = (key, sample, value, model, prompt_tokens, completion_tokens, time.time())
        with self._lock:
            self._open_conn()
            self._pending[(key, sample)] = row
            if (
                len(self._pending) >= self.flush_size
                or self._clock() - self._last_flush >= self.flush_interval
            ):
                self._flush_locked()
            elif self._timer is None:
                # Without it, the last answers before a long quiet spell (slow requests,
                # the end of a run nobody closes) would wait in memory for the next put.
                self._timer = threading.Timer(self.flush_interval, self._flush_from_timer)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Write every buffered answer now, in one transaction.

        Raises
        ------
        sqlite3.OperationalError
            If the write fails; the answers stay buffered.
        """
        with self._lock:
            if self._conn is not None:
                self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = self._clock()
        if not self._pending:
            return
        assert self._conn is not None
        with _write_transaction(self._conn) as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO responses (key, sample, value, model, prompt_tokens, "
                "completion_tokens, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                self._pending.values(),
            )
        self._pending.clear()

    def _flush_from_timer(self) -> None:
        with self._lock:
            self._timer = None
            if self._conn is None:
                return
            try:
                self._flush_locked()
            except sqlite3.Error as exc:
                # Nobody is there to catch it in this thread; the answers stay buffered and
                # the next put, flush or close tries again.
                warnings.warn(
                    f"parrot_pandas could not write to the cache {str(self.path)!r}: {exc}",
                    RuntimeWarning,
                    stacklevel=1,
                )

    # -- lifecycle

    def close(self) -> None:
        """Write the buffered answers and close the file. Calling it again does nothing."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._conn is None:
                return
            try:
                self._flush_locked()
            finally:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._conn is None

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            conn = self._open_conn()
            stored = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
            new = sum(
                conn.execute(
                    "SELECT 1 FROM responses WHERE key = ? AND sample = ?", pair
                ).fetchone()
                is None
                for pair in self._pending
            )
        return stored + new

    def __repr__(self) -> str:
        if self._conn is None:
            return f"<ResponseCache {str(self.path)!r} (closed)>"
        return f"<ResponseCache {str(self.path)!r} entries={len(self)}>"

    def _open_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"the cache {str(self.path)!r} is closed")
        return self._conn


# --------------------------------------------------------------------------- user helpers


def open_cache(
    setting: bool | str | os.PathLike[str] | None, *, readonly: bool = False
) -> ResponseCache | None:
    """Turn the ``cache=`` option into a cache.

    Parameters
    ----------
    setting : bool, str, os.PathLike or None
        ``True`` for the file at :func:`default_cache_path`, ``False`` or ``None`` for no
        cache, a path for that file.
    readonly : bool, default False
        Only read (for an estimate): the file is opened read-only, never migrated, written
        or created.

    Returns
    -------
    ResponseCache or None
        An open cache the caller must close, or ``None`` when caching is off (or, with
        ``readonly``, when the file does not exist).

    Raises
    ------
    ConfigurationError
        If ``setting`` is none of those, or the file cannot be used as a cache.

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
        return ResponseCache(path, readonly=True) if path.is_file() else None
    return ResponseCache(path)


def _resolve(path: str | os.PathLike[str] | None) -> pathlib.Path:
    return default_cache_path() if path is None else pathlib.Path(path).expanduser()


def _size_bytes(path: pathlib.Path) -> int:
    total = 0
    for file in (path, path.with_name(path.name + "-wal")):
        try:
            total += file.stat().st_size
        except FileNotFoundError:
            pass
    return total


def _from_timestamp(value: float | None) -> datetime.datetime | None:
    if value is None:
        return None
    return datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc).astimezone()


def cache_info(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe a cache file: its size, how many answers it holds and from which models.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The cache file; :func:`default_cache_path` when omitted. A file that does not
        exist is reported empty and is not created.

    Returns
    -------
    dict
        ``path`` (pathlib.Path), ``size_bytes`` (the database plus its write-ahead log),
        ``entries`` (int), ``models`` (model name to number of answers, most first),
        ``oldest`` and ``newest`` (timezone-aware datetimes of the first and last answer,
        or ``None`` when empty).

    Raises
    ------
    ConfigurationError
        If the file exists but is not a parrot_pandas cache.

    Examples
    --------
    >>> cache_info()["entries"]  # doctest: +SKIP
    1234
    """
    resolved = _resolve(path)
    info: dict[str, Any] = {
        "path": resolved,
        "size_bytes": 0,
        "entries": 0,
        "models": {},
        "oldest": None,
        "newest": None,
    }
    if not resolved.exists():
        return info
    with _connected(resolved) as conn:
        entries, oldest, newest = conn.execute(
            "SELECT count(*), min(created), max(created) FROM responses"
        ).fetchone()
        models = conn.execute(
            "SELECT model, count(*) AS n FROM responses GROUP BY model ORDER BY n DESC, model"
        ).fetchall()
    info.update(
        size_bytes=_size_bytes(resolved),
        entries=entries,
        models=dict(models),
        oldest=_from_timestamp(oldest),
        newest=_from_timestamp(newest),
    )
    return info


def clear_cache(
    path: str | os.PathLike[str] | None = None,
    *,
    model: str | None = None,
    older_than: datetime.timedelta | float | None = None,
) -> int:
    """Delete cached answers; with no filter, all of them.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The cache file; :func:`default_cache_path` when omitted. A file that does not
        exist is left uncreated.
    model : str, optional
        Delete only the answers of this model.
    older_than : datetime.timedelta or float, optional
        Delete only the answers cached longer ago than this (a float is seconds).

    Returns
    -------
    int
        The number of answers deleted.

    Raises
    ------
    ConfigurationError
        If ``older_than`` is negative or of the wrong type, or the file is not a
        parrot_pandas cache.

    Examples
    --------
    >>> clear_cache(model="gpt-4o-mini")  # doctest: +SKIP
    120
    >>> clear_cache(older_than=datetime.timedelta(days=30))  # doctest: +SKIP
    0
    """
    if older_than is not None:
        if isinstance(older_than, datetime.timedelta):
            seconds = older_than.total_seconds()
        elif isinstance(older_than, int | float) and not isinstance(older_than, bool):
            seconds = float(older_than)
        else:
            raise ConfigurationError(
                f"older_than must be a timedelta or seconds, got {older_than!r}"
            )
        if seconds < 0:
            raise ConfigurationError(f"older_than must not be negative, got {older_than!r}")
    resolved = _resolve(path)
    if not resolved.exists():
        return 0
    where, params = [], []
    if model is not None:
        where.append("model = ?")
        params.append(model)
    if older_than is not None:
        where.append("created < ?")
        params.append(time.time() - seconds)
    sql = "DELETE FROM responses" + (" WHERE " + " AND ".join(where) if where else "")
    with _connected(resolved) as conn:
        with _write_transaction(conn):
            deleted = conn.execute(sql, params).rowcount
        if deleted:
            # Give the space back: clearing is rare and users clear to free disk.
            _compact(conn)
    return deleted


@contextlib.contextmanager
def _connected(path: pathlib.Path) -> Iterator[sqlite3.Connection]:
    conn = _connect(path)
    try:
        yield conn
    finally:
        conn.close()
