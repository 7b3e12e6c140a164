"""Correlation both ways, with real parts: an OpenTelemetry-instrumented caller's ``traceparent``
joins its trace (read back from a real ``mlflow server`` and the Langfuse receiver), the
``traceresponse`` header, runId-derived ids computed first by the official JS client, grafted ids
refused, untrusted by default, and the opt-in ``RUN_FINISHED.result.traceId``."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from ag_ui.core import BaseEvent, EventType, RunFinishedEvent, RunStartedEvent
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.mlflow import MlflowBackend
from ambient_tracing.config import TracingConfig
from ambient_tracing.doors.stream import trace_agui_stream
from ambient_tracing.ids import parse_traceparent, trace_id_from_run_id
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import agui_app, run_input
from tests.support.client import Streamed, parse_events
from tests.support.fixtures_langfuse import sdk_langfuse_backend
from tests.support.fixtures_mlflow import wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.node_client import run_script
from tests.support.server import serve
from tests.test_otel_backend import otel_spans, otel_to


async def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[httpx.Headers, Streamed]:
    """POST a run; the response headers and the stream as read."""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30)) as client,
        client.stream("POST", f"{url}/agent", json=body, headers=headers) as response,
    ):
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        return response.headers, Streamed(raw, parse_events(raw))


def caller_span_headers() -> tuple[str, str, dict[str, str]]:
    """A real OpenTelemetry SDK span of a calling frontend; its trace id, span id and the headers
    its propagator writes."""
    tracer = TracerProvider().get_tracer("frontend")
    headers: dict[str, str] = {}
    with tracer.start_as_current_span("frontend click") as span:
        TraceContextTextMapPropagator().inject(headers)
        context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", headers


async def test_a_trusted_traceparent_puts_the_run_under_the_callers_span_in_every_backend(
    tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    otel_side = otel_to(langfuse_receiver)  # the OpenTelemetry backend, to the same loopback decoder
    obs = Observability(
        [langfuse_backend(), mlflow_side, otel_side],
        mask_messages=False,
        trust_traceparent=True,
        feedback_spool=tmp_path / "spool",
    )
    trace_id, caller_span, headers = caller_span_headers()
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        response_headers, streamed = await post(url, run_input("thread-tp", "run-tp"), headers)
    assert streamed.trace_ids == [trace_id]  # the id announced is the caller's
    announced = parse_traceparent(response_headers["traceresponse"])
    assert announced is not None and announced.trace_id == trace_id and announced.flags == "01"

    otel = otel_spans(langfuse_receiver, trace_id, 2)
    assert otel["llm_interaction"].parent_span_id == caller_span
    assert otel["llm_interaction"].span_id == announced.parent_span_id
    assert otel["tool_search"].parent_span_id == otel["llm_interaction"].span_id
    assert otel["llm_interaction"].attributes["gen_ai.operation.name"] == "invoke_agent"

    spans = langfuse_receiver.wait_for_spans(
        lambda s: any(
            x.name == "tool_search"
            and x.trace_id == trace_id
            and x.resource.get("service.name") != "otel-test"
            for x in s
        )
    )
    by_name = {
        span.name: span
        for span in spans
        if span.trace_id == trace_id and span.resource.get("service.name") != "otel-test"
    }
    root = by_name["llm_interaction"]
    assert root.parent_span_id == caller_span
    assert root.span_id == announced.parent_span_id  # traceresponse names the run's root span
    assert by_name["tool_search"].parent_span_id == root.span_id

    trace = await asyncio.to_thread(
        wait_for_trace, mlflow_side.tracking_uri, trace_id, lambda t: len(t.data.spans) >= 2
    )
    assert trace.info.trace_id == "tr-" + trace_id
    mlflow_spans = {span.name: span for span in trace.data.spans}
    assert mlflow_spans["llm_interaction"].parent_id == caller_span
    assert mlflow_spans["llm_interaction"].span_id == announced.parent_span_id
    assert mlflow_spans["tool_search"].parent_id == mlflow_spans["llm_interaction"].span_id
    # The run's trace is still a whole MLflow trace: finished, tagged, in its session.
    assert trace.info.state.value == "OK"
    assert trace.info.tags["ambient.thread_id"] == "thread-tp"  # the ownership data ratings check
    assert trace.info.tags["mlflow.traceName"] == "llm_interaction"
    assert mlflow_side.trace_thread(trace_id) == "thread-tp"
    assert trace.info.trace_metadata.get("mlflow.trace.session") == "thread-tp"
    await obs.aclose()


async def test_traceparent_is_ignored_unless_trusted() -> None:
    recorder = RecordingBackend()
    obs = Observability([recorder])
    trace_id, _, headers = caller_span_headers()
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        response_headers, streamed = await post(url, run_input("thread-u", "run-u"), headers)
    [announced] = streamed.trace_ids
    assert announced != trace_id
    assert "traceresponse" not in response_headers
    await obs.aclose()


@pytest.mark.parametrize(
    "value",
    [
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # another version
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero parent
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",  # upper case
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ],
)
def test_traceparent_is_validated_strictly(value: str) -> None:
    assert parse_traceparent(value) is None
    good = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    assert good is not None and good.parent_span_id == "b7ad6b7169203331"


def test_the_options_are_off_by_default_and_read_from_the_environment() -> None:
    assert not TracingConfig.from_env({}).trust_traceparent
    config = TracingConfig.from_env(
        {
            "AMBIENT_TRUST_TRACEPARENT": "true",
            "AMBIENT_TRACE_ID_FROM_RUN_ID": "true",
            "AMBIENT_RESULT_TRACE_ID": "true",
        }
    )
    assert config.trust_traceparent and config.trace_id_from_run_id and config.result_trace_id
    obs = Observability.from_config(config)
    assert obs.trust_traceparent and obs.runs.trace_id_from_run_id and obs.result_trace_id
    defaults = Observability()
    assert not (defaults.trust_traceparent or defaults.runs.trace_id_from_run_id or defaults.result_trace_id)


def test_the_run_id_rule() -> None:
    assert trace_id_from_run_id("0AF76519-16CD-43DD-8448-EB211C80319C") == "0af7651916cd43dd8448eb211c80319c"
    # Not a UUID: SHA-256 of the UTF-8 runId, first 16 bytes (the nil UUID too).
    assert trace_id_from_run_id("run-1") == "4e65d3fbe8ad6535681b021b30785b12"
    assert trace_id_from_run_id("00000000-0000-0000-0000-000000000000") == trace_id_from_run_id(
        "00000000-0000-0000-0000-000000000000"
    )
    assert trace_id_from_run_id("00000000-0000-0000-0000-000000000000") != "0" * 32
    assert trace_id_from_run_id("") is None


async def test_the_js_client_computes_the_id_before_the_run(tmp_path: Path) -> None:
    recorder = RecordingBackend()
    obs = Observability([recorder], trace_id_from_run_id=True, result_trace_id=True)
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        report = await asyncio.to_thread(run_script, "derived-trace-id.mjs", url, "thread-js-derived")
    assert len(report["runs"]) == 2  # one with a UUID runId, one with another runId
    for run in report["runs"]:
        assert run["computed"] == run["announced"] == run["traceresponse"].split("-")[1], run
        assert run["resultTraceId"] == run["computed"]
    await obs.aclose()


async def test_a_grafted_id_of_another_thread_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    recorder = RecordingBackend()
    obs = Observability([recorder], trust_traceparent=True)
    _, _, headers = caller_span_headers()
    caplog.set_level(logging.WARNING, logger="ambient_tracing")
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        _, first = await post(url, run_input("thread-a", "run-a"), headers)
        victim = first.trace_ids[0]
        graft = {"traceparent": f"00-{victim}-{'1' * 16}-01"}
        response_headers, second = await post(url, run_input("thread-b", "run-b"), graft)
        _, same_thread = await post(url, run_input("thread-a", "run-a2"), graft)
    [fresh] = second.trace_ids
    assert fresh != victim and "traceresponse" not in response_headers
    assert obs.thread_of(fresh) == "thread-b" and obs.thread_of(victim) == "thread-a"
    assert any(
        "another thread" in record.getMessage() and victim in record.getMessage() for record in caplog.records
    )
    assert same_thread.trace_ids == [victim]  # the id's own thread may join it again
    await obs.aclose()


async def test_a_run_id_of_another_threads_trace_is_refused_in_the_python_door() -> None:
    recorder = RecordingBackend()
    obs = Observability([recorder], trace_id_from_run_id=True)
    run_id = str(uuid.uuid4())

    async def run(thread: str) -> list[BaseEvent]:
        async def events() -> Any:
            yield RunStartedEvent(type=EventType.RUN_STARTED, thread_id=thread, run_id=run_id)
            yield RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id=thread, run_id=run_id)

        return [event async for event in trace_agui_stream(events(), obs)]

    first = await run("thread-1")
    second = await run("thread-2")
    assert first[1].value == {"traceId": run_id.replace("-", "")}  # type: ignore[attr-defined]
    assert second[1].value["traceId"] != run_id.replace("-", "")  # type: ignore[attr-defined]
    await obs.aclose()


async def test_result_trace_id_edits_only_the_result_and_only_when_asked() -> None:
    def raw(body: dict[str, Any]) -> list[bytes]:
        thread, run = body["threadId"], body["runId"]
        return [
            f'data: {{"type":"RUN_STARTED","threadId":"{thread}","runId":"{run}"}}\n\n'.encode(),
            f'data: {{"type": "RUN_FINISHED", "threadId":"{thread}","runId":"{run}",'
            ' "result" : {"answer": 4.20e1}}\n\n'.encode(),
            f'data: {{"type":"RUN_STARTED","threadId":"{thread}","runId":"{run}-2"}}\n\n'
            f'data: {{"type":"RUN_FINISHED","threadId":"{thread}","runId":"{run}-2","result":"text"}}\n\n'
            f'data: {{"type":"RUN_STARTED","threadId":"{thread}","runId":"{run}-3"}}\n\n'
            f'data: {{"type":"RUN_FINISHED","threadId":"{thread}","runId":"{run}-3"}}\n\n'.encode(),
        ]

    for on in (False, True):
        obs = Observability([RecordingBackend()], result_trace_id=on)
        with serve(TracingMiddleware(agui_app(raw=raw), observability=obs)) as url:
            _, streamed = await post(url, run_input("thread-r", "run-r"))
        first, _, third = streamed.trace_ids
        frames = [f for f in streamed.raw.split(b"\n\n") if b"RUN_FINISHED" in f]
        if not on:
            assert b"traceId" not in b"".join(frames)
        else:
            assert frames[0] == (
                b'data: {"type": "RUN_FINISHED", "threadId":"thread-r","runId":"run-r",'
                b' "result" : {"traceId":"' + first.encode() + b'","answer": 4.20e1}}'
            )
            assert frames[1].endswith(b'"result":"text"}')  # not an object: untouched
            assert json.loads(frames[2][6:])["result"] == {"traceId": third}
        await obs.aclose()


async def test_a_declared_length_body_is_not_rewritten_but_the_header_is_added() -> None:
    thread, run_id = "thread-cl", str(uuid.uuid4())
    body = (
        f'data: {{"type":"RUN_STARTED","threadId":"{thread}","runId":"{run_id}"}}\n\n'
        f'data: {{"type":"RUN_FINISHED","threadId":"{thread}","runId":"{run_id}"}}\n\n'
    ).encode()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"text/event-stream"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    backend = RecordingBackend()
    obs = Observability([backend], trace_id_from_run_id=True, result_trace_id=True)
    with serve(TracingMiddleware(app, observability=obs), lifespan="off") as url:
        response_headers, streamed = await post(url, run_input(thread, run_id))
    assert streamed.raw == body  # bytes as the app wrote them: its length stays true
    assert response_headers["content-length"] == str(len(body))
    assert response_headers["traceresponse"].split("-")[1] == run_id.replace("-", "")
    assert backend.runs[0].trace_id == run_id.replace("-", "")
    await obs.aclose()


async def test_the_python_door_adds_result_trace_id_when_asked() -> None:
    obs = Observability([RecordingBackend()], result_trace_id=True)

    async def events() -> Any:
        yield RunStartedEvent(type=EventType.RUN_STARTED, thread_id="t-py", run_id="r-1")
        yield RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id="t-py", run_id="r-1", result={"a": 1})
        yield RunStartedEvent(type=EventType.RUN_STARTED, thread_id="t-py", run_id="r-2")
        yield RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id="t-py", run_id="r-2", result="text")

    out = [event async for event in trace_agui_stream(events(), obs)]
    first_id, second_id = out[1].value["traceId"], out[4].value["traceId"]  # type: ignore[attr-defined]
    assert out[2].result == {"traceId": first_id, "a": 1}  # type: ignore[attr-defined]
    assert out[5].result == "text" and second_id  # type: ignore[attr-defined]
    await obs.aclose()


async def test_another_replicas_trace_is_refused_from_the_backends_ownership_data(
    tmp_path: Path, mlflow_backend: Any
) -> None:
    """The trace is not in this process's registry (another replica, a restart): the backends'
    answer, looked up when the request arrived, refuses it."""
    experiment = f"replicas-{uuid.uuid4().hex[:8]}"
    first = Observability([mlflow_backend(experiment)], feedback_spool=tmp_path / "a")
    with serve(TracingMiddleware(agui_app(), observability=first)) as url:
        _, streamed = await post(url, run_input("thread-owner", "run-1"))
    [victim] = streamed.trace_ids
    await first.aclose()
    stored = mlflow_backend(experiment)
    await asyncio.to_thread(wait_for_trace, stored.tracking_uri, victim)

    second = Observability([stored], trust_traceparent=True, feedback_spool=tmp_path / "b")
    graft = {"traceparent": f"00-{victim}-{'2' * 16}-01"}
    # The lookup the request starts, finished (as it usually is by the response's start).
    assert second.owners.answered(victim) == "unknown"
    await asyncio.to_thread(second.owners.lookup, victim)
    with serve(TracingMiddleware(agui_app(), observability=second)) as url:
        response_headers, grafted = await post(url, run_input("thread-intruder", "run-2"), graft)
        _, owner = await post(url, run_input("thread-owner", "run-3"), graft)
    assert grafted.trace_ids != [victim] and "traceresponse" not in response_headers
    assert owner.trace_ids == [victim]
    await second.aclose()


async def test_the_sdk_paths_record_the_callers_trace(
    tmp_path: Path, mlflow_server: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    """Langfuse with an app's own client (TraceContext with the parent span) and MLflow through its
    SDK (the root under the caller's trace id, naming the caller's span: see backends/mlflow.py)."""

    key = uuid.uuid4().hex[:8]
    sdk_mlflow = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name=f"sdk-{key}", otlp=False)
    obs = Observability(
        [sdk_langfuse_backend(langfuse_receiver), sdk_mlflow],
        mask_messages=False,
        trust_traceparent=True,
        feedback_spool=tmp_path / "spool",
    )
    trace_id, caller_span, headers = caller_span_headers()
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        _, streamed = await post(url, run_input("thread-sdk", "run-sdk"), headers)
    assert streamed.trace_ids == [trace_id]
    spans = langfuse_receiver.wait_for_spans(
        lambda s: any(x.name == "llm_interaction" and x.trace_id == trace_id for x in s)
    )
    [root] = [span for span in spans if span.name == "llm_interaction" and span.trace_id == trace_id]
    assert root.parent_span_id == caller_span
    trace = await asyncio.to_thread(
        wait_for_trace, mlflow_server.url, trace_id, lambda t: len(t.data.spans) >= 2
    )
    mlflow_root = next(span for span in trace.data.spans if span.name == "llm_interaction")
    assert mlflow_root.parent_id is None
    assert mlflow_root.attributes["ambient.caller_span_id"] == caller_span
    await obs.aclose()
