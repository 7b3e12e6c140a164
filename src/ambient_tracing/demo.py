"""``ambient-tracing demo``: a scripted AG-UI agent behind the middleware, traced to a local MLflow
store, talked to over real HTTP, then its traces read back and printed as span trees.

Needs the ``demo`` extra (mlflow-skinny, sqlalchemy, alembic, uvicorn, httpx); no LLM key, no network
beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ag_ui.core import (
    BaseEvent,
    EventType,
    RunFinishedEvent,
    RunStartedEvent,
    StepFinishedEvent,
    StepStartedEvent,
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
from starlette.responses import StreamingResponse
from starlette.routing import Route

from ambient_tracing.doors.middleware import TracingMiddleware
from ambient_tracing.observability import Observability

EXPERIMENT = "ambient-tracing-demo"
MODEL = "scripted-demo-model"
CONVERSATION = ("What's the weather in Lisbon?", "And in Oslo?", "Thanks! Which one is warmer?")
_WEATHER = {"lisbon": "21°C and sunny", "oslo": "4°C and light rain"}


def scripted_agent(thread_id: str, run_id: str, question: str) -> list[BaseEvent]:
    """One run of a pretend agent: a weather tool call with its result, then an answer, then usage.
    Long because it is the script itself, one event per line."""
    city = next((name for name in _WEATHER if name in question.lower()), None)
    call_id, message_id = f"call-{run_id[:8]}", f"msg-{run_id[:8]}"
    events: list[BaseEvent] = [
        RunStartedEvent(type=EventType.RUN_STARTED, thread_id=thread_id, run_id=run_id)
    ]
    if city:
        events += [
            StepStartedEvent(type=EventType.STEP_STARTED, step_name="lookup"),
            ToolCallStartEvent(
                type=EventType.TOOL_CALL_START, tool_call_id=call_id, tool_call_name="get_weather"
            ),
            ToolCallArgsEvent(
                type=EventType.TOOL_CALL_ARGS, tool_call_id=call_id, delta=json.dumps({"city": city})
            ),
            ToolCallEndEvent(type=EventType.TOOL_CALL_END, tool_call_id=call_id),
            ToolCallResultEvent(
                type=EventType.TOOL_CALL_RESULT,
                tool_call_id=call_id,
                message_id=f"{call_id}-r",
                content=_WEATHER[city],
            ),
            StepFinishedEvent(type=EventType.STEP_FINISHED, step_name="lookup"),
        ]
        answer = f"It is {_WEATHER[city]} in {city.title()}."
    else:
        answer = "Lisbon is warmer: 21°C against 4°C in Oslo."
    events.append(
        TextMessageStartEvent(type=EventType.TEXT_MESSAGE_START, message_id=message_id, role="assistant")
    )
    events += [
        TextMessageContentEvent(type=EventType.TEXT_MESSAGE_CONTENT, message_id=message_id, delta=word + " ")
        for word in answer.split()
    ]
    events += [
        TextMessageEndEvent(type=EventType.TEXT_MESSAGE_END, message_id=message_id),
        RunFinishedEvent(
            type=EventType.RUN_FINISHED,
            thread_id=thread_id,
            run_id=run_id,
            usage=[
                TokenUsage(model=MODEL, input_tokens=40 + len(question), output_tokens=len(answer.split()))
            ],
        ),
    ]
    return events


def demo_app() -> Starlette:
    """POST /agent streams :func:`scripted_agent` for the last user message, as AG-UI SSE."""

    async def agent(request: Request) -> StreamingResponse:
        body = await request.json()
        question = next(
            (m.get("content", "") for m in reversed(body.get("messages", [])) if m.get("role") == "user"), ""
        )
        encoder = EventEncoder()

        async def stream() -> AsyncIterator[str]:
            for event in scripted_agent(body["threadId"], body["runId"], question):
                yield encoder.encode(event)
                await asyncio.sleep(0.005)

        return StreamingResponse(stream(), media_type=encoder.get_content_type())

    return Starlette(routes=[Route("/agent", agent, methods=["POST"])])


@contextmanager
def _serve(app: Any) -> Iterator[str]:
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the demo server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


async def _converse(base_url: str, thread_id: str, say: Any) -> list[str]:
    import httpx

    trace_ids: list[str] = []
    messages: list[dict[str, str]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for number, question in enumerate(CONVERSATION, 1):
            messages.append({"id": f"u{number}", "role": "user", "content": question})
            body = {
                "threadId": thread_id,
                "runId": str(uuid.uuid4()),
                "messages": messages,
                "state": {},
                "tools": [],
                "context": [],
                "forwardedProps": {},
            }
            say(f"\nuser> {question}")
            text: list[str] = []
            async with client.stream(
                "POST", "/agent", json=body, headers={"x-current-user-id": "demo-user"}
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        event = json.loads(line[6:])
                        text += _describe(event, say, trace_ids)
            answer = "".join(text).strip()
            say(f"agent> {answer}")
            messages.append({"id": f"a{number}", "role": "assistant", "content": answer})
    return trace_ids


def _describe(event: dict[str, Any], say: Any, trace_ids: list[str]) -> list[str]:
    kind = event["type"]
    if kind == "CUSTOM" and event.get("name") == "ambient:trace_id":
        trace_ids.append(event["value"]["traceId"])
        say(f"  CUSTOM ambient:trace_id   traceId={event['value']['traceId']}")
    elif kind == "TEXT_MESSAGE_CONTENT":
        return [event["delta"]]
    elif kind == "TEXT_MESSAGE_END":
        return ["\n"]
    elif kind == "TOOL_CALL_START":
        say(f"  TOOL_CALL_START {event['toolCallName']}")
    elif kind == "TOOL_CALL_RESULT":
        say(f"  TOOL_CALL_RESULT          {event['content']!r}")
    elif kind == "RUN_FINISHED":
        usage = event.get("usage") or [{}]
        tokens = f"in={usage[0].get('inputTokens')} out={usage[0].get('outputTokens')}"
        say(f"  RUN_FINISHED              tokens {tokens}")
    elif kind in ("RUN_STARTED", "STEP_STARTED", "STEP_FINISHED", "TEXT_MESSAGE_START"):
        say(f"  {kind}")
    return []


def _print_trees(tracking_uri: str, trace_ids: list[str], say: Any) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for trace_id in trace_ids:
        trace = client.get_trace(f"tr-{trace_id}")
        info = trace.info
        say(
            f"\ntrace tr-{trace_id}  status={info.state}  tags: thread={info.tags.get('ambient.thread_id')} "
            f"run={info.tags.get('ambient.run_id')}  usage={info.token_usage}"
        )
        _print_tree(trace.data.spans, say)


def _print_tree(spans: list[Any], say: Any) -> None:
    children: dict[str | None, list[Any]] = {}
    for span in sorted(spans, key=lambda span: span.start_time_ns):
        children.setdefault(span.parent_id, []).append(span)

    def show(span: Any, depth: int) -> None:
        took = (span.end_time_ns - span.start_time_ns) / 1e6
        inputs = json.dumps(span.inputs, ensure_ascii=False)
        outputs = json.dumps(span.outputs, ensure_ascii=False)
        say(f"  {'  ' * depth}{span.name:<{24 - 2 * depth}} {took:7.1f} ms  in={inputs} out={outputs}")
        for child in children.get(span.span_id, []):
            show(child, depth + 1)

    for root in children.get(None, []):
        show(root, 0)


def demo_observability(store: Path) -> tuple[Observability, str]:
    """An :class:`Observability` tracing to the sqlite store at ``store`` (ratings queued beside it)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the demo talks to 127.0.0.1 only
    from ambient_tracing.backends.mlflow import MlflowBackend

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its table-creation chatter
    store.parent.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{store.resolve()}"
    observability = Observability(
        [MlflowBackend(tracking_uri=tracking_uri, experiment_name=EXPERIMENT)],
        runner_type="demo",
        mask_messages=False,
        feedback_spool=store.parent / "feedback-queue" / "feedback.db",  # its folder is made 0700
    )
    return observability, tracking_uri


