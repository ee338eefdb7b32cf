"""df.llm end to end against a real local HTTP server (parrot_pandas.testing.FakeServer)."""

from __future__ import annotations

import ast
import inspect
import json
import os
import pathlib
import pydoc
import re
import subprocess
import sys
import typing
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pandas as pd
import pytest

import parrot_pandas
from parrot_pandas import APIConnectionError, APIError, ConfigurationError, RowsFailedError
from parrot_pandas._config import RUN_SETTINGS
from parrot_pandas.accessor import _front_door


def test_generate_keeps_input_columns_index_and_order(docs, server):
    out = docs.llm.generate("Say: ${title}", output="said", base_url=server.url)
    assert list(out.columns) == ["title", "text", "said"]
    assert list(out.index) == ["a", "b", "c", "d"]
    assert out.index.name == "doc"
    assert out["said"].tolist() == [
        "echo: Say: Ada",
        "echo: Say: Alan",
        "echo: Say: Grace",
        "echo: Say: Edsger",
    ]
    assert "said" not in docs.columns  # the input is never modified
    facts = out.attrs["llm"]
    assert facts["requests"] == 4 and facts["rows"] == 4 and facts["failed_rows"] == 0


def test_missing_values_skip_the_row_and_give_na(docs, server):
    out = docs.llm.generate("Facts: ${text}", base_url=server.url)
    assert out.loc["d", "output"] is pd.NA
    assert out.loc["a", "output"] == "echo: Facts: name=Ada, year=1815"
    sent = server.stats()["by_prompt"]
    assert len(sent) == 3 and all("None" not in p and "nan" not in p for p in sent)
    assert out.attrs["llm"]["skipped_rows"] == 1


def test_n_samples_are_deduplicated_and_exploded(docs, server):
    out = docs.iloc[:2].llm.generate("Say: ${title}", n=3, temperature=1.0, base_url=server.url)
    # The echo model answers two distinct texts over three samples.
    assert list(out.index) == ["a", "a", "b", "b"]
    assert out.loc["a", "output"].tolist() == ["echo: Say: Ada", "echo (alt): Say: Ada"]


def test_server_that_ignores_n_gets_more_requests(docs, server_factory):
    server = server_factory(honor_n=False)
    out = docs.iloc[:1].llm.generate("Say: ${title}", n=3, base_url=server.url)
    # Three single-choice requests make up the three samples (all identical: one row).
    assert server.stats()["ok"] == 3
    assert out["output"].tolist() == ["echo: Say: Ada"]


def test_identical_prompts_are_sent_once(server):
    df = pd.DataFrame({"t": ["x", "y", "x", "x"]}, index=[5, 5, 6, 7])
    out = df.llm.generate("${t}", base_url=server.url)
    assert server.stats()["ok"] == 2
    assert out["output"].tolist() == ["echo: x", "echo: y", "echo: x", "echo: x"]
    assert list(out.index) == [5, 5, 6, 7]


def test_extract_explodes_objects_with_typed_columns(docs, server):
    out = docs.llm.extract("Facts:\n${text}", {"name": str, "year": int}, base_url=server.url)
    assert list(out.columns) == ["title", "text", "name", "year"]
    assert list(out.index) == ["a", "b", "b", "c", "d"]
    assert out["name"].tolist()[:3] == ["Ada", "Alan", "Alonzo"]
    assert str(out["year"].dtype) == "Int64"
    assert out.loc["c", "name"] is pd.NA  # nothing found: one row, NA fields
    assert out.loc["d", "year"] is pd.NA  # skipped
    assert out.attrs["llm"]["strategy"] == "tools"


def test_extract_with_field_names_and_samples(docs, server):
    out = docs.iloc[:2].llm.extract("Facts:\n${text}", ["name", "year"], n=2, base_url=server.url)
    # Both samples carry the same objects: deduplicated, values as strings.
    assert out["name"].tolist() == ["Ada", "Alan", "Alonzo"]
    assert out["year"].tolist() == ["1815", "1912", "1903"]


def test_multiindex_and_duplicate_labels_are_kept(server):
    index = pd.MultiIndex.from_tuples([("x", 1), ("x", 1), ("y", 2)], names=["k", "v"])
    df = pd.DataFrame(
        {"facts": ["name=A, year=1", "name=B, year=2\nname=C, year=3", "none"]}, index=index
    )
    out = df.llm.extract("${facts}", {"name": str, "year": int}, base_url=server.url)
    assert list(out.index) == [("x", 1), ("x", 1), ("x", 1), ("y", 2)]
    assert out["name"].tolist()[:3] == ["A", "B", "C"]
    assert out.index.names == ["k", "v"]


