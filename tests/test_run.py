"""_run: prepare (every check before a request) and Run.execute / Run.chunks on a real server."""

from __future__ import annotations

import pandas as pd
import pytest

from parrot_pandas import ConfigurationError, RowsFailedError
from parrot_pandas._events import Event, RowsDone, RowsFailed, RowsSkipped, RunFinished, RunStarted
from parrot_pandas._limits import RateBudget
from parrot_pandas._run import Run, RunSpec, prepare

KEY = "sk-run-test-key-0123456789"


def _spec(template: str = "${title}", **changes: object) -> RunSpec:
    """A spec with a key, so prepare's own checks are what a test sees."""
    options = {"api_key": KEY, **changes.pop("options", {})}  # type: ignore[dict-item]
    return RunSpec(template, options=options, **changes)  # type: ignore[arg-type]


# -- prepare: every check before a request -------------------------------------------------


def test_generate_spec_gives_a_scalar_run_with_one_text_field(docs):
    run = prepare(docs, _spec(output="said", model="m", system="be brief", n=2))
    assert isinstance(run, Run) and run.scalar
    assert [f.name for f in run.fields] == ["said"]
    assert run.frame is docs  # the input itself; never copied, never modified
    assert (run.config.model, run.config.system, run.config.n) == ("m", "be brief", 2)
    assert run.plan.strategy is None
    assert run.template.columns == ("title",)


@pytest.mark.parametrize(("structured", "first"), [("auto", "tools"), ("prompt", "prompt")])
def test_extract_spec_starts_with_the_strategy_asked_for(docs, structured, first):
    spec = _spec("${text}", fields={"name": str, "year": int}, options={"structured": structured})
    run = prepare(docs, spec)
    assert not run.scalar
    assert [f.name for f in run.fields] == ["name", "year"]
    assert run.plan.strategy == first


def test_defaults_come_from_the_spec(docs):
    run = prepare(docs, _spec(output="o"))
    assert (run.config.model, run.config.system, run.config.n) == ("gpt-4o-mini", None, 1)


def test_a_missing_template_column_is_named_with_the_available_ones(docs):
    with pytest.raises(ConfigurationError, match=r"\['body'\].*available columns: \['title'"):
        prepare(docs, _spec("${title} ${body}", output="o"))


@pytest.mark.parametrize("output", ["title", "text"])
def test_an_output_name_that_is_a_column_is_refused(docs, output):
    with pytest.raises(ConfigurationError, match="already exist.*pass output="):
        prepare(docs, _spec(output=output))


def test_fields_that_are_columns_are_refused_with_their_own_fix(docs):
    with pytest.raises(ConfigurationError, match=r"\['title'\] already exist.*rename the fields"):
        prepare(docs, _spec(fields=["name", "title"]))


def test_an_input_llm_error_column_is_refused(docs):
    frame = docs.assign(llm_error="mine")
    with pytest.raises(ConfigurationError, match="'llm_error'"):
        prepare(frame, _spec(output="o"))


@pytest.mark.parametrize("output", ["", 3])
def test_the_output_name_must_be_a_non_empty_string(docs, output):
    with pytest.raises(ConfigurationError, match="output must be a non-empty column name"):
        prepare(docs, _spec(output=output))


def test_extract_needs_fields(docs):
    with pytest.raises(ConfigurationError, match="fields"):
        prepare(docs, _spec(fields=None))


def test_an_unknown_option_is_refused_with_a_suggestion(docs):
    with pytest.raises(ConfigurationError, match="did you mean 'temperature'"):
        prepare(docs, _spec(output="o", options={"temprature": 0.5}))


def test_sending_needs_a_key_and_an_estimate_does_not(docs):
    spec = RunSpec("${title}", output="o")  # OpenAI's URL, no key anywhere
    with pytest.raises(ConfigurationError, match="no API key"):
        prepare(docs, spec)
    run = prepare(docs, spec, sending=False)
    assert run.config.api_key is None


def test_an_estimate_allows_names_that_are_columns(docs):
    # Nothing is built, so nothing would be overwritten.
    frame = docs.assign(llm_error="mine")
    run = prepare(frame, RunSpec("${title}", output="title"), sending=False)
    assert [f.name for f in run.fields] == ["title"]


def test_prepare_leaves_the_spec_and_its_options_alone(docs):
    options = {"api_key": KEY, "temperature": 0.5}
    spec = RunSpec("${title}", output="o", options=options)
    prepare(docs, spec)
    assert options == {"api_key": KEY, "temperature": 0.5}
    assert spec.options is options


def test_the_key_stays_out_of_the_specs_repr(docs):
    spec = _spec(output="o")
    assert KEY not in repr(spec) and KEY not in repr(prepare(docs, spec))


# -- Run.execute and Run.chunks on a real local server -------------------------------------


class _CountingBudget(RateBudget):
    """A real budget that counts the permissions it grants."""

    def __init__(self) -> None:
        super().__init__()
        self.acquired = 0

    async def acquire(self, tokens: int = 0) -> None:
        await super().acquire(tokens)
        self.acquired += 1