def run_demo(store: Path, say: Any = print) -> list[str]:
    """Run the whole demo against the sqlite store at ``store``; returns the trace ids it saw."""
    observability, tracking_uri = demo_observability(store)
    say(f"Tracing to MLflow store {store} (experiment {EXPERIMENT!r}); preparing it...")
    asyncio.run(observability.start())
    thread_id = f"demo-thread-{uuid.uuid4().hex[:8]}"
    app = TracingMiddleware(demo_app(), observability=observability)
    with _serve(app) as base_url:
        say(f"Scripted AG-UI agent with TracingMiddleware at {base_url}/agent, thread {thread_id}")
        trace_ids = asyncio.run(_converse(base_url, thread_id, say))
    asyncio.run(observability.aclose())  # flushes MLflow's export queue off the event loop
    say("\nRead back from the store:")
    _print_trees(tracking_uri, trace_ids, say)
    say(
        "\nThe demo shows message content (LANGFUSE_MASK_MESSAGES is on by default in your apps).\n"
        "Open these traces in the MLflow UI:\n"
        f"  pip install mlflow && mlflow ui --backend-store-uri {tracking_uri}\n"
        "  then browse http://127.0.0.1:5000, experiment "
        f"{EXPERIMENT!r}; the ids above are the 'tr-...' request ids.\n"
        "Trace to Langfuse instead (or as well) in your own app:\n"
        "  export OBSERVABILITY_BACKENDS=langfuse   # or langfuse,mlflow\n"
        "  export LANGFUSE_ENABLED=true LANGFUSE_PUBLIC_KEY=pk-lf-... LANGFUSE_SECRET_KEY=sk-lf-... "
        "LANGFUSE_HOST=https://cloud.langfuse.com\n"
        "  app.add_middleware(TracingMiddleware)"
    )
    return trace_ids
