"""The Python door: trace_agui_stream over an async iterator of AG-UI event models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from ag_ui.core import (
    BaseEvent,
    CustomEvent,
    EventType,
    RunAgentInput,
    RunFinishedEvent,
    RunStartedEvent,
    StepStartedEvent,
    TextMessageContentEvent,
    TextMessageStartEvent,
    UserMessage,
)

from ambient_tracing import Observability, trace_agui_stream
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import run_input, scripted_run

pytestmark = pytest.mark.timeout(10)


def observed() -> tuple[RecordingBackend, Observability]:
    backend = RecordingBackend()
    return backend, Observability([backend], mask_messages=False)


async def source(
    events: Sequence[BaseEvent], *, fail: BaseException | None = None
) -> AsyncIterator[BaseEvent]:
    for event in events:
        yield event
    if fail is not None:
        raise fail


async def collect(events: AsyncIterator[BaseEvent]) -> list[BaseEvent]:
    async with asyncio.timeout(5):
        return [event async for event in events]


def is_id_event(event: BaseEvent) -> bool:
    return isinstance(event, CustomEvent) and event.name == "ambient:trace_id"


async def test_yields_the_same_objects_plus_an_id_event_after_run_started() -> None:
    backend, obs = observed()
    events = scripted_run("t", "r")
    out = await collect(trace_agui_stream(source(events), observability=obs, run_input=run_input("t", "r")))
    assert [event for event in out if not is_id_event(event)] == events
    assert all(a is b for a, b in zip([e for e in out if not is_id_event(e)], events, strict=True))
    [turn] = backend.runs
    assert out[0] is events[0] and is_id_event(out[1])
    assert isinstance(out[1], CustomEvent) and out[1].value == {"traceId": turn.trace_id}
    assert out[1].type is EventType.CUSTOM and isinstance(out[1].timestamp, int)
    assert len(out) == len(events) + 1
    assert not backend.open_spans()
    assert turn.error is None and turn.output == "The answer is 42. "
    assert turn.input == "What is the meaning of life?"
    assert turn.find("tool_search").input == {"query": "life"}
    assert obs.last_trace_id("t") == turn.trace_id


async def test_each_run_of_the_stream_gets_its_id_event() -> None:
    backend, obs = observed()
    events = [*scripted_run("t", "r1"), *scripted_run("t", "r2")]
    out = await collect(trace_agui_stream(source(events), observability=obs))
    positions = [index for index, event in enumerate(out) if is_id_event(event)]
    starts = [index for index, event in enumerate(out) if event.type is EventType.RUN_STARTED]
    assert positions == [start + 1 for start in starts]
    assert [out[p].value["traceId"] for p in positions] == [turn.trace_id for turn in backend.runs]  # type: ignore[attr-defined]
    assert len({turn.trace_id for turn in backend.runs}) == 2


async def test_run_input_model_user_and_thread() -> None:
    backend, obs = observed()
    run = RunAgentInput(
        thread_id="t-model",
        run_id="r-model",
        state={},
        messages=[UserMessage(id="u", role="user", content="hi from a model")],
        tools=[],
        context=[],
        forwarded_props={},
    )
    events = [
        RunStartedEvent(type=EventType.RUN_STARTED, thread_id="t-model", run_id="r-model"),
        RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id="t-model", run_id="r-model"),
    ]
    await collect(trace_agui_stream(source(events), obs, run, user_id="u-1", user_name="Grace"))
    [turn] = backend.runs
    assert turn.run is not None
    assert (turn.run.thread_id, turn.run.user_id, turn.run.user_name) == ("t-model", "u-1", "Grace")
    assert turn.input == "hi from a model"


async def test_consumer_stopping_early_ends_every_span_as_cancelled() -> None:
    backend, obs = observed()
    closed: list[bool] = []

    async def endless() -> AsyncIterator[BaseEvent]:
        yield RunStartedEvent(type=EventType.RUN_STARTED, thread_id="t", run_id="r")
        yield StepStartedEvent(type=EventType.STEP_STARTED, step_name="plan")
        yield TextMessageStartEvent(type=EventType.TEXT_MESSAGE_START, message_id="m", role="assistant")
        try:
            while True:
                yield TextMessageContentEvent(type=EventType.TEXT_MESSAGE_CONTENT, message_id="m", delta="x")
        finally:
            closed.append(True)

    events = trace_agui_stream(endless(), observability=obs)
    async with asyncio.timeout(5):
        seen = [await anext(events) for _ in range(6)]
        await events.aclose()
    assert is_id_event(seen[1])
    assert closed == [True]  # the source generator was closed too
    [turn] = backend.runs
    assert not backend.open_spans()
    assert turn.error == "cancelled: the consumer stopped reading"
    assert turn.find("step_plan").error == "run ended: cancelled: the consumer stopped reading"
    assert turn.output == "xx"
    assert obs.current_trace_id("t") is None


async def test_passthrough_closes_the_source_when_the_consumer_stops() -> None:
    closed: list[bool] = []

    async def endless() -> AsyncIterator[BaseEvent]:
        try:
            while True:
                yield StepStartedEvent(type=EventType.STEP_STARTED, step_name="x")
        finally:
            closed.append(True)

    events = trace_agui_stream(endless(), observability=Observability())
    async with asyncio.timeout(5):
        await anext(events)
        await events.aclose()
    assert closed == [True]


async def test_consumer_task_cancelled_ends_every_span() -> None:
    backend, obs = observed()
    started = asyncio.Event()

    async def stalls() -> AsyncIterator[BaseEvent]:
        yield RunStartedEvent(type=EventType.RUN_STARTED, thread_id="t", run_id="r")
        started.set()
        await asyncio.sleep(30)
        yield RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id="t", run_id="r")

    task = asyncio.create_task(collect(trace_agui_stream(stalls(), observability=obs)))
    async with asyncio.timeout(5):
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    [turn] = backend.runs
    assert not backend.open_spans()
    assert turn.error is not None and "Cancelled" in turn.error


async def test_source_raising_ends_spans_with_error_and_reraises() -> None:
    backend, obs = observed()
    events = scripted_run("t", "r")[:3]  # RUN_STARTED, TOOL_CALL_START, one TOOL_CALL_ARGS
    failure = RuntimeError("model unavailable")
    out: list[BaseEvent] = []
    with pytest.raises(RuntimeError) as raised:
        async with asyncio.timeout(5):
            async for event in trace_agui_stream(source(events, fail=failure), observability=obs):
                out.append(event)
    assert raised.value is failure
    assert [event for event in out if not is_id_event(event)] == events
    [turn] = backend.runs
    assert not backend.open_spans()
    assert turn.error == "RuntimeError: model unavailable"
    assert turn.find("tool_search").error == "run ended: RuntimeError: model unavailable"


async def test_disabled_observability_yields_exactly_the_source() -> None:
    obs = Observability([])
    assert not obs.enabled
    events = scripted_run("t", "r")
    out = await collect(trace_agui_stream(source(events), observability=obs, run_input=run_input("t", "r")))
    assert len(out) == len(events) and all(a is b for a, b in zip(out, events, strict=True))


async def test_a_sampled_out_run_gets_no_id_event() -> None:
    backend = RecordingBackend(record=False)
    obs = Observability([backend])
    events = scripted_run("t", "r")
    out = await collect(trace_agui_stream(source(events), observability=obs))
    assert out == events


async def test_events_with_extra_and_odd_fields_never_break_the_stream() -> None:
    backend, obs = observed()
    events: list[BaseEvent] = [
        RunStartedEvent(type=EventType.RUN_STARTED, thread_id="t", run_id="r", input=None),
        TextMessageStartEvent.model_validate(
            {"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant", "extraField": [1]}
        ),
        TextMessageContentEvent(type=EventType.TEXT_MESSAGE_CONTENT, message_id="m", delta="ok"),
        CustomEvent(type=EventType.CUSTOM, name="other", value={"a": 1}),
        RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id="t", run_id="r", result={"answer": 1}),
    ]
    out = await collect(trace_agui_stream(source(events), observability=obs))
    assert [event for event in out if not is_id_event(event)] == events
    [turn] = backend.runs
    assert turn.output == "ok" and turn.error is None and not backend.open_spans()
