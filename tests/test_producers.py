"""Real AG-UI producers beyond one framework, each behind TracingMiddleware over uvicorn.

pydantic-ai, LangGraph (ag-ui-langgraph on a scripted langchain-core chat model), Google ADK
(ag-ui-adk on a scripted ``BaseLlm``) and AWS Strands (ag-ui-strands on a scripted ``Model``), as
served by ``examples/``. For each: the traced stream passes
``ag-ui-validate`` and carries one id event per run right after RUN_STARTED; the run is read back from
a real ``mlflow server`` and from the Langfuse SDK's exports under that one id, with its tool span,
names and usage; no span outlives its parent; a run finished without ``outcome`` is a success.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ag_ui_validate.pytest_plugin import assert_valid_agui, validate_agui_endpoint

from ambient_tracing import Observability
from ambient_tracing.backends.mlflow import MlflowBackend
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import run_input
from tests.support.client import Streamed, post_run
from tests.support.fixtures_mlflow import wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver, ReceivedSpan
from tests.support.producers import (
    ANSWER,
    CITY,
    PRODUCERS,
    PROMPT,
    TOOL_CALL_ID,
    Producer,
)
from tests.support.server import serve

VALIDATE_CLI = Path(sys.executable).with_name("ag-ui-validate")


def producers() -> list[Any]:
    """Every producer as a test parameter, named."""
    return [pytest.param(producer, id=producer.name) for producer in PRODUCERS]


def json_decoded(value: Any) -> Any:
    """``value``, or what it decodes to when it is a string holding JSON."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


async def run_once(url: str, thread: str, run: str, prompt: str = PROMPT) -> Streamed:
    headers = {"accept": "text/event-stream", "x-current-user-id": "ana"}
    streamed = await post_run(url, run_input(thread, run, prompt), headers=headers)
    assert streamed.raw.endswith(b"\n\n"), streamed.raw[-200:]
    return streamed


async def traced_run(producer: Producer, obs: Observability, thread: str) -> tuple[Streamed, str]:
    """One run of the producer's example behind the middleware; the stream and the id it announced."""
    with serve(producer.build_app(obs)) as url:
        streamed = await run_once(url, thread, f"{thread}-run")
    [trace_id] = streamed.trace_ids
    await obs.aclose()
    return streamed, trace_id


# -- the stream ---------------------------------------------------------------------------------


