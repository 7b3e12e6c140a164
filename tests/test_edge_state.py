"""State that must stay right and cheap under odd or hostile event sequences: out-of-order and
unmatched steps, overlapping runs of one thread, huge model names, runs after shutdown."""

from __future__ import annotations

import pytest

from ambient_tracing import Observability
from ambient_tracing.session_metrics.pricing import MAX_MODEL_NAME_CHARS, Pricing, TokenCounts
from ambient_tracing.testing import RecordingBackend
from ambient_tracing.tracer.handlers import StreamTracer
from ambient_tracing.tracer.request import RunRequest


def started(thread: str, run: str) -> dict[str, str]:
    return {"type": "RUN_STARTED", "threadId": thread, "runId": run}


def step(kind: str, name: str) -> dict[str, str]:
    return {"type": f"STEP_{kind}", "stepName": name}


def test_steps_finished_out_of_order_end_once_and_parent_the_innermost_open_one() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    tracer = StreamTracer(obs.runs, RunRequest())
    tracer.on_event(started("th", "r"))
    for event in [step("STARTED", "a"), step("STARTED", "b"), step("STARTED", "c"), step("FINISHED", "b")]:
        tracer.on_event(event)
    # c is still innermost: a tool started now is made in it.
    tracer.on_event({"type": "TOOL_CALL_START", "toolCallId": "t1", "toolCallName": "Grep"})
    tracer.on_event(step("FINISHED", "c"))
    # b was finished already, so the innermost open step is a.
    tracer.on_event({"type": "TOOL_CALL_START", "toolCallId": "t2", "toolCallName": "Read"})
    tracer.on_event(step("STARTED", "d"))
    tracer.on_event(step("FINISHED", "nope"))  # matches no open step: warned, ignored
    tracer.on_event({"type": "RUN_FINISHED"})
    [turn] = backend.runs
    assert turn.find("tool_Grep").attributes["ambient.step"] == "c"
    assert turn.find("tool_Read").attributes["ambient.step"] == "a"
    assert turn.find("step_d").parent is turn.find("step_a")
    assert [span.ended for span in turn.walk()] == [1] * len(turn.walk())
    assert all(span.error is None for span in turn.walk())  # a, still open, ended with the run


def test_a_flood_of_unmatched_step_finishes_keeps_every_span_right() -> None:
    backend = RecordingBackend()
    tracer = StreamTracer(Observability([backend], mask_messages=False).runs, RunRequest())
    tracer.on_event(started("th", "r"))
    for index in range(5_000):
        tracer.on_event(step("STARTED", f"s{index}"))
    for index in range(5_000):
        tracer.on_event(step("FINISHED", f"other{index}"))
    for index in reversed(range(5_000)):
        tracer.on_event(step("FINISHED", f"s{index}"))
    tracer.on_event({"type": "RUN_FINISHED"})
    [turn] = backend.runs
    spans = turn.walk()  # 1,000 nested steps (the per-run cap), the rest not recorded
    assert len(spans) == 1 + 1_000
    assert all(span.ended == 1 and span.error is None for span in spans)


def test_current_trace_id_names_a_run_still_open_while_any_is() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    first, second = StreamTracer(obs.runs, RunRequest()), StreamTracer(obs.runs, RunRequest())
    run_a = first.on_event(started("th", "a"))
    run_b = second.on_event(started("th", "b"))
    assert obs.current_trace_id("th") == run_b
    second.on_event({"type": "RUN_FINISHED"})
    assert obs.current_trace_id("th") == run_a  # A is still open
    assert obs.last_trace_id("th") == run_b
    first.on_event({"type": "RUN_FINISHED"})
    assert obs.current_trace_id("th") is None and obs.last_trace_id("th") == run_b


async def test_after_aclose_no_new_run_gets_an_id() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    tracer = StreamTracer(obs.runs, RunRequest())
    assert tracer.on_event(started("th", "before"))
    await obs.aclose()
    # A stream that was already running when the app shut down starts another run.
    assert tracer.on_event(started("th", "after")) is None
    assert StreamTracer(obs.runs, RunRequest()).on_event(started("th", "later")) is None
    assert [turn.run.run_id for turn in backend.runs if turn.run] == ["before"]
    assert not backend.open_spans()


@pytest.mark.parametrize("separator", [".", ":", "/"])
def test_a_huge_model_name_has_no_price_and_real_names_still_do(separator: str) -> None:
    pricing = Pricing()
    huge = separator.join(["x"] * 200_000)
    assert pricing.price(huge) is None
    assert pricing.cost(huge, TokenCounts(input=10)) is None
    assert pricing.price("x" * (MAX_MODEL_NAME_CHARS - 7) + "/gpt-4o") is not None
    assert pricing.price("us.anthropic.claude-sonnet-4-20250514") == pricing.price("claude-sonnet-4")
    assert pricing.price("openai:gpt-4o-mini") == pricing.price("gpt-4o-mini")
