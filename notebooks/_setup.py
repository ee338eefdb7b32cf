"""Where the notebooks send their requests: the one place that decides.

``use_server()`` picks, in this order:

1. The server in the environment, when ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` is set
   (OpenAI, or any OpenAI-compatible server: vLLM, Ollama, llama.cpp, ...). parrot_pandas
   reads both variables itself, so nothing else changes; ``PARROT_PANDAS_MODEL`` names the
   model (default ``parrot_pandas.DEFAULT_MODEL``).
2. Otherwise a real model on this machine: SmolLM2-135M-Instruct through llama.cpp's
   OpenAI-compatible server (``parrot_pandas.local``; ``scripts/quickstart`` installs it).
3. If that is not installed, a stand-in, :class:`parrot_pandas.testing.FakeServer`, in a
   background thread. It does not think: it echoes each prompt back and "extracts" the
   ``key=value`` lines it finds, which is why the sample data carries such lines.

``PARROT_PANDAS_NOTEBOOK_SERVER=local`` or ``=stand-in`` forces the offline choice (the tests
use it). Offline answers go to a throwaway cache file (unless ``PARROT_PANDAS_CACHE`` is set),
never to your real response cache.

The notebooks import this file from their own directory (Jupyter starts the kernel there).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import parrot_pandas

__all__ = ["Server", "use_server"]


@dataclasses.dataclass(frozen=True)
class Server:
    """The server a notebook talks to."""

    base_url: str
    model: str
    kind: str  # "environment", "local model" or "stand-in"

    @property
    def local(self) -> bool:
        """Whether the server runs on this machine, started by the notebook."""
        return self.kind != "environment"

    def __str__(self) -> str:
        return f"model {self.model} at {self.base_url} ({self.kind})"


# Started at most once per kernel, so re-running a notebook's setup cell reuses it; the server
# object is kept too, since a local model server stops when it is garbage-collected.
_local: Server | None = None
_running: object = None


def use_server(name: str = "notebook") -> Server:
    """Use the server in the environment, else start a local one; return which.

    Parameters
    ----------
    name : str
        The notebook's name, used for the offline run's throwaway cache directory.

    Returns
    -------
    Server
        Its base URL, the model the calls will use, and what kind of server it is.
    """
    global _local
    forced = os.environ.get("PARROT_PANDAS_NOTEBOOK_SERVER")
    if _local is not None:
        return _local
    if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
        base_url = os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1")
        return Server(base_url, _model(), "environment")
    _local = _start_local(forced)
    os.environ["OPENAI_BASE_URL"] = _local.base_url
    os.environ["PARROT_PANDAS_MODEL"] = _local.model
    os.environ.setdefault(
        "PARROT_PANDAS_CACHE",
        os.path.join(tempfile.mkdtemp(prefix=f"parrot-{name}-"), "cache.sqlite3"),
    )
    return _local


def _start_local(forced: str | None) -> Server:
    # Both run until the kernel stops (a subprocess tied to it, or a daemon thread).
    global _running
    if forced != "stand-in":
        from parrot_pandas.local import LocalModelError, LocalModelServer

        try:
            server = _running = LocalModelServer().start()
            return Server(server.url, server.model, "local model")
        except LocalModelError as exc:
            if forced == "local":
                raise
            print(f"No local model ({exc}); using the stand-in server.")
    from parrot_pandas.testing import FakeServer

    # Like a real model, the stand-in refuses prompts longer than its context window.
    server = _running = FakeServer(latency=0.05, context_window=128_000).start()
    return Server(server.url, _model(), "stand-in")


def _model() -> str:
    # The rule parrot_pandas documents for a call that names no model.
    return os.environ.get("PARROT_PANDAS_MODEL", parrot_pandas.DEFAULT_MODEL)