@pytest.mark.parametrize("producer", producers())
async def test_stream_is_valid_ag_ui_with_one_id_event_per_run(producer: Producer, tmp_path: Path) -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    thread = f"thread-{producer.name}-valid"
    with serve(producer.build_app(obs)) as url:
        first = await run_once(url, thread, "run-1")
        second = await run_once(url, thread, "run-2", f"And the weather in {CITY}?")
        live = await validate_agui_endpoint(
            f"{url}/agent", input=run_input(thread, "run-3", PROMPT), timeout_ms=20_000
        )
    for streamed in (first, second):
        assert streamed.types[:2] == ["RUN_STARTED", "CUSTOM"], streamed.types
        assert streamed.types[-1] == "RUN_FINISHED"
        assert streamed.raw.count(b"ambient:trace_id") == 1
        [trace_id] = streamed.trace_ids
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
        assert_valid_agui(streamed.events, max_warnings=0)
        text = "".join(e["delta"] for e in streamed.events if e["type"] == "TEXT_MESSAGE_CONTENT")
        assert text.strip() == ANSWER
    assert first.trace_ids != second.trace_ids

    # The validator's CLI on the captured bytes, and its HTTP client against the live endpoint.
    capture = tmp_path / "run.sse"
    capture.write_bytes(first.raw)
    result = subprocess.run(
        [str(VALIDATE_CLI), str(capture), "--json"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["summary"]["errors"] == 0 and report["summary"]["warnings"] == 0, report["diagnostics"]
    assert report["eventCount"] == len(first.events)
    assert live.summary.errors == 0 and live.summary.warnings == 0, live.diagnostics
    assert live.internal_errors == []

    turns = [turn for turn in backend.runs if turn.run is not None and turn.run.thread_id == thread]
    assert [turn.trace_id for turn in turns[:2]] == [*first.trace_ids, *second.trace_ids]
    assert [turn.run.turn_number for turn in turns if turn.run is not None] == [1, 2, 3]
    assert backend.open_spans() == []
    await obs.aclose()


# -- read back from MLflow and Langfuse ---------------------------------------------------------


def mlflow_spans(tracking_uri: str, trace_id: str, count: int) -> tuple[Any, list[Any]]:
    trace = wait_for_trace(tracking_uri, trace_id, lambda t: len(t.data.spans) == count)
    return trace, trace.data.spans


def langfuse_spans(receiver: LangfuseReceiver, trace_id: str, count: int) -> list[ReceivedSpan]:
    return receiver.wait_for_spans(lambda spans: sum(s.trace_id == trace_id for s in spans) >= count)


@pytest.mark.parametrize("producer", producers())
async def test_the_run_is_read_back_from_mlflow_and_langfuse_under_one_id(
    producer: Producer, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], runner_type=producer.name, mask_messages=False)
    thread = f"thread-{producer.name}-backends"
    streamed, trace_id = await traced_run(producer, obs, thread)
    count = len(producer.span_names)

    # MLflow: the trace under the announced id, its root, its tool span and the usage.
    trace, spans = mlflow_spans(mlflow_side.tracking_uri, trace_id, count)
    assert trace.info.trace_id == f"tr-{trace_id}"
    assert sorted(span.name for span in spans) == sorted(producer.span_names)
    assert trace.info.tags["ambient.thread_id"] == thread
    root = next(span for span in spans if span.parent_id is None)
    assert root.name == "llm_interaction"
    assert root.inputs == PROMPT
    assert str(root.outputs).strip() == ANSWER
    assert root.attributes["gen_ai.conversation.id"] == thread
    [tool] = [span for span in spans if span.name == "tool_get_weather"]
    assert tool.inputs == {"city": CITY}
    # MLflow reads a string output that is itself JSON back decoded (Strands' '"Sunny ..."').
    assert json_decoded(tool.outputs) == json_decoded(producer.tool_output)
    assert tool.attributes["gen_ai.tool.name"] == "get_weather"
    assert tool.attributes["gen_ai.tool.call.id"] == TOOL_CALL_ID
    assert tool.status.status_code.value == "OK"
    # Tools hang off the run (a step may end before the result comes); the step is an attribute.
    assert tool.parent_id == root.span_id
    assert tool.attributes.get("ambient.step") == producer.tool_step
    if producer.usage is None:
        assert not trace.info.token_usage
    else:
        model, input_tokens, output_tokens, total = producer.usage
        assert trace.info.token_usage == {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": total,
        }
        assert root.attributes["gen_ai.request.model"] == model

    # Langfuse: the same id, the same spans, the tool observation and the usage details.
    received = [s for s in langfuse_spans(langfuse_receiver, trace_id, count) if s.trace_id == trace_id]
    assert sorted(span.name for span in received) == sorted(producer.span_names)
    by_name = {span.name: span for span in received}
    lf_root, lf_tool = by_name["llm_interaction"], by_name["tool_get_weather"]
    assert lf_tool.parent_span_id in {span.span_id for span in received}
    assert lf_root.attributes["session.id"] == thread
    assert lf_root.attributes["user.id"] == "ana"
    assert list(lf_root.attributes["langfuse.trace.tags"]) == [f"runner:{producer.name}"]
    assert lf_root.attributes["langfuse.observation.input"] == PROMPT
    assert lf_tool.attributes["langfuse.observation.type"] == "span"  # the origin runner's type
    assert lf_tool.metadata("tool_name") == "get_weather" and lf_tool.metadata("tool_id") == TOOL_CALL_ID
    assert lf_tool.metadata("is_error") in (False, "false")
    assert json.loads(lf_tool.attributes["langfuse.observation.input"]) == {"city": CITY}
    output = lf_tool.attributes["langfuse.observation.output"]
    assert (output if isinstance(producer.tool_output, str) else json.loads(output)) == producer.tool_output
    assert lf_tool.metadata("gen_ai.tool.name") == "get_weather"
    if producer.usage is None:
        assert "langfuse.observation.usage_details" not in lf_root.attributes
    else:
        model, input_tokens, output_tokens, total = producer.usage
        assert json.loads(lf_root.attributes["langfuse.observation.usage_details"]) == {
            "input": input_tokens,
            "output": output_tokens,
            "total": total,
        }
        assert lf_root.attributes["langfuse.observation.model.name"] == model
    assert obs.last_trace_id(thread) == trace_id
    assert streamed.trace_ids == [trace_id]


@pytest.mark.parametrize("producer", producers())
async def test_no_span_outlives_its_parent(
    producer: Producer, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    """LangGraph closes its ``agent`` step before the ``tools`` step brings the tool result: every span
    still has to start and end inside its parent, in both backends."""
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], mask_messages=False)
    _, trace_id = await traced_run(producer, obs, f"thread-{producer.name}-nesting")
    count = len(producer.span_names)
    outside: list[tuple[str, str, str]] = []

    _, spans = mlflow_spans(mlflow_side.tracking_uri, trace_id, count)
    by_id = {span.span_id: span for span in spans}
    for span in spans:
        if span.parent_id is not None:
            parent = by_id[span.parent_id]
            if not parent.start_time_ns <= span.start_time_ns <= span.end_time_ns <= parent.end_time_ns:
                outside.append(("mlflow", span.name, parent.name))
    received = [s for s in langfuse_spans(langfuse_receiver, trace_id, count) if s.trace_id == trace_id]
    lf_by_id = {span.span_id: span for span in received}
    for span in received:
        if span.parent_span_id in lf_by_id:  # the root's parent is Langfuse's remote trace context
            parent = lf_by_id[span.parent_span_id]
            if not parent.start_ns <= span.start_ns <= span.end_ns <= parent.end_ns:
                outside.append(("langfuse", span.name, parent.name))
    assert outside == []


@pytest.mark.parametrize("producer", producers())
async def test_a_run_finished_without_outcome_is_a_success(
    producer: Producer, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    """AG-UI 1.0: RUN_FINISHED without ``outcome`` means success (LangGraph and ADK send none;
    pydantic-ai and Strands send ``{"type": "success"}``)."""
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], mask_messages=False)
    streamed, trace_id = await traced_run(producer, obs, f"thread-{producer.name}-outcome")
    sent = streamed.events[-1].get("outcome")
    assert sent in (None, {"type": "success"})
    _, spans = mlflow_spans(mlflow_side.tracking_uri, trace_id, len(producer.span_names))
    root = next(span for span in spans if span.parent_id is None)
    assert root.attributes["ambient.outcome"] == "success"
    received = langfuse_spans(langfuse_receiver, trace_id, len(producer.span_names))
    lf_root = next(s for s in received if s.trace_id == trace_id and s.name == "llm_interaction")
    assert lf_root.metadata("ambient.outcome") == "success"
