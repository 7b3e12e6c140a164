"""What the origin runner's dashboards and deployments rely on (issue 9), and span parenting that holds
whatever order a producer sends step and tool events in.

Core behaviour is checked with the in-memory RecordingBackend; what a backend stores is checked with
the real ``mlflow server`` fixture and the Langfuse SDK exporting to the loopback receiver.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient_tracing import Observability
from ambient_tracing.testing import RecordedSpan, RecordingBackend, outliving_spans
from ambient_tracing.tracer.handlers import StreamTracer
from ambient_tracing.tracer.request import RunRequest
from tests.support.fixtures_mlflow import wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver

pytestmark = pytest.mark.timeout(120)

Event = dict[str, Any]


def feed(obs: Observability, events: list[Event], *, user: str | None = "alice") -> StreamTracer:
    tracer = StreamTracer(obs.runs, RunRequest(thread_id="th", run_id="r", user_message="hi", user_id=user))
    for event in events:
        tracer.on_event(event)
    tracer.close()
    return tracer


def traced(events: list[Event], **options: Any) -> tuple[RecordingBackend, RecordedSpan, Observability]:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False, **options)
    feed(obs, events)
    [turn] = backend.runs
    return backend, turn, obs


def run(*events: Event, **finished: Any) -> list[Event]:
    return [
        {"type": "RUN_STARTED", "threadId": "th", "runId": "r"},
        *events,
        {"type": "RUN_FINISHED", "threadId": "th", "runId": "r", **finished},
    ]


def tool_call(call_id: str, name: str, **end: Any) -> list[Event]:
    return [
        {"type": "TOOL_CALL_START", "toolCallId": call_id, "toolCallName": name},
        {"type": "TOOL_CALL_ARGS", "toolCallId": call_id, "delta": '{"cmd": "ls"}'},
        {"type": "TOOL_CALL_END", "toolCallId": call_id, **end},
    ]


def result(call_id: str, content: Any = "ok", **extra: Any) -> Event:
    return {
        "type": "TOOL_CALL_RESULT",
        "toolCallId": call_id,
        "messageId": f"{call_id}-r",
        "content": content,
        **extra,
    }


async def session_report(obs: Observability, backend: RecordingBackend) -> dict[str, Any]:
    assert await obs.end_session("th")
    [record] = [record for record in backend.records if record["name"] == "Session Metrics"]
    return dict(record["metadata"])


# -- failed tools ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result_event", "reason"),
    [
        (result("c1", "permission denied", isError=True), "permission denied"),
        (result("c1", "", error="disk full"), "disk full"),
        (result("c1", "Error: no such file"), "Error: no such file"),
        (result("c1", '{"isError": true, "content": [{"type": "text", "text": "boom"}]}'), "boom"),
    ],
)
async def test_a_failed_tool_ends_its_span_as_error_and_is_counted(result_event: Event, reason: str) -> None:
    backend, turn, obs = traced(run(*tool_call("c1", "Bash"), result_event))
    tool = turn.find("tool_Bash")
    assert tool.error == reason
    assert tool.attributes["is_error"] is True
    assert (tool.attributes["tool_id"], tool.attributes["tool_name"]) == ("c1", "Bash")
    assert (tool.attributes["gen_ai.tool.call.id"], tool.attributes["gen_ai.tool.name"]) == ("c1", "Bash")
    metrics = await session_report(obs, backend)
    assert metrics["tool_failures"] == {"Bash": 1}


async def test_a_tool_that_succeeds_is_not_an_error() -> None:
    backend, turn, obs = traced(run(*tool_call("c1", "Read"), result("c1", "file text")))
    tool = turn.find("tool_Read")
    assert tool.error is None and tool.attributes["is_error"] is False and tool.output == "file text"
    assert (await session_report(obs, backend))["tool_failures"] == {}


async def test_tool_call_end_with_an_error_as_the_origin_adapter_sends_it() -> None:
    # The origin's Claude adapter: TOOL_CALL_END carries the error, the TOOL_CALL_RESULT after it does not.
    backend, turn, obs = traced(
        run(
            *tool_call("c1", "Bash", error="Command not found: foobar"),
            result("c1", "Command not found: foobar"),
            *tool_call("c2", "Read", error={"message": "EACCES"}),  # no result ever comes
        )
    )
    bash, read = turn.find("tool_Bash"), turn.find("tool_Read")
    assert bash.error == "Command not found: foobar" and bash.attributes["is_error"] is True
    assert bash.output == "Command not found: foobar"
    assert read.error == "EACCES" and read.attributes["is_error"] is True
    metrics = await session_report(obs, backend)
    # Counted once each, though the Bash failure shows in both events.
    assert metrics["tool_failures"] == {"Bash": 1, "Read": 1}
    assert metrics["tool_failure_reasons"] == {
        "Bash": {"Command not found: foobar": 1},
        "Read": {"EACCES": 1},
    }


async def test_tool_call_end_without_an_error_changes_nothing() -> None:
    _, turn, _ = traced(run(*tool_call("c1", "Bash", error=None), result("c1", "fine")))
    assert turn.find("tool_Bash").error is None


# -- outcome ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finished", "outcome"),
    [
        ({}, "success"),  # AG-UI 1.0: no outcome means success (LangGraph, ADK, CrewAI, Langroid)
        ({"outcome": {}}, "success"),
        ({"outcome": {"type": "success"}}, "success"),
        ({"outcome": {"type": "interrupt", "interrupts": [{"id": "i"}]}}, "interrupt"),
        ({"outcome": {"type": "cancelled"}}, "cancelled"),
    ],
)
def test_outcome_is_recorded_and_defaults_to_success(finished: dict[str, Any], outcome: str) -> None:
    _, turn, _ = traced(run(**finished))
    assert turn.attributes["ambient.outcome"] == outcome


def test_a_failed_run_has_no_success_outcome() -> None:
    _, turn, _ = traced(
        [{"type": "RUN_STARTED", "threadId": "th", "runId": "r"}, {"type": "RUN_ERROR", "message": "x"}]
    )
    assert turn.error == "x" and "ambient.outcome" not in turn.attributes


# -- parenting: no span outlives its parent, whatever the order ------------------------------------

LANGGRAPH = run(  # ag-ui-langgraph: the tool result arrives in the `tools` step, after `agent` ended
    {"type": "STEP_STARTED", "stepName": "agent"},
    *tool_call("c1", "search"),
    {"type": "STEP_FINISHED", "stepName": "agent"},
    {"type": "STEP_STARTED", "stepName": "tools"},
    result("c1", "found"),
    {"type": "STEP_FINISHED", "stepName": "tools"},
    {"type": "STEP_STARTED", "stepName": "agent"},
    {"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant"},
    {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "done"},
    {"type": "TEXT_MESSAGE_END", "messageId": "m"},
    {"type": "STEP_FINISHED", "stepName": "agent"},
)
ADK = run(  # ag-ui-adk: no steps; a long-running tool's result never comes in this run
    {"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant"},
    {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "let me look"},
    {"type": "TEXT_MESSAGE_END", "messageId": "m"},
    *tool_call("c1", "lookup"),
    result("c1", "42"),
    *tool_call("c2", "approve"),
)
CREWAI = run(  # ag-ui-crewai flows: a step per flow method, chunked tool calls, results after the step
    {"type": "STEP_STARTED", "stepName": "chat"},
    {"type": "TOOL_CALL_CHUNK", "toolCallId": "c1", "toolCallName": "crew", "delta": '{"q": 1}'},
    {"type": "STEP_FINISHED", "stepName": "chat"},
    result("c1", "crew says hi"),
    {"type": "STEP_STARTED", "stepName": "chat"},
    {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "role": "assistant", "delta": "hi"},
    {"type": "STEP_FINISHED", "stepName": "chat"},
)
OUT_OF_ORDER = run(  # an outer step and a subagent closed before what they contain
    {"type": "STEP_STARTED", "stepName": "outer"},
    {"type": "STEP_STARTED", "stepName": "inner"},
    {"type": "SUBAGENT_STARTED", "subagentRunId": "s1", "name": "helper"},
    {"type": "STEP_STARTED", "stepName": "sub-step", "subagentRunId": "s1"},
    *[dict(event, subagentRunId="s1") for event in tool_call("c1", "fetch")],
    {"type": "REASONING_START", "messageId": "r", "subagentRunId": "s1"},
    {"type": "STEP_FINISHED", "stepName": "outer"},
    {"type": "SUBAGENT_FINISHED", "subagentRunId": "s1", "result": "done"},
    result("c1", "page"),
    {"type": "STEP_FINISHED", "stepName": "sub-step"},
    {"type": "REASONING_END", "messageId": "r"},
    {"type": "STEP_FINISHED", "stepName": "inner"},
)


@pytest.mark.parametrize(
    "events", [LANGGRAPH, ADK, CREWAI, OUT_OF_ORDER], ids=["langgraph", "adk", "crewai", "odd"]
)
def test_no_span_outlives_its_parent(events: list[Event]) -> None:
    _, turn, _ = traced(events)
    assert outliving_spans(turn) == []
    assert all(span.ended == 1 for span in turn.walk())


def test_langgraph_tool_hangs_off_the_turn_and_names_the_step_it_started_in() -> None:
    _, turn, _ = traced(LANGGRAPH)
    tool = turn.find("tool_search")
    assert tool.parent is turn and tool.attributes["ambient.step"] == "agent" and tool.output == "found"
    assert [child.name for child in turn.children] == [
        "step_agent",
        "tool_search",
        "step_tools",
        "step_agent",
    ]


def test_a_closed_subagent_waits_for_the_calls_made_in_it() -> None:
    _, turn, _ = traced(OUT_OF_ORDER)
    subagent = turn.find("subagent_helper")
    assert {child.name for child in subagent.children} == {"step_sub-step", "tool_fetch", "reasoning"}
    assert subagent.output == "done" and turn.find("tool_fetch").output == "page"
    assert subagent.ended_at is not None and subagent.ended_at > turn.find("tool_fetch").ended_at  # type: ignore[operator]


_SCOPED = st.sampled_from(["s1", "s2"])
_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("STEP_STARTED"), st.sampled_from(["a", "b", "c"]), _SCOPED),
        st.tuples(st.just("STEP_FINISHED"), st.sampled_from(["a", "b", "c"]), _SCOPED),
        st.tuples(st.just("TOOL_CALL_START"), st.sampled_from(["t1", "t2", "t3"]), _SCOPED),
        st.tuples(st.just("TOOL_CALL_RESULT"), st.sampled_from(["t1", "t2", "t3"]), _SCOPED),
        st.tuples(st.just("SUBAGENT_STARTED"), _SCOPED, _SCOPED),
        st.tuples(st.just("SUBAGENT_FINISHED"), _SCOPED, _SCOPED),
        st.tuples(st.just("REASONING_START"), st.just("r"), _SCOPED),
        st.tuples(st.just("REASONING_END"), st.just("r"), _SCOPED),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OPERATIONS, st.sampled_from([{}, {"error": True}]))
def test_no_span_outlives_its_parent_in_any_order(
    operations: list[tuple[str, str, str]], end: dict[str, Any]
) -> None:
    events: list[Event] = []
    for kind, name, subagent in operations:
        event: Event = {"type": kind, "subagentRunId": subagent}
        if kind.startswith("STEP"):
            event["stepName"] = name
        elif kind.startswith("TOOL"):
            event.update(toolCallId=name, toolCallName=name, messageId="m", content="x")
        elif kind.startswith("SUBAGENT"):
            event.update(subagentRunId=name, parentSubagentRunId=subagent, name=name)
        events.append(event)
    finish: Event = (
        {"type": "RUN_ERROR", "message": "boom"}
        if end
        else {"type": "RUN_FINISHED", "threadId": "th", "runId": "r"}
    )
    _, turn, _ = traced([{"type": "RUN_STARTED", "threadId": "th", "runId": "r"}, *events, finish])
    assert outliving_spans(turn) == []
    assert all(span.ended == 1 for span in turn.walk())


# -- a Langfuse client that cannot be built -------------------------------------------------------


def test_a_langfuse_client_that_raises_leaves_the_app_running_without_langfuse(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("langfuse")
    # The SDK reads LANGFUSE_TIMEOUT itself and raises ValueError quoting the value; here the value is a key.
    monkeypatch.setenv("LANGFUSE_TIMEOUT", "sk-lf-leaked-secret")
    environ = {
        "OBSERVABILITY_BACKENDS": "langfuse",
        "LANGFUSE_ENABLED": "true",
        "LANGFUSE_PUBLIC_KEY": "pk-lf-origin",
        "LANGFUSE_SECRET_KEY": "sk-lf-leaked-secret",
        "LANGFUSE_HOST": "http://127.0.0.1:9",
    }
    with caplog.at_level(logging.WARNING):
        obs = Observability.from_env(environ)
    assert obs.backends == () and not obs.enabled
    assert "Langfuse tracing is off" in caplog.text
    assert "sk-lf-leaked-secret" not in caplog.text


def test_a_langfuse_host_that_cannot_be_parsed_is_a_warning() -> None:
    obs = Observability.from_env(
        {
            "LANGFUSE_ENABLED": "1",
            "LANGFUSE_PUBLIC_KEY": "pk",
            "LANGFUSE_SECRET_KEY": "sk",
            "LANGFUSE_HOST": "http://[::1",
            "OBSERVABILITY_BACKENDS": "langfuse,mlflow",
            "MLFLOW_TRACING_ENABLED": "1",
            "MLFLOW_TRACKING_URI": "http://[::1",
        }
    )
    assert obs.backends == ()


# -- what the backends store ------------------------------------------------------------------------


def flag(span: Any, key: str) -> Any:
    """A boolean metadata value (SDK 5 JSON-encodes it, SDK 4 sends it as is)."""
    value = span.metadata(key)
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


FAILING_RUN = run(
    *tool_call("c1", "Bash", error="exit status 2"),
    result("c1", "ls: cannot access"),
    *tool_call("c2", "Read"),
    result("c2", "text"),
)


async def test_langfuse_stores_the_origin_tool_span(
    langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability([langfuse_backend()], mask_messages=False)
    tracer = feed(obs, FAILING_RUN)
    await obs.aclose()
    spans = {span.name: span for span in langfuse_receiver.wait_for_spans(3)}
    bash, read = spans["tool_Bash"], spans["tool_Read"]
    for span, call_id, name in ((bash, "c1", "Bash"), (read, "c2", "Read")):
        assert span.attributes["langfuse.observation.type"] == "span"
        assert span.metadata("tool_id") == call_id and span.metadata("tool_name") == name
        assert span.metadata("gen_ai.tool.name") == name
        assert span.parent_span_id == spans["llm_interaction"].span_id
    assert bash.attributes["langfuse.observation.level"] == "ERROR"
    assert bash.attributes["langfuse.observation.status_message"] == "exit status 2"
    assert flag(bash, "is_error") is True
    assert read.attributes.get("langfuse.observation.level", "DEFAULT") == "DEFAULT"
    assert flag(read, "is_error") is False
    assert spans["llm_interaction"].metadata("ambient.outcome") == "success"
    assert tracer.trace_id is None


async def test_mlflow_stores_the_origin_tool_span_and_trace_tags(mlflow_backend: Any) -> None:
    backend = mlflow_backend()
    obs = Observability([backend], mask_messages=False)
    tracer = StreamTracer(
        obs.runs,
        RunRequest(thread_id="th", run_id="r", user_message="hi", user_id="alice", user_name="Alice"),
    )
    trace_id = tracer.on_event(FAILING_RUN[0])
    assert trace_id is not None
    for event in FAILING_RUN[1:]:
        tracer.on_event(event)
    await obs.aclose()
    trace = wait_for_trace(backend.tracking_uri, trace_id, lambda t: len(t.data.spans) == 3)
    assert trace.info.tags["ambient.session_id"] == "th"
    assert trace.info.tags["ambient.user_id"] == "alice"
    assert trace.info.trace_metadata["user_name"] == "Alice"
    spans = {span.name: span for span in trace.data.spans}
    bash, read = spans["tool_Bash"], spans["tool_Read"]
    assert bash.status.status_code.value == "ERROR" and bash.status.description == "exit status 2"
    assert bash.attributes["is_error"] is True and bash.attributes["tool_id"] == "c1"
    assert bash.attributes["tool_name"] == "Bash"
    assert read.status.status_code.value == "OK" and read.attributes["is_error"] is False
    assert spans["llm_interaction"].attributes["ambient.outcome"] == "success"


# -- usage in RUN_FINISHED.result.usage (the origin runner's Claude adapter) -----------------------


def claude_result(**usage: int) -> dict[str, Any]:
    """``RUN_FINISHED.result`` as the origin's adapter builds it from the Claude SDK's ResultMessage."""
    return {
        "is_error": False,
        "num_turns": 2,
        "total_cost_usd": 0.01,
        "usage": usage,
        "model": "claude-sonnet-4",
    }


async def test_cumulative_result_usage_counts_what_is_new_in_each_run() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    feed(obs, run(result=claude_result(input_tokens=100, output_tokens=50, cache_read_input_tokens=20)))
    feed(
        obs,
        run(
            result=claude_result(
                input_tokens=300,
                output_tokens=150,
                cache_read_input_tokens=20,
                cache_creation_input_tokens=10,
            )
        ),
    )
    first, second = (turn.usage for turn in backend.runs)
    # AG-UI accounting: cache counts are parts of the input.
    assert [
        (u.model, u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) for u in first
    ] == [("claude-sonnet-4", 120, 50, 20, 0)]
    assert [(u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) for u in second] == [
        (210, 100, 0, 10)
    ]
    assert backend.runs[0].model == "claude-sonnet-4"
    metrics = await session_report(obs, backend)
    assert metrics["tokens"]["input"] == 330 and metrics["tokens"]["output"] == 150
    assert metrics["models"] == ["claude-sonnet-4"]
    # Sonnet 4: $3 input, $15 output, $0.30 cache read, $3.75 cache write per million.
    expected = (300 * 3 + 150 * 15 + 20 * 0.3 + 10 * 3.75) / 1_000_000
    assert metrics["estimated_cost_usd"] == pytest.approx(expected, abs=1e-6)  # rounded to 6 places


def test_a_counter_that_goes_down_restarted() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    feed(obs, run(result=claude_result(input_tokens=500, output_tokens=50)))
    feed(obs, run(result=claude_result(input_tokens=40, output_tokens=5)))
    assert [turn.usage[0].input_tokens for turn in backend.runs] == [500, 40]


def test_ag_ui_usage_wins_over_result_usage_and_bad_usage_is_ignored() -> None:
    agui = [{"model": "m", "inputTokens": 7, "outputTokens": 3}]
    _, turn, _ = traced(run(usage=agui, result=claude_result(input_tokens=100)))
    assert [(u.model, u.input_tokens) for u in turn.usage] == [("m", 7)]
    for bad in ("lots", {"usage": "lots"}, {"usage": {"input_tokens": "many", "output_tokens": -1}}, None):
        _, turn, _ = traced(run(result=bad))
        assert turn.usage == ()


async def test_result_usage_objects_from_the_python_door() -> None:
    from ag_ui.core import EventType, RunFinishedEvent, RunStartedEvent

    from ambient_tracing import trace_agui_stream

    class Usage:  # the Claude SDK hands over a plain object
        def __init__(self) -> None:
            self.input_tokens, self.output_tokens = 11, 4

    async def events() -> Any:
        yield RunStartedEvent(type=EventType.RUN_STARTED, thread_id="th", run_id="r")
        yield RunFinishedEvent(
            type=EventType.RUN_FINISHED, thread_id="th", run_id="r", result={"usage": Usage()}
        )

    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    async for _ in trace_agui_stream(events(), obs):
        pass
    [turn] = backend.runs
    assert [(u.input_tokens, u.output_tokens) for u in turn.usage] == [(11, 4)]


async def test_mlflow_and_langfuse_record_result_usage(
    mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow = mlflow_backend()
    obs = Observability([mlflow, langfuse_backend()], mask_messages=False)
    tracer = StreamTracer(obs.runs, RunRequest(thread_id="th-usage", run_id="r", user_message="hi"))
    trace_id = tracer.on_event({"type": "RUN_STARTED", "threadId": "th-usage", "runId": "r"})
    assert trace_id is not None
    tracer.on_event(
        {
            "type": "RUN_FINISHED",
            "threadId": "th-usage",
            "runId": "r",
            "result": claude_result(input_tokens=100, output_tokens=50, cache_read_input_tokens=20),
        }
    )
    await obs.aclose()
    trace = wait_for_trace(mlflow.tracking_uri, trace_id)
    usage = trace.info.token_usage
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (120, 50, 170)
    [root] = [span for span in langfuse_receiver.wait_for_spans(1) if span.trace_id == trace_id]
    assert root.attributes["langfuse.observation.model.name"] == "claude-sonnet-4"
    details = json.loads(root.attributes["langfuse.observation.usage_details"])
    assert (details["input"], details["output"], details["cache_read_input_tokens"]) == (120, 50, 20)


# -- namespace, workflow, Session Metrics as the origin's dashboards read them ---------------------


def test_active_workflow_is_read_from_the_environment_when_asked() -> None:
    from ambient_tracing.config import Workflow, active_workflow

    assert active_workflow({}) is None
    assert active_workflow({"ACTIVE_WORKFLOW_GIT_URL": "  "}) is None
    workflow = active_workflow(
        {
            "ACTIVE_WORKFLOW_GIT_URL": "https://x-token:ghp_secret@github.com/acme/bug-triage.git/",
            "ACTIVE_WORKFLOW_BRANCH": " main\n",
            "ACTIVE_WORKFLOW_PATH": "flows/triage",
        }
    )
    assert workflow == Workflow("https://github.com/acme/bug-triage.git/", "main", "flows/triage")
    assert workflow.name == "bug-triage"
    assert workflow.metadata() == {
        "workflow_name": "bug-triage",
        "workflow_url": "https://github.com/acme/bug-triage.git/",
        "workflow_branch": "main",
        "workflow_path": "flows/triage",
    }
    nameless = active_workflow({"ACTIVE_WORKFLOW_GIT_URL": "https://host/%%%"})
    assert nameless is not None and nameless.name == "" and nameless.metadata()["workflow_name"] == "unknown"
    assert active_workflow({"ACTIVE_WORKFLOW_GIT_URL": "git@github.com:acme/tool.git"}).name == "tool"  # type: ignore[union-attr]


def test_namespace_comes_from_agentic_session_namespace() -> None:
    from ambient_tracing import TracingConfig

    assert TracingConfig.from_env({}).namespace is None
    assert TracingConfig.from_env({"AGENTIC_SESSION_NAMESPACE": "team-a"}).namespace == "team-a"
    assert TracingConfig.from_env({"AGENTIC_SESSION_NAMESPACE": "team a;drop"}).namespace == "teamadrop"


async def test_every_run_and_session_metrics_carry_namespace_and_the_workflow_of_the_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False, namespace="team-a")
    monkeypatch.setenv("ACTIVE_WORKFLOW_GIT_URL", "https://github.com/acme/bug-triage.git")
    monkeypatch.setenv("ACTIVE_WORKFLOW_BRANCH", "main")
    feed(obs, run(*tool_call("c1", "Read"), result("c1")))
    monkeypatch.setenv("ACTIVE_WORKFLOW_GIT_URL", "https://github.com/acme/spec-kit")  # the user switched
    monkeypatch.delenv("ACTIVE_WORKFLOW_BRANCH")
    feed(obs, run(*tool_call("c2", "mcp__github__get_issue", error="rate limited"), result("c2", "")))
    first, second = (turn.attributes for turn in backend.runs)
    assert first["ambient.namespace"] == second["ambient.namespace"] == "team-a"
    assert (first["ambient.workflow"], first["workflow_name"], first["workflow_branch"]) == (
        "bug-triage",
        "bug-triage",
        "main",
    )
    assert second["workflow_url"] == "https://github.com/acme/spec-kit" and "workflow_branch" not in second

    assert await obs.end_session("th")
    [record] = backend.records
    assert record["input"] == {
        "session_id": "th",
        "user_id": "alice",
        "namespace": "team-a",
        "user_name": None,
    }
    metadata = record["metadata"]
    assert metadata["source"] == "ambient-runner-metrics" and metadata["collected_at"]
    assert (metadata["session_id"], metadata["user_id"], metadata["namespace"]) == ("th", "alice", "team-a")
    assert metadata["workflow_name"] == metadata["ambient.workflow"] == "spec-kit"
    # The origin's flat keys, alongside this package's nested ones.
    assert metadata["tool_calls_total"] == 2.0 and metadata["tool_calls_Read"] == 1.0
    assert metadata["tool_calls_github"] == 1.0 and metadata["tool_calls"] == {"Read": 1, "github": 1}
    assert (
        metadata["interrupt_tool_failure_total"] == 1.0 and metadata["interrupt_tool_failure_github"] == 1.0
    )
    assert metadata["interrupt_reason_github:_rate_limited"] == 1.0
    assert metadata["interrupt_human"] == 0.0 and metadata["interrupt_unclear_context"] == 0.0
    assert metadata["token_total"] == 0.0 and metadata["estimated_cost_usd"] is None
    assert record["output"]["tool_failure_reasons"] == {"github": {"rate limited": 1}}


async def test_flat_token_keys_use_the_origins_accounting() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False, workflow=None)
    usage = [
        {"model": "claude-sonnet-4", "inputTokens": 1000, "outputTokens": 500, "cachedInputTokens": 200},
        {"model": "mystery", "inputTokens": 10, "outputTokens": 5},
    ]
    feed(obs, run(usage=usage))
    feed(obs, run(usage=usage[:1]))
    assert await obs.end_session("th")
    [record] = backend.records
    metadata = record["metadata"]
    # Anthropic's accounting: token_input is the uncached part; the total is everything.
    assert metadata["token_input"] == 2 * 800 + 10 and metadata["token_cache_read"] == 400
    assert metadata["token_output"] == 1005 and metadata["token_total"] == 2 * 1500 + 15
    assert metadata["models_seen"] == {"claude-sonnet-4": 2, "mystery": 1}
    assert metadata["namespace"] == "unknown" and "ambient.workflow" not in metadata


async def test_a_flood_of_failure_reasons_stays_bounded() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    events = [
        event
        for n in range(300)
        for event in (*tool_call(f"c{n}", f"t{n % 5}"), result(f"c{n}", f"Error {n}"))
    ]
    feed(obs, run(*events))
    assert await obs.end_session("th")
    metadata = backend.records[0]["metadata"]
    reasons = [key for key in metadata if key.startswith("interrupt_reason_")]
    assert len(reasons) <= 101
    assert sum(metadata[key] for key in reasons) == 300


async def test_backends_store_namespace_workflow_and_session_metrics(
    mlflow_backend: Any,
    langfuse_backend: Any,
    langfuse_receiver: LangfuseReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mlflow = mlflow_backend()
    obs = Observability([mlflow, langfuse_backend()], mask_messages=False, namespace="team-a")
    monkeypatch.setenv("ACTIVE_WORKFLOW_GIT_URL", "https://github.com/acme/bug-triage.git")
    monkeypatch.setenv("ACTIVE_WORKFLOW_PATH", "flows/triage")
    tracer = StreamTracer(
        obs.runs,
        RunRequest(thread_id="th-wf", run_id="r", user_message="hi", user_id="alice", user_name="Alice"),
    )
    trace_id = tracer.on_event({"type": "RUN_STARTED", "threadId": "th-wf", "runId": "r"})
    assert trace_id is not None
    for event in [*tool_call("c1", "Read"), result("c1", "text")]:
        tracer.on_event(event)
    tracer.on_event({"type": "RUN_FINISHED", "threadId": "th-wf", "runId": "r"})
    assert await obs.end_session("th-wf")
    await obs.aclose()

    trace = wait_for_trace(mlflow.tracking_uri, trace_id)
    assert (
        trace.info.tags["ambient.workflow"] == "bug-triage"
        and trace.info.tags["ambient.namespace"] == "team-a"
    )
    assert trace.info.trace_metadata["workflow_path"] == "flows/triage"
    assert trace.info.trace_metadata["workflow_url"] == "https://github.com/acme/bug-triage.git"
    [metrics_trace] = mlflow.client.search_traces(
        locations=[mlflow.experiment_id], filter_string="tags.`ambient.source` = 'ambient-runner-metrics'"
    )
    root = metrics_trace.data.spans[0]
    assert root.inputs == {
        "session_id": "th-wf",
        "user_id": "alice",
        "namespace": "team-a",
        "user_name": "Alice",
    }
    assert root.attributes["tool_calls_Read"] == 1.0 and root.attributes["workflow_name"] == "bug-triage"
    assert metrics_trace.info.tags["ambient.workflow"] == "bug-triage"
    assert metrics_trace.info.tags["ambient.user_id"] == "alice"

    spans = langfuse_receiver.wait_for_spans(
        lambda found: {"Session Metrics", "tool_Read"} <= {s.name for s in found}
    )
    for span in spans:
        assert {"namespace:team-a", "workflow:bug-triage"} <= set(span.attributes["langfuse.trace.tags"])
        assert span.metadata("workflow_name", trace=True) == "bug-triage"
        assert span.metadata("workflow_path", trace=True) == "flows/triage"
        assert span.metadata("namespace", trace=True) == "team-a"
    [summary] = [span for span in spans if span.name == "Session Metrics"]
    assert json.loads(summary.attributes["langfuse.observation.input"])["user_name"] == "Alice"
    assert summary.metadata("token_total") in (0.0, "0.0")
    assert summary.metadata("user_name") == "Alice"


# -- one trace when two layers would trace the same request ---------------------------------------


def _app_using_the_stream_wrapper(obs: Observability, media_type: str = "text/event-stream") -> Any:
    """An app that traces its own events with trace_agui_stream (as the README shows)."""
    from ag_ui.encoder import EventEncoder
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from ambient_tracing import trace_agui_stream
    from tests.support.agui_app import scripted_run

    async def agent(request: Request) -> StreamingResponse:
        body = await request.json()

        async def events() -> Any:
            for event in scripted_run(body["threadId"], body["runId"]):
                yield event

        async def encoded() -> Any:
            encoder = EventEncoder()
            async for event in trace_agui_stream(events(), obs, body):
                yield encoder.encode(event)

        return StreamingResponse(encoded(), media_type=media_type)

    return Starlette(routes=[Route("/agent", agent, methods=["POST"])])


@pytest.mark.parametrize("layers", ["middleware+wrapper", "middleware+middleware"])
async def test_two_layers_give_one_trace_and_one_id_event(layers: str) -> None:
    from ambient_tracing import TracingMiddleware
    from tests.support.agui_app import agui_app, run_input
    from tests.support.client import post_run
    from tests.support.server import serve

    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False, workflow=None)
    inner = (
        _app_using_the_stream_wrapper(obs)
        if layers == "middleware+wrapper"
        else TracingMiddleware(agui_app(), observability=obs)
    )
    with serve(TracingMiddleware(inner, observability=obs)) as url:
        streamed = await post_run(url, run_input("th-two", "r1"))
        again = await post_run(url, run_input("th-two", "r2"))
    assert len(streamed.trace_ids) == 1 and len(again.trace_ids) == 1
    assert streamed.types[:2] == ["RUN_STARTED", "CUSTOM"]
    assert [turn.trace_id for turn in backend.runs] == streamed.trace_ids + again.trace_ids
    assert not backend.open_spans()


async def test_the_stream_wrapper_alone_still_traces() -> None:
    from tests.support.agui_app import run_input
    from tests.support.client import post_run
    from tests.support.server import serve

    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False, workflow=None)
    with serve(_app_using_the_stream_wrapper(obs)) as url:
        streamed = await post_run(url, run_input("th-one", "r1"))
    assert [turn.trace_id for turn in backend.runs] == streamed.trace_ids


# -- a sqlite store keeps its artifacts beside it ----------------------------------------------------


async def test_a_sqlite_store_keeps_its_artifacts_beside_the_database(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ambient_tracing.backends.mlflow import MlflowBackend, artifacts_beside

    store, elsewhere = tmp_path / "store", tmp_path / "started-here"
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    backend = MlflowBackend(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", experiment_name="my runs/\u00e9")
    backend.setup()
    location = backend.client.get_experiment(backend.experiment_id).artifact_location
    assert location == (store / "mlartifacts" / "my-runs").as_uri()
    obs = Observability([backend], mask_messages=False, workflow=None)
    tracer = feed(obs, run(*tool_call("c1", "Read"), result("c1", "x" * 10_000)))
    await obs.aclose()
    assert tracer.trace_id is None
    assert not (elsewhere / "mlruns").exists() and not (elsewhere / "mlartifacts").exists()
    # A relative path is beside the database too; other stores choose their own location.
    assert artifacts_beside("sqlite:///rel/m.db", "e") == (elsewhere / "rel" / "mlartifacts" / "e").as_uri()
    assert artifacts_beside("sqlite://", "e") is None and artifacts_beside("sqlite:///:memory:", "e") is None
    assert artifacts_beside("http://127.0.0.1:5000", "e") is None


async def test_a_response_the_middleware_does_not_trace_is_traced_by_the_wrapper() -> None:
    from ambient_tracing import TracingMiddleware
    from tests.support.agui_app import run_input
    from tests.support.client import post_run
    from tests.support.server import serve

    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False, workflow=None)
    # Not SSE: the middleware passes the bytes through untraced, so the app's own wrapper traces.
    app = _app_using_the_stream_wrapper(obs, media_type="application/x-agui-lines")
    with serve(TracingMiddleware(app, observability=obs)) as url:
        streamed = await post_run(url, run_input("th-lines", "r1"))
    assert len(streamed.trace_ids) == 1
    assert [turn.trace_id for turn in backend.runs] == streamed.trace_ids
