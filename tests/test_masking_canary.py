"""The privacy mask, proven end to end: marked long strings in every field of every event kind and
of the error paths go through the middleware (uvicorn, httpx) to the Langfuse SDK (exporting to the
loopback receiver) and MLflow (a real ``mlflow server``); then everything both stored is read back
and searched. No canary may be found."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.rating import Rating
from ambient_tracing.privacy import REDACTED, mask_id
from tests.support.fixtures_langfuse import sdk_langfuse_backend
from tests.support.fixtures_mlflow import MlflowServer
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.pair import sse
from tests.support.server import serve

pytestmark = pytest.mark.timeout(180)

MARK = "CANARY"


def canary(field: str) -> str:
    """A string over the mask's limit, marked so it can be found wherever it ends up."""
    return f"{MARK}-{field}-".ljust(72, "x")


def key_json(field: str) -> str:
    """JSON text whose object KEY is a canary (and its value another)."""
    return json.dumps({canary(f"{field}-key"): canary(f"{field}-value"), "n": 1})


THREAD = canary("thread")


def full_run() -> list[dict[str, Any]]:
    """One run with a canary in every field of every event kind the core reads (and some it does not)."""
    return [
        {
            "type": "RUN_STARTED",
            "threadId": THREAD,
            "runId": canary("run"),
            "parentRunId": canary("parent-run"),
            "input": {
                "threadId": THREAD,
                "runId": canary("run"),
                "messages": [{"id": canary("input-msg-id"), "role": "user", "content": canary("input-msg")}],
                "state": {canary("state-key"): canary("state")},
            },
        },
        {"type": "TEXT_MESSAGE_START", "messageId": canary("msg-id"), "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": canary("msg-id"), "delta": canary("text")},
        {"type": "TEXT_MESSAGE_END", "messageId": canary("msg-id")},
        {"type": "TEXT_MESSAGE_CHUNK", "messageId": canary("chunk-id"), "delta": canary("text-chunk")},
        {"type": "TEXT_MESSAGE_START", "messageId": "u1", "role": "user"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "u1", "delta": canary("user-text")},
        {
            "type": "TOOL_CALL_START",
            "toolCallId": canary("call-id"),
            "toolCallName": canary("tool-name"),
            "parentMessageId": canary("parent-msg"),
        },
        {"type": "TOOL_CALL_ARGS", "toolCallId": canary("call-id"), "delta": key_json("args")},
        {"type": "TOOL_CALL_END", "toolCallId": canary("call-id"), "error": canary("tool-end-error")},
        {
            "type": "TOOL_CALL_RESULT",
            "toolCallId": canary("call-id"),
            "messageId": canary("result-msg"),
            "role": "tool",
            "content": json.dumps({canary("result-key"): 1, "error": canary("tool-error")}),
            "isError": True,
        },
        {"type": "TOOL_CALL_START", "toolCallId": "c2", "toolCallName": "mcp__" + canary("server") + "__x"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c2", "delta": canary("args-text")},
        {
            "type": "TOOL_CALL_RESULT",
            "toolCallId": "c2",
            "messageId": "m",
            "content": "Error: " + canary("err"),
        },
        {
            "type": "TOOL_CALL_CHUNK",
            "toolCallId": canary("chunk-call"),
            "toolCallName": canary("chunk-tool"),
            "delta": key_json("chunk-args"),
        },
        {
            "type": "TOOL_CALL_RESULT",
            "toolCallId": canary("unknown-call"),
            "messageId": "m",
            "content": canary("u"),
        },
        {"type": "STEP_STARTED", "stepName": canary("step")},
        {"type": "REASONING_START", "messageId": canary("reasoning-id")},
        {"type": "REASONING_MESSAGE_START", "messageId": "rm", "role": "reasoning"},
        {"type": "REASONING_MESSAGE_CONTENT", "messageId": "rm", "delta": canary("reasoning")},
        {"type": "REASONING_MESSAGE_END", "messageId": "rm"},
        {"type": "REASONING_END", "messageId": canary("reasoning-id")},
        {"type": "THINKING_TEXT_MESSAGE_CONTENT", "delta": canary("thinking")},
        {"type": "THINKING_TEXT_MESSAGE_END"},
        {"type": "STEP_FINISHED", "stepName": canary("step")},
        {"type": "STEP_FINISHED", "stepName": canary("step-not-open")},
        {
            "type": "SUBAGENT_STARTED",
            "subagentRunId": canary("sub-id"),
            "name": canary("sub-name"),
            "description": canary("sub-description"),
        },
        {
            "type": "TOOL_CALL_START",
            "toolCallId": "c3",
            "toolCallName": "t",
            "subagentRunId": canary("sub-id"),
        },
        {"type": "TOOL_CALL_RESULT", "toolCallId": "c3", "messageId": "m", "content": canary("sub-tool")},
        {
            "type": "SUBAGENT_FINISHED",
            "subagentRunId": canary("sub-id"),
            "result": {canary("sub-result-key"): canary("sub-result")},
            "outcome": {"type": canary("sub-outcome")},
        },
        {"type": "SUBAGENT_STARTED", "subagentRunId": "s2", "name": "n", "parentSubagentRunId": canary("p")},
        {"type": "SUBAGENT_ERROR", "subagentRunId": "s2", "message": canary("sub-error")},
        {"type": "CUSTOM", "name": canary("custom-name"), "value": {canary("custom-key"): canary("custom")}},
        {"type": "RAW", "event": canary("raw"), "source": canary("raw-source")},
        {"type": "STATE_SNAPSHOT", "snapshot": {canary("snapshot-key"): canary("snapshot")}},
        {"type": "STATE_DELTA", "delta": [{"op": "add", "path": "/" + canary("path"), "value": canary("v")}]},
        {"type": "MESSAGES_SNAPSHOT", "messages": [{"id": "m", "role": "user", "content": canary("snap")}]},
        {
            "type": "RUN_FINISHED",
            "threadId": THREAD,
            "runId": canary("run"),
            "result": {canary("result-key2"): canary("run-result")},
            "outcome": {
                "type": "interrupt",
                "interrupts": [{"toolCallId": canary("i-call"), "reason": canary("interrupt-reason")}],
            },
            "usage": [
                {
                    "model": canary("model"),
                    "provider": canary("provider"),
                    "inputTokens": 5,
                    "outputTokens": 3,
                },
                {"model": canary("model-2"), "inputTokens": 1, "outputTokens": 1},
            ],
        },
    ]


def error_run() -> list[dict[str, Any]]:
    """A run ended by RUN_ERROR while a tool call, a step and a subagent are open."""
    return [
        {"type": "RUN_STARTED", "threadId": THREAD, "runId": canary("run-2")},
        {"type": "STEP_STARTED", "stepName": "s"},
        {"type": "SUBAGENT_STARTED", "subagentRunId": "s", "name": "n"},
        {"type": "TOOL_CALL_START", "toolCallId": "open", "toolCallName": "Bash"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "open", "delta": key_json("open-args")},
        {
            "type": "RUN_ERROR",
            "message": canary("run-error"),
            "code": canary("run-error-code"),
            "usage": [{"model": canary("error-model"), "inputTokens": 2}],
        },
    ]


def single_model_run() -> list[dict[str, Any]]:
    """One model (so it becomes the turn's model, tags included) and a long result instead of text."""
    return [
        {"type": "RUN_STARTED", "threadId": "t-plain", "runId": "r-plain"},
        {
            "type": "RUN_FINISHED",
            "result": canary("result-text"),
            "outcome": {"type": canary("outcome")},
            "usage": [{"model": canary("only-model"), "inputTokens": 4, "outputTokens": 2}],
        },
    ]


def crashing_run() -> list[dict[str, Any]]:
    return [
        {"type": "RUN_STARTED", "threadId": THREAD, "runId": "r-crash"},
        {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "Read"},
    ]


def canary_app() -> Starlette:
    """POST /agent/{scenario}: the scenario's events as SSE; ``crash`` raises mid-stream."""
    scenarios: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "full": lambda: [*full_run(), *error_run()],
        "single": single_model_run,
        "crash": crashing_run,
    }

    async def agent(request: Request) -> Response:
        name = request.path_params["scenario"]
        await request.body()
        events = scenarios[name]()

        async def body() -> AsyncIterator[bytes]:
            for event in events:
                yield sse(event)
                await asyncio.sleep(0)
            if name == "crash":
                raise RuntimeError(canary("exception"))

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/agent/{scenario}", agent, methods=["POST"])])


