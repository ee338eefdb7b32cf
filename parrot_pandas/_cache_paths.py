"""Where ``cache=True`` keeps its file: ``$PARROT_PANDAS_CACHE`` or the platform's cache folder."""

from __future__ import annotations

import os
import pathlib
import sys

__all__ = ["CACHE_ENV_VAR", "default_cache_path"]

CACHE_ENV_VAR = "PARROT_PANDAS_CACHE"
_APP_DIR = "parrot_pandas"
_FILE_NAME = "responses.sqlite3"


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
