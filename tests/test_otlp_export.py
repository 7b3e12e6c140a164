"""The package's own span export (records.py, otlp.py) against real receivers.

The traces must look as when the vendor SDKs made them: Langfuse (loopback receiver decoding the
OTLP protobuf) compared attribute by attribute with the real SDK's output; MLflow (a real ``mlflow
server``) compared with the SDK path of the same backend, read back with MLflow's client. A dead or
hanging collector costs the stream nothing, retries are bounded and memory stays bounded.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langfuse import Langfuse
from opentelemetry.sdk.trace import TracerProvider

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.base import RunStart, SpanKind, TokenUsage, TracingBackend
from ambient_tracing.backends.langfuse import LangfuseBackend
from ambient_tracing.backends.langfuse_otlp import LangfuseMapper
from ambient_tracing.backends.mlflow import MlflowBackend
from ambient_tracing.backends.mlflow_server import stores_json_text
from ambient_tracing.backends.otlp import OtlpExporter
from ambient_tracing.backends.records import RecordSpan, SpanRecord
from ambient_tracing.ids import new_trace_id
from ambient_tracing.privacy import JsonText
from ambient_tracing.spans.outgoing import OutgoingSpan
from tests.support.agui_app import agui_app, run_input, scripted_run
from tests.support.client import post_run
from tests.support.fixtures_langfuse import sdk_langfuse_backend
from tests.support.fixtures_mlflow import MlflowServer, wait_for_trace
from tests.support.hanging import HangingServer
from tests.support.langfuse_receiver import LangfuseReceiver, ReceivedSpan
from tests.support.server import free_port, serve


def _turn(trace_id: str, run_id: str = "run-1", **overrides: Any) -> RunStart:
    values: dict[str, Any] = {
        "thread_id": "thread-1",
        "run_id": run_id,
        "user_id": "alice",
        "user_name": "Alice",
        "runner_type": "pydantic-ai",
        "turn_number": 2,
        "input": "What?",
        "trace_id": trace_id,
        "attributes": {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.conversation.id": "thread-1",
            "ambient.namespace": "ns1",
            "gen_ai.request.model": "m-1",
        },
    }
    return RunStart(**{**values, **overrides})


FETCH_ARGS = {"url": "https://example.com/a", "headers": {"accept": "json"}, "retries": [1, 2.5]}
FETCH_RESULT = [{"id": 1, "tags": ["a", "b"], "next": None}, {"id": 2, "ok": True, "empty": {}}]


def _every_kind_of_span(backend: TracingBackend, trace_id: str, failed_id: str) -> None:
    """One run with a step, tools (one failing), reasoning, a subagent, a per-model generation, usage."""
    root = backend.start_run(_turn(trace_id))
    assert root is not None
    step = root.start_child("step_plan", SpanKind.STEP)
    tool = step.start_child(
        "tool_search",
        SpanKind.TOOL,
        attributes={"gen_ai.tool.name": "search", "gen_ai.tool.call.id": "c1"},
        start_time_ns=time.time_ns(),
    )
    tool.set_input({"query": "life", "n": 3, "nested": {"ok": [1, 2.5, None, True], "empty": [], "none": {}}})
    tool.end(output="42")
    # Payloads as the wire gave them: an SDK span gets them decoded (OutgoingSpan, on the span worker).
    fetch = step.start_child("tool_fetch", SpanKind.TOOL)
    fetch = fetch if getattr(backend, "span_sink", None) else OutgoingSpan(fetch, masked=False)
    fetch.set_input(JsonText(json.dumps(FETCH_ARGS)))
    fetch.end(output=JsonText(json.dumps(FETCH_RESULT)))
    step.start_child("tool_bad", SpanKind.TOOL).end(error="boom", attributes={"ambient.tool_result": "none"})
    step.end()
    root.start_child("reasoning", SpanKind.REASONING).end(output="thinking")
    subagent = root.start_child(
        "subagent_x", SpanKind.SUBAGENT, input="desc", attributes={"gen_ai.agent.name": "x"}
    )
    subagent.end(output={"r": 1}, attributes={"ambient.outcome": "success"})
    root.start_child("model_usage", SpanKind.GENERATION).end(
        model="a", usage=(TokenUsage(model="a", input_tokens=5, output_tokens=1),)
    )
    root.end(
        output="The answer",
        model="m-1",
        usage=(
            TokenUsage(
                model="m-1",
                provider="acme",
                input_tokens=12,
                output_tokens=7,
                total_tokens=19,
                cache_read_tokens=2,
            ),
        ),
        attributes={"ambient.outcome": "success", "ambient.spans_not_recorded": 3},
    )
    failed = backend.start_run(_turn(failed_id, "run-2", user_id=None, user_name=None, input={"a": [1, 2]}))
    assert failed is not None
    failed.end(
        error="run failed",
        usage=(TokenUsage(model="a", input_tokens=1), TokenUsage(model="b", output_tokens=2)),
    )
    backend.record_span(
        "Session Metrics",
        thread_id="thread-1",
        user_id="alice",
        runner_type="x",
        output={"turns": 2},
        metadata={"n": 5},
    )


def _by_name(spans: list[ReceivedSpan], trace_ids: set[str]) -> dict[tuple[str, bool], ReceivedSpan]:
    return {(span.name, span.trace_id in trace_ids): span for span in spans}


def test_langfuse_spans_carry_exactly_what_the_sdk_writes(langfuse_receiver: LangfuseReceiver) -> None:
    key = uuid.uuid4().hex[:8]
    sdk = LangfuseBackend(
        client=Langfuse(
            public_key=f"pk-{key}",
            secret_key=f"sk-{key}",
            base_url=langfuse_receiver.base_url,
            flush_at=1,
            flush_interval=0.05,
            environment="prod",
            tracer_provider=TracerProvider(),
        ),
        flush_timeout=5,
    )
    ours = LangfuseBackend(
        public_key=f"pk-{key}-2",
        secret_key=f"sk-{key}",
        host=langfuse_receiver.base_url,
        environment="prod",
        flush_at=1,
        flush_interval=0.05,
    )
    assert sdk.span_sink is None and ours.span_sink is not None
    try:
        ids = {"sdk": (new_trace_id(), new_trace_id()), "ours": (new_trace_id(), new_trace_id())}
        _every_kind_of_span(sdk, *ids["sdk"])
        sdk.flush(5)
        sdk_spans = langfuse_receiver.wait_for_spans(10, timeout=15)
        _every_kind_of_span(ours, *ids["ours"])
        ours.flush(5)
        all_spans = langfuse_receiver.wait_for_spans(20, timeout=15)
    finally:
        sdk.shutdown()
        ours.shutdown()
    our_spans = [span for span in all_spans if span not in sdk_spans]
    expected = _by_name(sdk_spans, {ids["sdk"][0]})
    received = _by_name(our_spans, {ids["ours"][0]})
    assert expected.keys() == received.keys() and len(expected) == 10
    for key_, span in received.items():
        reference = expected[key_]
        # The SDK gives a root with an adopted trace id a made-up remote parent and marks it as_root;
        # ours is a plain root. Everything else is identical.
        reference_attributes = {
            k: v for k, v in reference.attributes.items() if k != "langfuse.internal.as_root"
        }
        assert span.attributes == reference_attributes, key_
        assert (span.status_code, span.status_message) == (reference.status_code, reference.status_message)
        assert (span.parent_span_id is None) == (reference.name in ("llm_interaction", "Session Metrics"))
        assert span.end_ns >= span.start_ns > 0
    tool = received[("tool_search", True)]
    assert tool.parent_span_id == received[("step_plan", True)].span_id
    assert {span.trace_id for span in our_spans if span.name != "Session Metrics"} == set(ids["ours"])


def _stored(uri: str, trace_id: str, spans: int) -> dict[str, Any]:
    # A run's token usage is aggregated by the server a moment after its spans are stored: wait for it.
    trace = wait_for_trace(
        uri, trace_id, lambda t: len(t.data.spans) == spans and (spans == 1 or bool(t.info.token_usage))
    )
    info = trace.info
    return {
        "state": info.state.value,
        "tags": {k: v for k, v in info.tags.items() if k != "mlflow.artifactLocation"},
        "session": info.trace_metadata.get("mlflow.trace.session"),
        "user": info.trace_metadata.get("mlflow.trace.user"),
        "token_usage": info.token_usage,
        "request": info.request_preview,
        "response": info.response_preview,
        "spans": {
            span.name: (
                span.span_type,
                span.parent_id is None,
                span.status.status_code.value,
                span.status.description,
                span.inputs,
                span.outputs,
                {
                    k: v
                    for k, v in span.attributes.items()
                    if k not in ("mlflow.traceRequestId", "mlflow.spanStartTimeNs", "session.id", "user.id")
                    and not k.startswith("mlflow.traceTag.")
                },
            )
            for span in trace.data.spans
        },
    }


def test_mlflow_server_traces_over_otlp_look_as_the_sdk_made_them(mlflow_server: MlflowServer) -> None:
    experiment = f"otlp-{uuid.uuid4().hex[:8]}"
    ours = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name=experiment, interval=0.05)
    sdk = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name=experiment, otlp=False)
    ours.setup()
    sdk.setup()
    assert ours.span_sink is not None and sdk.span_sink is None
    ids = {"ours": (new_trace_id(), new_trace_id()), "sdk": (new_trace_id(), new_trace_id())}
    _every_kind_of_span(ours, *ids["ours"])
    _every_kind_of_span(sdk, *ids["sdk"])
    ours.flush(10)
    sdk.flush(10)
    for index, spans in ((0, 8), (1, 1)):
        assert _stored(mlflow_server.url, ids["ours"][index], spans) == _stored(
            mlflow_server.url, ids["sdk"][index], spans
        )
    stored = _stored(mlflow_server.url, ids["ours"][0], 8)
    assert (
        stored["tags"]["ambient.run_id"] == "run-1"
        and stored["tags"]["mlflow.traceName"] == "llm_interaction"
    )
    assert (stored["session"], stored["user"], stored["state"]) == ("thread-1", "alice", "OK")
    assert stored["token_usage"]["total_tokens"] == 19
    assert stored["spans"]["tool_fetch"][4:6] == (FETCH_ARGS, FETCH_RESULT)
    assert ours.span_sink.mapper.json_as_text  # the payloads went as the JSON text they came as
    found = ours.client.search_traces(
        locations=[ours.experiment_id or ""],
        filter_string="tags.`ambient.thread_id` = 'thread-1' AND trace.name = 'Session Metrics'",
        max_results=5,
    )
    assert len(found) == 2  # one recorded over OTLP, one by the SDK
    ours.shutdown()


# Tool payloads as producers write them: compact, non-ASCII, escaped, nested, a JSON string or
# number, text that only looks like JSON, plain text; and the SDK path's value for each.
WIRE_PAYLOADS = [
    '{"q":"météo à Paris","n":3,"deep":{"a":[{"b":[1,{"c":null}]}]}}',
    '[{"path":"a\\tb.txt","ok":true},{"escaped":"\\u00e9\\n\\"quote\\""}]',
    ' {"leading": "space"}',
    '"a JSON string"',
    "42",
    '{"truncated": ',
    "plain text result",
    "{}",
    "[]",
]


def test_json_text_payloads_are_stored_by_an_mlflow_server_as_the_sdk_stores_them(
    mlflow_server: MlflowServer,
) -> None:
    """Over OTLP a tool payload that came as JSON text goes as that text (the server stores an
    object's or array's text as the value); each is stored as the SDK path stores it decoded."""
    experiment = f"wire-{uuid.uuid4().hex[:8]}"
    ours = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name=experiment, interval=0.05)
    sdk = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name=experiment, otlp=False)
    ours.setup()
    sdk.setup()
    assert ours.span_sink is not None and ours.span_sink.mapper.json_as_text
    ids = {"ours": new_trace_id(), "sdk": new_trace_id()}
    for label, backend in (("ours", ours), ("sdk", sdk)):
        root = backend.start_run(_turn(ids[label]))
        assert root is not None
        for index, payload in enumerate(WIRE_PAYLOADS):
            tool = root.start_child(f"tool_{index}", SpanKind.TOOL)
            tool = tool if label == "ours" else OutgoingSpan(tool, masked=False)
            tool.set_input(JsonText(payload))
            tool.end(output=JsonText(payload))
        root.end(output="done", usage=(TokenUsage(model="m", input_tokens=1),))  # _stored waits for it
    ours.flush(10)
    sdk.flush(10)
    spans = len(WIRE_PAYLOADS) + 1
    stored = _stored(mlflow_server.url, ids["ours"], spans)
    assert stored == _stored(mlflow_server.url, ids["sdk"], spans)
    assert stored["spans"]["tool_0"][4]["deep"] == {"a": [{"b": [1, {"c": None}]}]}
    assert stored["spans"]["tool_1"][5][1]["escaped"] == 'é\n"quote"'
    ours.shutdown()


@contextlib.contextmanager
def _answering(status: int, body: bytes) -> Iterator[str]:
    """A loopback HTTP server that answers every GET with ``status`` and ``body``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_json_text_goes_as_text_only_to_a_server_known_to_store_it_as_the_value(
    mlflow_server: MlflowServer,
) -> None:
    """MLflow 3.6 stored a JSON text attribute as a string (mlflow#18767): the version is asked once
    at setup, and anything but a 3.7 or later answer (old, unreadable, refused, hung) keeps
    structured values, which every version stores alike."""
    assert stores_json_text(mlflow_server.url, 5)
    for status, body in ((200, b"3.6.0"), (200, b"2.22.1"), (200, b"not a version"), (404, b"3.17.2")):
        with _answering(status, body) as url:
            assert not stores_json_text(url, 5), (status, body)
    with HangingServer() as hanging:
        started = time.monotonic()
        assert not stores_json_text(hanging.url, 0.5)
        assert time.monotonic() - started < 5
    assert not stores_json_text(f"http://127.0.0.1:{free_port()}", 5)  # nothing listening


