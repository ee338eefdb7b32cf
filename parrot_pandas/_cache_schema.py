"""The cache file's format: whose file it is, its numbered migrations, and opening it.

A cache file is ours when its header carries :data:`APPLICATION_ID` (``PRAGMA application_id``),
or when it is a file written before that mark existed (schema version 1 or 2 with exactly our
``responses`` table), or when it is empty. Anything else is someone else's database, passed as
``cache=`` by mistake: it is refused before anything is written to it, not even the switch to
WAL mode. Whose file it is is decided from a read-only look that leaves no trace on disk.

``PRAGMA user_version`` records how many of the numbered functions in ``_MIGRATIONS`` have
run; opening a file for writing runs the missing ones, each in its own transaction.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from .errors import ConfigurationError

__all__ = ["APPLICATION_ID", "compact", "connect", "write_transaction"]

# "parr": marks a file as a parrot_pandas cache (bytes 68-71 of the SQLite header).
APPLICATION_ID = 0x70617272
# How long opening a file waits for another process's write lock (a migration, the WAL switch).
OPEN_TIMEOUT_S = 30.0
_COLUMNS = ("key", "sample", "value", "model", "prompt_tokens", "completion_tokens", "created")
# Schema versions written before files carried APPLICATION_ID.
_UNMARKED_VERSIONS = (1, 2)
# Every name the migrations create in sqlite_master, those of a step half done included.
_OUR_NAMES = frozenset(
    {"responses", "responses_v2", "responses_model", "responses_created", "batches"}
    | {"sqlite_autoindex_responses_1", "sqlite_autoindex_responses_v2_1"}
    | {"sqlite_autoindex_batches_1"}
)
_SQLITE_MAGIC = b"SQLite format 3\x00"
_FIX = "pass cache=False, or cache='another/path.sqlite3'"


# --------------------------------------------------------------------------- migrations

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
def _m003_mark_as_ours(conn: sqlite3.Connection) -> None:
    # From here on a file says whose it is, so a foreign database is never mistaken for ours.
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")


@_migration
def _m004_batches(conn: sqlite3.Connection) -> None:
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


@_migration
def _m005_batch_owner(conn: sqlite3.Connection) -> None:
    # Which process is submitting a part ("host:pid"), so a second process running the same
    # call waits for that submission instead of making its own (parrot_pandas._batch_run).
    conn.execute("ALTER TABLE batches ADD COLUMN owner TEXT")


def _user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction, rolled back if the body raises."""
    # IMMEDIATE takes the write lock up front, where the busy timeout applies; a deferred
    # transaction that has read first can fail with SQLITE_BUSY when it upgrades.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # A failed COMMIT (disk full) can leave the transaction open: end it either way.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    version = _user_version(conn)
    migrated = False
    for number in range(version + 1, len(_MIGRATIONS) + 1):
        with write_transaction(conn):
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
        compact(conn)


def compact(conn: sqlite3.Connection) -> None:
    """Give free pages back to the disk, if no other process is in the way right now."""
    try:
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.OperationalError:
        pass  # another process mid-write: the file keeps its free pages for later rows


# --------------------------------------------------------------------------- whose file


def _inspect(path: pathlib.Path) -> str:
    """``"missing"``, ``"empty"`` (ours to initialise) or ``"ours"``; raises for anything else.

    Reads without writing: a database in WAL mode that nobody has open is read as immutable,
    so not even the ``-wal`` and ``-shm`` files a reader would create appear beside it.
    """
    if pathlib.Path(f"{path}-wal").exists():
        # Open somewhere in WAL mode (or left so by a crash). Not read through a descriptor of
        # our own: closing any descriptor of a file drops every POSIX lock this process holds
        # on it, and a connection of another thread may hold some (SQLite's "how to corrupt"
        # 2.2; seen as SQLITE_IOERR_SHORT_READ with Dask partitions on threads). A locking
        # read checks the file instead.
        if not path.exists():
            return "missing"
        immutable = False
    else:
        # No -wal: no connection of this process has the file open (ours are all in WAL mode,
        # and connect() sets a file up one caller at a time), so a descriptor is safe here.
        try:
            with open(path, "rb") as file:
                header = file.read(100)
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the cache file {str(path)!r}: {exc.strerror or exc}; {_FIX}"
            ) from None
        if not header:
            return "empty"
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise ConfigurationError(
                f"the cache file {str(path)!r} is not an SQLite database (a damaged cache, or "
                f"another kind of file); delete it if it is a damaged cache, or {_FIX}"
            )
        immutable = header[18] == 2  # WAL mode, and nobody has it open
    app_id, version, tables, columns = _facts(path, immutable=immutable)
    ours = app_id == APPLICATION_ID or (
        app_id == 0 and version in _UNMARKED_VERSIONS and columns == _COLUMNS
    )
    if not ours and immutable and app_id in (0, APPLICATION_ID) and set(tables) <= _OUR_NAMES:
        # "Nobody has it open" was a guess: another process (a Dask worker starting at the
        # same moment) may be setting the file up, and an immutable read ignores its locks and
        # log, so it can see a half-written file. A file that holds nothing but our names is
        # read again with locks before it is called foreign (a foreign one is never touched).
        app_id, version, tables, columns = _facts(path, immutable=False)
        ours = app_id == APPLICATION_ID or (
            app_id == 0 and version in _UNMARKED_VERSIONS and columns == _COLUMNS
        )
    if not ours:
        if app_id == 0 and version == 0 and not tables:
            return "empty"  # a new file another process is just setting up, say
        raise ConfigurationError(
            f"{str(path)!r} is an SQLite database that is not a parrot_pandas cache; it was "
            f"left untouched. Point cache= at a file of its own: {_FIX}"
        )
    latest = len(_MIGRATIONS)
    if version > latest:
        raise ConfigurationError(
            f"the cache file {str(path)!r} was written by a newer parrot_pandas (schema "
            f"version {version}, this one knows {latest}); upgrade parrot_pandas, or {_FIX}"
        )
    # Later migrations may add columns, never take ours away.
    if version > 0 and not set(_COLUMNS) <= set(columns):
        raise ConfigurationError(
            f"the cache file {str(path)!r} is damaged (its responses table is missing or "
            f"altered); delete it, or {_FIX}"
        )
    return "ours"


