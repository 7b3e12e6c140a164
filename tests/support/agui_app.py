"""A scripted AG-UI app: the events it streams are given by the test, encoded by ag-ui's encoder."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from ag_ui.core import (
    BaseEvent,
    EventType,
    RunFinishedEvent,
    RunStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    TokenUsage,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.encoder import EventEncoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

Script = Callable[[dict], Sequence[BaseEvent]]


def scripted_run(
    thread_id: str,
    run_id: str,
    *,
    text: str = "The answer is 42.",
    tool: str = "search",
    model: str = "scripted-model",
) -> list[BaseEvent]:
    """A typical run: a tool call with its result, then text, then usage."""
    return [
        RunStartedEvent(type=EventType.RUN_STARTED, thread_id=thread_id, run_id=run_id),
        ToolCallStartEvent(
            type=EventType.TOOL_CALL_START, tool_call_id=f"{run_id}-call", tool_call_name=tool
        ),
        ToolCallArgsEvent(type=EventType.TOOL_CALL_ARGS, tool_call_id=f"{run_id}-call", delta='{"query": '),
        ToolCallArgsEvent(type=EventType.TOOL_CALL_ARGS, tool_call_id=f"{run_id}-call", delta='"life"}'),
        ToolCallEndEvent(type=EventType.TOOL_CALL_END, tool_call_id=f"{run_id}-call"),
        ToolCallResultEvent(
            type=EventType.TOOL_CALL_RESULT,
            tool_call_id=f"{run_id}-call",
            message_id=f"{run_id}-result",
            content="42",
        ),
        TextMessageStartEvent(
            type=EventType.TEXT_MESSAGE_START, message_id=f"{run_id}-msg", role="assistant"
        ),
        *[
            TextMessageContentEvent(
                type=EventType.TEXT_MESSAGE_CONTENT, message_id=f"{run_id}-msg", delta=word + " "
            )
            for word in text.split()
        ],
        TextMessageEndEvent(type=EventType.TEXT_MESSAGE_END, message_id=f"{run_id}-msg"),
        RunFinishedEvent(
            type=EventType.RUN_FINISHED,
            thread_id=thread_id,
            run_id=run_id,
            usage=[TokenUsage(model=model, input_tokens=12, output_tokens=7, total_tokens=19)],
        ),
    ]


def agui_app(
    script: Script | None = None, *, delay: float = 0.0, raw: Callable[[dict], Sequence[bytes]] | None = None
) -> Starlette:
    """POST /agent streams ``script(body)`` encoded as SSE (or ``raw(body)`` chunks as given),
    sleeping ``delay`` seconds between chunks. GET /health answers plain JSON."""

    async def agent(request: Request) -> Response:
        body = await request.json()
        if raw is not None:
            chunks = list(raw(body))
        else:
            encoder = EventEncoder()
            events = (script or (lambda b: scripted_run(b["threadId"], b["runId"])))(body)
            chunks = [encoder.encode(event).encode() for event in events]

        async def stream():
            for chunk in chunks:
                yield chunk
                if delay:
                    await asyncio.sleep(delay)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(request: Request) -> Response:
        return Response('{"ok": true}', media_type="application/json")

    return Starlette(routes=[Route("/agent", agent, methods=["POST"]), Route("/health", health)])


def run_input(thread_id: str, run_id: str, message: str = "What is the meaning of life?") -> dict:
    return {
        "threadId": thread_id,
        "runId": run_id,
        "state": {},
        "tools": [],
        "context": [],
        "forwardedProps": {},
        "messages": [{"id": f"{run_id}-u", "role": "user", "content": message}],
    }
