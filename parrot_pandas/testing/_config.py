"""``ServerConfig``: how a :class:`~parrot_pandas.testing.FakeServer` behaves, checked once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ._faults import FAULTS
from ._packing import check_pack_faults

__all__ = ["ServerConfig"]


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a :class:`FakeServer` behaves. Every field has a harmless default.

    Parameters
    ----------
    latency : float
        Seconds to wait before answering each admitted request.
    latency_jitter : float
        Fraction in ``[0, 1]``: each wait is drawn uniformly from
        ``latency * (1 ± latency_jitter)`` (seeded, so runs repeat).
    rpm, tpm : float, optional
        Requests / tokens per minute, enforced with the server's token buckets
        (``_bucket.TokenBucket``). A request costs ``prompt_tokens + (max_tokens or
        max_completion_tokens or 0)`` tokens at admission.
    burst : float
        Bucket capacity in seconds of rate: the buckets hold ``rpm / 60 * burst`` requests
        and ``tpm / 60 * burst`` tokens (at least 1).
    fail_rate, drop_rate, malformed_rate : float
        Probabilities, per admitted request, of answering 500/503 (alternately), of closing
        the connection without a response, and (structured requests only) of answering
        truncated, invalid JSON. Their sum must not exceed 1.
    seed : int
        Seed of the generator behind faults and jitter.
    api_key : str, optional
        When set, requests must carry it, each route as its API does: ``Authorization: Bearer``
        (OpenAI), ``x-api-key`` (Anthropic) or ``api-key`` (Azure). Never echoed.
    models : sequence of str, optional
        Model names the server accepts (others get 404 ``model_not_found``); ``None`` accepts
        any model.
    context_window : int, optional
        Rejects requests whose prompt tokens plus ``max_tokens`` exceed it (400
        ``context_length_exceeded``).
    honor_n : bool
        Return ``n`` choices; when ``False`` always one, as some servers do.
    supports_tools, supports_json_schema, supports_json_object : bool
        When ``False``, requests using ``tools`` / ``response_format`` of that type get a 400
        naming the parameter, as servers without that feature do. On the Anthropic route,
        ``supports_json_schema`` governs ``output_config.format``.
    filtered : sequence of str
        Azure route only: a prompt containing any of these words (any case) is refused by the
        "content filter", Azure's 400 with code ``content_filter``.
    faults : mapping of str to str
        Marker word -> fault (a key of :data:`FAULTS`): a request whose last user message
        contains the word (any case) gets that fault, on every route and every attempt, e.g.
        ``faults={"FILTERME": "content_filter", "BOOM": "server_error"}``. Counted in
        ``stats()["faults"]``.
    pack_faults : mapping of str to float
        Packed requests (several rows, each in a ``<row id="N">`` block) are always answered
        row by row; these spoil the answers at the given rates: ``drop``, ``duplicate``,
        ``unknown``, ``reorder`` and ``truncate`` (see ``_packing.PACK_FAULTS``).
    """

    latency: float = 0.0
    latency_jitter: float = 0.0
    rpm: float | None = None
    tpm: float | None = None
    burst: float = 1.0
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    seed: int = 0
    api_key: str | None = dataclasses.field(default=None, repr=False)
    models: tuple[str, ...] | None = None
    context_window: int | None = None
    honor_n: bool = True
    supports_tools: bool = True
    supports_json_schema: bool = True
    supports_json_object: bool = True
    filtered: tuple[str, ...] = ()
    faults: Mapping[str, str] | tuple[tuple[str, str], ...] = ()
    pack_faults: Mapping[str, float] | tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        faults = dict(self.faults.items() if isinstance(self.faults, Mapping) else self.faults)
        unknown = sorted(set(faults.values()) - set(FAULTS))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; the faults are {sorted(FAULTS)}")
        # Kept as pairs: the config stays hashable and comparable.
        object.__setattr__(self, "faults", tuple(faults.items()))
        object.__setattr__(self, "pack_faults", check_pack_faults(self.pack_faults))
        if isinstance(self.filtered, str):
            object.__setattr__(self, "filtered", (self.filtered,))
        else:
            object.__setattr__(self, "filtered", tuple(self.filtered or ()))
        if isinstance(self.models, str):
            object.__setattr__(self, "models", (self.models,))
        elif self.models is not None:
            object.__setattr__(self, "models", tuple(self.models))
        if self.latency < 0 or not 0 <= self.latency_jitter <= 1:
            raise ValueError("latency must be >= 0 and latency_jitter in [0, 1]")
        for name in ("rpm", "tpm", "context_window"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if self.burst <= 0:
            raise ValueError(f"burst must be positive, got {self.burst!r}")
        rates = (self.fail_rate, self.drop_rate, self.malformed_rate)
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ValueError(
                "fail_rate, drop_rate and malformed_rate must be in [0, 1] and sum to <= 1"
            )
