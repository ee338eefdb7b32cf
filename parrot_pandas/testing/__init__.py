"""The test kit: a deterministic local LLM server (moved here from ``testing.py``; split next)."""

from __future__ import annotations

from ._server import (
    FAULTS,
    FakeServer,
    ServerConfig,
    TokenBucket,
    _format_duration,
    main,
    make_app,
)

__all__ = ["FAULTS", "FakeServer", "ServerConfig", "TokenBucket", "main", "make_app"]
_ = _format_duration  # re-exported for tests until the split