def test_empty_frame_returns_empty_frame_with_output_columns(server):
    df = pd.DataFrame({"text": pd.Series([], dtype="string")})
    out = df.llm.extract("${text}", ["a", "b"], base_url=server.url)
    assert list(out.columns) == ["text", "a", "b"] and len(out) == 0
    assert server.stats()["requests"] == 0


def test_non_string_values_render_with_str(server):
    df = pd.DataFrame(
        {"n": [1, 2.5], "when": pd.to_datetime(["2024-01-02", "2024-03-04"]), "l": [[1], ["a"]]}
    )
    out = df.llm.generate("${n} ${when} ${l}", base_url=server.url)
    assert out["output"].tolist() == [
        "echo: 1.0 2024-01-02 00:00:00 [1]",
        "echo: 2.5 2024-03-04 00:00:00 ['a']",
    ]


async def test_agenerate_and_aextract_run_on_the_callers_loop(docs, server):
    out = await docs.llm.agenerate("Say: ${title}", base_url=server.url)
    assert out["output"].iloc[0] == "echo: Say: Ada"
    ex = await docs.llm.aextract("${text}", {"name": str}, base_url=server.url)
    assert ex["name"].iloc[0] == "Ada"


# -- failure is normal, loss is not -------------------------------------------------------


@pytest.mark.slow
def test_600_rows_survive_faults_complete_and_correct(server_factory):
    server = server_factory(
        fail_rate=0.05, drop_rate=0.02, malformed_rate=0.05, latency=0.01, seed=7
    )
    df = pd.DataFrame({"facts": [f"name=n{i}, year={1000 + i}" for i in range(600)]})
    out = df.llm.extract("Facts:\n${facts}", {"name": str, "year": int}, base_url=server.url)
    assert len(out) == 600
    assert out["name"].tolist() == [f"n{i}" for i in range(600)]
    assert out["year"].tolist() == [1000 + i for i in range(600)]
    stats = server.stats()
    assert stats["failed"] > 0 and stats["dropped"] > 0 and stats["malformed"] > 0
    facts = out.attrs["llm"]
    assert facts["retries"] == stats["failed"] + stats["dropped"] + stats["malformed"]
    assert facts["requests"] == stats["requests"]


def test_bad_key_fails_at_once_with_server_message_and_no_key(docs, server_factory):
    server = server_factory(api_key="sk-right-key-123456")
    with pytest.raises(APIError) as info:
        docs.llm.generate("${title}", base_url=server.url, api_key="sk-wrong-key-987654")
    assert info.value.status == 401
    assert "sk-wrong-key-987654" not in str(info.value) and "987654" not in repr(info.value)
    assert server.stats()["requests"] == 1  # the setup request only


def test_unknown_model_fails_at_once(docs, server_factory):
    server = server_factory(models=("small",))
    with pytest.raises(APIError, match="does not exist") as info:
        docs.llm.generate("${title}", model="huge", base_url=server.url)
    assert info.value.status == 404
    assert server.stats()["requests"] == 1


def test_unreachable_server_fails_after_retries(docs):
    with pytest.raises(APIConnectionError):
        docs.llm.generate("${title}", base_url="http://127.0.0.1:9/v1", max_retries=1)


def _long_rows() -> pd.DataFrame:
    return pd.DataFrame({"text": ["short", "x" * 4000, "also short"]}, index=[1, 2, 3])


def test_a_row_too_long_fails_alone_and_raise_carries_the_rest(server_factory):
    server = server_factory(context_window=100)
    with pytest.raises(RowsFailedError) as info:
        _long_rows().llm.generate("${text}", base_url=server.url)
    exc = info.value
    assert list(exc.errors.index) == [2]
    assert "maximum context length" in exc.errors.loc[2]
    assert exc.result.loc[1, "output"] == "echo: short"
    assert exc.result.loc[3, "output"] == "echo: also short"
    assert exc.result.loc[2, "output"] is pd.NA