class _Unencodable:
    def __str__(self) -> str:
        return "unencodable"


def test_hostile_values_are_encoded_not_raised(langfuse_receiver: LangfuseReceiver) -> None:
    from ambient_tracing.backends.mlflow_otlp import MlflowMapper
    from ambient_tracing.backends.otlp import encode

    root = RecordSpan.open_run(_turn(new_trace_id()), ())
    weird = {
        1: "int key",
        "big": 1 << 80,
        "nan": math.nan,
        "object": _Unencodable(),
        "bytes": b"\xff\x00",
        "deep": [[[[{"x": "y" * 10_000}]]]],
        "set": {1, 2},
        "tuple keys": {(1, 2): "json cannot"},
        "\ud800 lone surrogate": "\udfff",
    }
    child = root.start_child("tool_\u2603\ud800", SpanKind.TOOL, input=weird, attributes={"k": weird})
    child.end(output=weird, error="e" * 100_000, attributes={"ambient.x": None})
    record: SpanRecord = child.record
    for mapper in (LangfuseMapper(public_key="pk"), MlflowMapper("1")):
        assert len(encode([record], mapper)) > 100_000


async def test_a_dead_or_hanging_collector_costs_the_stream_nothing(
    langfuse_receiver: LangfuseReceiver,
) -> None:
    langfuse_receiver.mode = "hang"
    hanging = LangfuseBackend(
        public_key="pk-h",
        secret_key="sk-h",
        host=langfuse_receiver.base_url,
        timeout=1,
        flush_at=1,
        max_queue=50,
    )
    dead = LangfuseBackend(
        public_key="pk-d", secret_key="sk-d", host=f"http://127.0.0.1:{free_port()}", timeout=1
    )
    obs = Observability([hanging, dead], flush_timeout=3)
    try:
        with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
                started = time.monotonic()
                streams = [
                    await post_run(url, run_input("t-dead", f"r-{index}"), client=client)
                    for index in range(30)
                ]
                elapsed = time.monotonic() - started
        assert elapsed < 15  # 30 runs; the collectors' 1 s timeouts and retries are not in it
        expected = [event.type.value for event in scripted_run("t-dead", "r-0")]
        for streamed in streams:
            assert [t for t in streamed.types if t != "CUSTOM"] == expected
            assert len(streamed.trace_ids) == 1
        assert hanging.span_sink is not None
        assert hanging.span_sink.pending <= 50  # bounded while the collector hangs
        assert hanging.span_sink.dropped > 0
        started = time.monotonic()
        hanging.flush(0.5)
        assert time.monotonic() - started < 1.5
    finally:
        started = time.monotonic()
        await obs.aclose()
        assert time.monotonic() - started < 12  # each flush bounded by flush_timeout, shutdown not again
        langfuse_receiver.mode = "ok"


