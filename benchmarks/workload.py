"""The AG-UI workload: a realistic run as SSE frames, and the Starlette app that streams it.

A run is RUN_STARTED, then blocks of 50 events (an assistant message of 42 text deltas, then a tool
call: START, 3 ARGS, END, RESULT of ~300 bytes of JSON), padded with text deltas, then RUN_FINISHED
with usage. Frames are byte-for-byte what ag-ui's ``EventEncoder`` writes (``data: {json}\\n\\n``),
one frame per body chunk, as ``StreamingResponse`` sends an encoder's output.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

BLOCK = 50
TEXT_DELTAS = 42
_WORDS = [
    f"{word} "
    for word in ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "in", "Paris")
]
_ARGS = ['{"query": "weather', " in Paris", ' tomorrow", "limit": 3}']
_RESULT = json.dumps(
    {
        "results": [
            {"title": f"Forecast {i}", "url": f"https://example.com/weather/{i}", "summary": "rain, 14 C"}
            for i in range(4)
        ]
    }
)


def _frame(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def _text_frames(message_id: str) -> list[bytes]:
    return [
        _frame({"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": word}) for word in _WORDS
    ]


def run_frames(
    events: int, *, thread_id: str = "thread-1", run_id: str = "run-1", tool_result_bytes: int = 0
) -> Iterator[bytes]:
    """The frames of one run of ``events`` events (at least 2). ``tool_result_bytes`` > 0 makes the
    first tool call's result a JSON string of about that size."""
    yield _frame({"type": "RUN_STARTED", "threadId": thread_id, "runId": run_id})
    remaining = max(0, events - 2)
    block = 0
    message_id = f"{run_id}-m0"
    while remaining >= BLOCK:
        message_id = f"{run_id}-m{block}"
        call_id = f"{run_id}-c{block}"
        yield _frame({"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"})
        texts = _text_frames(message_id)
        for index in range(TEXT_DELTAS):
            yield texts[index % len(texts)]
        yield _frame({"type": "TEXT_MESSAGE_END", "messageId": message_id})
        yield _frame(
            {
                "type": "TOOL_CALL_START",
                "toolCallId": call_id,
                "toolCallName": "search",
                "parentMessageId": message_id,
            }
        )
        for delta in _ARGS:
            yield _frame({"type": "TOOL_CALL_ARGS", "toolCallId": call_id, "delta": delta})
        yield _frame({"type": "TOOL_CALL_END", "toolCallId": call_id})
        content = _RESULT
        if tool_result_bytes and block == 0:
            content = json.dumps({"blob": "x" * tool_result_bytes})
        yield _frame(
            {
                "type": "TOOL_CALL_RESULT",
                "messageId": f"{run_id}-r{block}",
                "toolCallId": call_id,
                "content": content,
                "role": "tool",
            }
        )
        remaining -= BLOCK
        block += 1
    texts = _text_frames(message_id)
    for index in range(remaining):
        yield texts[index % len(texts)]
    yield _frame(
        {
            "type": "RUN_FINISHED",
            "threadId": thread_id,
            "runId": run_id,
            "usage": [
                {
                    "model": "gpt-bench",
                    "inputTokens": 1200,
                    "outputTokens": events,
                    "totalTokens": 1200 + events,
                }
            ],
        }
    )


def request_body(
    events: int,
    *,
    run_id: str = "run-1",
    interval: float = 0.0,
    stamp: bool = False,
    tool_result_bytes: int = 0,
    chunk_bytes: int = 0,
) -> dict[str, Any]:
    """A RunAgentInput; ``forwardedProps.bench`` tells the app what to stream."""
    return {
        "threadId": f"thread-{run_id}",
        "runId": run_id,
        "state": {},
        "tools": [],
        "context": [],
        "messages": [{"id": f"{run_id}-u", "role": "user", "content": "What will the weather be in Paris?"}],
        "forwardedProps": {
            "bench": {
                "events": events,
                "interval": interval,
                "stamp": stamp,
                "toolResultBytes": tool_result_bytes,
                "chunkBytes": chunk_bytes,
            }
        },
    }


def _stamped(frame: bytes) -> bytes:
    """The frame with the emit time (CLOCK_MONOTONIC ns, shared by all processes) as ``benchT``."""
    return frame[:-3] + b',"benchT":%d}\n\n' % time.monotonic_ns()


async def _body(
    events: int, thread_id: str, run_id: str, interval: float, stamp: bool, tool_result_bytes: int, chunk: int
) -> AsyncIterator[bytes]:
    start = time.monotonic()
    frames = run_frames(events, thread_id=thread_id, run_id=run_id, tool_result_bytes=tool_result_bytes)
    for index, frame in enumerate(frames):
        if interval:
            delay = start + index * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if chunk and len(frame) > chunk:
            for offset in range(0, len(frame), chunk):
                yield frame[offset : offset + chunk]
        else:
            yield _stamped(frame) if stamp else frame


async def agent(request: Request) -> Response:
    body = await request.json()
    bench = body.get("forwardedProps", {}).get("bench", {})
    stream = _body(
        int(bench.get("events", 100)),
        body.get("threadId", "thread-1"),
        body.get("runId", "run-1"),
        float(bench.get("interval", 0.0)),
        bool(bench.get("stamp", False)),
        int(bench.get("toolResultBytes", 0)),
        int(bench.get("chunkBytes", 0)),
    )
    return StreamingResponse(stream, media_type="text/event-stream")


def make_app() -> Starlette:
    """POST /agent streams the run its body's ``forwardedProps.bench`` describes."""
    return Starlette(routes=[Route("/agent", agent, methods=["POST"])])
