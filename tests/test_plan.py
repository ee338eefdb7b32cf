"""Tests for parrot_pandas._plan.RequestPlan: messages, schema, cache keys, parsing, combining."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Literal

import pytest

from parrot_pandas._cache_key import request_key
from parrot_pandas._config import STRUCTURED_STRATEGIES, RunConfig
from parrot_pandas._plan import RequestPlan
from parrot_pandas._structured import Fields, items_schema, normalize_fields
from parrot_pandas.errors import StructuredOutputError

CONFIG = RunConfig(
    model="gpt-4o-mini",
    base_url="https://user:pw@api.example.com/v1",
    api_key="sk-test-secret",
    params=(("temperature", 0.0),),
)
FIELDS = normalize_fields(
    {"name": str, "year": int | None, "tags": list[str], "kind": Literal["a", "b"]}
)


def extract_plan(strategy: str = "tools", config: RunConfig = CONFIG) -> RequestPlan:
    return RequestPlan(config, FIELDS, strategy)


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("strategy", ["tools", "json_schema"])
def test_native_strategies_send_the_prompt_alone(strategy):
    assert extract_plan(strategy).messages("hello") == ({"role": "user", "content": "hello"},)
    with_system = extract_plan(strategy, replace(CONFIG, system="Be brief."))
    assert with_system.messages("hello") == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    )


@pytest.mark.parametrize("strategy", ["json_object", "prompt"])
def test_text_strategies_carry_the_schema_in_the_system_message(strategy):
    (system, user) = extract_plan(strategy).messages("hello")
    assert system == {"role": "system", "content": FIELDS.instructions}
    assert user == {"role": "user", "content": "hello"}
    embedded = system["content"].split("of this form: ", 1)[1].rsplit(". Put every", 1)[0]
    assert json.loads(embedded) == items_schema(FIELDS)
    (system, _) = extract_plan(strategy, replace(CONFIG, system="Be brief.")).messages("hello")
    assert system["content"] == f"Be brief.\n\n{FIELDS.instructions}"


@pytest.mark.parametrize("strategy", [None, *STRUCTURED_STRATEGIES])
def test_generate_never_adds_instructions(strategy):
    plan = RequestPlan(replace(CONFIG, system="S"), None, strategy)
    assert plan.messages("p") == (
        {"role": "system", "content": "S"},
        {"role": "user", "content": "p"},
    )
    assert plan.schema is None
    assert plan.call("p", 2).strategy is None


# --------------------------------------------------------------------------- schema and calls


def test_schema_is_the_fields_schema_shared_across_strategies():
    plans = [extract_plan(s) for s in STRUCTURED_STRATEGIES]
    assert plans[0].schema == items_schema(FIELDS)
    assert all(plan.schema is FIELDS.schema for plan in plans)
    assert extract_plan().with_strategy("prompt").fields is FIELDS


def test_plain_field_tuples_are_compiled_on_construction():
    plan = RequestPlan(CONFIG, tuple(FIELDS), "tools")
    assert isinstance(plan.fields, Fields)
    assert plan.fields == FIELDS
    assert plan.schema == FIELDS.schema


def test_call_carries_everything_a_provider_needs():
    plan = extract_plan("json_schema", replace(CONFIG, params=(("max_tokens", 50),)))
    call = plan.call("hello", 3)
    assert call.model == "gpt-4o-mini"
    assert call.messages == plan.messages("hello")
    assert call.n == 3
    assert dict(call.params) == {"max_tokens": 50}
    assert call.schema is FIELDS.schema
    assert call.strategy == "json_schema"
    with pytest.raises(TypeError):
        call.params["max_tokens"] = 1  # shared by every request: read only


def test_cost_counts_prompt_schema_and_the_output_budget():
    plan = extract_plan("tools", replace(CONFIG, params=(("max_tokens", 50),)))
    bare = RequestPlan(replace(CONFIG, params=(("max_tokens", 50),)))
    call, bare_call = plan.call("x" * 400, 2), bare.call("x" * 400, 2)
    assert bare.cost(bare_call) == 100 + 2 * 50
    assert plan.cost(call) > bare.cost(bare_call)  # the schema is prompt tokens too
    assert bare.cost(bare_call, prompt_ratio=2.0) == 200 + 2 * 50


# --------------------------------------------------------------------------- cache keys


def test_the_key_is_the_same_for_every_strategy():
    keys = {extract_plan(s).key("hello") for s in STRUCTURED_STRATEGIES}
    assert len(keys) == 1


def test_keys_stay_what_they_were():
    # Computed on 6c2ede6: a changed key silently voids every user's cache.
    assert RequestPlan(CONFIG).key("hello") == (
        "ee781bafddcc6e9e201c4fb03419a8f17029bd97b82c828d74522b6d50dc907a"
    )
    assert extract_plan().key("hello") == (
        "6b7a687d707167960d6b0236093ba4df22e74547bcf3259e8416da14a4127ecc"
    )


def test_the_key_is_the_request_not_the_credentials():
    plan = RequestPlan(CONFIG)
    expected = request_key(
        {
            "base_url": "https://api.example.com/v1",  # user:pw stripped
            "model": "gpt-4o-mini",
            "params": {"temperature": 0.0},
            "schema": None,
            "messages": [{"role": "user", "content": "hello"}],
        }
    )
    assert plan.key("hello") == expected
    assert RequestPlan(replace(CONFIG, api_key="sk-other")).key("hello") == expected
    other_userinfo = replace(CONFIG, base_url="https://someone:else@api.example.com/v1")
    assert RequestPlan(other_userinfo).key("hello") == expected


@pytest.mark.parametrize(
    "change",
    [
        {"model": "gpt-4o"},
        {"base_url": "https://api.example.com/v2"},
        {"params": (("temperature", 1.0),)},
        {"system": "Be brief."},
        {"provider": "azure"},
    ],
)
def test_the_key_changes_with_what_shapes_the_answer(change):
    assert RequestPlan(replace(CONFIG, **change)).key("hello") != RequestPlan(CONFIG).key("hello")


def test_the_key_changes_with_the_prompt_and_the_fields():
    assert extract_plan().key("hello") != extract_plan().key("hello!")
    assert extract_plan().key("hello") != RequestPlan(CONFIG).key("hello")
    other = RequestPlan(CONFIG, normalize_fields({"name": str}), "tools")
    assert other.key("hello") != extract_plan().key("hello")


# --------------------------------------------------------------------------- parse and combine


def test_generate_parses_text_as_it_is_and_combines_distinct_answers():
    plan = RequestPlan(CONFIG)
    assert plan.parse("  any text {not json ") == "  any text {not json "
    assert plan.combine(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]


def test_extract_parses_with_the_compiled_parser():
    plan = extract_plan()
    assert plan.parse == FIELDS.parse  # the fields' own parser, no wrapper per plan
    assert plan.parse('{"items": [{"name": "Ada", "year": "1815", "tags": "x", "kind": "A"}]}') == [
        {"name": "Ada", "year": 1815, "tags": ["x"], "kind": "a"}
    ]
    with pytest.raises(StructuredOutputError) as info:
        plan.parse("no JSON here")
    assert info.value.verdict.retry is True
    with pytest.raises(StructuredOutputError) as info:
        plan.parse('[{"name": "A", "year": 1e30, "tags": [], "kind": "a"}]')
    assert info.value.verdict.reason == "invalid_value"


def test_extract_combines_the_items_of_all_samples_without_repeats():
    plan = extract_plan()
    one = {"name": "Ada", "year": 1815, "tags": ["x"], "kind": "a"}
    two = {"name": "Alan", "year": None, "tags": [], "kind": "b"}
    assert plan.combine([[one], [two, dict(one)], []]) == [one, two]
    assert plan.combine([[], []]) == []