def test_memory_stays_bounded_and_retries_are_bounded(
    langfuse_receiver: LangfuseReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    import tracemalloc

    langfuse_receiver.mode = "503"
    mapper = LangfuseMapper(public_key="pk")
    exporter = OtlpExporter(
        "test",
        langfuse_receiver.base_url + "/api/public/otel/v1/traces",
        mapper,
        max_queue=1_000,
        retries=2,
        retry_delay=0.01,
    )
    root = RecordSpan.open_run(_turn(new_trace_id()), (exporter,))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for index in range(100_000):
            root.start_child(f"tool_{index % 7}", SpanKind.TOOL, input={"i": index}).end(output="x" * 100)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 5_000_000  # 1,000 records kept at most (plus a batch in flight), not 100,000
    assert exporter.pending <= 1_000 and exporter.dropped > 50_000  # the destination fails every batch
    assert exporter.flush(30)
    posts = [request for request in langfuse_receiver.requests if request[0] == "POST"]
    assert exporter.failed + exporter.dropped == 100_000 and exporter.exported == 0
    assert posts and len(posts) % 3 == 0  # one try and two retries per batch, no more
    drops = [r for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(drops) == 1  # logged once, however many were dropped
    exporter.shutdown(1)
    langfuse_receiver.mode = "ok"


def test_a_rejecting_collector_is_not_retried(langfuse_receiver: LangfuseReceiver) -> None:
    exporter = OtlpExporter(
        "test", langfuse_receiver.base_url + "/no/such/path", LangfuseMapper(public_key="pk")
    )
    RecordSpan.open_run(_turn(new_trace_id()), (exporter,)).end()
    assert exporter.flush(10)
    assert exporter.failed == 1 and langfuse_receiver.requests == [("POST", "/no/such/path")]
    exporter.shutdown(1)


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "http://"])
def test_a_bad_endpoint_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError):
        OtlpExporter("test", url, LangfuseMapper(public_key="pk"))