def test_coerce_returns_na_and_llm_error_column(server_factory):
    server = server_factory(context_window=100)
    out = _long_rows().llm.generate("${text}", base_url=server.url, errors="coerce")
    assert out["llm_error"].isna().tolist() == [True, False, True]
    assert out.loc[3, "output"] == "echo: also short"
    assert out.attrs["llm"]["failed_rows"] == 1


def test_first_row_too_long_is_a_row_failure_not_a_run_failure(server_factory):
    server = server_factory(context_window=100)
    df = _long_rows().iloc[[1, 0, 2]]
    out = df.llm.generate("${text}", base_url=server.url, errors="coerce")
    assert out["output"].isna().tolist() == [True, False, False]


# -- the cache ----------------------------------------------------------------------------


def test_rerun_is_served_from_the_cache(docs, server):
    first = docs.llm.extract("${text}", {"name": str, "year": int}, base_url=server.url)
    sent = server.stats()["requests"]
    second = docs.llm.extract("${text}", {"name": str, "year": int}, base_url=server.url)
    assert server.stats()["requests"] == sent  # nothing new was sent
    pd.testing.assert_frame_equal(first, second, check_like=False)
    assert second.attrs["llm"]["cached_rows"] == 3 and second.attrs["llm"]["requests"] == 0
    third = docs.llm.extract(
        "${text}", {"name": str, "year": int}, base_url=server.url, refresh=True
    )
    assert third.attrs["llm"]["requests"] == 3


def test_cache_false_always_sends(docs, server):
    docs.llm.generate("${title}", base_url=server.url, cache=False)
    docs.llm.generate("${title}", base_url=server.url, cache=False)
    assert server.stats()["requests"] == 8


def test_api_key_never_reaches_cache_attrs_or_repr(docs, server_factory, tmp_path):
    key = "sk-secret-key-abcdef123456"
    server = server_factory(api_key=key)
    path = tmp_path / "c.sqlite3"
    out = docs.llm.generate("${title}", base_url=server.url, api_key=key, cache=str(path))
    assert key not in repr(out.attrs) and key not in repr(out)
    for file in tmp_path.iterdir():
        assert key.encode() not in file.read_bytes()


# -- bad input fails before any request ---------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda df, url: df.llm.generate("${missing}", base_url=url), "does not have"),
        (lambda df, url: df.llm.generate(42, base_url=url), "template must be a string"),
        (lambda df, url: df.llm.generate("${title}", output="text", base_url=url), "already exist"),
        (lambda df, url: df.llm.generate("${title}", n=0, base_url=url), "n must be"),
        (lambda df, url: df.llm.generate("${title}", temprature=1, base_url=url), "temperature"),
        (
            lambda df, url: df.llm.generate("${title}", errors="ignore", base_url=url),
            "errors must be",
        ),
        (lambda df, url: df.llm.extract("${title}", [], base_url=url), "empty"),
        (lambda df, url: df.llm.extract("${title}", ["a", "a"], base_url=url), "given twice"),
        (lambda df, url: df.llm.extract("${title}", "question", base_url=url), "question"),
        (lambda df, url: df.llm.extract("${title}", ["title"], base_url=url), "already exist"),
    ],
)
def test_bad_input_raises_before_any_request(docs, server, call, message):
    with pytest.raises(ConfigurationError, match=message):
        call(docs, server.url)
    assert server.stats()["requests"] == 0


def test_missing_column_error_names_missing_and_available(docs, server):
    with pytest.raises(ConfigurationError) as info:
        docs.llm.generate("${titel} ${body}", base_url=server.url)
    text = str(info.value)
    assert (
        "titel" in text and "body" in text and "'title'" in text and "did you mean ${title}" in text
    )


def test_column_names_with_spaces(server):
    df = pd.DataFrame({"source url": ["http://x"], "price $": [3]})
    out = df.llm.generate("See ${source url} for $$${price $}", base_url=server.url)
    assert out["output"].iloc[0] == "echo: See http://x for $3"


# -- structured-output strategies ---------------------------------------------------------

_TYPED = {"name": str, "year": int}


@pytest.mark.parametrize("strategy", ["tools", "json_schema", "json_object", "prompt"])
def test_every_strategy_gives_typed_columns(docs, server, strategy):
    out = docs.llm.extract("Facts:\n${text}", _TYPED, base_url=server.url, structured=strategy)
    assert out["name"].tolist()[:3] == ["Ada", "Alan", "Alonzo"]
    assert str(out["year"].dtype) == "Int64" and out["year"].tolist()[:3] == [1815, 1912, 1903]
    assert out.attrs["llm"]["strategy"] == strategy


