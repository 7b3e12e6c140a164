"""The MLflow backend against a real ``mlflow server`` (and a sqlite store): what a run becomes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pytest
from ag_ui.core import EventType, RunErrorEvent, RunStartedEvent, ToolCallStartEvent

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.base import RunStart, SpanKind, TokenUsage
from ambient_tracing.backends.mlflow import MlflowBackend, to_mlflow_trace_id
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.fixtures_mlflow import MlflowServer, wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.server import serve


def _turn(**overrides: Any) -> RunStart:
    values: dict[str, Any] = {
        "thread_id": "thread-1",
        "run_id": "run-1",
        "user_id": "alice",
        "user_name": "Alice",
        "runner_type": "pydantic-ai",
        "turn_number": 1,
        "input": "What is the meaning of life?",
    }
    return RunStart(**{**values, **overrides})


def _spans_by_name(trace: Any) -> dict[str, Any]:
    return {span.name: span for span in trace.data.spans}


def test_a_turn_with_a_tool_is_stored_with_names_parents_tags_and_usage(mlflow_backend: Any) -> None:
    backend: MlflowBackend = mlflow_backend()
    root = backend.start_run(_turn(attributes={"gen_ai.conversation.id": "thread-1"}))
    assert root is not None
    assert len(root.trace_id) == 32 and int(root.trace_id, 16) >= 0
    tool = root.start_child("tool_search", SpanKind.TOOL, attributes={"gen_ai.tool.name": "search"})
    tool.set_input({"query": "life"})
    tool.end(output="42")
    root.end(
        output="The answer is 42.",
        usage=[TokenUsage(model="m-1", provider="acme", input_tokens=12, output_tokens=7)],
    )

    trace = wait_for_trace(backend.tracking_uri, root.trace_id, lambda t: len(t.data.spans) == 2)
    info = trace.info
    assert info.trace_id == f"tr-{root.trace_id}"
    assert info.experiment_id == backend.experiment_id
    assert info.tags["ambient.thread_id"] == "thread-1"
    assert info.tags["ambient.run_id"] == "run-1"
    assert info.trace_metadata["mlflow.trace.session"] == "thread-1"
    assert info.trace_metadata["mlflow.trace.user"] == "alice"
    assert info.token_usage == {"input_tokens": 12, "output_tokens": 7, "total_tokens": 19}
    assert info.state.value == "OK"

    spans = _spans_by_name(trace)
    turn, search = spans["llm_interaction"], spans["tool_search"]
    assert turn.parent_id is None and search.parent_id == turn.span_id
    assert turn.span_type == "AGENT" and search.span_type == "TOOL"
    assert turn.inputs == "What is the meaning of life?" and turn.outputs == "The answer is 42."
    assert search.inputs == {"query": "life"} and search.outputs == "42"
    assert search.attributes["gen_ai.tool.name"] == "search"
    attributes = turn.attributes
    assert attributes["ambient.runner_type"] == "pydantic-ai"
    assert attributes["ambient.session_id"] == "thread-1"
    assert attributes["ambient.user_id"] == "alice"
    assert attributes["gen_ai.conversation.id"] == "thread-1"
    assert attributes["llm.model_name"] == "m-1"
    assert attributes["gen_ai.usage.input_tokens"] == 12
    assert attributes["gen_ai.provider.name"] == "acme"


def test_an_error_ends_the_span_with_error_status_and_message(mlflow_backend: Any) -> None:
    backend: MlflowBackend = mlflow_backend()
    root = backend.start_run(_turn())
    assert root is not None
    root.start_child("tool_fail", SpanKind.TOOL).end(error="run ended: boom")
    root.end(error="boom")
    trace = wait_for_trace(backend.tracking_uri, root.trace_id, lambda t: len(t.data.spans) == 2)
    assert trace.info.state.value == "ERROR"
    for span in trace.data.spans:
        assert span.status.status_code.value == "ERROR"
    assert _spans_by_name(trace)["llm_interaction"].status.description == "boom"


def test_no_turn_before_setup_or_when_tracing_is_disabled(mlflow_server: MlflowServer) -> None:
    backend = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name="not-set-up")
    assert backend.start_run(_turn()) is None
    backend.setup()
    mlflow.tracing.disable()
    try:
        assert backend.start_run(_turn()) is None  # never MLflow's placeholder id
    finally:
        mlflow.tracing.enable()
    span = backend.start_run(_turn())
    assert span is not None
    span.end()


def test_the_sqlite_store_is_created_when_missing(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    store = tmp_path / "new" / "mlflow.db"
    store.parent.mkdir()
    backend = MlflowBackend(tracking_uri=f"sqlite:///{store}", experiment_name="sqlite-test")
    try:
        backend.setup()
        assert store.exists()
        root = backend.start_run(_turn())
        assert root is not None
        root.end(output="ok")
        trace = wait_for_trace(backend.tracking_uri, root.trace_id)
        assert trace.data.spans[0].name == "llm_interaction"
    finally:
        mlflow.set_tracking_uri(mlflow_server.url)  # MLflow's tracking URI is process-wide


async def test_a_run_through_the_middleware_is_searchable_by_its_tags(mlflow_backend: Any) -> None:
    backend: MlflowBackend = mlflow_backend()
    obs = Observability([backend], runner_type="pydantic-ai", mask_messages=False)
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        streamed = await post_run(url, run_input("thread-m", "run-m"), headers={"x-current-user-id": "bob"})
    [trace_id] = streamed.trace_ids
    assert obs.last_trace_id("thread-m") == trace_id
    await obs.aclose()

    trace = wait_for_trace(backend.tracking_uri, trace_id, lambda t: len(t.data.spans) == 2)
    spans = _spans_by_name(trace)
    assert spans["tool_search"].parent_id == spans["llm_interaction"].span_id
    assert spans["tool_search"].inputs == {"query": "life"}
    assert spans["tool_search"].attributes["gen_ai.tool.call.id"] == "run-m-call"
    assert spans["llm_interaction"].outputs == "The answer is 42. "
    assert trace.info.trace_metadata["mlflow.trace.user"] == "bob"
    assert trace.info.token_usage["total_tokens"] == 19

    found = mlflow.search_traces(
        locations=[backend.experiment_id],
        filter_string="tags.`ambient.run_id` = 'run-m'",
        return_type="list",
    )
    assert [t.info.trace_id for t in found] == [to_mlflow_trace_id(trace_id)]


async def test_run_error_and_masking_reach_mlflow(mlflow_backend: Any) -> None:
    backend: MlflowBackend = mlflow_backend()
    obs = Observability([backend])  # LANGFUSE_MASK_MESSAGES defaults to on: masks MLflow too
    long_question = "Please tell me, in great detail, what is the meaning of life and everything?"

    def failing(body: dict[str, Any]) -> list[Any]:
        return [
            RunStartedEvent(type=EventType.RUN_STARTED, thread_id=body["threadId"], run_id=body["runId"]),
            ToolCallStartEvent(type=EventType.TOOL_CALL_START, tool_call_id="c1", tool_call_name="search"),
            RunErrorEvent(type=EventType.RUN_ERROR, message="model overloaded"),
        ]

    with serve(TracingMiddleware(agui_app(failing), observability=obs)) as url:
        streamed = await post_run(url, run_input("thread-e", "run-e", long_question))
    [trace_id] = streamed.trace_ids
    await obs.aclose()
    trace = wait_for_trace(backend.tracking_uri, trace_id, lambda t: len(t.data.spans) == 2)
    spans = _spans_by_name(trace)
    assert trace.info.state.value == "ERROR"
    assert spans["llm_interaction"].status.description == "model overloaded"
    assert spans["llm_interaction"].inputs == "[REDACTED FOR PRIVACY]"
    assert spans["tool_search"].status.status_code.value == "ERROR"


async def test_both_backends_record_the_run_under_the_one_id_in_the_stream(
    mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], mask_messages=False)
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        streamed = await post_run(url, run_input("thread-b", "run-b"))
    [trace_id] = streamed.trace_ids
    await obs.aclose()

    trace = wait_for_trace(mlflow_side.tracking_uri, trace_id, lambda t: len(t.data.spans) == 2)
    assert trace.info.trace_id == f"tr-{trace_id}"
    langfuse_spans = langfuse_receiver.wait_for_spans(
        lambda spans: {"llm_interaction", "tool_search"} <= {s.name for s in spans if s.trace_id == trace_id}
    )
    assert {s.trace_id for s in langfuse_spans if s.name == "llm_interaction"} == {trace_id}
    assert obs.current_trace_id("thread-b") is None
    assert obs.last_trace_id("thread-b") == trace_id


@pytest.mark.parametrize("ratio", ["0.0"])
def test_a_sampled_out_run_gets_no_id_event(ratio: str, mlflow_backend: Any, monkeypatch: Any) -> None:
    backend: MlflowBackend = mlflow_backend()
    monkeypatch.setenv("MLFLOW_TRACE_SAMPLING_RATIO", ratio)
    mlflow.tracing.reset()  # the sampler is built with the tracer provider
    try:
        assert backend.start_run(_turn()) is None
    finally:
        monkeypatch.delenv("MLFLOW_TRACE_SAMPLING_RATIO")
        mlflow.tracing.reset()


def test_usage_of_several_models_is_summed_for_the_trace(mlflow_backend: Any) -> None:
    backend: MlflowBackend = mlflow_backend()
    root = backend.start_run(_turn())
    assert root is not None
    for model, tokens in (("a", 10), ("b", 5)):
        root.start_child("model_usage", SpanKind.GENERATION).end(
            model=model, usage=[TokenUsage(model=model, input_tokens=tokens, output_tokens=1)]
        )
    root.end()
    trace = wait_for_trace(backend.tracking_uri, root.trace_id, lambda t: len(t.data.spans) == 3)
    assert trace.info.token_usage == {"input_tokens": 15, "output_tokens": 2, "total_tokens": 17}
    models = sorted(s.attributes.get("llm.model_name") for s in trace.data.spans if s.name == "model_usage")
    assert models == ["a", "b"]
    assert json.dumps(trace.info.token_usage)
