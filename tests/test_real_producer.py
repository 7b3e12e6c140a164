"""The middleware and the generator door in front of a real AG-UI producer: pydantic-ai's own
AG-UI adapter running a scripted FunctionModel agent (see tests/support/pydantic_agent.py).

What pydantic-ai 2.68 streams for one run (ag-ui-protocol 1.0, ``include_usage=True``)::

    RUN_STARTED (protocolVersion "1.0")
    TEXT_MESSAGE_START / TEXT_MESSAGE_END      an empty assistant message: the tool call's parent
    TOOL_CALL_START, TOOL_CALL_ARGS x3, TOOL_CALL_END
    TOOL_CALL_RESULT (role "tool")
    TEXT_MESSAGE_START, TEXT_MESSAGE_CONTENT x13, TEXT_MESSAGE_END
    RUN_FINISHED (outcome success, usage [{model, inputTokens, outputTokens, totalTokens}])
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ag_ui.core import BaseEvent, CustomEvent, RunAgentInput
from ag_ui_validate.pytest_plugin import assert_valid_agui, validate_agui_endpoint
from pydantic_ai.ui.ag_ui import AGUIAdapter

from ambient_tracing import Observability, TracingMiddleware, trace_agui_stream
from ambient_tracing.testing import RecordedSpan, RecordingBackend
from tests.support.agui_app import agui_app, run_input
from tests.support.pydantic_agent import (
    MODEL_NAME,
    answer_text,
    tool_call_id_for,
    weather_agent,
    weather_app,
    weather_report,
)
from tests.support.server import serve

pytestmark = pytest.mark.timeout(30)

CITY = "Paris"
PROMPT = f"What is the weather in {CITY}?"
THREAD, RUN = "thread-real", "run-real"
EXPECTED_TYPES = [
    "RUN_STARTED",
    "TEXT_MESSAGE_START",
    "TEXT_MESSAGE_END",
    "TOOL_CALL_START",
    "TOOL_CALL_ARGS",
    "TOOL_CALL_ARGS",
    "TOOL_CALL_ARGS",
    "TOOL_CALL_END",
    "TOOL_CALL_RESULT",
    "TEXT_MESSAGE_START",
    *["TEXT_MESSAGE_CONTENT"] * len(answer_text(CITY).split(" ")),
    "TEXT_MESSAGE_END",
    "RUN_FINISHED",
]
VALIDATE_CLI = Path(sys.executable).with_name("ag-ui-validate")
ID_FRAME = re.compile(
    rb'data: \{"type":"CUSTOM","name":"ambient:trace_id","value":\{"traceId":"([0-9a-f]{32})"\},'
    rb'"timestamp":\d+\}\n\n'
)
#: The id frame as either door writes it: ag-ui's encoder puts ``timestamp`` second, the middleware last.
ANY_ID_FRAME = re.compile(rb'data: \{"type":"CUSTOM",[^\n]*"name":"ambient:trace_id"[^\n]*\}\n\n')
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


# -- helpers ------------------------------------------------------------------------------------


class Traced:
    def __init__(self, url: str, backend: RecordingBackend, observability: Observability) -> None:
        self.url, self.backend, self.observability = url, backend, observability


@pytest.fixture
def traced() -> Iterator[Traced]:
    """The weather agent behind TracingMiddleware, over real HTTP."""
    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False)
    with serve(TracingMiddleware(weather_app(), observability=observability)) as url:
        yield Traced(url, backend, observability)


@pytest.fixture
def plain_url() -> Iterator[str]:
    """The same agent with no middleware."""
    with serve(weather_app()) as url:
        yield url


async def post_raw(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """POST a RunAgentInput and return the response body exactly as it came off the wire."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client,
        client.stream(
            "POST", f"{url}/agent", json=body, headers={"accept": "text/event-stream", **(headers or {})}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return b"".join([chunk async for chunk in response.aiter_raw()])


def frames(raw: bytes) -> list[dict[str, Any]]:
    """The events of an SSE body made of ``data: <json>\\n\\n`` frames (as pydantic-ai writes them)."""
    assert raw.endswith(b"\n\n")
    events = []
    for frame in raw[:-2].split(b"\n\n"):
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        events.append(json.loads(frame[len(b"data: ") :]))
    return events


def trace_ids(events: list[dict[str, Any]]) -> list[str]:
    return [
        event["value"]["traceId"]
        for event in events
        if event["type"] == "CUSTOM" and event.get("name") == "ambient:trace_id"
    ]


def without_id_frame(raw: bytes) -> tuple[bytes, str]:
    """The stream with the injected frame cut out, and the id it announced."""
    found = list(ID_FRAME.finditer(raw))
    assert len(found) == 1, raw
    match = found[0]
    return raw[: match.start()] + raw[match.end() :], match.group(1).decode()


def normalized(raw: bytes) -> bytes:
    """``raw`` with what pydantic-ai makes up afresh per run replaced: millisecond timestamps by 0,
    and its message ids (uuid4) by ``id-N`` in order of first use, so references still have to agree."""
    raw = re.sub(rb'"timestamp":\d+', b'"timestamp":0', raw)
    seen: dict[bytes, bytes] = {}
    return UUID.sub(lambda m: seen.setdefault(m.group(0), b"id-%d" % len(seen)), raw)


def shape(turn: RecordedSpan) -> dict[str, Any]:
    """What a recorded trace says, without its ids."""

    def span(node: RecordedSpan) -> dict[str, Any]:
        return {
            "name": node.name,
            "kind": node.kind,
            "input": node.input,
            "output": node.output,
            "error": node.error,
            "model": node.model,
            "usage": node.usage,
            "ended": node.ended,
            "attributes": node.attributes,
            "children": [span(child) for child in node.children],
        }

    assert turn.run is not None
    return {
        "thread_id": turn.run.thread_id,
        "run_id": turn.run.run_id,
        "user_id": turn.run.user_id,
        "turn_number": turn.run.turn_number,
        **span(turn),
    }


def assert_weather_trace(backend: RecordingBackend, trace_id: str, *, user_id: str | None = None) -> None:
    """The trace of one weather run (thread THREAD, run RUN, asking about CITY)."""
    assert [turn.trace_id for turn in backend.runs] == [trace_id]
    turn = backend.by_trace(trace_id)
    assert turn.run is not None
    assert (turn.run.thread_id, turn.run.run_id, turn.run.user_id) == (THREAD, RUN, user_id)
    assert turn.name == "llm_interaction"
    assert turn.input == PROMPT
    assert turn.output == answer_text(CITY)
    assert turn.error is None
    assert turn.attributes["ambient.outcome"] == "success"
    assert turn.attributes["gen_ai.conversation.id"] == THREAD
    # FunctionModel estimates usage; pydantic-ai reports it on RUN_FINISHED (include_usage=True).
    assert turn.model == MODEL_NAME
    [usage] = turn.usage
    assert usage.model == MODEL_NAME
    assert usage.input_tokens and usage.output_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens

    # The empty TEXT_MESSAGE_START/END pair pydantic-ai sends before the tool call adds nothing.
    [tool] = turn.children
    assert tool is turn.find("tool_get_weather")
    assert tool.input == {"city": CITY}  # the streamed argument fragments, joined and parsed
    assert tool.output == weather_report(CITY)
    assert tool.error is None
    assert tool.attributes["gen_ai.tool.call.id"] == tool_call_id_for(CITY)
    assert tool.attributes["gen_ai.tool.name"] == "get_weather"
    assert tool.children == []
    assert all(span.trace_id == trace_id and span.ended == 1 for span in turn.walk())
    assert backend.open_spans() == []


# -- the middleware in front of pydantic-ai ------------------------------------------------------


async def test_plain_pydantic_ai_stream_is_what_the_other_tests_assume(plain_url: str) -> None:
    raw = await post_raw(plain_url, run_input(THREAD, RUN, PROMPT))
    events = frames(raw)
    assert [event["type"] for event in events] == EXPECTED_TYPES
    assert trace_ids(events) == []
    assert "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT") == answer_text(CITY)
    finished = events[-1]
    assert finished["outcome"] == {"type": "success"}
    assert finished["usage"][0]["model"] == MODEL_NAME


