"""``python -m parrot_pandas.testing``: serve the fake server from a shell."""

from __future__ import annotations

from ._server import main

raise SystemExit(main())