async def test_execute_answers_every_row_with_its_facts(docs, server):
    run = prepare(docs, _spec("Say: ${text}", output="said", options={"base_url": server.url}))
    out = await run.execute()
    assert list(out.columns) == ["title", "text", "said"]
    assert out.loc["a", "said"] == "echo: Say: name=Ada, year=1815"
    assert out.loc["d", "said"] is pd.NA  # text missing: not sent
    facts = out.attrs["llm"]
    assert (facts["rows"], facts["done_rows"], facts["skipped_rows"]) == (4, 3, 1)
    assert facts["requests"] == server.stats()["requests"] == 3
    assert facts["cost"] is not None  # gpt-4o-mini's price is known
    assert "llm_error" not in out.columns  # no row failed and errors="raise"


async def test_execute_uses_the_budget_and_listeners_it_is_given(docs, server):
    run = prepare(docs, _spec(output="o", options={"base_url": server.url, "cache": False}))
    budget = _CountingBudget()
    events: list[Event] = []
    await run.execute(budget=budget, listeners=[events.append])
    assert budget.acquired == server.stats()["requests"] == 4
    assert isinstance(events[0], RunStarted) and events[0].rows == 4
    assert isinstance(events[-1], RunFinished)
    assert sum(e.rows for e in events if isinstance(e, RowsDone)) == 4


async def test_execute_raises_with_the_partial_result_or_coerces(server_factory):
    server = server_factory(context_window=100)
    frame = pd.DataFrame({"t": ["short", "x" * 4000, "fine"]}, index=[7, 8, 9])
    run = prepare(frame, _spec("${t}", output="o", options={"base_url": server.url}))
    with pytest.raises(RowsFailedError) as info:
        await run.execute()
    assert list(info.value.errors.index) == [8]
    assert info.value.result.loc[9, "o"] == "echo: fine"
    coerce = _spec("${t}", output="o", options={"base_url": server.url, "errors": "coerce"})
    out = await prepare(frame, coerce).execute()
    assert out["llm_error"].notna().tolist() == [False, True, False]
    assert out.attrs["llm"]["failed_rows"] == 1


async def test_after_a_fallback_nothing_reports_the_first_strategy(docs, server_factory, caplog):
    # Issue 12: the scheduler moves its plan on a fallback; Run.plan is only where the run
    # started, and every report of the run (frame, events, summary) names where it ended.
    server = server_factory(supports_tools=False)
    options = {"base_url": server.url, "cache": False}
    run = prepare(docs, _spec("${text}", fields={"name": str}, options=options))
    assert run.plan.strategy == "tools"
    events: list[Event] = []
    with caplog.at_level("INFO", logger="parrot_pandas"):
        out = await run.execute(listeners=[events.append])
    assert out.attrs["llm"]["strategy"] == "json_schema"
    finished = [e.facts for e in events if isinstance(e, RunFinished) and "strategy" in e.facts]
    assert [facts["strategy"] for facts in finished] == ["json_schema"]
    summary = [r.getMessage() for r in caplog.records if "strategy " in r.getMessage()]
    assert summary and all("strategy json_schema" in line for line in summary)
    assert not any("strategy tools" in line for line in summary)
    assert run.plan.strategy == "tools"  # the frozen starting point, not a report
    parts = [part async for part in run.chunks(2)]
    # A chunk built before the run's facts are in carries no strategy (timing decides which
    # chunks do); none may name the strategy the run left.
    assert {part.attrs["llm"].get("strategy") for part in parts} <= {None, "json_schema"}


async def test_chunks_stream_the_frame_in_order_with_one_schema(server):
    frame = pd.DataFrame({"t": [f"row {i}" for i in range(10)]}, index=range(100, 110))
    run = prepare(frame, _spec("${t}", output="o", options={"base_url": server.url}))
    events: list[Event] = []
    parts = [part async for part in run.chunks(4, listeners=[events.append])]
    assert [len(p) for p in parts] == [4, 4, 2]
    assert all(list(p.columns) == ["t", "o", "llm_error"] for p in parts)
    whole = pd.concat(parts)
    assert whole.index.tolist() == list(range(100, 110))
    assert whole["o"].tolist() == [f"echo: row {i}" for i in range(10)]
    assert whole["llm_error"].isna().all()
    assert sum(e.rows for e in events if isinstance(e, (RowsDone, RowsSkipped))) == 10


async def test_chunks_raise_after_the_last_chunk_carrying_the_failed_rows(server_factory):
    server = server_factory(context_window=100)
    frame = pd.DataFrame({"t": ["a", "x" * 4000, "b", "c", "x" * 5000]})
    run = prepare(frame, _spec("${t}", output="o", options={"base_url": server.url}))
    parts = []
    events: list[Event] = []
    with pytest.raises(RowsFailedError) as info:
        async for part in run.chunks(2, listeners=[events.append]):
            parts.append(part)
    assert [len(p) for p in parts] == [2, 2, 1]  # every chunk came before the error
    assert list(info.value.errors.index) == [1, 4]
    assert info.value.result["llm_error"].notna().all()
    assert sum(e.rows for e in events if isinstance(e, RowsFailed)) == 2


async def test_leaving_chunks_early_stops_sending(server_factory):
    server = server_factory(latency=0.01)
    frame = pd.DataFrame({"t": [f"row {i}" for i in range(2000)]})
    run = prepare(
        frame, _spec("${t}", output="o", options={"base_url": server.url, "cache": False})
    )
    stream = run.chunks(10)
    first = await anext(stream)
    await stream.aclose()
    assert len(first) == 10
    sent = server.stats()["requests"]
    # The run keeps a window of a few hundred rows ahead of the consumer, not the frame.
    assert sent < 1000