# -- one origin-style run, SDK path and OTLP path side by side -------------------------------------

# Times, the experiment (each path has its own), and the root's session.id/user.id attributes (only
# over OTLP: MLflow's ingest takes the trace's session and user from them).
_VOLATILE = frozenset(
    {
        "collected_at",
        "period_start",
        "period_end",
        "mlflow.spanStartTimeNs",
        "mlflow.experimentId",
        "session.id",
        "user.id",
    }
)


def _origin_run(obs: Observability) -> str:
    """One run with what the origin runner's dashboards rely on: a failed and a good tool, a step,
    usage in RUN_FINISHED.result, namespace and workflow; then the thread's Session Metrics."""
    from ambient_tracing.tracer.handlers import StreamTracer
    from ambient_tracing.tracer.request import RunRequest

    tracer = StreamTracer(
        obs.runs,
        RunRequest(thread_id="th", run_id="r", user_message="hi", user_id="alice", user_name="Alice"),
    )
    events: list[dict[str, Any]] = [
        {"type": "RUN_STARTED", "threadId": "th", "runId": "r"},
        {"type": "STEP_STARTED", "stepName": "plan"},
        {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "Bash"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": '{"cmd": "ls"}'},
        {"type": "TOOL_CALL_END", "toolCallId": "c1", "error": "exit status 2"},
        {"type": "TOOL_CALL_RESULT", "toolCallId": "c1", "messageId": "m1", "content": "ls: no"},
        {"type": "STEP_FINISHED", "stepName": "plan"},
        {"type": "TOOL_CALL_START", "toolCallId": "c2", "toolCallName": "Read"},
        {"type": "TOOL_CALL_END", "toolCallId": "c2"},
        {"type": "TOOL_CALL_RESULT", "toolCallId": "c2", "messageId": "m2", "content": "text"},
        {"type": "TEXT_MESSAGE_START", "messageId": "a1", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "a1", "delta": "Done."},
        {"type": "TEXT_MESSAGE_END", "messageId": "a1"},
        {
            "type": "RUN_FINISHED",
            "threadId": "th",
            "runId": "r",
            "result": {"usage": {"input_tokens": 100, "output_tokens": 20}, "model": "claude-sonnet-4"},
        },
    ]
    trace_id = tracer.on_event(events[0])
    assert trace_id is not None
    for event in events[1:]:
        tracer.on_event(event)
    tracer.close()
    return trace_id


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in _VOLATILE}
    return value