async def test_wrapped_stream_passes_ag_ui_validate(traced: Traced, tmp_path: Path) -> None:
    raw = await post_raw(traced.url, run_input(THREAD, RUN, PROMPT))
    capture = tmp_path / "wrapped.sse"
    capture.write_bytes(raw)

    # The CLI on the captured bytes.
    result = subprocess.run(
        [str(VALIDATE_CLI), str(capture), "--json"], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["summary"] == {"errors": 0, "warnings": 0, "info": 0}, report["diagnostics"]
    assert report["diagnostics"] == []
    assert report["eventCount"] == len(EXPECTED_TYPES) + 1
    assert report["internalErrors"] == []

    # The pytest helper on the parsed events; no warnings allowed either.
    assert_valid_agui(frames(raw), max_warnings=0)


async def test_live_endpoint_passes_ag_ui_validate(traced: Traced) -> None:
    """The validator's own HTTP client against the wrapped endpoint: adds the transport rules
    (content type, framing) that a recorded capture cannot check."""
    report = await validate_agui_endpoint(
        f"{traced.url}/agent", input=run_input(THREAD, RUN, PROMPT), timeout_ms=10_000
    )
    assert report.summary.errors == 0 and report.summary.warnings == 0, report.diagnostics
    assert report.internal_errors == []
    assert report.event_count == len(EXPECTED_TYPES) + 1
    assert "AGUI505" not in {skip.rule for skip in report.skipped}  # the content-type rule ran
    assert len(traced.backend.runs) == 1


async def test_exactly_one_trace_id_right_after_run_started(traced: Traced) -> None:
    raw = await post_raw(traced.url, run_input(THREAD, RUN, PROMPT))
    events = frames(raw)
    assert [event["type"] for event in events] == [EXPECTED_TYPES[0], "CUSTOM", *EXPECTED_TYPES[1:]]
    [trace_id] = trace_ids(events)
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    announced = events[1]
    assert set(announced) == {"type", "name", "value", "timestamp"}
    assert isinstance(announced["timestamp"], int)
    assert events[0]["timestamp"] <= announced["timestamp"] <= events[2]["timestamp"] + 1000
    assert raw.count(b"ambient:trace_id") == 1
    assert trace_id == traced.backend.runs[0].trace_id


async def test_trace_records_the_run(traced: Traced) -> None:
    raw = await post_raw(traced.url, run_input(THREAD, RUN, PROMPT), headers={"x-current-user-id": "user-7"})
    [trace_id] = trace_ids(frames(raw))
    assert_weather_trace(traced.backend, trace_id, user_id="user-7")
    assert traced.observability.last_trace_id(THREAD) == trace_id
    assert traced.observability.current_trace_id(THREAD) is None


async def test_wrapped_stream_is_the_plain_stream_plus_one_frame(traced: Traced, plain_url: str) -> None:
    """Byte for byte, modulo what pydantic-ai draws afresh for every run.

    Two runs of the same agent differ in the millisecond ``timestamp`` of each event and in the
    message ids (uuid4) pydantic-ai mints (the tool call id is fixed by the scripted model, and the
    thread and run ids come from the request). Those are normalized, everything else (keys, key
    order, values, separators, frame boundaries) must match byte for byte.
    """
    body = run_input(THREAD, RUN, PROMPT)
    plain = await post_raw(plain_url, body)
    wrapped, _ = without_id_frame(await post_raw(traced.url, body))
    assert wrapped != plain  # they do differ before normalizing: timestamps and message ids
    assert normalized(wrapped) == normalized(plain)
    # What was normalized: the three message ids (two assistant messages, one tool result).
    assert len(set(UUID.findall(plain))) == 3


async def test_recorded_producer_bytes_pass_through_exactly(plain_url: str) -> None:
    """Exact bytes: replay what pydantic-ai sent, one frame per chunk as its StreamingResponse
    writes them, through the middleware; cut the injected frame out and nothing else differs."""
    recorded = await post_raw(plain_url, run_input(THREAD, RUN, PROMPT))
    chunks = [frame + b"\n\n" for frame in recorded[:-2].split(b"\n\n")]
    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False)
    app = TracingMiddleware(agui_app(raw=lambda body: chunks), observability=observability)
    with serve(app) as url:
        wrapped = await post_raw(url, run_input(THREAD, RUN, PROMPT))
    rest, trace_id = without_id_frame(wrapped)
    assert rest == recorded
    assert wrapped.startswith(chunks[0] + b'data: {"type":"CUSTOM","name":"ambient:trace_id"')
    assert_weather_trace(backend, trace_id)


