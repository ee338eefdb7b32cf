"""The gallery notebooks run top to bottom in a real kernel: offline, and against a server
named by the environment."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import nbformat
import pytest

# The quickstart's test owns these: the variables that would send a notebook elsewhere, and
# how a cell's outputs become text.
from test_notebook import _ENV_TO_DROP, _text

_DROP = (*_ENV_TO_DROP, "PARROT_PANDAS_PROVIDER")
NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
GALLERY = ("summarize", "sentiment", "qa_pairs", "dask")

Execute = Callable[..., dict[str, str]]


@pytest.mark.parametrize("name", GALLERY)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: cell {cell.id!r} was committed with outputs"
            assert cell.execution_count is None, f"{name}: cell {cell.id!r} has a count"


@pytest.fixture(scope="module")
def kernelspec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A "python3" kernelspec for this very interpreter, found first through JUPYTER_PATH."""
    ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")
    pytest.importorskip("nbclient")
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    ipykernel_kernelspec.install(prefix=str(prefix), kernel_name="python3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        yield


@pytest.fixture
def execute(kernelspec: None, tmp_path: pathlib.Path) -> Execute:
    """Run a gallery notebook; return each code cell's outputs as text, by cell id."""
    from nbclient import NotebookClient

    def run(name: str, **env_vars: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _DROP}
        env["PARROT_PANDAS_CACHE"] = str(tmp_path / f"{name}.sqlite3")
        env["IPYTHONDIR"] = str(tmp_path / "ipython")  # no user profile or startup files
        env.setdefault("PARROT_PANDAS_NOTEBOOK_SERVER", "stand-in")
        env.update(env_vars)

        path = NOTEBOOKS / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb,
            kernel_name="python3",
            timeout=60,
            startup_timeout=60,
            resources={"metadata": {"path": str(NOTEBOOKS)}},  # where _setup.py is
        )
        client.execute(env=env)

        texts: dict[str, str] = {}
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"{name}: {cell.id!r} raised {errors[0].ename}: {errors[0].evalue}"
            stderr = "".join(
                o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stderr"
            )
            assert "Warning" not in stderr, f"{name}: {cell.id!r} warned: {stderr}"
            texts[cell.id] = _text(cell.outputs)
        return texts

    return run


def _counts(text: str) -> dict[str, int]:
    """``label   count`` lines of a printed Series."""
    return {m[0]: int(m[1]) for m in re.findall(r"^(\S+)\s+(\d+)\s*$", text, re.M)}


@pytest.mark.slow
def test_summarize(execute: Execute) -> None:
    out = execute("summarize")
    assert re.search(r"at http://127\.0\.0\.1:\d+/v1 \(stand-in\)", out["setup"])

    # Every release with text got a summary (the republished one shares its answer): the
    # stand-in's echo fits max_tokens=100 (an answer cut at max_tokens would be a row error).
    assert out["generate"].count("echo: ") == 5
    assert re.search(r"^PR-106\s+(<NA>|NaN)\s*$", out["generate"], re.M)  # under embargo

    # The estimate and the run agree: six rows, one skipped, one duplicate sent once.
    compare = out["compare"]
    for key, value in (("rows", 6), ("skipped_rows", 1), ("requests", 4)):
        assert re.search(rf"^{key}\s+{value}\s+{value}\s*$", compare, re.M), compare
    assert re.search(r"^completion_tokens\s+400\s+\d+\s*$", compare, re.M)  # 4 x max_tokens

    # Asking again finds everything in the cache: nothing to send, nothing to pay.
    assert _counts(out["again"]) == {"rows": 6, "cached_rows": 5, "requests": 0}
    assert re.search(r"^cost\s+0\.0\s*$", out["again"], re.M)

    # batch=True against the local test server: live and batch side by side, then both runs;
    # the same summaries, one batch, three of four requests at half price.
    assert re.search(
        r"^batch\s+4\s+\d+\s+400\s+[\d.e-]+\s+within 24 h\s*$", out["batch-modes"], re.M
    )
    assert "same summaries: True" in out["batch-run"]
    assert re.search(r"batches: \['batch_\w+'\]", out["batch-run"])
    assert "saved: 37%" in out["batch-run"]