def _facts(path: pathlib.Path, *, immutable: bool) -> tuple[int, int, list[str], tuple[str, ...]]:
    """The file's application id, schema version, tables and ``responses`` columns."""
    try:
        conn = _connect_readonly(path, immutable=immutable)
        try:
            # One read transaction, so the four facts come from one snapshot: read statement by
            # statement, another process migrating the file in between showed version 4 with no
            # mark, and the reader called its own cache foreign (four Dask workers, CI).
            conn.execute("BEGIN")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = _user_version(conn)
            tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
            columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(responses)"))
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _unusable(path, exc) from None
    return app_id, version, tables, columns


def _unusable(path: pathlib.Path, exc: sqlite3.Error) -> ConfigurationError:
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith("SQLITE_READONLY") or name.startswith("SQLITE_CANTOPEN"):
        return ConfigurationError(
            f"cannot write the cache file {str(path)!r} or its folder ({exc}); make both "
            f"writable, or {_FIX}"
        )
    if name.startswith("SQLITE_BUSY"):
        return ConfigurationError(
            f"the cache file {str(path)!r} stayed locked by another process for "
            f"{OPEN_TIMEOUT_S:g} s ({exc}); try again when it is done, or {_FIX}"
        )
    return ConfigurationError(
        f"cannot use the cache file {str(path)!r}: {exc} (a damaged cache?); delete it if it "
        f"is a damaged cache, or {_FIX}"
    )


# --------------------------------------------------------------------------- connections


def connect(
    path: pathlib.Path, *, readonly: bool = False, busy_timeout: float = OPEN_TIMEOUT_S
) -> sqlite3.Connection | None:
    """Open a cache file, after checking it is ours; for writing, migrated and in WAL mode.

    Parameters
    ----------
    path : pathlib.Path
    readonly : bool
        Open for reading only: nothing is created, migrated or switched. ``None`` is returned
        when the file does not exist or holds no cache yet.
    busy_timeout : float
        Seconds a statement of the returned connection waits for another process's lock.

    Raises
    ------
    ConfigurationError
        Naming ``path`` and the fix: a file that is not a database, a damaged one, a database
        that is not a parrot_pandas cache (left untouched), one from a newer version, or a file
        (or folder) that cannot be written.
    """
    # One caller at a time in this process checks and sets up a file (see _inspect).
    with _SETTING_UP:
        return _open(path, readonly=readonly, busy_timeout=busy_timeout)


_SETTING_UP = threading.Lock()


def _new_lock_in_child() -> None:
    # A fork while another thread held the lock would leave it held for good in the child.
    global _SETTING_UP
    _SETTING_UP = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def _open(path: pathlib.Path, *, readonly: bool, busy_timeout: float) -> sqlite3.Connection | None:
    state = _inspect(path)
    if readonly:
        if state in ("missing", "empty"):
            return None
        try:
            conn = _connect_readonly(path, immutable=False)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000):d}")
        except sqlite3.Error as exc:
            raise _unusable(path, exc) from None
        return conn
    if state != "missing" and not os.access(path, os.W_OK):
        raise ConfigurationError(
            f"the cache file {str(path)!r} is read-only; make it writable (chmod u+w), or {_FIX}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot create the folder of the cache file {str(path)!r}: "
            f"{exc.strerror or exc}; {_FIX}"
        ) from None
    try:
        conn = open_plain(path, busy_timeout=OPEN_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise _unusable(path, exc) from None
    try:
        _enable_wal(conn)
        # NORMAL in WAL mode stays consistent after a crash or power loss; it can only
        # lose the last commits on power loss, which a cache can afford.
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000):d}")
    except sqlite3.Error as exc:
        conn.close()
        raise _unusable(path, exc) from None
    except BaseException:
        conn.close()
        raise
    return conn


def open_plain(path: pathlib.Path, *, busy_timeout: float) -> sqlite3.Connection:
    """Another connection to a file :func:`connect` has already checked and migrated."""
    # isolation_level=None: we issue BEGIN/COMMIT ourselves (see write_transaction).
    # check_same_thread=False: connections are used from the cache's writer thread and from
    # whichever thread runs the event loop; the cache serialises every use.
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000):d}")
    return conn


def _connect_readonly(path: pathlib.Path, *, immutable: bool) -> sqlite3.Connection:
    uri = pathlib.Path(os.path.abspath(path)).as_uri() + (
        "?immutable=1" if immutable else "?mode=ro"
    )
    return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)


def _enable_wal(conn: sqlite3.Connection) -> None:
    if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        return
    # Switching a fresh file to WAL fails at once with "database is locked", without
    # waiting for the busy timeout, while another process opening the same new file
    # holds a lock; two notebooks started together hit this.
    deadline = time.monotonic() + OPEN_TIMEOUT_S
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