def _preview(text: str | None) -> str:
    """A stored preview without the Session Metrics' times (it may be cut short: not JSON)."""
    return re.sub(r'"(collected_at|period_start|period_end)": ?"[^"]*"', "", text or "")


def _mlflow_view(backend: MlflowBackend, trace_id: str) -> dict[str, Any]:
    """Everything MLflow stored for the run and the thread's Session Metrics, minus ids and times."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=backend.tracking_uri)
    complete = "mlflow.traceInputs"  # over OTLP, the trace metadata follows the spans
    run = wait_for_trace(
        backend.tracking_uri,
        trace_id,
        lambda t: len(t.data.spans) == 4 and complete in t.info.trace_metadata,
    )
    found: list[Any] = []
    for _ in range(100):
        found = client.search_traces(
            locations=[backend.experiment_id or ""], filter_string="trace.name = 'Session Metrics'"
        )
        if found and complete in found[0].info.trace_metadata:
            break
        time.sleep(0.1)
    [metrics] = found
    view: dict[str, Any] = {}
    for label, trace in (("run", run), ("metrics", metrics)):
        info = trace.info
        names = {span.span_id: span.name for span in trace.data.spans}
        view[label] = {
            "state": info.state.value,
            "tags": {k: v for k, v in info.tags.items() if k != "mlflow.artifactLocation"},
            "metadata": {
                k: v for k, v in info.trace_metadata.items() if not k.startswith("mlflow.trace.size")
            },
            "token_usage": info.token_usage,
            "request": _preview(info.request_preview),
            "response": _preview(info.response_preview),
            "spans": {
                span.name: {
                    "type": span.span_type,
                    "parent": names.get(span.parent_id or ""),
                    "status": (span.status.status_code.value, span.status.description),
                    "inputs": span.inputs,
                    "outputs": _without_volatile(span.outputs),
                    "attributes": _without_volatile(
                        {
                            k: v
                            for k, v in span.attributes.items()
                            if k != "mlflow.traceRequestId" and not k.startswith("mlflow.traceTag.")
                        }
                    ),
                }
                for span in trace.data.spans
            },
        }
    return view


def _differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two nested values differ, as readable paths (empty: identical)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [
            difference
            for key in sorted(ours.keys() | theirs.keys(), key=str)
            for difference in _differences(
                ours.get(key, "<missing>"), theirs.get(key, "<missing>"), f"{path}/{key}"
            )
        ]
    if isinstance(ours, list | tuple) and isinstance(theirs, list | tuple) and len(ours) == len(theirs):
        return [
            d
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for d in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [f"{path}: otlp {ours!r} != sdk {theirs!r}"]


def _langfuse_view(spans: list[ReceivedSpan]) -> dict[str, Any]:
    by_id = {span.span_id: span.name for span in spans}
    view: dict[str, Any] = {}
    for span in spans:
        attributes = {
            k: v
            for k, v in span.attributes.items()
            if k != "langfuse.internal.as_root" and k.rsplit(".", 1)[-1] not in _VOLATILE
        }
        for key in ("langfuse.observation.output",):
            if span.name == "Session Metrics" and key in attributes:
                attributes[key] = _without_volatile(json.loads(attributes[key]))
        view[span.name] = (
            by_id.get(span.parent_span_id or ""),
            span.status_code,
            span.status_message,
            attributes,
        )
    return view


async def test_one_origin_run_is_stored_alike_over_otlp_and_through_the_sdks(
    mlflow_server: MlflowServer, langfuse_receiver: LangfuseReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same run (failed tool, tool metadata, outcome, parenting, result usage, namespace, workflow,
    user name, Session Metrics) through the SDKs and over OTLP: MLflow's stored traces and the decoded
    spans at the Langfuse receiver are the same but for ids and times."""
    monkeypatch.setenv("ACTIVE_WORKFLOW_GIT_URL", "https://github.com/acme/bug-triage.git")
    monkeypatch.setenv("ACTIVE_WORKFLOW_BRANCH", "main")
    key = uuid.uuid4().hex[:8]
    sdk_mlflow = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name=f"sdk-{key}", otlp=False)
    sdk_langfuse = sdk_langfuse_backend(langfuse_receiver)
    otlp_mlflow = MlflowBackend(tracking_uri=mlflow_server.url, experiment_name=f"otlp-{key}", interval=0.05)
    otlp_langfuse = LangfuseBackend(
        public_key=f"pk-{key}-2", secret_key=f"sk-{key}", host=langfuse_receiver.base_url, flush_interval=0.05
    )
    views: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    seen = 0
    for label, backends in (("sdk", [sdk_mlflow, sdk_langfuse]), ("otlp", [otlp_mlflow, otlp_langfuse])):
        obs = Observability(backends, mask_messages=False, namespace="team-a")
        await obs.start()
        trace_id = _origin_run(obs)
        assert await obs.end_session("th")
        await obs.aclose()
        received = langfuse_receiver.wait_for_spans(seen + 5, timeout=20)
        mine = received[seen:]
        seen = len(received)
        assert {span.trace_id for span in mine if span.name != "Session Metrics"} == {trace_id}
        views[label] = (_mlflow_view(backends[0], trace_id), _langfuse_view(mine))  # type: ignore[arg-type]
    (sdk_mlflow_view, sdk_langfuse_view), (otlp_mlflow_view, otlp_langfuse_view) = views["sdk"], views["otlp"]
    differences = _differences(otlp_mlflow_view, sdk_mlflow_view)
    differences += _differences(otlp_langfuse_view, sdk_langfuse_view)
    assert not differences, "\n".join(differences)
    run = otlp_mlflow_view["run"]
    assert run["tags"]["ambient.workflow"] == "bug-triage" and run["tags"]["ambient.session_id"] == "th"
    assert run["metadata"]["user_name"] == "Alice" and run["metadata"]["workflow_branch"] == "main"
    assert run["token_usage"]["input_tokens"] == 100
    bash = otlp_langfuse_view["tool_Bash"]
    assert bash[0] == "llm_interaction" and bash[3]["langfuse.observation.level"] == "ERROR"
    assert set(otlp_langfuse_view) == {
        "llm_interaction",
        "step_plan",
        "tool_Bash",
        "tool_Read",
        "Session Metrics",
    }


