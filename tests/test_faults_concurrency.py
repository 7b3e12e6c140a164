"""Fault suite: 500 concurrent runs (500 distinct AG-UI threads) through one uvicorn server. No id
crosses between streams or traces: every stream carries exactly its own bytes plus one id frame, and
the trace under that id holds that stream's thread, run, text and tool arguments. A smaller run of 50
checks the same against the real Langfuse SDK (loopback receiver)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import agui_app, run_input
from tests.support.asgi_driver import frame
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.pair import ends_of, strip_ids
from tests.support.server import serve

pytestmark = pytest.mark.timeout(90)


def own_frames(thread: str, run: str) -> list[bytes]:
    """A run whose every event names its own run, so crossed bytes cannot go unnoticed."""
    events = [
        {"type": "RUN_STARTED", "threadId": thread, "runId": run},
        {"type": "TOOL_CALL_START", "toolCallId": f"{run}-c", "toolCallName": "lookup"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": f"{run}-c", "delta": json.dumps({"run": run})},
        {"type": "TOOL_CALL_END", "toolCallId": f"{run}-c"},
        {
            "type": "TOOL_CALL_RESULT",
            "toolCallId": f"{run}-c",
            "messageId": f"{run}-r",
            "content": f"for {run}",
        },
        {"type": "TEXT_MESSAGE_START", "messageId": f"{run}-m", "role": "assistant"},
        *[
            {"type": "TEXT_MESSAGE_CONTENT", "messageId": f"{run}-m", "delta": f"{run}:{i} "}
            for i in range(4)
        ],
        {"type": "TEXT_MESSAGE_END", "messageId": f"{run}-m"},
        {"type": "RUN_FINISHED", "threadId": thread, "runId": run},
    ]
    return [frame(event) for event in events]


def own_text(run: str) -> str:
    return "".join(f"{run}:{i} " for i in range(4))


def as_value(attribute: Any) -> Any:
    """An observation input/output as the SDK sent it: JSON for structures, the string itself for text."""
    try:
        return json.loads(attribute)
    except (TypeError, ValueError):
        return attribute


def concurrent_app() -> Any:
    return agui_app(raw=lambda body: own_frames(body["threadId"], body["runId"]), delay=0.01)


async def stream_all(url: str, count: int, prefix: str) -> tuple[dict[str, tuple[str, str]], int]:
    """Run ``count`` streams at once; {trace id: (thread, run)} and the most streams open at one time."""
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    open_now = most = 0
    found: dict[str, tuple[str, str]] = {}

    async def one(client: httpx.AsyncClient, index: int) -> None:
        nonlocal open_now, most
        thread, run = f"{prefix}-thread-{index}", f"{prefix}-run-{index}"
        chunks: list[bytes] = []
        async with client.stream("POST", f"{url}/agent", json=run_input(thread, run)) as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                if not chunks:
                    open_now += 1
                    most = max(most, open_now)
                chunks.append(chunk)
        open_now -= 1
        raw = b"".join(chunks)
        stripped, ids = strip_ids(raw)
        assert stripped == b"".join(own_frames(thread, run)), f"stream {index} carries bytes not its own"
        assert [position for position, _ in ids] == ends_of(stripped, "RUN_STARTED")
        [(_, trace_id)] = ids
        assert trace_id not in found, "two streams were told the same trace id"
        found[trace_id] = (thread, run)

    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=30), limits=limits) as client:
        await asyncio.gather(*(one(client, index) for index in range(count)))
    return found, most


async def test_500_concurrent_runs_never_cross_ids() -> None:
    runs = 500
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    started = time.monotonic()
    with serve(TracingMiddleware(concurrent_app(), observability=obs)) as url:
        found, most = await stream_all(url, runs, "c")
    assert time.monotonic() - started < 80
    assert most >= runs // 5, f"only {most} streams overlapped: the test proves little"

    assert len(found) == runs
    assert len(backend.runs) == runs
    assert {turn.trace_id for turn in backend.runs} == set(found)
    for turn in backend.runs:
        thread, run = found[turn.trace_id]
        assert turn.run is not None
        assert (turn.run.thread_id, turn.run.run_id) == (thread, run)
        assert turn.output == own_text(run)
        assert turn.error is None
        [tool] = turn.children
        assert tool.input == {"run": run}
        assert tool.output == f"for {run}"
        assert tool.attributes["gen_ai.tool.call.id"] == f"{run}-c"
        assert all(span.trace_id == turn.trace_id for span in turn.walk())
        assert obs.last_trace_id(thread) == turn.trace_id
        assert obs.current_trace_id(thread) is None
    assert backend.open_spans() == []
    assert obs.runs.open_streams == 0


async def test_50_concurrent_runs_to_langfuse_never_cross_ids(
    langfuse_receiver: LangfuseReceiver, langfuse_backend: Any
) -> None:
    runs = 50
    recording = RecordingBackend()
    obs = Observability([langfuse_backend(flush_at=64), recording], mask_messages=False)
    with serve(TracingMiddleware(concurrent_app(), observability=obs)) as url:
        found, _ = await stream_all(url, runs, "lf")
    await obs.aclose()

    spans = langfuse_receiver.wait_for_spans(
        lambda spans: (
            {(s.trace_id, s.name) for s in spans}
            >= {(t, n) for t in found for n in ("llm_interaction", "tool_lookup")}
        ),
        timeout=20,
    )
    assert {turn.trace_id for turn in recording.runs} == set(found)  # the one id in both backends
    for span in spans:
        if span.trace_id not in found:
            continue
        thread, run = found[span.trace_id]
        assert span.attributes["session.id"] == thread
        assert span.metadata("run_id", trace=True) == run
        assert span.metadata("thread_id", trace=True) == thread
        if span.name == "tool_lookup":
            assert as_value(span.attributes["langfuse.observation.input"]) == {"run": run}
        if span.name == "llm_interaction":
            assert as_value(span.attributes["langfuse.observation.output"]) == own_text(run)
