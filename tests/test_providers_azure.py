"""Tests for parrot_pandas.providers.azure and the FakeServer's Azure OpenAI route.

The provider alone (URL, header, content filter; no network), the test server against the
OpenAI SDK's ``AzureOpenAI`` client (so the route is proven to speak Azure's protocol), and
whole runs through ``df.llm`` against it.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from parrot_pandas._client import Client
from parrot_pandas._config import RunConfig
from parrot_pandas._plan import RequestPlan
from parrot_pandas._scheduler import Scheduler
from parrot_pandas._structured import items_schema, normalize_fields
from parrot_pandas.errors import RATE_LIMITED, APIError, ConfigurationError, Verdict
from parrot_pandas.providers import AzureOpenAIProvider, Call, OpenAIProvider, provider_for
from parrot_pandas.testing import FakeServer

KEY = "azure-test-key-0123456789abcdef"
ENDPOINT = "https://my-resource.openai.azure.com"
VERSION = "2024-10-21"
MESSAGES = ({"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"})
SCHEMA = items_schema(normalize_fields({"name": str, "year": int}))
ENVIRONMENT = (
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_AD_TOKEN",
    "OPENAI_API_VERSION",
    "PARROT_PANDAS_PROVIDER",
)
FILTER_400 = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
        "content management policy. Please modify your prompt and retry.",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
    }
}


@pytest.fixture(autouse=True)
def _no_azure_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def call(**kwargs) -> Call:
    kwargs.setdefault("model", "gpt4o-prod")
    kwargs.setdefault("messages", MESSAGES)
    return Call(**kwargs)


def provider(endpoint: str = ENDPOINT, key: str | None = KEY) -> AzureOpenAIProvider:
    return AzureOpenAIProvider(endpoint, key, api_version=VERSION)


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {"text": ["name=Ada, year=1815\nname=Alan, year=1912", "name=Grace, year=1906", "none"]},
        index=pd.Index(["a", "b", "c"], name="doc"),
    )


# -- the provider ---------------------------------------------------------------------------------


def test_url_names_the_deployment_and_the_api_version():
    request = provider(ENDPOINT + "/").build(call())
    assert request.url == (
        f"{ENDPOINT}/openai/deployments/gpt4o-prod/chat/completions?api-version={VERSION}"
    )


def test_a_deployment_name_is_quoted_into_the_path():
    url = provider().build(call(model="my deployment/v2")).url
    assert "/deployments/my%20deployment%2Fv2/chat/completions?" in url


def test_the_key_goes_in_api_key_not_authorization():
    request = provider().build(call())
    assert request.headers["api-key"] == KEY and "Authorization" not in request.headers
    assert "api-key" not in provider(key=None).build(call()).headers


def test_the_body_is_openais():
    call_ = call(n=3, schema=SCHEMA, strategy="tools", params={"temperature": 0.1})
    assert provider().build(call_).json == OpenAIProvider("http://x/v1").build(call_).json


def test_the_key_never_shows_in_a_repr():
    azure = provider()
    for text in (repr(azure), repr(azure.build(call())), str(azure.build(call()))):
        assert KEY not in text
    assert VERSION in repr(azure)


def test_parse_is_openais_with_azure_extras():
    body = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "finish_reason": "stop",
                "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}},
            }
        ],
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2},
    }
    limits = CIMultiDictProxy(CIMultiDict({"x-ratelimit-remaining-requests": "99"}))
    completion = provider().parse(call(), body, limits)
    assert completion.texts == ("hello",)
    assert (completion.prompt_tokens, completion.completion_tokens) == (9, 2)
    assert completion.limits.remaining_requests == 99 and completion.limits.limit_requests is None


def test_an_answer_withheld_by_the_content_filter_says_so():
    body = {
        "choices": [
            {"index": 0, "message": {"role": "assistant"}, "finish_reason": "content_filter"}
        ]
    }
    (problem,) = provider().parse(call(), body, {}).problems
    assert "content filter withheld" in problem.message
    assert problem.verdict == Verdict("row", False, "content_filter")  # never asked again


def test_the_content_filter_400_is_recognisable_as_a_rows_own_error():
    error = provider().error(call(), 400, FILTER_400, {})
    assert (error.status, error.code, error.retryable) == (400, "content_filter", False)
    assert error.verdict == Verdict("row", False, "content_filter")
    assert "content filter" in error.message.lower()
    bare = {"error": {"code": "content_filter", "message": "Blocked."}}
    assert provider().error(call(), 400, bare, {}).message == "Azure content filter: Blocked."


def test_a_missing_deployment_says_model_is_the_deployment():
    body = {"error": {"code": "DeploymentNotFound", "message": "The API deployment ..."}}
    error = provider().error(call(), 404, body, {})
    assert "model= is the deployment name" in error.message
    assert error.verdict == Verdict("run", False, "not_found")


def test_azure_429_carries_retry_after_ms():
    body = {"error": {"code": "429", "message": "Please retry after 2 seconds."}}
    headers = CIMultiDictProxy(CIMultiDict({"retry-after-ms": "1500", "retry-after": "2"}))
    error = provider().error(call(), 429, body, headers)
    assert (error.code, error.retry_after, error.retryable) == ("429", 1.5, True)
    assert error.verdict == RATE_LIMITED  # every worker waits


# -- configuration: as the OpenAI SDK's AzureOpenAI reads it --------------------------------------


def test_environment_as_azureopenai_reads_it(monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", ENDPOINT + "/")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_VERSION", VERSION)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-must-not-travel")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    config = RunConfig.from_options(provider="azure", model="gpt4o-prod")
    assert (config.provider, config.base_url) == ("azure", ENDPOINT)
    assert (config.api_key, config.api_version) == (KEY, VERSION)
    azure = provider_for(config)
    assert isinstance(azure, AzureOpenAIProvider)
    assert azure.build(call()).url.startswith(f"{ENDPOINT}/openai/deployments/gpt4o-prod/")
    assert KEY not in repr(config)


def test_options_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_VERSION", "2023-05-15")
    config = RunConfig.from_options(
        provider="azure", base_url=ENDPOINT, api_key=KEY, api_version=VERSION, model="d"
    )
    assert config.api_version == VERSION


@pytest.mark.parametrize(
    ("missing", "variable"),
    [
        ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_ENDPOINT"),
        ("OPENAI_API_VERSION", "OPENAI_API_VERSION"),
        ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"),
    ],
)
def test_each_missing_setting_is_named(monkeypatch, missing, variable):
    values = {
        "AZURE_OPENAI_ENDPOINT": ENDPOINT,
        "AZURE_OPENAI_API_KEY": KEY,
        "OPENAI_API_VERSION": VERSION,
    }
    for name, value in values.items():
        if name != missing:
            monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=variable):
        RunConfig.from_options(provider="azure", model="d")


def test_an_estimate_needs_the_endpoint_but_no_key_or_version(monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", ENDPOINT)
    config = RunConfig.from_options(provider="azure", model="d", need_key=False)
    assert (config.api_key, config.api_version) == (None, None)


def test_azure_is_never_implied():
    assert RunConfig.from_options(model="gpt-4o", base_url="http://x/v1").provider == "openai"


# -- the test server answers the OpenAI SDK's AzureOpenAI client ---------------------------------


@pytest.fixture
def azure_server(server_factory) -> FakeServer:
    return server_factory(api_key=KEY, models=["gpt4o-prod"], filtered=["forbidden"])


@pytest.fixture
def sdk(azure_server: FakeServer):
    openai = pytest.importorskip("openai")
    return openai.AzureOpenAI(
        azure_endpoint=azure_server.origin, api_key=KEY, api_version=VERSION, max_retries=0
    )


def test_sdk_chat_completion_with_n(sdk, azure_server):
    response = sdk.chat.completions.with_raw_response.create(
        model="gpt4o-prod", messages=[{"role": "user", "content": "hello"}], n=2
    )
    completion = response.parse()
    assert [c.message.content for c in completion.choices] == ["echo: hello", "echo (alt): hello"]
    assert completion.model == "gpt4o-prod" and completion.usage.prompt_tokens > 0
    assert completion.prompt_filter_results[0]["prompt_index"] == 0
    assert azure_server.stats()["ok"] == 1


def test_sdk_chat_completion_with_a_forced_tool(sdk):
    tool = {"type": "function", "function": {"name": "record", "parameters": SCHEMA}}
    completion = sdk.chat.completions.create(
        model="gpt4o-prod",
        messages=[{"role": "user", "content": "name=Ada, year=1815"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "record"}},
    )
    (tool_call,) = completion.choices[0].message.tool_calls
    assert json.loads(tool_call.function.arguments) == {"items": [{"name": "Ada", "year": 1815}]}


def test_sdk_sees_azure_errors(sdk, azure_server):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model="gpt4o-prod", messages=[{"role": "user", "content": "a FORBIDDEN thing"}]
        )
    assert info.value.code == "content_filter"
    assert info.value.body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "DeploymentNotFound"
    wrong = openai.AzureOpenAI(
        azure_endpoint=azure_server.origin,
        api_key="azure-bad-key-42",
        api_version=VERSION,
        max_retries=0,
    )
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(
            model="gpt4o-prod", messages=[{"role": "user", "content": "x"}]
        )
    assert "azure-bad-key-42" not in json.dumps(info.value.body)


def test_sdk_sees_an_azure_429(server_factory):
    openai = pytest.importorskip("openai")
    server = server_factory(rpm=60)
    client = openai.AzureOpenAI(
        azure_endpoint=server.origin, api_key="k", api_version=VERSION, max_retries=0
    )
    messages = [{"role": "user", "content": "x"}]
    client.chat.completions.create(model="d", messages=messages)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="d", messages=messages)
    headers = info.value.response.headers
    assert info.value.code == "429" and VERSION in info.value.message
    assert int(headers["retry-after-ms"]) > 0 and headers["x-ratelimit-remaining-requests"] == "0"


def test_the_route_needs_the_api_version(azure_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=f"{azure_server.origin}/openai/deployments/gpt4o-prod", api_key="k"
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "x"}])


# -- whole runs through df.llm --------------------------------------------------------------------


def run_options(server: FakeServer, **options) -> dict:
    return {
        "provider": "azure",
        "model": "gpt4o-prod",
        "base_url": server.origin,
        "api_key": KEY,
        "api_version": VERSION,
        "progress": False,
        **options,
    }


def test_generate_with_n_uses_azures_n(azure_server):
    out = frame().llm.generate("${text}", n=2, **run_options(azure_server))
    assert azure_server.stats()["requests"] == 3  # one request per row: Azure has n
    assert list(out.index) == ["a", "a", "b", "b", "c", "c"]
    assert out.attrs["llm"]["cost"] is None  # a deployment name has no known price


def test_extract_is_typed(azure_server):
    out = frame().llm.extract(
        "${text}", fields={"name": str, "year": int}, **run_options(azure_server)
    )
    assert out.attrs["llm"]["strategy"] == "tools"
    assert out["name"].tolist()[:3] == ["Ada", "Alan", "Grace"]
    assert str(out["year"].dtype) == "Int64"


def test_settings_from_the_environment_end_to_end(azure_server, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", azure_server.origin)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_API_VERSION", VERSION)
    out = frame().llm.generate("${text}", provider="azure", model="gpt4o-prod", progress=False)
    assert out["output"].notna().all()


def test_a_filtered_prompt_is_that_rows_error_even_on_the_setup_request(azure_server):
    frame_ = pd.DataFrame({"text": ["something forbidden", "fine", "also fine"]})
    out = frame_.llm.generate("${text}", errors="coerce", **run_options(azure_server))
    assert out.loc[0, "output"] is None or pd.isna(out.loc[0, "output"])
    assert "content filter" in out.loc[0, "llm_error"].lower()
    assert out.loc[1:, "output"].tolist() == ["echo: fine", "echo: also fine"]
    assert azure_server.stats()["requests"] == 3  # a refusal is not retried


def test_an_unknown_deployment_fails_at_once(azure_server):
    with pytest.raises(APIError, match="deployment") as info:
        frame().llm.generate("${text}", **run_options(azure_server, model="gpt4o-typo"))
    assert info.value.status == 404 and azure_server.stats()["requests"] == 1


def test_the_key_never_leaks(azure_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="parrot_pandas")
    cache = tmp_path / "cache.sqlite3"
    frame_ = pd.concat([frame(), pd.DataFrame({"text": ["forbidden"]}, index=["x"])])
    out = frame_.llm.generate(
        "${text}", errors="coerce", **run_options(azure_server, cache=str(cache))
    )
    assert out["llm_error"].notna().sum() == 1
    with pytest.raises(APIError) as info:
        frame().llm.generate("${text}", **run_options(azure_server, api_key="azure-wrong-key-999"))
    assert info.value.status == 401
    seen = [caplog.text, repr(out.attrs), out.to_csv(), str(info.value)]
    assert all(KEY not in text and "azure-wrong-key-999" not in text for text in seen)
    assert KEY.encode() not in cache.read_bytes()


async def test_a_429_pauses_the_budget_for_retry_after_ms(fake_clock, recording_budget):
    async with FakeServer(rpm=120, clock=fake_clock) as server:  # two requests, refilled at 2/s
        config = RunConfig.from_options(**run_options(server, cache=False, max_concurrency=4))
        budget = recording_budget()
        start = fake_clock()
        async with Client(provider_for(config), secret=KEY) as client:
            # Another client of the same deployment empties the server's bucket first.
            for prompt in ("other", "other 2"):
                await client.send(RequestPlan(config).call(prompt, 1))
            scheduler = Scheduler(
                RequestPlan(config), client, budget, clock=fake_clock, sleep=fake_clock.sleep
            )
            outcome = await scheduler.run(iter(["a", "b", "c"]), rows=3)
        stats = server.stats()
    assert [job.values for job in outcome] == [["echo: a"], ["echo: b"], ["echo: c"]]
    assert stats["rate_limited"] >= 1
    assert budget.pauses[0] == pytest.approx(0.5)  # retry-after-ms, not the rounded retry-after
    assert fake_clock() - start >= 0.5