# -- the generator door on the same agent ---------------------------------------------------------


def _dump(event: BaseEvent) -> dict[str, Any]:
    return event.model_dump(mode="json", by_alias=True, exclude_none=True)


async def test_generator_door_traces_the_same_run(traced: Traced) -> None:
    """``AGUIAdapter.run_stream()`` is pydantic-ai's ``AsyncIterator[BaseEvent]``: traced by
    trace_agui_stream, it must give the same events plus the id event, and the same trace."""
    body = run_input(THREAD, RUN, PROMPT)
    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False)
    adapter = AGUIAdapter(weather_agent(), RunAgentInput.model_validate(body), include_usage=True)
    events: AsyncIterator[BaseEvent] = trace_agui_stream(
        adapter.run_stream(), observability, body, user_id="user-7"
    )
    received = [event async for event in events]

    assert [event.type.value for event in received] == [EXPECTED_TYPES[0], "CUSTOM", *EXPECTED_TYPES[1:]]
    announced = received[1]
    assert isinstance(announced, CustomEvent)
    assert announced.name == "ambient:trace_id"
    trace_id = announced.value["traceId"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    assert_valid_agui([_dump(event) for event in received], max_warnings=0)
    assert_weather_trace(backend, trace_id, user_id="user-7")
    assert observability.last_trace_id(THREAD) == trace_id

    # The HTTP door, on the same request, records the same trace.
    await post_raw(traced.url, body, headers={"x-current-user-id": "user-7"})
    assert shape(traced.backend.runs[0]) == shape(backend.runs[0])

    # Encoded by pydantic-ai's own encoder, the generator door's output is what the middleware sends.
    reencoded = "".join([chunk async for chunk in adapter.encode_stream(_replay(received))]).encode()
    wire = await post_raw(traced.url, body)
    assert len(ANY_ID_FRAME.findall(reencoded)) == len(ANY_ID_FRAME.findall(wire)) == 1
    assert normalized(ANY_ID_FRAME.sub(b"", reencoded)) == normalized(ANY_ID_FRAME.sub(b"", wire))


async def _replay(events: list[BaseEvent]) -> AsyncIterator[BaseEvent]:
    for event in events:
        yield event