@pytest.mark.slow
def test_sentiment(execute: Execute) -> None:
    out = execute("sentiment")
    assert "(stand-in)" in out["setup"]

    # A closed choice comes back as a category holding exactly the choices, in order.
    assert "['POSITIVE', 'NEUTRAL', 'NEGATIVE']" in out["dtypes"]
    assert re.search(r"^sentiment\s+category\s*$", out["dtypes"], re.M)
    assert re.search(r"^confidence\s+Float64\s*$", out["dtypes"], re.M)

    counts = _counts(out["counts"])
    assert list(counts) == ["POSITIVE", "NEUTRAL", "NEGATIVE"]
    assert counts == {"POSITIVE": 3, "NEUTRAL": 3, "NEGATIVE": 2}

    # The review without text was not sent; the unsure labels are found by index.
    assert re.search(r"^9\s+Toaster T3(\s+(NaN|<NA>)){3}\s*$", out["extract"], re.M)
    unsure = re.findall(r"^(\d+)\s+\S+ \S+\s+NEUTRAL\s+0\.\d+\s*$", out["review"], re.M)
    assert unsure == ["2", "8"]

    # Four reviews per request: the setup review alone, then packs of 4 and 3; same labels.
    assert "3 requests for 8 reviews (2 packed), 0 reviews asked again" in out["packed"]
    assert "same label as one review per request: 8 of 8" in out["packed"]
    # The cache holds reviews, not packs: another rows_per_request sends nothing.
    assert "requests sent: 0" in out["packed-cache"]


@pytest.mark.slow
def test_qa_pairs(execute: Execute) -> None:
    out = execute("qa_pairs")
    assert "(stand-in)" in out["setup"]
    assert "Visa, Mastercard, PayPal and Apple Pay" in out["extract"]  # commas kept

    # Exploded one row per pair, joined back by index: articles without pairs count zero.
    rows = re.findall(r"^(\d+)\s+.+?\s+(\d+)\s*$", out["join"], re.M)
    pairs = {int(article): int(count) for article, count in rows}
    assert pairs == {201: 2, 202: 3, 203: 1, 204: 0, 205: 0, 206: 2}

    # The chunked write repeats the same call: all from the cache, and all rows saved.
    assert "requests sent: 0, rows from the cache: 5" in out["write"]
    assert out["write"].count(" rows written") == 3  # chunksize=2 over six articles
    kind = "parquet" if importlib.util.find_spec("pyarrow") is not None else "csv"
    assert re.search(rf"^10 rows read back from \S+ \({kind}\)$", out["read"], re.M)


@pytest.mark.slow
def test_server_from_the_environment(execute: Execute, server_factory) -> None:
    # A server that insists on its key, and a model without a known price (a local model).
    server = server_factory(api_key="sk-gallery-test")
    out = execute(
        "summarize",
        OPENAI_BASE_URL=server.url,
        OPENAI_API_KEY="sk-gallery-test",
        PARROT_PANDAS_MODEL="my-local-model",
    )
    assert f"model my-local-model at {server.url} (environment)" in out["setup"]
    assert server.stats()["ok"] == 4
    # Unknown price: cost is None before and after, never a guess.
    assert re.search(r"^cost\s+None\s+None\s*$", out["compare"], re.M)
    assert "sk-gallery-test" not in "".join(out.values())


@pytest.mark.slow
def test_dask(execute: Execute) -> None:
    pytest.importorskip("dask.distributed")
    out = execute("dask")
    assert "name    string" in out["meta"] and "year     Int64" in out["meta"]
    assert "40 rows; 40 years in range" in out["compute"]
