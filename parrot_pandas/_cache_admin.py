"""Looking after a cache file by hand: :func:`cache_info` and :func:`clear_cache`."""

from __future__ import annotations

import datetime
import os
import pathlib
import time
from typing import Any

from ._cache_paths import default_cache_path
from ._cache_schema import compact, connect, write_transaction
from .errors import ConfigurationError

__all__ = ["cache_info", "clear_cache"]


def cache_info(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe a cache file: its size, how many answers it holds and from which models.

    Parameters
    ----------
    path : str or os.PathLike, optional
        The cache file; the default cache (``$PARROT_PANDAS_CACHE`` or the user cache
        directory) when omitted. The file is only read: one that does not exist is reported
        empty and is not created.

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
        If the file exists but is not a parrot_pandas cache, or is damaged.

    Examples
    --------
    >>> import parrot_pandas
    >>> parrot_pandas.cache_info()["entries"]  # doctest: +SKIP
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
    conn = connect(resolved, readonly=True)
    if conn is None:
        info["size_bytes"] = _size_bytes(resolved)
        return info
    try:
        entries, oldest, newest = conn.execute(
            "SELECT count(*), min(created), max(created) FROM responses"
        ).fetchone()
        models = conn.execute(
            "SELECT model, count(*) AS n FROM responses GROUP BY model ORDER BY n DESC, model"
        ).fetchall()
    finally:
        conn.close()
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
        The cache file; the default cache when omitted. A file that does not exist is left
        uncreated.
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
        parrot_pandas cache (it is then left untouched), is damaged or read-only.

    Examples
    --------
    >>> import datetime, parrot_pandas
    >>> parrot_pandas.clear_cache(model="gpt-4o-mini")  # doctest: +SKIP
    120
    >>> parrot_pandas.clear_cache(older_than=datetime.timedelta(days=30))  # doctest: +SKIP
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
    conn = connect(resolved)
    assert conn is not None
    try:
        with write_transaction(conn):
            deleted = conn.execute(sql, params).rowcount
        if deleted:
            # Give the space back: clearing is rare and users clear to free disk.
            compact(conn)
    finally:
        conn.close()
    return deleted


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
