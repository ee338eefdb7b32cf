"""The sync API inside a real Jupyter kernel: its running loop, ``await``, nest mode and Ctrl-C.

Each test starts its own ipykernel (the interpreter running the tests) and talks to it with
``jupyter_client``; the kernel's code reaches a :class:`FakeServer` started in this process.
"""

from __future__ import annotations

import os
import pathlib
import queue
import sqlite3
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from parrot_pandas.testing import FakeServer

pytestmark = pytest.mark.slow

jupyter_client = pytest.importorskip("jupyter_client")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")

CELL_TIMEOUT = 30.0
_ENV_TO_DROP = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PARROT_PANDAS_MODEL", "PARROT_PANDAS_CACHE")

FRAME = """
import pandas as pd
import parrot_pandas
df = pd.DataFrame({{"text": ["alpha", "beta", None]}}, index=[10, 20, 30])
URL = {url!r}
"""


class Kernel:
    """A started kernel, its manager and a blocking client."""

    def __init__(self, km: Any, kc: Any) -> None:
        self.km = km
        self.kc = kc

    def run(self, code: str, timeout: float = CELL_TIMEOUT) -> tuple[dict[str, Any], str]:
        """Execute a cell; return the reply content and the cell's output as text."""
        outputs: list[dict[str, Any]] = []
        reply = self.kc.execute_interactive(
            code, timeout=timeout, output_hook=outputs.append, allow_stdin=False
        )
        return reply["content"], _text(outputs)

    def ok(self, code: str, timeout: float = CELL_TIMEOUT) -> str:
        """Execute a cell that must succeed; return its output as text."""
        content, text = self.run(code, timeout)
        assert content["status"] == "ok", (
            f"{content.get('ename')}: {content.get('evalue')}\n"
            + "\n".join(content.get("traceback", []))
        )
        return text


def _text(messages: list[dict[str, Any]]) -> str:
    parts = []
    for msg in messages:
        kind, content = msg["header"]["msg_type"], msg["content"]
        if kind == "stream":
            parts.append(content["text"])
        elif kind in ("execute_result", "display_data"):
            parts.append(content["data"].get("text/plain", ""))
        elif kind == "error":
            parts.append(f"{content['ename']}: {content['evalue']}")
    return "\n".join(parts)


@pytest.fixture
def kernel(tmp_path: pathlib.Path) -> Iterator[Kernel]:
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    # A kernelspec for this very interpreter, so the kernel imports the code under test.
    prefix = tmp_path / "jupyter-prefix"
    ipykernel_kernelspec.install(prefix=str(prefix), kernel_name="python3")
    specs = KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")])
    km = KernelManager(kernel_name="python3", kernel_spec_manager=specs)

    env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_DROP}
    env["PARROT_PANDAS_CACHE"] = str(tmp_path / "default-cache.sqlite3")
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    km.start_kernel(env=env, cwd=str(tmp_path))
    kc = km.blocking_client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        k = Kernel(km, kc)
        assert k.ok("import sys; print(sys.executable)").strip() == sys.executable
        yield k
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer(latency=0.05) as srv:
        yield srv


def _assert_loop_untouched(k: Kernel) -> None:
    """nest_asyncio was not applied: asyncio, the kernel's loop and task APIs are the originals."""
    out = k.ok(
        "import asyncio, sys\n"
        "loop = asyncio.get_running_loop()\n"
        "print(asyncio.run.__module__)\n"
        "print(type(loop).run_until_complete.__module__)\n"
        "print(sorted(m for m in sys.modules if m.startswith('nest_asyncio')))\n"
        "await asyncio.sleep(0)\n"
        "print(asyncio.current_task() is not None)\n"
    )
    assert out.split() == ["asyncio.runners", "asyncio.base_events", "[]", "True"], out
    try:
        import sniffio  # noqa: F401
    except ImportError:
        return
    assert k.ok("import sniffio; print(sniffio.current_async_library())").strip() == "asyncio"


def test_sync_generate_in_a_cell(kernel: Kernel, server: FakeServer) -> None:
    kernel.ok(FRAME.format(url=server.url))
    # The precondition that makes this test worth having: the cell runs inside a live loop.
    assert (
        kernel.ok("import asyncio; print(asyncio.get_running_loop().is_running())").strip()
        == "True"
    )
    out = kernel.ok(
        "out = df.llm.generate('Say: ${text}', output='said', base_url=URL, cache=False)\n"
        "print(out['said'].tolist()); print(out.index.tolist())"
    )
    assert "['echo: Say: alpha', 'echo: Say: beta', <NA>]" in out
    assert "[10, 20, 30]" in out
    kernel.ok(
        "qa = df.llm.extract('Pairs: ${text}', fields={'k': str}, base_url=URL, cache=False)\n"
        "assert len(qa) == 3, qa"
    )
    _assert_loop_untouched(kernel)