@pytest.mark.parametrize(
    ("switches", "chosen"),
    [
        ({"supports_tools": False}, "json_schema"),
        ({"supports_tools": False, "supports_json_schema": False}, "json_object"),
        (
            {"supports_tools": False, "supports_json_schema": False, "supports_json_object": False},
            "prompt",
        ),
    ],
)
def test_auto_falls_back_once_per_run(docs, server_factory, switches, chosen):
    server = server_factory(**switches)
    out = docs.llm.extract("Facts:\n${text}", _TYPED, base_url=server.url, cache=False)
    assert out.attrs["llm"]["strategy"] == chosen
    assert out["year"].tolist()[:3] == [1815, 1912, 1903]
    stats = server.stats()
    # Each refused strategy costs one request, once per run, not once per row.
    assert stats["rejected"] == len(switches) and stats["ok"] == 3


# -- the front door: one declaration of the shared keywords, real signatures, overloads ----

_METHODS = ("generate", "agenerate", "extract", "aextract", "estimate")


def _front_doors() -> list:
    doors = [getattr(parrot_pandas.LLMAccessor, name) for name in _METHODS]
    try:
        from parrot_pandas.dask import DaskLLMAccessor
    except ImportError:  # Dask is optional
        return doors
    return [*doors, DaskLLMAccessor.generate, DaskLLMAccessor.extract]


def _documented(doc: str) -> list[str]:
    """The parameter names a numpydoc Parameters section lists, in order."""
    lines = inspect.cleandoc(doc).splitlines()
    section = lines[lines.index("Parameters") + 2 : lines.index("Returns")]
    names = []
    for line in section:
        if line and not line[0].isspace():
            names += line.split(" : ")[0].split(", ")
    return names


@pytest.mark.parametrize("method", _front_doors(), ids=lambda m: m.__qualname__)
def test_every_front_door_shows_and_documents_its_real_parameters(method):
    signature = inspect.signature(method)
    params = signature.parameters
    for name, default in (("model", None), ("system", None), ("n", 1)):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == default
    assert list(params)[-1] == "options"
    assert params["options"].kind is inspect.Parameter.VAR_KEYWORD
    # Every parameter in the signature is in the docstring's Parameters section, and the
    # run settings are listed from RunConfig's own list.
    shown = [name for name in params if name != "self"]
    documented = [name.lstrip("*") for name in _documented(method.__doc__)]
    assert documented == shown
    assert all(f"``{name}``" in method.__doc__ for name in RUN_SETTINGS)


def test_help_shows_the_shared_parameters():
    text = pydoc.render_doc(parrot_pandas.LLMAccessor.aextract, renderer=pydoc.plaintext)
    assert "model: 'str | None' = None" in text and "n: 'int' = 1" in text
    assert "Samples per row" in text and "chunksize : int, optional" in text


def test_signature_defaults_are_the_ones_used(docs, server_factory):
    server = server_factory(honor_n=False)  # one request per sample
    out = docs.iloc[:1].llm.generate("${title}", base_url=server.url)
    assert out.attrs["llm"]["model"] == parrot_pandas.DEFAULT_MODEL == "gpt-4o-mini"
    assert server.stats()["requests"] == 1  # n=1
    docs.iloc[:1].llm.generate("${title}", base_url=server.url, n=2, cache=False)
    assert server.stats()["requests"] == 3
    assert server.stats()["by_prompt"] == {"Ada": 1} or list(server.stats()["by_prompt"]) == ["Ada"]


def test_a_method_without_options_or_sections_is_refused():
    def no_options(self, template: str) -> None:
        """Nothing.

        Parameters
        ----------
        template : str

        Returns
        -------
        None
        """

    def no_sections(self, template: str, **options: Any) -> None:
        """Nothing documented."""

    with pytest.raises(TypeError, match="options"):
        _front_door(no_options)
    with pytest.raises(TypeError, match="Parameters and a Returns"):
        _front_door(no_sections)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is 3.11+")
