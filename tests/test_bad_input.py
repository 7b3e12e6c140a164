"""Bad input through the middleware over real HTTP.

Every test checks the same promises: the client gets the app's bytes unchanged (plus one id frame
right after each traced RUN_STARTED), tracing records what it can, at most one warning per run is
logged, nothing raises into the app (its stream runs to the end), and the server keeps serving.

Not here: a backend whose calls *hang*. Backend calls are synchronous on the event loop by
contract (no network I/O; export happens in the SDKs' own threads), so a hanging call is a
broken backend that would stall the loop; the vendor backends' tests cover slow or hanging
receivers. Here a backend that *raises* is tested.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from ambient_tracing.backends.base import RunStart, SpanKind
from ambient_tracing.doors import sse as sse_module
from ambient_tracing.testing import RecordedSpan
from ambient_tracing.tracer.handlers import MAX_TEXT_CHARS, TRUNCATED
from tests.support.agui_app import run_input
from tests.support.pair import Fetched, Pair, ends_of, fetch, run_events, serve_pair, sse, strip_ids

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with serve_pair() as served:
        yield served


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("ambient_tracing") and r.levelno >= logging.WARNING
    ]


async def check(
    pair: Pair,
    caplog: pytest.LogCaptureFixture,
    chunks: Sequence[bytes],
    *,
    thread: str,
    body: bytes | None = None,
    runs: int = 1,
    traced: bool = True,
) -> tuple[Fetched, list[RecordedSpan]]:
    """Stream ``chunks`` (``runs`` runs; ``traced`` False: no backend records them) through both
    servers and check the promises; returns the traced response and the recorded turns."""
    caplog.set_level(logging.WARNING, logger="ambient_tracing")
    caplog.clear()
    path = pair.app.add_stream(chunks)
    name = path.rsplit("/", 1)[1]
    sent = json.dumps(run_input(thread, "r")).encode() if body is None else body
    async with httpx.AsyncClient(timeout=10) as client:
        response = await fetch(pair.traced, path, body=sent, client=client, timeout=10)
        plain = await fetch(pair.plain, path, body=sent, client=client, timeout=10)
    assert response.status == plain.status == 200
    assert plain.raw == b"".join(chunks)
    stripped, ids = strip_ids(response.raw)
    assert stripped == plain.raw
    turns = pair.runs(thread)
    assert len(turns) == (runs if traced else 0)
    assert [trace_id for _, trace_id in ids] == [turn.trace_id for turn in turns]
    assert [position for position, _ in ids] == (ends_of(plain.raw, "RUN_STARTED") if traced else [])
    # Everything that was opened has ended, exactly once.
    assert not [span for turn in turns for span in turn.walk() if span.ended != 1]
    assert pair.app.completed[name] == 2  # both streams ran to their end: nothing raised into the app
    assert pair.app.bodies[name] == [sent, sent]  # and the app read the whole request body
    assert len(warnings_of(caplog)) <= runs, [r.getMessage() for r in warnings_of(caplog)]
    await still_serves(pair)
    return response, turns


async def still_serves(pair: Pair) -> None:
    path = pair.app.add_stream([sse(event) for event in run_events("t-after", "r")])
    response = await fetch(pair.traced, path, body=run_input("t-after", "r"))
    assert response.status == 200
    assert strip_ids(response.raw)[0] == b"".join(sse(event) for event in run_events("t-after", "r"))


def text_run(thread: str, *deltas: str, eol: bytes = b"\n") -> list[bytes]:
    return [
        sse(event, eol)
        for event in run_events(
            thread,
            "r",
            {"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant"},
            *[{"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": delta} for delta in deltas],
            {"type": "TEXT_MESSAGE_END", "messageId": "m"},
        )
    ]


# -- the request body -----------------------------------------------------------------------------


async def test_request_body_not_json(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    _, [turn] = await check(
        pair, caplog, text_run("t-nojson", "hi"), thread="t-nojson", body=b"\xff{not json"
    )
    assert turn.run is not None and turn.run.run_id == "r"  # from RUN_STARTED
    assert turn.input is None and turn.output == "hi" and turn.error is None


@pytest.mark.parametrize(
    ("body", "user_message"),
    [
        ([1, 2, 3], None),
        ("a string", None),
        (None, None),
        ({"threadId": 5, "runId": ["x"], "messages": "hello"}, None),
        (
            {"messages": [{"role": "user"}, 5, None, {"role": "user", "content": {"parts": [1]}}]},
            {"parts": [1]},
        ),
        ({"messages": [{"role": "assistant", "content": "no user here"}]}, None),
    ],
    ids=["list", "string", "null", "wrong-types", "odd-messages", "no-user"],
)
async def test_request_body_json_but_not_a_run_agent_input(
    pair: Pair, caplog: pytest.LogCaptureFixture, body: Any, user_message: Any
) -> None:
    thread = f"t-notinput-{id(body)}"
    _, [turn] = await check(
        pair, caplog, text_run(thread, "ok"), thread=thread, body=json.dumps(body).encode()
    )
    assert turn.output == "ok" and turn.error is None
    assert turn.input == user_message


async def test_request_body_nested_too_deep_for_the_json_parser(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    _, [turn] = await check(pair, caplog, text_run("t-deep", "ok"), thread="t-deep", body=body)
    assert turn.output == "ok" and turn.input is None


# -- SSE data -------------------------------------------------------------------------------------


async def test_sse_data_that_is_not_json(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    start, *rest = text_run("t-notjson", "still ", "traced")
    chunks = [start, b"data: {not json\n\n", b"data: \xff\xfe\n\n", b"data:\n\n", b"data: hello\n\n", *rest]
    _, [turn] = await check(pair, caplog, chunks, thread="t-notjson")
    assert turn.output == "still traced" and turn.error is None
    [warning] = warnings_of(caplog)
    assert "not JSON" in warning.getMessage()


async def test_sse_data_that_is_json_but_not_an_object(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    start, *rest = text_run("t-notobject", "fine")
    odd = [
        b"data: [1, 2]\n\n",
        b'data: "RUN_STARTED"\n\n',
        b"data: null\n\n",
        b"data: 42\n\n",
        b"data: true\n\n",
    ]
    _, [turn] = await check(pair, caplog, [*odd, start, *odd, *rest], thread="t-notobject")
    assert turn.output == "fine" and turn.error is None
    assert not warnings_of(caplog)


async def test_unknown_events_and_legacy_thinking_events(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    events = run_events(
        "t-legacy",
        "r",
        {"type": "SOMETHING_FROM_THE_FUTURE", "payload": {"a": 1}},
        {"type": 5},
        {"noType": True},
        {"type": None},
        {"type": "THINKING_START", "title": "hmm"},
        {"type": "THINKING_TEXT_MESSAGE_START"},
        {"type": "THINKING_TEXT_MESSAGE_CONTENT", "delta": "let me "},
        {"type": "THINKING_TEXT_MESSAGE_CONTENT", "delta": "think"},
        {"type": "THINKING_TEXT_MESSAGE_END"},
        {"type": "THINKING_END"},
        {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "role": "assistant", "delta": "answer"},
    )
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-legacy")
    reasoning = turn.find("reasoning")
    assert reasoning.kind is SpanKind.REASONING and reasoning.output == "let me think"
    assert reasoning.error is None and reasoning.parent is turn
    assert [child.name for child in turn.children] == ["reasoning"]
    assert turn.output == "answer" and turn.error is None
    assert not warnings_of(caplog)


# -- framing --------------------------------------------------------------------------------------

UTF8_TEXT = "héllo 中文 😀 ✓"


def framing_run(thread: str, eol: bytes = b"\n") -> list[bytes]:
    return text_run(thread, UTF8_TEXT[:8], UTF8_TEXT[8:], eol=eol)


async def test_frames_split_at_every_byte(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    stream = b"".join(framing_run("t-bytewise"))
    _, [turn] = await check(
        pair, caplog, [stream[i : i + 1] for i in range(len(stream))], thread="t-bytewise"
    )
    assert turn.output == UTF8_TEXT and turn.error is None


async def test_frames_split_in_two_at_every_position(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """Every cut of the stream, including inside each UTF-8 character, over one keep-alive connection."""
    caplog.set_level(logging.WARNING, logger="ambient_tracing")
    stream = b"".join(text_run("t-split", UTF8_TEXT))
    run_started_end = ends_of(stream, "RUN_STARTED")[0]
    paths = [pair.app.add_stream([stream[:cut], stream[cut:]]) for cut in range(len(stream) + 1)]
    async with httpx.AsyncClient(timeout=10) as client:
        for path in paths:
            response = await fetch(pair.traced, path, body=run_input("t-split", "r"), client=client)
            stripped, ids = strip_ids(response.raw)
            assert stripped == stream, path
            assert [position for position, _ in ids] == [run_started_end], path
    turns = pair.runs("t-split")
    assert len(turns) == len(paths)
    assert all(turn.output == UTF8_TEXT and turn.error is None and turn.ended == 1 for turn in turns)
    assert not warnings_of(caplog)
    await still_serves(pair)


@pytest.mark.parametrize("eol", [b"\r\n", b"\r"], ids=["crlf", "cr"])
async def test_crlf_and_cr_line_endings(pair: Pair, caplog: pytest.LogCaptureFixture, eol: bytes) -> None:
    thread = f"t-eol-{len(eol)}"
    chunks = framing_run(thread, eol)
    _, [turn] = await check(pair, caplog, chunks, thread=thread)
    assert turn.output == UTF8_TEXT and turn.error is None
    # The same stream cut between every CR and LF (and anywhere else) still frames the same way.
    stream = b"".join(framing_run(thread + "-bytewise", eol))
    _, [turn] = await check(
        pair, caplog, [stream[i : i + 1] for i in range(len(stream))], thread=thread + "-bytewise"
    )
    assert turn.output == UTF8_TEXT


async def test_comments_and_other_fields(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    def event(data: dict[str, Any]) -> bytes:
        # A JSON value split over two data lines (which the reader joins with a newline).
        head, tail = json.dumps(data).split(", ", 1)
        return f"event: message\nid: {data['type']}\nretry: 1500\ndata: {head},\ndata:{tail}\n\n".encode()

    start, *rest = run_events(
        "t-fields", "r", {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "hi"}
    )
    chunks = [b": ping\n\n", b"retry: 3000\n\n", event(start), b": ping\n\n", b"event: noop\n\n"]
    chunks += [event(e) for e in rest] + [b": bye\n\n"]
    traced, [turn] = await check(pair, caplog, chunks, thread="t-fields")
    assert turn.output == "hi" and turn.error is None
    assert traced.raw.startswith(b": ping\n\nretry: 3000\n\n" + event(start) + b'data: {"type":"CUSTOM"')
    assert not warnings_of(caplog)


# -- runs that do not follow the rules ------------------------------------------------------------


async def test_stream_ending_without_run_finished(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    events = run_events(
        "t-unfinished",
        "r",
        {"type": "STEP_STARTED", "stepName": "plan"},
        {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "search"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": '{"q": 1}'},
        {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "partial"},
        finished=False,
    )
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-unfinished")
    assert turn.error == "stream ended before RUN_FINISHED" and turn.output == "partial"
    tool = turn.find("tool_search")
    assert tool.input == {"q": 1} and tool.error == "run ended: stream ended before RUN_FINISHED"
    assert tool.parent is turn and tool.attributes["ambient.step"] == "plan"
    assert turn.find("step_plan").error == "run ended: stream ended before RUN_FINISHED"
    assert pair.obs.current_trace_id("t-unfinished") is None
    assert pair.obs.last_trace_id("t-unfinished") == turn.trace_id


async def test_text_content_before_its_start(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    events = run_events(
        "t-early-text",
        "r",
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "early "},
        {"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "then on time"},
        {"type": "TEXT_MESSAGE_END", "messageId": "m"},
        {"type": "TEXT_MESSAGE_END", "messageId": "never-started"},
    )
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-early-text")
    assert turn.output == "early then on time" and turn.error is None


async def test_tool_args_and_result_for_an_unknown_tool_call(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    events = run_events(
        "t-unknown-tool",
        "r",
        {"type": "TOOL_CALL_ARGS", "toolCallId": "ghost", "delta": "{}"},
        {"type": "TOOL_CALL_END", "toolCallId": "ghost"},
        {"type": "TOOL_CALL_RESULT", "messageId": "x", "toolCallId": "ghost", "content": '{"found": true}'},
        {"type": "TOOL_CALL_RESULT", "messageId": "y", "toolCallId": "ghost", "content": "again"},
    )
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-unknown-tool")
    assert [(child.name, child.output) for child in turn.children] == [
        ("tool_unknown", {"found": True}),
        ("tool_unknown", "again"),
    ]
    assert turn.error is None
    assert len(warnings_of(caplog)) == 1


async def test_step_finished_without_step_started(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    events = run_events(
        "t-lost-step",
        "r",
        {"type": "STEP_FINISHED", "stepName": "never"},
        {"type": "STEP_STARTED", "stepName": "real"},
        {"type": "STEP_FINISHED", "stepName": "other"},
        {"type": "STEP_FINISHED", "stepName": "real"},
    )
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-lost-step")
    [step] = turn.children
    assert step.name == "step_real" and step.error is None
    assert len(warnings_of(caplog)) == 1


async def test_run_finished_twice(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    events = run_events("t-twice", "r", {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "x"})
    events.append({"type": "RUN_FINISHED", "threadId": "t-twice", "runId": "r", "result": "late"})
    events.append({"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "after the end"})
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-twice")
    assert turn.ended == 1 and turn.output == "x" and turn.error is None
    assert not warnings_of(caplog)


async def test_run_started_twice_without_finishing(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    events = [
        {"type": "RUN_STARTED", "threadId": "t-restart", "runId": "r1"},
        *run_events("t-restart", "r2", {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "x"}),
    ]
    _, [first, second] = await check(
        pair, caplog, [sse(event) for event in events], thread="t-restart", runs=2
    )
    assert first.error == "a new RUN_STARTED arrived before RUN_FINISHED"
    assert second.error is None and second.output == "x"


# -- size -----------------------------------------------------------------------------------------


async def test_huge_tool_result_in_one_frame(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """Larger than sse.MAX_EVENT_BYTES: passed on untouched and not parsed; the run still ends."""
    result = "r" * (20 * 1024 * 1024)
    assert len(result) > sse_module.MAX_EVENT_BYTES
    events = run_events(
        "t-huge-result",
        "r",
        {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "dump"},
        {"type": "TOOL_CALL_END", "toolCallId": "c"},
        {"type": "TOOL_CALL_RESULT", "messageId": "x", "toolCallId": "c", "content": result},
        {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "done"},
    )
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-huge-result")
    tool = turn.find("tool_dump")
    assert tool.output is None and tool.attributes["ambient.tool_result"] == "none"
    assert turn.output == "done" and turn.error is None


async def test_large_tool_result_is_capped(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """Under sse.MAX_EVENT_BYTES the result is parsed, and recorded up to core.MAX_TEXT_CHARS."""
    result = "é" * (1024 * 1024)
    events = run_events(
        "t-big-result",
        "r",
        {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "dump"},
        {"type": "TOOL_CALL_RESULT", "messageId": "x", "toolCallId": "c", "content": result},
    )
    _, [turn] = await check(pair, caplog, [sse(event) for event in events], thread="t-big-result")
    assert turn.find("tool_dump").output == "é" * MAX_TEXT_CHARS + TRUNCATED


async def test_huge_text(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    delta = "abcdefghij" * 100
    chunks = text_run("t-huge-text", *[delta] * 5000)  # 5 MB of deltas, one frame per chunk
    _, [turn] = await check(pair, caplog, chunks, thread="t-huge-text")
    assert turn.output == (delta * 5000)[:MAX_TEXT_CHARS] + TRUNCATED
    assert turn.error is None


# -- wrong types ----------------------------------------------------------------------------------


async def test_ids_and_fields_of_wrong_json_types(pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    events: list[dict[str, Any]] = [
        {"type": "RUN_STARTED", "threadId": ["t"], "runId": {"r": 1}, "input": "not an input"},
        {"type": "TEXT_MESSAGE_START", "messageId": [1], "role": "assistant", "name": 5},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": [1], "delta": {"a": 1}},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": [1], "delta": "ok"},
        {"type": "TEXT_MESSAGE_END", "messageId": [1]},
        {"type": "TOOL_CALL_START", "toolCallId": {}, "toolCallName": []},
        {"type": "TOOL_CALL_ARGS", "toolCallId": {}, "delta": 5},
        {"type": "TOOL_CALL_END", "toolCallId": {}},
        {"type": "TOOL_CALL_RESULT", "toolCallId": {}, "messageId": None, "content": {"x": 1}},
        {"type": "TOOL_CALL_CHUNK", "toolCallId": 3, "toolCallName": 4, "delta": []},
        {"type": "STEP_STARTED", "stepName": 7},
        {"type": "STEP_FINISHED", "stepName": 7},
        {"type": "REASONING_MESSAGE_CONTENT", "messageId": [], "delta": []},
        {"type": "REASONING_END"},
        {"type": "SUBAGENT_STARTED", "subagentRunId": [], "name": {}},
        {"type": "SUBAGENT_STARTED", "subagentRunId": "sa", "name": {}, "parentSubagentRunId": 1},
        {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "x", "subagentRunId": {"a": 1}},
        {"type": "SUBAGENT_FINISHED", "subagentRunId": "sa", "outcome": "done", "result": [1]},
        {"type": "SUBAGENT_ERROR", "subagentRunId": None, "message": 5},
        {"type": "RUN_FINISHED", "threadId": 1, "runId": 2, "outcome": "success", "usage": "lots"},
    ]
    _, [turn] = await check(
        pair,
        caplog,
        [sse(event) for event in events],
        thread="t-types",
        body=json.dumps(run_input("t-types", "r-body")).encode(),
    )
    assert turn.run is not None
    assert (turn.run.thread_id, turn.run.run_id) == ("t-types", "r-body")  # from the body
    assert turn.output == "ok" and turn.error is None and turn.usage == ()
    assert {child.name for child in turn.walk()} >= {"step_unnamed", "reasoning", "subagent_unnamed"}


# -- backends that raise --------------------------------------------------------------------------


class RaisingSpan:
    trace_id = "0123456789abcdef0123456789abcdef"

    def start_child(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("start_child is broken")

    def set_input(self, input: Any) -> None:
        raise RuntimeError("set_input is broken")

    def end(self, **kwargs: Any) -> None:
        raise RuntimeError("end is broken")


class BrokenBackend:
    name = "broken"
    span_sink = None

    def __init__(self, *, turns: bool) -> None:
        self._turns = turns

    def accepts(self, trace_id: str) -> bool:
        if not self._turns:
            raise RuntimeError("accepts is broken")
        return True

    def setup(self) -> None:
        raise RuntimeError("setup is broken")

    def start_run(self, turn: RunStart) -> RaisingSpan:
        if not self._turns:
            raise RuntimeError("start_run is broken")
        return RaisingSpan()

    def flush(self, timeout: float) -> None:
        raise RuntimeError("flush is broken")

    def shutdown(self) -> None:
        raise RuntimeError("shutdown is broken")


def full_run(thread: str) -> list[bytes]:
    return [
        sse(event)
        for event in run_events(
            thread,
            "r",
            {"type": "STEP_STARTED", "stepName": "plan"},
            {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "search"},
            {"type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": "{}"},
            {"type": "TOOL_CALL_RESULT", "messageId": "x", "toolCallId": "c", "content": "ok"},
            {"type": "STEP_FINISHED", "stepName": "plan"},
            {"type": "TEXT_MESSAGE_CHUNK", "messageId": "m", "delta": "done"},
        )
    ]


@pytest.mark.parametrize("turns", [False, True], ids=["start_run-raises", "spans-raise"])
async def test_a_raising_backend_beside_a_working_one(caplog: pytest.LogCaptureFixture, turns: bool) -> None:
    with serve_pair(others=[BrokenBackend(turns=turns)]) as served:
        started = time.monotonic()
        _, [turn] = await check(served, caplog, full_run("t-broken"), thread="t-broken")
        assert time.monotonic() - started < 2  # not delayed (both streams and a follow-up request)
        # The package chose the id, not a backend: the broken one cannot impose its own.
        assert turn.trace_id != RaisingSpan.trace_id and len(turn.trace_id) == 32
        assert turn.output == "done" and turn.error is None
        tool = turn.find("tool_search")
        assert tool.output == "ok" and tool.parent is turn and tool.attributes["ambient.step"] == "plan"


async def test_only_a_raising_backend(caplog: pytest.LogCaptureFixture) -> None:
    with serve_pair(others=[BrokenBackend(turns=False)], record=False) as served:
        traced, _ = await check(
            served, caplog, full_run("t-only-broken"), thread="t-only-broken", traced=False
        )
        assert b"ambient:trace_id" not in traced.raw
        assert {record.getMessage() for record in warnings_of(caplog)} == {
            "broken could not tell whether it records a run: RuntimeError('accepts is broken')"
        }
