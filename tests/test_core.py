"""The core: which trace operations an AG-UI event sequence becomes (protocol-neutral)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from ambient_tracing import Observability
from ambient_tracing.backends.base import SpanKind
from ambient_tracing.privacy import REDACTED
from ambient_tracing.testing import RecordedSpan, RecordingBackend
from ambient_tracing.tracer import handlers as core
from ambient_tracing.tracer.handlers import MAX_TEXT_CHARS, TRUNCATED, StreamTracer
from ambient_tracing.tracer.request import RunRequest


def trace(
    events: list[dict[str, Any]],
    *,
    mask: bool = False,
    request: RunRequest | None = None,
    backends: list[RecordingBackend] | None = None,
) -> tuple[RecordingBackend, list[str | None], Observability]:
    backend = RecordingBackend()
    obs = Observability(backends or [backend], mask_messages=mask)
    tracer = StreamTracer(obs.runs, request or RunRequest(thread_id="th", run_id="r", user_message="hello"))
    ids = [tracer.on_event(event) for event in events]
    tracer.close()
    return (backends or [backend])[0], ids, obs


def run(*events: dict[str, Any], **finished: Any) -> list[dict[str, Any]]:
    return [
        {"type": "RUN_STARTED", "threadId": "th", "runId": "r"},
        *events,
        {"type": "RUN_FINISHED", "threadId": "th", "runId": "r", **finished},
    ]


def only_turn(backend: RecordingBackend) -> RecordedSpan:
    [turn] = backend.runs
    assert not backend.open_spans()
    return turn


def test_run_started_opens_the_turn_and_returns_its_id() -> None:
    backend, ids, obs = trace(run())
    turn = only_turn(backend)
    assert ids == [turn.trace_id, None]
    assert turn.name == "llm_interaction" and turn.kind is SpanKind.RUN
    assert turn.input == "hello"
    assert turn.run is not None
    assert (turn.run.thread_id, turn.run.run_id, turn.run.turn_number) == ("th", "r", 1)
    assert turn.run.attributes == {"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": "th"}
    assert obs.last_trace_id("th") == turn.trace_id
    assert obs.current_trace_id("th") is None


def test_assistant_text_is_the_output_and_other_roles_are_not() -> None:
    backend, _, _ = trace(
        run(
            {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"},
            {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "Hello "},
            {"type": "TEXT_MESSAGE_END", "messageId": "m1"},
            {"type": "TEXT_MESSAGE_START", "messageId": "m2", "role": "developer"},
            {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m2", "delta": "hidden"},
            {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m3", "delta": "world"},
        )
    )
    assert only_turn(backend).output == "Hello world"


def test_tool_call_becomes_a_child_span_with_json_arguments_and_result() -> None:
    backend, _, _ = trace(
        run(
            {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "Read"},
            {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": '{"path":'},
            {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": ' "/etc/hosts"}'},
            {"type": "TOOL_CALL_END", "toolCallId": "c1"},
            {
                "type": "TOOL_CALL_RESULT",
                "toolCallId": "c1",
                "messageId": "x",
                "content": "127.0.0.1 localhost",
            },
        )
    )
    tool = only_turn(backend).find("tool_Read")
    assert tool.kind is SpanKind.TOOL
    assert tool.input == {"path": "/etc/hosts"}
    assert tool.output == "127.0.0.1 localhost"
    assert tool.attributes["gen_ai.tool.name"] == "Read"
    assert tool.attributes["gen_ai.tool.call.id"] == "c1"
    assert tool.error is None and tool.ended == 1


def test_tool_call_chunks_count_like_the_long_form_and_text_arguments_stay_text() -> None:
    backend, _, _ = trace(
        run(
            {"type": "TOOL_CALL_CHUNK", "toolCallId": "c1", "toolCallName": "Bash", "delta": "ls "},
            {"type": "TOOL_CALL_CHUNK", "toolCallId": "c1", "delta": "-la"},
            {"type": "TOOL_CALL_RESULT", "toolCallId": "c1", "messageId": "x", "content": '{"files": 3}'},
        )
    )
    tool = only_turn(backend).find("tool_Bash")
    assert (tool.input, tool.output) == ("ls -la", {"files": 3})


def test_a_run_that_starts_with_a_tool_call_or_fails_still_gets_a_trace() -> None:
    backend, ids, _ = trace(
        [
            {"type": "RUN_STARTED", "threadId": "th", "runId": "r"},
            {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "Read"},
            {"type": "RUN_ERROR", "message": "model overloaded", "code": "529"},
        ]
    )
    turn = only_turn(backend)
    assert ids[0] == turn.trace_id
    assert turn.error == "529: model overloaded"
    assert turn.find("tool_Read").error == "run ended: 529: model overloaded"


def test_usage_outcome_and_model_of_one_model() -> None:
    usage = [
        {
            "model": "claude-x",
            "provider": "anthropic",
            "inputTokens": 10,
            "outputTokens": 5,
            "totalTokens": 15,
            "cachedInputTokens": 3,
            "cacheWriteInputTokens": 2,
            "reasoningTokens": 1,
        }
    ]
    backend, _, _ = trace(run(usage=usage, outcome={"type": "interrupt", "interrupts": [{"id": "i"}]}))
    turn = only_turn(backend)
    assert turn.model == "claude-x"
    [entry] = turn.usage
    assert (entry.input_tokens, entry.output_tokens, entry.total_tokens) == (10, 5, 15)
    assert (entry.cache_read_tokens, entry.cache_write_tokens, entry.reasoning_tokens) == (3, 2, 1)
    assert turn.attributes["ambient.outcome"] == "interrupt"


def test_usage_of_several_models_becomes_one_generation_per_model() -> None:
    usage = [{"model": "big", "inputTokens": 10}, {"model": "small", "inputTokens": 2}, {"junk": True}, "bad"]
    backend, _, _ = trace(run(usage=usage))
    turn = only_turn(backend)
    generations = [child for child in turn.children if child.kind is SpanKind.GENERATION]
    assert [(g.model, g.usage[0].input_tokens) for g in generations] == [("big", 10), ("small", 2)]
    assert turn.usage == () and turn.model is None


def test_steps_and_subagents_nest_and_tools_hang_off_the_turn_or_their_subagent() -> None:
    backend, _, _ = trace(
        run(
            {"type": "STEP_STARTED", "stepName": "plan"},
            {"type": "REASONING_START", "messageId": "r1"},
            {"type": "REASONING_MESSAGE_START", "messageId": "r1m"},
            {"type": "REASONING_MESSAGE_CONTENT", "messageId": "r1m", "delta": "thinking"},
            {"type": "REASONING_MESSAGE_END", "messageId": "r1m"},
            {"type": "REASONING_END", "messageId": "r1"},
            {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "Grep"},
            {"type": "TOOL_CALL_RESULT", "toolCallId": "c1", "messageId": "x", "content": "ok"},
            {"type": "STEP_FINISHED", "stepName": "plan"},
            {"type": "SUBAGENT_STARTED", "subagentRunId": "s1", "name": "researcher", "description": "find"},
            {"type": "TOOL_CALL_START", "toolCallId": "c2", "toolCallName": "Web", "subagentRunId": "s1"},
            {"type": "TOOL_CALL_RESULT", "toolCallId": "c2", "messageId": "y", "content": "page"},
            {
                "type": "SUBAGENT_FINISHED",
                "subagentRunId": "s1",
                "result": "found",
                "outcome": {"type": "success"},
            },
        )
    )
    turn = only_turn(backend)
    step = turn.find("step_plan")
    assert step.parent is turn and step.kind is SpanKind.STEP
    assert step.children == []
    reasoning, tool = turn.find("reasoning"), turn.find("tool_Grep")
    assert reasoning.parent is turn and tool.parent is turn
    assert reasoning.attributes["ambient.step"] == tool.attributes["ambient.step"] == "plan"
    assert reasoning.output == "thinking"
    subagent = turn.find("subagent_researcher")
    assert subagent.kind is SpanKind.SUBAGENT and subagent.output == "found"
    assert [child.name for child in subagent.children] == ["tool_Web"]


def test_legacy_thinking_events_are_reasoning() -> None:
    backend, _, _ = trace(
        run(
            {"type": "THINKING_START"},
            {"type": "THINKING_TEXT_MESSAGE_START"},
            {"type": "THINKING_TEXT_MESSAGE_CONTENT", "delta": "hmm"},
            {"type": "THINKING_TEXT_MESSAGE_END"},
            {"type": "THINKING_END"},
        )
    )
    assert only_turn(backend).find("reasoning").output == "hmm"


def test_custom_state_and_activity_events_are_not_spans() -> None:
    backend, _, _ = trace(
        run(
            {"type": "CUSTOM", "name": "x", "value": 1},
            {"type": "STATE_SNAPSHOT", "snapshot": {}},
            {"type": "STATE_DELTA", "delta": []},
            {"type": "MESSAGES_SNAPSHOT", "messages": []},
            {"type": "ACTIVITY_SNAPSHOT", "messageId": "a", "activityType": "x", "content": {}},
            {"type": "RAW", "event": {}},
            {"type": "SOMETHING_NEW", "x": 1},
        )
    )
    assert only_turn(backend).children == []


def test_several_runs_in_one_stream_each_get_a_trace() -> None:
    first = run({"type": "TEXT_MESSAGE_CHUNK", "messageId": "a", "delta": "one"})
    second = [
        {**event, "runId": "r2"}
        for event in run({"type": "TEXT_MESSAGE_CHUNK", "messageId": "b", "delta": "two"})
    ]
    backend, ids, obs = trace(first + second)
    assert [turn.output for turn in backend.runs] == ["one", "two"]
    assert [turn.run.turn_number for turn in backend.runs if turn.run] == [1, 2]
    assert [i for i in ids if i] == [turn.trace_id for turn in backend.runs]
    assert obs.last_trace_id("th") == backend.runs[1].trace_id


def test_a_run_left_open_is_ended_with_an_error() -> None:
    backend, _, _ = trace(
        [{"type": "RUN_STARTED", "threadId": "th", "runId": "r"}, {"type": "STEP_STARTED", "stepName": "s"}]
    )
    turn = only_turn(backend)
    assert turn.error == "stream ended before RUN_FINISHED"
    assert turn.find("step_s").error == "run ended: stream ended before RUN_FINISHED"


def test_events_outside_a_run_are_ignored() -> None:
    backend, ids, _ = trace(
        [
            {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "x"},
            {"type": "RUN_FINISHED"},
            {"type": 7},
            {},
        ]
    )
    assert backend.runs == [] and ids == [None] * 4


def test_out_of_order_events_record_what_they_can_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ambient_tracing"):
        backend, _, _ = trace(
            run(
                {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "early"},
                {"type": "TOOL_CALL_ARGS", "toolCallId": "nope", "delta": "{}"},
                {"type": "TOOL_CALL_RESULT", "toolCallId": "ghost", "messageId": "x", "content": "r"},
                {"type": "STEP_FINISHED", "stepName": "never"},
                {"type": "TOOL_CALL_START", "toolCallName": "NoId"},
            )
        )
    turn = only_turn(backend)
    assert turn.output == "early"
    assert turn.find("tool_unknown").output == "r"
    assert len(caplog.records) == 1


def test_masking_redacts_long_content_for_every_backend() -> None:
    long_text = "x" * 80
    first, second = RecordingBackend(), RecordingBackend()
    trace(
        run(
            {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": long_text},
            {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "T"},
            {"type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": f'{{"q": "{long_text}", "n": "short"}}'},
            {"type": "TOOL_CALL_RESULT", "toolCallId": "c", "messageId": "x", "content": long_text},
        ),
        mask=True,
        request=RunRequest(thread_id="th", user_message=long_text),
        backends=[first, second],
    )
    for backend in (first, second):
        turn = only_turn(backend)
        assert (turn.input, turn.output) == (REDACTED, REDACTED)
        tool = turn.find("tool_T")
        assert tool.input == {"q": REDACTED, "n": "short"}
        assert tool.output == REDACTED
    assert first.runs[0].trace_id == second.runs[0].trace_id


def test_recorded_text_is_capped() -> None:
    backend, _, _ = trace(run(*[{"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "y" * 1000}] * 100))
    output = only_turn(backend).output
    assert output.startswith("y" * MAX_TEXT_CHARS)
    assert output == "y" * MAX_TEXT_CHARS + TRUNCATED


def test_spans_per_run_are_capped_and_the_rest_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "MAX_SPANS_PER_RUN", 3)
    calls = [
        event
        for number in range(5)
        for event in (
            {"type": "TOOL_CALL_START", "toolCallId": f"c{number}", "toolCallName": "search"},
            {"type": "TOOL_CALL_RESULT", "toolCallId": f"c{number}", "messageId": "x", "content": "ok"},
        )
    ]
    backend, _, _ = trace(run({"type": "STEP_STARTED", "stepName": "s"}, *calls))
    turn = only_turn(backend)
    assert [span.name for span in turn.walk()[1:]] == ["step_s", "tool_search", "tool_search"]
    assert turn.attributes["ambient.spans_not_recorded"] == 3


def test_a_run_no_backend_records_gets_no_id() -> None:
    backend = RecordingBackend(record=False)
    _, ids, obs = trace(run(), backends=[backend])
    assert ids == [None, None]
    assert obs.last_trace_id("th") is None


def test_user_message_from_run_started_input_wins_over_the_request() -> None:
    events = run()
    events[0]["input"] = {"messages": [{"role": "user", "content": "from the event"}]}
    backend, _, _ = trace(events)
    assert only_turn(backend).input == "from the event"
