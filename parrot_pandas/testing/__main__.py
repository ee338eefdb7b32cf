"""The command line: ``python -m parrot_pandas.testing --port 0 --latency 0.2 --rpm 1200``.

Prints the base URL on one line once the server listens, and serves until SIGTERM or Ctrl-C.
Benchmarks and tests start the server this way to run it in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

from ._config import ServerConfig
from ._faults import FAULTS
from ._server import FakeServer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parrot_pandas.testing",
        description="Serve a deterministic OpenAI-compatible API for tests and benchmarks. "
        "Prints the base URL on one line once listening; stops on SIGTERM or Ctrl-C.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--latency-jitter", type=float, default=0.0, help="fraction of latency")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute limit")
    p.add_argument("--tpm", type=float, default=None, help="tokens per minute limit")
    p.add_argument("--burst", type=float, default=1.0, help="bucket size, in seconds of rate")
    p.add_argument("--fail-rate", type=float, default=0.0, help="share of 500/503 answers")
    p.add_argument("--drop-rate", type=float, default=0.0, help="share of dropped connections")
    p.add_argument("--malformed-rate", type=float, default=0.0, help="share of invalid JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="require this bearer key")
    p.add_argument("--models", nargs="+", default=None, help="accepted model names")
    p.add_argument("--context-window", type=int, default=None, help="max prompt+completion")
    yes_no = argparse.BooleanOptionalAction
    p.add_argument("--honor-n", action=yes_no, default=True)
    p.add_argument("--supports-tools", action=yes_no, default=True)
    p.add_argument("--supports-json-schema", action=yes_no, default=True)
    p.add_argument("--supports-json-object", action=yes_no, default=True)
    p.add_argument("--filtered", nargs="+", default=(), help="words Azure's filter refuses")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="WORD=FAULT",
        help=f"fail prompts containing WORD with FAULT, one of {', '.join(sorted(FAULTS))}",
    )
    return p


async def _serve(server: FakeServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
    async with server:
        print(server.url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server from the command line (``python -m parrot_pandas.testing --help``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status, 0 after SIGTERM or Ctrl-C.
    """
    args = vars(_parser().parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    args["faults"] = dict(pair.partition("=")[::2] for pair in args.pop("fault"))
    server = FakeServer(ServerConfig(**args), host=host, port=port)
    try:
        asyncio.run(_serve(server))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