@pytest.mark.parametrize(
    ("name", "many"),
    [
        ("generate", Iterator[pd.DataFrame]),
        ("extract", Iterator[pd.DataFrame]),
        ("agenerate", AsyncIterator[pd.DataFrame]),
        ("aextract", AsyncIterator[pd.DataFrame]),
    ],
)
def test_overloads_tell_type_checkers_what_chunksize_returns(name, many):
    method = getattr(parrot_pandas.LLMAccessor, name)
    returns = {}
    for overload in typing.get_overloads(method):
        hints = typing.get_type_hints(overload)
        returns[hints["chunksize"]] = hints["return"]
        # An overload promises nothing the real signature does not take.
        assert set(inspect.signature(overload).parameters) <= set(
            inspect.signature(method).parameters
        )
    assert returns == {
        type(None): pd.DataFrame,
        int: many,
        int | None: pd.DataFrame | many,
    }


# -- public names --------------------------------------------------------------------------

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_NOTEBOOKS = _ROOT / "notebooks"
_BENCHMARKS = _ROOT / "benchmarks"
# A dotted path into the package, as ``importlib.import_module`` or ``client.run`` take it.
_DOTTED = re.compile(r"parrot_pandas(\.\w+)+")


def _private_names(source: str) -> list[str]:
    """The private parrot_pandas names a piece of code imports or reaches for."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("parrot_pandas"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("parrot_pandas."):
            names = [ast.unparse(node)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [match.group(0) for match in _DOTTED.finditer(node.value)]
        else:
            continue
        found += [
            name
            for name in names
            if name.startswith("parrot_pandas")
            and any(part.startswith("_") and not part.startswith("__") for part in name.split("."))
        ]
    return sorted(set(found))


def _notebook_code(path: pathlib.Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    # IPython magics and shell escapes are not Python.
    return "\n".join(
        line for cell in code for line in cell.splitlines() if not line.startswith(("%", "!"))
    )


def test_notebooks_and_benchmarks_use_only_public_names():
    # What users copy from must work with the public names alone (issue 12).
    sources = {
        str(path.relative_to(_ROOT)): path.read_text()
        for folder in (_NOTEBOOKS, _BENCHMARKS)
        for path in sorted(folder.glob("*.py"))
    }
    for path in sorted(_NOTEBOOKS.glob("*.ipynb")):
        sources[str(path.relative_to(_ROOT))] = _notebook_code(path)
    assert any(name.startswith("benchmarks/") for name in sources)
    assert any(name.endswith(".ipynb") for name in sources)
    assert {name: _private_names(text) for name, text in sources.items()} == {
        name: [] for name in sources
    }


@pytest.mark.parametrize(
    ("source", "private"),
    [
        ("from parrot_pandas._config import DEFAULT_MODEL",
         ["parrot_pandas._config.DEFAULT_MODEL"]),
        ("from parrot_pandas import _limits as limits", ["parrot_pandas._limits"]),
        ("import parrot_pandas._cache", ["parrot_pandas._cache"]),
        ("import parrot_pandas\nparrot_pandas._run.prepare",
         ["parrot_pandas._run", "parrot_pandas._run.prepare"]),
        ("from parrot_pandas.testing import _faults", ["parrot_pandas.testing._faults"]),
        ('client.run(import_module, "parrot_pandas.dask._accessor")',
         ["parrot_pandas.dask._accessor"]),
        ("from parrot_pandas import cache_info, __version__", []),
        ("from parrot_pandas.testing import FakeServer", []),
        ('import_module("parrot_pandas")', []),
    ],
)  # fmt: skip
def test_private_names_are_found(source, private):
    assert _private_names(source) == private


def test_the_public_names_are_importable():
    assert set(parrot_pandas.__all__) <= set(dir(parrot_pandas))
    assert not [
        name for name in parrot_pandas.__all__ if name.startswith("_") and name != "__version__"
    ]
    assert "DEFAULT_MODEL" in parrot_pandas.__all__


@pytest.mark.slow
def test_the_front_door_imports_without_docstrings():
    # python -OO drops every docstring; the shared keywords still reach the signatures.
    root = str(pathlib.Path(parrot_pandas.__file__).resolve().parent.parent)
    code = (
        "import inspect, parrot_pandas\n"
        "print(*inspect.signature(parrot_pandas.LLMAccessor.extract).parameters)"
    )
    done = subprocess.run(
        [sys.executable, "-OO", "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": root},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "self", "template", "fields", "chunksize", "model", "system", "n", "options"
    ]  # fmt: skip
