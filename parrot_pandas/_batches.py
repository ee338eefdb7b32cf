"""See and cancel this project's provider batches: :func:`list_batches`, :func:`cancel_batches`.

The batch records ``batch=True`` writes into the cache database say which batches this project
submitted (Anthropic's batches carry no metadata, so the account's list cannot tell). These
functions read them, ask the provider for a batch's state when told to, and cancel.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Iterable
from typing import Any

import pandas as pd

from ._batch import BatchClient
from ._batch_run import Record, Records, record_state
from ._cache import open_cache
from ._config import RunConfig
from ._runner import run_sync
from .errors import ConfigurationError
from .providers import provider_for
from .providers._batch import BatchStatus

__all__ = ["cancel_batches", "list_batches"]

_COLUMNS = ["batch_id", "provider", "base_url", "model", "state", "requests", "created", "updated"]
# What redact_url puts in place of a secret in the base URL a record keeps.
_REDACTED = "***"
# A record in one of these states needs nothing more from the provider.
_FINAL = ("collected", "ended:completed", "ended:failed", "ended:expired", "ended:cancelled")


def list_batches(
    cache: bool | str | os.PathLike[str] = True,
    *,
    every: bool = False,
    refresh: bool = False,
    **connection: Any,
) -> pd.DataFrame:
    """This project's outstanding provider batches, from the cache database's records.

    Parameters
    ----------
    cache : bool or path, default True
        The cache file the batch runs used (``True``: the default one).
    every : bool, default False
        Also list batches that have ended and whose answers were read.
    refresh : bool, default False
        Ask the provider for each listed batch's state now (needs its API key, from
        ``api_key=`` or the provider's environment variable) and update the records.
    **connection
        ``api_key``, ``api_version``, ``base_url``, ``provider``: how to reach the provider
        when refreshing. ``base_url`` and ``provider`` default to the record's; a recorded
        base URL is stored with its secrets redacted (``***``), so a gateway that carries
        its key in the URL needs ``base_url=`` again.

    Returns
    -------
    pandas.DataFrame
        One row per batch: ``batch_id``, ``provider``, ``base_url``, ``model``, ``state``
        (``submitting``, ``validating``, ``running``, ``cancelling``, ``ended:<outcome>``, or
        ``collected`` once its answers are in the cache), ``requests``, ``created`` and
        ``updated`` (UTC).

    Raises
    ------
    ConfigurationError
        ``cache`` is not a usable cache file, a refresh has no API key, or a recorded base
        URL had a secret redacted and no ``base_url=`` was given.

    Examples
    --------
    >>> parrot_pandas.list_batches(refresh=True)  # doctest: +SKIP
    """
    records = _records(cache)
    try:
        chosen = [r for r in records.all() if every or r.state not in _FINAL]
        if refresh:
            chosen = _on_provider(records, chosen, connection, cancel=False)
        return _frame(chosen)
    finally:
        records.close()


def cancel_batches(
    batch_ids: Iterable[str] | None = None,
    cache: bool | str | os.PathLike[str] = True,
    **connection: Any,
) -> pd.DataFrame:
    """Ask the provider to cancel this project's outstanding batches.

    What already ran stays paid for and readable: re-running the call that submitted a
    cancelled batch reads its answers and sends the rest again.

    Parameters
    ----------
    batch_ids : iterable of str, optional
        The batches to cancel; by default every outstanding one (see :func:`list_batches`).
    cache : bool or path, default True
        The cache file the batch runs used.
    **connection
        ``api_key``, ``api_version``, ``base_url``, ``provider``: how to reach the provider,
        as for :func:`list_batches`.

    Returns
    -------
    pandas.DataFrame
        The cancelled batches, as :func:`list_batches` shows them (``state`` is usually
        ``cancelling`` at first).

    Raises
    ------
    ConfigurationError
        A batch id that is not one of this project's, no API key, or a recorded base URL
        had a secret redacted and no ``base_url=`` was given.
    APIError
        The provider refused to cancel.
    """
    records = _records(cache)
    try:
        known = [r for r in records.all() if r.batch_id]
        if batch_ids is None:
            chosen = [r for r in known if r.state not in _FINAL]
        else:
            wanted = list(dict.fromkeys(batch_ids))
            by_id = {r.batch_id: r for r in known}
            unknown = [b for b in wanted if b not in by_id]
            if unknown:
                raise ConfigurationError(
                    f"batch(es) {unknown} are not among this project's batch records in the "
                    "cache; see parrot_pandas.list_batches(every=True)"
                )
            chosen = [by_id[b] for b in wanted]
        return _frame(_on_provider(records, chosen, connection, cancel=True))
    finally:
        records.close()


def _records(cache: Any) -> Records:
    opened = open_cache(cache)
    if opened is None:
        raise ConfigurationError("batch records live in the cache: pass cache=True or a path")
    path = opened.path
    opened.close()  # opening ran the migrations: the batches table exists
    return Records(path)


def _on_provider(
    records: Records, chosen: list[Record], connection: dict[str, Any], *, cancel: bool
) -> list[Record]:
    connection = dict(connection)
    provider = connection.pop("provider", None)
    base_url = connection.pop("base_url", None)
    if base_url is None:
        # Checked for every record before the first call: never send a "***" URL.
        redacted = sorted({r.base_url for r in chosen if r.batch_id and _REDACTED in r.base_url})
        if redacted:
            raise ConfigurationError(
                f"the recorded base URL {redacted[0]!r} had a secret redacted (secrets are "
                "never stored), so it cannot be called; pass base_url= with the full URL "
                "(the one the batch run used)"
            )

    async def go() -> list[Record]:
        out = []
        for record in chosen:
            if not record.batch_id:
                out.append(record)
                continue
            config = RunConfig.from_options(
                model=record.model or "batch",
                provider=provider or record.provider,
                base_url=base_url or record.base_url,
                **connection,
            )
            async with BatchClient(provider_for(config), secret=config.api_key) as client:
                status: BatchStatus
                if cancel:
                    status = await client.cancel(record.batch_id)
                else:
                    # Not retrieve(): a rejected batch is a state to show here, not an error.
                    request = client.protocol.retrieve_request(record.batch_id)
                    status = client.protocol.read_status(await client.call(request))
            now = datetime.datetime.now(datetime.timezone.utc).timestamp()
            state = record_state(status)
            records.update(
                record.provider,
                record.base_url,
                record.digest,
                state,
                now,
                batch_id=record.batch_id,
            )
            out.append(_replace(record, state, now))
        return out

    return run_sync(go)


def _replace(record: Record, state: str, now: float) -> Record:
    return dataclasses.replace(record, state=state, updated=now)


def _frame(chosen: list[Record]) -> pd.DataFrame:
    def when(t: float) -> pd.Timestamp:
        return pd.Timestamp(t, unit="s", tz="UTC")

    rows = [
        {
            "batch_id": r.batch_id,
            "provider": r.provider,
            "base_url": r.base_url,
            "model": r.model,
            "state": r.state,
            "requests": len(r.custom_ids),
            "created": when(r.created),
            "updated": when(r.updated),
        }
        for r in chosen
    ]
    return pd.DataFrame(rows, columns=_COLUMNS)
