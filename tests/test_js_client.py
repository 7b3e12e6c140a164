"""The official AG-UI TypeScript client (``@ag-ui/client`` HttpAgent, in Node) against a traced app.

``examples/js/trace-and-rate.mjs`` runs two turns of the pydantic-ai example behind TracingMiddleware
and rates them through the middleware's feedback endpoint: the client's own event verification must
accept the traced stream, its ``onCustomEvent`` must see exactly one ``ambient:trace_id`` per run, and
each rating must land on the trace it was meant for (read back from the real MLflow server and the
Langfuse receiver).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from examples.pydantic_ai_app import build_app

from ambient_tracing import Observability
from ambient_tracing.backends.mlflow import MlflowBackend
from tests.support.fixtures_mlflow import wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.node_client import run_script
from tests.support.server import serve


def ratings(trace: Any) -> list[Any]:
    return [a for a in trace.info.assessments if a.name == "user-feedback" and a.valid is not False]


async def test_http_agent_sees_one_id_per_run_and_its_ratings_land_on_the_right_traces(
    tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability(
        [langfuse_backend(), mlflow_side], mask_messages=False, feedback_spool=tmp_path / "spool.jsonl"
    )
    thread = "thread-js-client"
    with serve(build_app(obs, feedback_path="/feedback")) as url:
        report = await asyncio.to_thread(run_script, "trace-and-rate.mjs", url, thread, "2")

    # The client accepted both streams (runAgent would have rejected them otherwise) and saw one id each.
    first, second = report["runs"]
    for run in (first, second):
        assert len(run["traceIds"]) == 1, run
        assert run["types"][:2] == ["RUN_STARTED", "CUSTOM"]
        assert run["types"].count("CUSTOM") == 1
        assert run["types"][-1] == "RUN_FINISHED"
        assert "tool" in run["newMessages"] and run["newMessages"][-1] == "assistant"
        assert run["lastTraceId"] == run["traceIds"][0]
    [first_id], [second_id] = first["traceIds"], second["traceIds"]
    assert first_id != second_id
    assert obs.last_trace_id(thread) == second_id

    # Thumbs up named the first run's trace; thumbs down named none and went to the thread's latest.
    up, down = report["feedback"]
    assert up["status"] == down["status"] == 200
    assert up["body"]["event"]["traceId"] == first_id and up["body"]["event"]["recorded"] is True
    assert down["body"]["event"]["traceId"] == second_id and down["body"]["event"]["recorded"] is True

    for trace_id, value, comment in ((first_id, True, "spot on"), (second_id, False, "wrong city")):
        trace = await asyncio.to_thread(
            wait_for_trace, mlflow_side.tracking_uri, trace_id, lambda t: bool(ratings(t))
        )
        [rating] = ratings(trace)
        assert rating.value is value
        assert rating.source.source_type == "HUMAN" and rating.source.source_id == "ana"
        assert rating.rationale == comment
        assert trace.info.tags["ambient.thread_id"] == thread
    scores = langfuse_receiver.wait_for_scores(2)
    assert sorted((s["traceId"], s["value"]) for s in scores) == sorted([(first_id, 1), (second_id, 0)])
    await obs.aclose()
