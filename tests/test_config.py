"""Tests for parrot_pandas._config: options, the environment, validation, secrets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from parrot_pandas._config import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    REQUEST_PARAMETERS,
    RUN_SETTINGS,
    RunConfig,
)
from parrot_pandas._secrets import redact_url
from parrot_pandas.errors import ConfigurationError

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
    )
    assert config.n == 2 and type(config.n) is int
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
