"""Configuration from the runner's environment variables."""

from __future__ import annotations

import logging

import pytest

from ambient_tracing import Observability, TracingConfig
from ambient_tracing.config import runner_type_slug

LANGFUSE = {
    "LANGFUSE_ENABLED": "true",
    "LANGFUSE_PUBLIC_KEY": "pk-lf-test",
    "LANGFUSE_SECRET_KEY": "sk-lf-test",
    "LANGFUSE_HOST": "http://127.0.0.1:1",
}
MLFLOW = {
    "OBSERVABILITY_BACKENDS": "mlflow",
    "MLFLOW_TRACING_ENABLED": "1",
    "MLFLOW_TRACKING_URI": "sqlite:///x.db",
}


def test_nothing_configured_is_a_passthrough() -> None:
    config = TracingConfig.from_env({})
    assert (config.langfuse, config.mlflow) == (None, None)
    assert config.runner_type == "claude-agent-sdk"
    assert config.mask_messages is True
    assert not Observability.from_env({}).enabled


def test_langfuse_is_the_default_backend() -> None:
    config = TracingConfig.from_env(LANGFUSE)
    assert config.langfuse is not None
    assert config.langfuse.host == "http://127.0.0.1:1"
    assert config.mlflow is None


def test_langfuse_base_url_is_accepted_for_host() -> None:
    env = {**LANGFUSE, "LANGFUSE_BASE_URL": "https://cloud.example/"}
    del env["LANGFUSE_HOST"]
    config = TracingConfig.from_env(env)
    assert config.langfuse is not None and config.langfuse.host == "https://cloud.example"


def test_both_backends_listed_case_insensitively() -> None:
    config = TracingConfig.from_env({**LANGFUSE, **MLFLOW, "OBSERVABILITY_BACKENDS": " Langfuse , MLFLOW "})
    assert config.langfuse is not None
    assert config.mlflow is not None
    assert config.mlflow.experiment_name == "ambient-code-sessions"


def test_mlflow_needs_its_enable_flag_and_uri() -> None:
    assert TracingConfig.from_env({**MLFLOW, "MLFLOW_TRACING_ENABLED": "false"}).mlflow is None
    config = TracingConfig.from_env({**MLFLOW, "MLFLOW_EXPERIMENT_NAME": "mine"})
    assert config.mlflow is not None and config.mlflow.experiment_name == "mine"


def test_langfuse_listed_but_not_enabled_is_off_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert TracingConfig.from_env({"LANGFUSE_PUBLIC_KEY": "pk"}).langfuse is None
    assert not caplog.records


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"LANGFUSE_SECRET_KEY": ""}, "LANGFUSE_SECRET_KEY"),
        ({"LANGFUSE_PUBLIC_KEY": ""}, "LANGFUSE_PUBLIC_KEY"),
        ({"LANGFUSE_HOST": "ftp://langfuse"}, "LANGFUSE_HOST"),
        ({"LANGFUSE_HOST": "not a url"}, "LANGFUSE_HOST"),
    ],
)
def test_langfuse_misconfiguration_warns_once_naming_the_variable(
    change: dict[str, str], variable: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ambient_tracing"):
        config = TracingConfig.from_env({**LANGFUSE, **change})
    assert config.langfuse is None
    assert len(caplog.records) == 1
    assert variable in caplog.records[0].getMessage()
    assert "sk-lf-test" not in caplog.text


def test_mlflow_misconfiguration_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ambient_tracing"):
        assert TracingConfig.from_env({**MLFLOW, "MLFLOW_TRACKING_URI": ""}).mlflow is None
        assert TracingConfig.from_env({**MLFLOW, "MLFLOW_TRACKING_URI": "gopher://x"}).mlflow is None
    assert [record.getMessage().count("MLFLOW_TRACKING_URI") for record in caplog.records] == [1, 1]


def test_sample_rate_and_flush_timeout() -> None:
    config = TracingConfig.from_env(
        {**LANGFUSE, "LANGFUSE_SAMPLE_RATE": "0.25", "LANGFUSE_FLUSH_TIMEOUT": "3"}
    )
    assert config.langfuse is not None
    assert (config.langfuse.sample_rate, config.langfuse.flush_timeout) == (0.25, 3.0)


def test_bad_numbers_fall_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    config = TracingConfig.from_env(
        {**LANGFUSE, "LANGFUSE_SAMPLE_RATE": "2", "LANGFUSE_FLUSH_TIMEOUT": "soon"}
    )
    assert config.langfuse is not None
    assert (config.langfuse.sample_rate, config.langfuse.flush_timeout) == (None, 30.0)
    assert "LANGFUSE_SAMPLE_RATE" in caplog.text and "LANGFUSE_FLUSH_TIMEOUT" in caplog.text


def test_masking_can_be_turned_off() -> None:
    assert TracingConfig.from_env({"LANGFUSE_MASK_MESSAGES": "false"}).mask_messages is False
    assert TracingConfig.from_env({"LANGFUSE_MASK_MESSAGES": "0"}).mask_messages is False


@pytest.mark.parametrize(
    ("raw", "slug"),
    [
        ("", "claude-agent-sdk"),
        ("Claude-Agent-SDK", "claude-agent-sdk"),
        ("Pydantic AI", "pydantic-ai"),
        ("  langgraph ", "langgraph"),
        ("!!!", "claude-agent-sdk"),
    ],
)
def test_runner_type_slug(raw: str, slug: str) -> None:
    assert runner_type_slug(raw) == slug
