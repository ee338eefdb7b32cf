"""Tests for parrot_pandas._config: options, the environment, validation, secrets."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from aiohttp import web

from parrot_pandas._config import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    REQUEST_PARAMETERS,
    RUN_SETTINGS,
    RunConfig,
    _check_request_params,
    _check_run_settings,
    _resolve_endpoint,
    _split_options,
)
from parrot_pandas._secrets import redact_url
from parrot_pandas.errors import ConfigurationError
from parrot_pandas.providers import (
    PROVIDERS,
    AnthropicProvider,
    Call,
    OpenAIProvider,
    provider_for,
)
from parrot_pandas.testing import FakeServer

LOCAL = "http://127.0.0.1:8080/v1"
KEY = "sk-test-0123456789abcdef"


def make(**options) -> RunConfig:
    options.setdefault("base_url", LOCAL)
    return RunConfig.from_options(**options)


# -- defaults and the environment -------------------------------------------------------------


def test_defaults_without_environment_on_a_local_server():
    config = make()
    assert config.model == DEFAULT_MODEL
    assert config.base_url == LOCAL
    assert config.api_key is None
    assert (config.n, config.system, config.params) == (1, None, ())
    assert (config.max_concurrency, config.max_retries, config.timeout) == (64, 6, 120.0)
    assert (config.rpm, config.tpm, config.cache, config.refresh) == (None, None, True, False)
    assert (config.errors, config.progress, config.running_loop) == ("raise", None, "thread")
    assert config.rows_per_request == 1


def test_environment_supplies_key_url_and_model(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", "https://llm.example.com/v1/")
    monkeypatch.setenv("PARROT_PANDAS_MODEL", "my-model")
    config = RunConfig.from_options()
    assert config.api_key == KEY
    assert config.base_url == "https://llm.example.com/v1"  # trailing slash dropped
    assert config.model == "my-model"


def test_options_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://env.example.com/v1")
    monkeypatch.setenv("PARROT_PANDAS_MODEL", "env-model")
    config = RunConfig.from_options(model="arg-model", api_key="from-arg", base_url=LOCAL)
    assert (config.model, config.api_key, config.base_url) == ("arg-model", "from-arg", LOCAL)


def test_openai_without_a_key_is_refused_naming_the_fix():
    with pytest.raises(ConfigurationError) as info:
        RunConfig.from_options()
    message = str(info.value)
    assert "OPENAI_API_KEY" in message and "api_key=" in message and "base_url=" in message


@pytest.mark.parametrize(
    "url",
    [
        DEFAULT_BASE_URL,
        DEFAULT_BASE_URL + "/",
        "https://api.openai.com",
        "https://API.openai.com/v1",
    ],
)
def test_any_openai_url_needs_a_key(url):
    with pytest.raises(ConfigurationError, match="no API key"):
        RunConfig.from_options(base_url=url)


def test_an_empty_key_in_the_environment_counts_as_no_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")
    with pytest.raises(ConfigurationError, match="no API key"):
        RunConfig.from_options()
    assert make().api_key is None


def test_openai_with_a_key_is_fine(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    config = RunConfig.from_options()
    assert (config.base_url, config.api_key) == (DEFAULT_BASE_URL, KEY)


def test_a_local_server_needs_no_key():
    assert make(base_url="http://localhost:11434/v1").api_key is None


# -- unknown options ----------------------------------------------------------------------------


def test_an_unknown_option_is_refused_with_the_closest_valid_one():
    with pytest.raises(ConfigurationError) as info:
        make(temprature=0.2)
    message = str(info.value)
    assert "'temprature' (did you mean 'temperature'?)" in message
    assert "extra_body" in message
    assert "max_concurrency" in message  # the valid options are listed


def test_several_unknown_options_are_all_named():
    with pytest.raises(ConfigurationError) as info:
        make(max_concurency=4, zzzzzz=1)
    message = str(info.value)
    assert "'max_concurency' (did you mean 'max_concurrency'?)" in message
    assert "'zzzzzz'" in message
    assert "'zzzzzz' (did you mean" not in message


def test_parameters_and_settings_do_not_overlap():
    assert not REQUEST_PARAMETERS & RUN_SETTINGS


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"model": ""}, "model must be a non-empty string"),
        ({"model": 4}, "model must be a non-empty string"),
        ({"system": 3}, "system must be a string or None, got int"),
        ({"n": 0}, r"n must be an integer >= 1"),
        ({"n": True}, r"n must be an integer >= 1"),
        ({"n": 2.0}, r"n must be an integer >= 1"),
        ({"base_url": "ftp://host/v1"}, "base_url must be an http"),
        ({"base_url": "localhost:8080/v1"}, "base_url must be an http"),
        ({"base_url": 8080}, "base_url must be an http"),
        ({"base_url": "http://host:99999/v1"}, "base_url is not a valid URL"),
        ({"api_key": 123}, "api_key must be a string"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": 1.5}, "max_tokens must be a positive integer"),
        ({"max_tokens": True}, "max_tokens must be a positive integer"),
        ({"max_completion_tokens": -1}, "max_completion_tokens must be a positive integer"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": True}, "top_p must be a number"),
        ({"presence_penalty": "x"}, "presence_penalty must be a number"),
        ({"frequency_penalty": [1]}, "frequency_penalty must be a number"),
        ({"extra_body": [("a", 1)]}, "extra_body must be a dict of JSON fields, got list"),
        ({"max_concurrency": 0}, r"max_concurrency must be an integer >= 1"),
        ({"max_concurrency": 2.0}, r"max_concurrency must be an integer >= 1"),
        ({"max_retries": -1}, r"max_retries must be an integer >= 0"),
        ({"max_retries": True}, r"max_retries must be an integer >= 0"),
        ({"timeout": 0}, "timeout must be a positive number or None"),
        ({"timeout": float("nan")}, "timeout must be a positive number or None"),
        ({"timeout": "10"}, "timeout must be a positive number or None"),
        ({"rpm": -5}, "rpm must be a positive number or None"),
        ({"tpm": True}, "tpm must be a positive number or None"),
        ({"errors": "ignore"}, "errors must be 'raise' or 'coerce'"),
        ({"running_loop": "asyncio"}, "running_loop must be 'thread'"),
        ({"cache": 1}, "cache must be True, False or a file path"),
        ({"cache": None}, "cache must be True, False or a file path"),
        ({"rows_per_request": 0}, r"rows_per_request must be an integer >= 1 .* or \"auto\""),
        ({"rows_per_request": 2.0}, "rows_per_request must be an integer >= 1"),
        ({"rows_per_request": True}, "rows_per_request must be an integer >= 1"),
        ({"rows_per_request": "AUTO"}, "rows_per_request must be an integer >= 1"),
        ({"rows_per_request": "5"}, "rows_per_request must be an integer >= 1"),
        ({"rows_per_request": None}, "rows_per_request must be an integer >= 1"),
    ],
)
def test_invalid_values_are_refused(options, match):
    with pytest.raises(ConfigurationError, match=match):
        make(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": 0},
        {"timeout": None},
        {"timeout": 0.5},
        {"rpm": 60, "tpm": 1e6},
        {"errors": "coerce"},
        {"running_loop": "nest"},
        {"cache": False},
        {"cache": "responses.sqlite3"},
        {"cache": Path("responses.sqlite3")},
        {"temperature": 0, "top_p": 1, "seed": 7, "stop": ["\n"]},
        {"extra_body": {"top_k": 3}},
        {"rows_per_request": 1},
        {"rows_per_request": 20},
        {"rows_per_request": "auto"},
    ],
)
def test_valid_values_are_kept(options):
    config = make(**options)
    for name, value in options.items():
        if name in REQUEST_PARAMETERS:
            assert config.request_params[name] == value
        else:
            assert getattr(config, name) == value


def test_numpy_scalars_are_taken_as_python_values():
    config = make(
        n=np.int64(2),
        max_tokens=np.int64(64),
        seed=np.int32(7),
        temperature=np.float32(0.5),
        max_concurrency=np.int64(4),
        rows_per_request=np.int64(8),
    )
    assert config.n == 2 and type(config.n) is int
    assert config.rows_per_request == 8 and type(config.rows_per_request) is int
    assert config.request_params == {"max_tokens": 64, "seed": 7, "temperature": 0.5}
    assert all(type(v) in (int, float) for v in config.request_params.values())
    assert config.max_concurrency == 4 and type(config.max_concurrency) is int


def test_credentials_in_the_url_and_a_key_cannot_both_be_sent():
    with pytest.raises(ConfigurationError) as info:
        make(base_url="https://me:hunter2@proxy.local/v1", api_key=KEY)
    assert "hunter2" not in str(info.value)
    assert KEY not in str(info.value)
    assert make(base_url="https://me:hunter2@proxy.local/v1").api_key is None


# -- request parameters -------------------------------------------------------------------------


def test_request_params_are_a_fresh_sorted_dict_without_none_and_without_settings():
    config = make(top_p=0.9, temperature=0.0, seed=None, max_retries=2, stop=["END"])
    assert config.params == (("stop", ["END"]), ("temperature", 0.0), ("top_p", 0.9))
    params = config.request_params
    assert params == {"stop": ["END"], "temperature": 0.0, "top_p": 0.9}
    params["temperature"] = 1.0
    assert config.request_params["temperature"] == 0.0


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50}, 50),
        ({"max_tokens": 100, "max_completion_tokens": 50}, 50),
    ],
)
def test_max_output_tokens(options, expected):
    assert make(**options).max_output_tokens == expected


def test_config_is_frozen():
    config = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "other"  # type: ignore[misc]


# -- secrets ------------------------------------------------------------------------------------


def test_the_api_key_is_never_in_repr_or_str(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    config = RunConfig.from_options()
    assert config.api_key == KEY
    for text in (repr(config), str(config), f"{config}", repr([config])):
        assert KEY not in text
    assert "model='gpt-4o-mini'" in repr(config)


def test_a_password_in_the_base_url_is_not_in_repr():
    config = make(base_url="https://me:hunter2@proxy.local/v1?api-key=s3cr3t&region=eu")
    assert config.base_url == "https://me:hunter2@proxy.local/v1?api-key=s3cr3t&region=eu"
    text = repr(config)
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "base_url='https://me:***@proxy.local/v1?api-key=***&region=eu'" in text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (LOCAL, LOCAL),
        ("https://u:p@h:8443/v1", "https://u:***@h:8443/v1"),
        ("https://u@h/v1", "https://u@h/v1"),
        ("https://h/v1?key=abc&token=t&x=1", "https://h/v1?key=***&token=***&x=1"),
        ("http://[bad", "<unparseable URL>"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_an_invalid_base_url_error_does_not_show_its_password():
    with pytest.raises(ConfigurationError, match="base_url must be an http") as info:
        make(base_url="htp://me:hunter2@proxy.local/v1")
    assert "hunter2" not in str(info.value)
    assert "me:***@proxy.local" in str(info.value)


def test_redact_url_changes_nothing_but_the_secrets():
    # The scheme's letter case and the other query values' encoding are the user's own.
    assert redact_url("HTTP://Host/v1?tenant=a+b&x=%2F") == "HTTP://Host/v1?tenant=a+b&x=%2F"
    # urlsplit drops a newline from the query; the secret after it is still found.
    assert redact_url("https://h/v1?key=se\ncret") == "https://h/v1?key=***"


# -- the API key --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "where"),
    [
        (KEY + "\n", "at its end"),  # read from a file
        (KEY + "\r\n", "at its end"),
        (" " + KEY, "at its start"),
        (KEY[:8] + "\t" + KEY[8:], "inside it"),
        (KEY + "\u200b", "at its end"),  # a zero-width space pasted with it
        (KEY + "\x00", "at its end"),
    ],
)
def test_a_key_with_whitespace_or_control_characters_is_refused_without_showing_it(key, where):
    with pytest.raises(ConfigurationError) as info:
        make(api_key=key)
    message = str(info.value)
    assert "api_key=" in message and where in message and "strip" in message
    assert KEY not in message and KEY[:8] not in message and KEY[8:] not in message


def test_a_key_from_the_environment_names_its_variable(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "\n")
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY") as info:
        RunConfig.from_options()
    assert KEY not in str(info.value)


# -- numbers JSON cannot carry ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"timeout": float("inf")},
            r"timeout must be a positive number or None, got inf \(pass None",
        ),
        ({"rpm": float("inf")}, "rpm must be a positive number or None"),
        ({"tpm": np.float64("inf")}, "tpm must be a positive number or None"),
        ({"temperature": float("nan")}, "temperature is nan, which JSON cannot carry"),
        ({"top_p": np.float32("inf")}, "top_p is inf"),
        ({"presence_penalty": -float("inf")}, "presence_penalty is -inf"),
        ({"top_k": float("nan")}, "top_k is nan"),
        ({"logit_bias": {50256: float("nan")}}, r"logit_bias\[50256\] is nan"),
        ({"stop": ["a", float("inf")]}, r"stop\[1\] is inf"),
        (
            {"extra_body": {"options": {"temperature": float("nan")}}},
            r"extra_body\['options'\]\['temperature'\] is nan",
        ),
        ({"extra_body": {"when": object()}}, r"extra_body\['when'\] is a object, which a JSON"),
        ({"extra_body": {"ids": {1, 2}}}, r"extra_body\['ids'\] is a set"),
        ({"extra_body": {("a", "b"): 1}}, "extra_body has a key of type tuple"),
    ],
)
def test_values_json_cannot_carry_are_refused_before_any_request(options, match):
    with pytest.raises(ConfigurationError, match=match):
        make(**options)


def test_numpy_scalars_inside_parameters_become_json():
    config = make(
        extra_body={"options": {"num_ctx": np.int64(4096), "mirostat_tau": np.float32(5.0)}},
        logit_bias={np.int64(50256): np.int64(-100)},
        stop=("END",),
    )
    params = config.request_params
    assert params["extra_body"] == {"options": {"num_ctx": 4096, "mirostat_tau": 5.0}}
    assert type(params["extra_body"]["options"]["num_ctx"]) is int
    assert params["logit_bias"] == {50256: -100} and params["stop"] == ("END",)
    json.dumps(params, allow_nan=False)  # what the client sends


# -- base_url -----------------------------------------------------------------------------------


def test_the_scheme_is_matched_in_any_letter_case():
    assert make(base_url="HTTP://127.0.0.1:8080/v1").base_url == "HTTP://127.0.0.1:8080/v1"
    assert make(base_url="Https://llm.example.com/v1").base_url == "Https://llm.example.com/v1"


def test_a_wrong_scheme_is_shown_as_given():
    with pytest.raises(ConfigurationError, match="base_url must be an http") as info:
        make(base_url="FTP://Me:hunter2@Host.example/V1?Token=abc&Region=EU")
    assert "'FTP://Me:***@Host.example/V1?Token=***&Region=EU'" in str(info.value)
    assert "hunter2" not in str(info.value) and "abc" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("https://llm.example.com/v1\n", "whitespace or a control character"),
        (" https://llm.example.com/v1", "whitespace or a control character"),
        ("https://llm.exa mple.com/v1", "whitespace or a control character"),
        ("https:///v1", "base_url has no host"),
        ("http://", "base_url has no host"),
    ],
)
def test_a_base_url_that_cannot_be_requested_is_refused(url, match):
    with pytest.raises(ConfigurationError, match=match):
        make(base_url=url)


def test_a_secret_in_a_bad_base_url_is_never_shown():
    with pytest.raises(ConfigurationError, match="whitespace") as info:
        make(base_url="https://llm.example.com/v1?api-key=s3cr3t-value\n")
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "base_url", "url"),
    [
        (
            {"base_url": "https://gw.example.com/v1/?tenant=a&x=%2F"},
            "https://gw.example.com/v1?tenant=a&x=%2F",
            "https://gw.example.com/v1/chat/completions?tenant=a&x=%2F",
        ),
        (
            {"base_url": "https://gw.example.com/llm/v1?tenant=a", "provider": "anthropic"},
            "https://gw.example.com/llm?tenant=a",
            "https://gw.example.com/llm/v1/messages?tenant=a",
        ),
        (
            {
                "base_url": "https://res.openai.azure.com/?tenant=a",
                "provider": "azure",
                "api_version": "2024-10-21",
            },
            "https://res.openai.azure.com?tenant=a",
            "https://res.openai.azure.com/openai/deployments/m/chat/completions"
            "?tenant=a&api-version=2024-10-21",
        ),
    ],
)
def test_a_query_in_base_url_is_kept_after_the_endpoint_path(options, base_url, url):
    config = make(api_key=KEY, model="m", **options)
    assert config.base_url == base_url
    request = provider_for(config).build(
        Call(model="m", messages=({"role": "user", "content": "x"},))
    )
    assert request.url == url


def test_a_key_in_the_query_is_never_shown():
    config = make(base_url="https://gw.example.com/v1?api-key=s3cr3t-value&tenant=a")
    provider = provider_for(config)
    request = provider.build(Call(model="m", messages=({"role": "user", "content": "x"},)))
    assert request.url.endswith("/chat/completions?api-key=s3cr3t-value&tenant=a")
    for text in (repr(config), repr(provider), repr(request)):
        assert "s3cr3t" not in text and "api-key=***&tenant=a" in text


# -- a claude- model and the OpenAI protocol ----------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"base_url": "https://api.openai.com/v1"},
        {"base_url": "https://API.OpenAI.com/v1/"},
        {"provider": "openai"},  # the default base URL is OpenAI's
    ],
)
def test_a_claude_model_is_not_sent_to_openais_own_api(monkeypatch, options):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(ConfigurationError) as info:
        RunConfig.from_options(model="claude-3-5-haiku-latest", **options)
    message = str(info.value)
    assert "served by the Anthropic API" in message
    assert "provider='anthropic'" in message and "gateway" in message
    assert KEY not in message


def test_a_claude_model_with_a_gateway_url_speaks_openai_and_says_why(caplog):
    gateway = "https://me:hunter2@litellm.example.com/v1"
    with caplog.at_level(logging.INFO, logger="parrot_pandas"):
        config = make(model="claude-3-5-haiku", base_url=gateway)
    assert config.provider == "openai"
    text = caplog.text
    assert "OpenAI-compatible gateway" in text and "provider='anthropic'" in text
    assert "litellm.example.com" in text and "hunter2" not in text


def test_a_claude_model_with_anthropics_own_url_speaks_anthropic(caplog):
    with caplog.at_level(logging.INFO, logger="parrot_pandas"):
        config = make(
            model="claude-3-5-haiku", base_url="https://api.anthropic.com/v1", api_key=KEY
        )
    assert (config.provider, config.base_url) == ("anthropic", "https://api.anthropic.com")
    assert "the model name starts with 'claude-'" in caplog.text


# -- the provider states its facts --------------------------------------------------------------


class _EchoProvider(OpenAIProvider):
    """A protocol added in one module: nothing else in the package is changed for it."""

    name = "echo"
    label = "Echo"
    api_key_env = "ECHO_API_KEY"
    base_url_env = "ECHO_BASE_URL"
    default_base_url = "https://api.echo.example/v2"
    vendor_hosts = ("api.echo.example",)
    model_prefixes = ("echo-",)
    samples_per_request = 2

    @classmethod
    def prepare_params(cls, params):
        params = dict(params)
        if "stop" in params:
            params["stop_words"] = params.pop("stop")
        params.setdefault("max_tokens", 77)
        return params


def test_a_new_provider_is_one_class(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "echo", _EchoProvider)
    monkeypatch.setenv("ECHO_API_KEY", KEY)
    config = RunConfig.from_options(model="echo-1", stop=["END"])
    assert (config.provider, config.base_url, config.api_key) == (
        "echo",
        "https://api.echo.example/v2",
        KEY,
    )
    assert config.request_params == {"max_tokens": 77, "stop_words": ["END"]}
    assert (config.samples_per_request, config.max_output_tokens) == (2, 77)
    assert isinstance(provider_for(config), _EchoProvider)
    monkeypatch.delenv("ECHO_API_KEY")
    with pytest.raises(ConfigurationError, match="no API key for Echo: set the ECHO_API_KEY"):
        RunConfig.from_options(model="echo-1")
    # An echo- model sent to OpenAI's own API is refused the same way a claude- one is.
    with pytest.raises(ConfigurationError, match="served by the Echo API"):
        RunConfig.from_options(model="echo-1", provider="openai", api_key=KEY)


def test_every_provider_states_its_facts():
    for name, provider in PROVIDERS.items():
        assert provider.name == name
        assert provider.api_key_env.endswith("_API_KEY")
        assert provider.base_url_env and provider.example_base_url.startswith("http")
        assert provider.samples_per_request in (None, 1)
        assert provider.prepare_params({}) is not None
    assert PROVIDERS["anthropic"].samples_per_request == 1
    assert PROVIDERS["anthropic"].prepare_params({"max_completion_tokens": 9}) == {"max_tokens": 9}
    assert PROVIDERS["azure"].default_base_url is None


# -- the named checks ---------------------------------------------------------------------------


def test_split_options_separates_settings_from_parameters():
    settings, params = _split_options({"timeout": 5, "temperature": 0.1, "seed": None})
    assert (settings, params) == ({"timeout": 5}, {"temperature": 0.1})
    with pytest.raises(ConfigurationError, match="did you mean 'timeout'"):
        _split_options({"timeuot": 5})


def test_resolve_endpoint_takes_what_it_reads_out_of_the_settings(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    settings = {"provider": "anthropic", "timeout": 5}
    endpoint = _resolve_endpoint(settings, "m", need_key=True)
    assert endpoint.provider == "anthropic" and endpoint.api_key == KEY
    assert settings == {"timeout": 5}


def test_check_request_params_lets_the_provider_rename():
    assert _check_request_params({"max_completion_tokens": 5}, AnthropicProvider) == {
        "max_tokens": 5
    }
    assert _check_request_params({"max_completion_tokens": 5}, OpenAIProvider) == {
        "max_completion_tokens": 5
    }


def test_check_run_settings_takes_finite_positive_numbers():
    _check_run_settings({"timeout": 1e9, "rpm": 0.5, "tpm": None})
    with pytest.raises(ConfigurationError, match="timeout"):
        _check_run_settings({"timeout": float("inf")})


# -- against a real server ----------------------------------------------------------------------


def _started(seen: list[tuple[str, list[tuple[str, str]]]]) -> FakeServer:
    """A FakeServer that also notes the path and query of every request it gets."""

    @web.middleware
    async def note(request: web.Request, handler):
        # The decoded query: aiohttp's URL type may write %2F as / (the same value).
        seen.append((request.path, list(request.query.items())))
        return await handler(request)

    server = FakeServer()
    server.app.middlewares.append(note)
    return server


@pytest.mark.parametrize(
    ("provider", "base", "path", "extra"),
    [
        ("openai", "{url}/", "/v1/chat/completions", []),
        ("openai", "{URL}", "/v1/chat/completions", []),  # HTTP:// as some users type it
        ("anthropic", "{origin}/v1", "/v1/messages", []),
        (
            "azure",
            "{origin}",
            "/openai/deployments/m/chat/completions",
            [("api-version", "2024-10-21")],
        ),
    ],
)
def test_a_query_in_base_url_reaches_the_server_after_the_endpoint_path(
    provider, base, path, extra, caplog
):
    seen: list[tuple[str, list[tuple[str, str]]]] = []
    frame = pd.DataFrame({"text": ["one", "two"]})
    with _started(seen) as server, caplog.at_level(logging.DEBUG, logger="parrot_pandas"):
        url = base.format(
            url=server.url, origin=server.origin, URL=server.url.replace("http://", "HTTP://")
        )
        out = frame.llm.generate(
            "${text}",
            base_url=url + "?tenant=a%2Fb&sig=s3cr3t-sig",
            provider=provider,
            api_version="2024-10-21" if provider == "azure" else None,
            model="m",
            api_key="test-key",
            cache=False,
            progress=False,
        )
    assert out["output"].notna().all()
    assert seen == [(path, [("tenant", "a/b"), ("sig", "s3cr3t-sig"), *extra])] * 2
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in repr(out.attrs)


@pytest.mark.parametrize(
    "options",
    [{"api_key": "test-key\n"}, {"temperature": float("nan")}, {"timeout": float("inf")}],
)
def test_bad_values_send_no_request(server, options):
    frame = pd.DataFrame({"text": ["one", "two"]})
    with pytest.raises(ConfigurationError) as info:
        frame.llm.generate("${text}", base_url=server.url, cache=False, progress=False, **options)
    assert "test-key" not in str(info.value)
    assert server.stats()["requests"] == 0