async def test_aclose_sends_what_is_queued_within_flush_timeout(langfuse_receiver: LangfuseReceiver) -> None:
    """With a batch interval far longer than the test, only aclose's flush can have sent the spans:
    they are at the receiver when it returns, in well under ``flush_timeout``."""
    backend = LangfuseBackend(
        public_key="pk-c", secret_key="sk-c", host=langfuse_receiver.base_url, flush_interval=600
    )
    obs = Observability([backend], flush_timeout=10)
    trace_id = _origin_run(obs)
    assert backend.span_sink is not None and backend.span_sink.pending == 4  # nothing sent yet
    started = time.monotonic()
    await obs.aclose()
    assert time.monotonic() - started < 10
    spans = langfuse_receiver.spans  # no waiting: they arrived before aclose returned
    assert sorted(span.name for span in spans if span.trace_id == trace_id) == [
        "llm_interaction",
        "step_plan",
        "tool_Bash",
        "tool_Read",
    ]
    assert backend.span_sink.exported >= 4 and backend.span_sink.pending == 0


def test_a_span_that_cannot_be_prepared_never_stops_the_exporter(
    langfuse_receiver: LangfuseReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool result whose JSON holds a lone surrogate (escaped on the wire) is decoded; a record
    that still cannot be prepared is counted as failed, and the spans after it are sent."""
    from ambient_tracing.backends import record_queue
    from ambient_tracing.privacy import JsonText

    backend = LangfuseBackend(public_key="pk-s", secret_key="sk-s", host=langfuse_receiver.base_url)
    sink = backend.span_sink
    assert sink is not None
    trace_id = new_trace_id()
    root = RecordSpan.open_run(_turn(trace_id), [sink])
    root.start_child("tool_surrogate", SpanKind.TOOL).end(output=JsonText('{"k": "\ud83d"}'))
    backend.flush(10)
    prepare = record_queue.outgoing_record

    def refuse_one(record: SpanRecord, **options: bool) -> SpanRecord:
        if record.name == "tool_unpreparable":
            raise RuntimeError("cannot be prepared")
        return prepare(record, **options)

    monkeypatch.setattr(record_queue, "outgoing_record", refuse_one)
    root.start_child("tool_unpreparable", SpanKind.TOOL).end(output="x")
    root.start_child("tool_after", SpanKind.TOOL).end(output="y")
    root.end(output="done")
    backend.flush(10)
    spans = {span.name: span for span in langfuse_receiver.wait_for_spans(3)}
    assert spans["tool_surrogate"].attributes["langfuse.observation.output"] == '{"k": "\\ud83d"}'
    assert {"tool_after", "llm_interaction"} <= spans.keys() and "tool_unpreparable" not in spans
    assert sink.failed == 1
    backend.shutdown()


def test_run_attributes_are_encoded_once_and_written_first_on_every_span() -> None:
    """Each span carries its run's attributes, then its own, exactly as the mapper gives them,
    with the spans of two runs interleaved in one batch."""
    from ambient_tracing.backends.otlp import encode
    from tests.support.langfuse_receiver import decode_spans

    mapper = LangfuseMapper(public_key="pk")
    roots = [RecordSpan.open_run(_turn(new_trace_id(), run_id=run_id), ()) for run_id in ("run-a", "run-b")]
    records = []
    for index in range(3):
        for root in roots:
            child = root.start_child(f"tool_{index}", SpanKind.TOOL, input={"n": index})
            child.end(output="done", attributes={"is_error": False})
            records.append(child.record)
    records += [root.record for root in roots]
    for root in roots:
        root.end(output="bye")
    received = decode_spans(encode(records, mapper))
    assert [span.name for span in received] == [record.name for record in records]
    for span, record in zip(received, records, strict=True):
        expected = {**mapper.run_attributes(record), **mapper.attributes(record)}
        assert list(span.attributes) == list(expected)
        assert span.attributes["session.id"] == record.run.thread_id
        assert span.attributes["langfuse.trace.metadata.run_id"] == f'"{record.run.run_id}"'


def test_a_record_copy_has_every_slot_of_the_original() -> None:
    record = SpanRecord(new_trace_id(), 7, "tool_x", SpanKind.TOOL, _turn(new_trace_id()), input={"a": 1})
    record.end_ns, record.output, record.error, record.model = 9, "out", "boom", "m"
    record.usage, record.end_attributes, record.input_set = (TokenUsage(input_tokens=1),), {"k": 1}, True
    twin = record.copy()
    assert twin is not record
    for name in SpanRecord.__slots__:
        assert getattr(twin, name) is getattr(record, name), name