async def post(client: httpx.AsyncClient, url: str, scenario: str) -> None:
    body = {
        "threadId": THREAD,
        "runId": canary("body-run"),
        "messages": [{"id": "u", "role": "user", "content": canary("request-msg")}],
    }
    headers = {"x-current-user-id": canary("user-id"), "x-current-user-name": canary("user-name")}
    try:
        async with client.stream("POST", f"{url}/agent/{scenario}", json=body, headers=headers) as response:
            async for _ in response.aiter_raw():
                pass
    except httpx.HTTPError:
        if scenario != "crash":  # the crash breaks the response off: expected
            raise


def mlflow_stored(server: MlflowServer, experiment_name: str) -> str:
    """Everything MLflow stored for the experiment, as text: each trace's info (tags, metadata,
    previews, assessments) and spans (names, attributes, inputs, outputs, status, events)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None
    traces = client.search_traces(locations=[experiment.experiment_id], max_results=500)
    return "\n".join(trace.to_json() for trace in traces)


#: A feedback comment: the user's words to the operators, kept as written (the README says so).
FEEDBACK_TEXT = "The answer skipped the second file; please look at the migration again."


def rating() -> Rating:
    """Feedback on the thread with no trace id (so each backend finds the thread's trace by its
    masked id): canaries in every id and label, and a long comment that is kept."""
    return Rating(
        kind="thumbs_down",
        thread_id=THREAD,
        trace_id=None,
        user_id=canary("rating-user"),
        message_id=canary("rating-message"),
        comment=FEEDBACK_TEXT,
        correction=None,
        metadata={
            "user": canary("rating-user"),
            "messageId": canary("rating-message"),
            "session": canary("rating-session"),
            "project": canary("rating-project"),
            "feedbackType": "thumbs_down",
        },
    )


def sdk_mlflow(server: MlflowServer) -> Any:
    """MLflow through its SDK (spans made on the span worker, masked there), on the same server."""
    from ambient_tracing.backends.mlflow import MlflowBackend

    backend = MlflowBackend(
        tracking_uri=server.url, experiment_name=f"canary-sdk-{uuid.uuid4().hex[:8]}", otlp=False
    )
    backend.setup()
    return backend


@pytest.mark.parametrize(
    ("langfuse_path", "mlflow_path"),
    [("otlp", "otlp"), ("sdk", "otlp"), ("otlp", "sdk")],
    ids=["both-otlp", "langfuse-sdk", "mlflow-sdk"],
)
async def test_no_canary_reaches_either_backend(
    langfuse_receiver: LangfuseReceiver,
    langfuse_backend: Any,
    mlflow_server: MlflowServer,
    mlflow_backend: Any,
    langfuse_path: str,
    mlflow_path: str,
) -> None:
    # OTLP: spans built by the package, masked in the exporters' threads; SDK: masked on the worker.
    mlflow = mlflow_backend() if mlflow_path == "otlp" else sdk_mlflow(mlflow_server)
    langfuse = langfuse_backend() if langfuse_path == "otlp" else sdk_langfuse_backend(langfuse_receiver)
    assert (mlflow.span_sink is None) == (mlflow_path == "sdk")
    assert (langfuse.span_sink is None) == (langfuse_path == "sdk")
    obs = Observability([langfuse, mlflow])  # mask_messages defaults to on
    with serve(TracingMiddleware(canary_app(), observability=obs)) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            for scenario in ("full", "single", "crash"):
                await post(client, url, scenario)
    await obs.aclose()  # Session Metrics too, then both backends flushed

    # Everything arrived (so finding no canary means something) ...
    spans = langfuse_receiver.wait_for_spans(
        lambda found: (
            sum(span.name == "llm_interaction" for span in found) >= 4
            and any(span.name == "Session Metrics" for span in found)
        )
    )
    langfuse_text = "\n".join(json.dumps(asdict(span), default=str) for span in spans)
    mlflow_text = ""
    for _ in range(100):  # bounded: MLflow stores traces a few seconds after their export
        mlflow_text = mlflow_stored(mlflow_server, mlflow.experiment_name)
        if mlflow_text.count('"llm_interaction"') >= 4 and "Session Metrics" in mlflow_text:
            break
        await asyncio.sleep(0.3)
    for text in (langfuse_text, mlflow_text):
        assert text.count("llm_interaction") >= 4 and "Session Metrics" in text
        assert REDACTED in text and "tool_" + REDACTED in text and "masked-" in text

    # Feedback on the thread, once its traces are stored: found through the masked thread id.
    feedback = Observability([langfuse_backend(), mlflow_backend(mlflow.experiment_name)])
    feedback.submit_rating(rating())
    for _ in range(150):  # bounded: delivery runs in the background
        mlflow_text = mlflow_stored(mlflow_server, mlflow.experiment_name)
        if langfuse_receiver.scores and FEEDBACK_TEXT in mlflow_text:
            break
        await asyncio.sleep(0.2)
    await feedback.aclose()
    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["comment"] == FEEDBACK_TEXT and FEEDBACK_TEXT in mlflow_text  # kept as written
    assert score.get("traceId") and score["traceId"] in mlflow_text  # the thread's trace, found masked
    assert mask_id(canary("rating-user")) in mlflow_text  # the rater, as a digest
    langfuse_text += "\n" + json.dumps(langfuse_receiver.scores)
    # ... and not one canary is in it, in any field of any span, trace, tag or metadata.
    for store, text in (("Langfuse", langfuse_text), ("MLflow", mlflow_text)):
        if MARK in text:
            at = text.index(MARK)
            pytest.fail(f"a canary reached {store}: ...{text[max(at - 300, 0) : at + 100]}...")