def test_await_agenerate_in_a_cell(kernel: Kernel, server: FakeServer) -> None:
    kernel.ok(FRAME.format(url=server.url))
    out = kernel.ok(
        "out = await df.llm.agenerate('Say: ${text}', base_url=URL, cache=False, n=3)\n"
        "print(sorted(out['output'].dropna().tolist()))"
    )
    assert (
        "['echo (alt): Say: alpha', 'echo (alt): Say: beta', 'echo: Say: alpha', 'echo: Say: beta']"
        in out
    )
    _assert_loop_untouched(kernel)


def test_nest_mode_in_a_cell(kernel: Kernel, server: FakeServer) -> None:
    kernel.ok(FRAME.format(url=server.url))
    out = kernel.ok(
        "import sys\n"
        "out = df.llm.generate('Say: ${text}', base_url=URL, cache=False, running_loop='nest')\n"
        "print(out['output'].tolist())\n"
        "print(any(m.startswith('nest_asyncio') for m in sys.modules))"
    )
    assert "['echo: Say: alpha', 'echo: Say: beta', <NA>]" in out
    assert out.split()[-1] == "True", "running_loop='nest' did not go through nest_asyncio"
    # The kernel stays usable afterwards, for both sync and async cells.
    assert kernel.ok("1 + 1").strip() == "2"
    again = kernel.ok(
        "out = await df.llm.agenerate('Again: ${text}', base_url=URL, cache=False)\n"
        "print(out['output'].tolist())"
    )
    assert "['echo: Again: alpha', 'echo: Again: beta', <NA>]" in again


def test_ctrl_c_stops_a_run_promptly(
    kernel: Kernel, server: FakeServer, tmp_path: pathlib.Path
) -> None:
    cache = tmp_path / "interrupted.sqlite3"
    with FakeServer(latency=2.0) as slow:
        kernel.ok(
            "import pandas as pd, parrot_pandas\n"
            f"big = pd.DataFrame({{'text': [f'row {{i}}' for i in range(50)]}})\n"
            f"SLOW, FAST, CACHE = {slow.url!r}, {server.url!r}, {str(cache)!r}"
        )
        kc = kernel.kc
        msg_id = kc.execute(
            "out = big.llm.generate('Say: ${text}', base_url=SLOW, max_concurrency=5, cache=CACHE)"
        )
        # Interrupt once the setup request has been answered and workers are in flight, so
        # the run has something to keep and something to abort.
        deadline = time.monotonic() + 10
        while not (slow.stats()["ok"] >= 1 and slow.stats()["in_flight"] >= 1):
            assert time.monotonic() < deadline, f"the run never got going: {slow.stats()}"
            time.sleep(0.02)
        time.sleep(0.3)
        interrupted = time.monotonic()
        kernel.km.interrupt_kernel()
        reply = _wait_for_reply(kc, msg_id, timeout=10)
        stopped_after = time.monotonic() - interrupted
        outputs = _drain_iopub(kc, msg_id, timeout=5)

        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        assert stopped_after < 2.0, f"the cell ended {stopped_after:.2f} s after Ctrl-C"
        assert "KeyboardInterrupt" in _text(outputs)
        assert slow.stats()["ok"] < 50  # it really was stopped, not run to the end

    # Answers that arrived before Ctrl-C were kept: a re-run pays only for what is missing.
    with sqlite3.connect(cache) as db:
        kept = db.execute("SELECT count(*) FROM responses").fetchone()[0]
    assert kept >= 1

    # The kernel is still usable: no stray run thread, plain cells and new runs work.
    assert kernel.ok("1 + 1").strip() == "2"
    threads = kernel.ok("import threading; print([t.name for t in threading.enumerate()])")
    assert "parrot_pandas-run" not in threads
    quick = kernel.ok(
        "small = big.head(3)\n"
        "out = small.llm.generate('Say: ${text}', base_url=FAST, cache=False)\n"
        "print(out['output'].tolist())"
    )
    assert "['echo: Say: row 0', 'echo: Say: row 1', 'echo: Say: row 2']" in quick
    _assert_loop_untouched(kernel)


def _wait_for_reply(kc: Any, msg_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no execute_reply: the cell did not stop after Ctrl-C"
        try:
            msg = kc.get_shell_msg(timeout=remaining)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


def _drain_iopub(kc: Any, msg_id: str, timeout: float) -> list[dict[str, Any]]:
    """The cell's iopub messages, up to its idle status."""
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return messages
