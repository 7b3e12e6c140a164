"""The OpenTelemetry backend (backends/otel.py) with real parts: the middleware under uvicorn, the
loopback OTLP decoder, a real ``mlflow server``, an OpenTelemetry SDK ``TracerProvider`` and a real
Arize Phoenix server read back through its REST API. Every wait is bounded."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import StatusCode

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends import from_config
from ambient_tracing.backends.base import RunStart, SpanKind, TokenUsage
from ambient_tracing.backends.otel import DEFAULT_ENDPOINT, OtelBackend
from ambient_tracing.config import TracingConfig
from ambient_tracing.ids import new_trace_id
from ambient_tracing.privacy import REDACTED
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.fixtures_mlflow import MlflowServer, wait_for_trace
from tests.support.fixtures_phoenix import PhoenixServer
from tests.support.hanging import HangingServer
from tests.support.langfuse_receiver import LangfuseReceiver, ReceivedSpan
from tests.support.server import free_port, serve
from tests.test_masking_canary import MARK, canary_app, post

pytestmark = pytest.mark.timeout(180)


def otel_to(receiver: LangfuseReceiver, **options: Any) -> OtelBackend:
    options.setdefault("service_name", "otel-test")
    return OtelBackend(endpoint=receiver.base_url + "/v1/traces", flush_timeout=5, **options)


def otel_spans(receiver: LangfuseReceiver, trace_id: str, count: int) -> dict[str, ReceivedSpan]:
    """The otel backend's spans of the trace at the receiver, by name (not Langfuse's: other resource)."""

    def mine(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == trace_id and s.resource.get("service.name") == "otel-test"]

    spans = mine(receiver.wait_for_spans(lambda spans: len(mine(spans)) >= count, timeout=15))
    return {span.name: span for span in spans}


def _run(trace_id: str) -> RunStart:
    return RunStart(
        "th-1",
        "run-1",
        "alice",
        "Alice",
        "pydantic-ai",
        1,
        "hello",
        trace_id,
        attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": "th-1"},
    )


def _one_run(backend: OtelBackend, trace_id: str) -> None:
    """A root with a failing tool, a step with a tool, usage of one model (cache counts too)."""
    root = backend.start_run(_run(trace_id))
    assert root is not None
    step = root.start_child("step_plan", SpanKind.STEP)
    tool = step.start_child(
        "tool_search",
        SpanKind.TOOL,
        attributes={
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": "search",
            "gen_ai.tool.call.id": "c1",
        },
    )
    tool.set_input({"query": "life"})
    tool.end(output={"answer": 42})
    step.end()
    bad = root.start_child("tool_bad", SpanKind.TOOL, attributes={"gen_ai.tool.name": "bad"})
    bad.end(error="boom", attributes={"ambient.tool_result": "none"})
    usage = TokenUsage(model="m-1", provider="acme", input_tokens=10, output_tokens=3, cache_read_tokens=4)
    root.end(output="done", model="m-1", usage=(usage,), attributes={"ambient.outcome": "success"})


def test_otel_settings_follow_the_standard_variables() -> None:
    config = TracingConfig.from_env(
        {
            "OBSERVABILITY_BACKENDS": "otel",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=a%20b,x=1",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x=2",
            "OTEL_SERVICE_NAME": "svc",
            "OTEL_RESOURCE_ATTRIBUTES": "openinference.project.name=p1,deployment.environment=dev",
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
        }
    )
    otel = config.otel
    assert otel is not None and config.langfuse is None and config.mlflow is None
    assert otel.endpoint == "http://collector:4318/v1/traces"
    assert otel.headers == {"api-key": "a b", "x": "2"}
    assert otel.service_name == "svc" and otel.resource_attributes["openinference.project.name"] == "p1"
    assert otel.sample_rate == 0.25 and otel.timeout == 2.5 and otel.compress
    traces = TracingConfig.from_env(
        {
            "OBSERVABILITY_BACKENDS": "mlflow,otel",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://ignored:4318",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://phoenix:6006/v1/traces",
        }
    ).otel
    assert traces is not None and traces.endpoint == "http://phoenix:6006/v1/traces"
    assert (
        TracingConfig.from_env({"OBSERVABILITY_BACKENDS": "otel"}).otel
        == TracingConfig.from_env({"OBSERVABILITY_BACKENDS": "otel"}).otel
    )
    assert (
        TracingConfig.from_env({"OBSERVABILITY_BACKENDS": "otel", "OTEL_SDK_DISABLED": "true"}).otel is None
    )
    assert TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}).otel is None  # not listed
    for bad in ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}):
        assert TracingConfig.from_env({"OBSERVABILITY_BACKENDS": "otel", **bad}).otel is None


def test_from_config_builds_the_backend_and_the_default_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import opentelemetry.trace

    # No SDK TracerProvider installed (whatever other tests of this process did): the OTel default endpoint.
    monkeypatch.setattr(opentelemetry.trace, "get_tracer_provider", opentelemetry.trace.NoOpTracerProvider)
    backends = from_config(TracingConfig.from_env({"OBSERVABILITY_BACKENDS": "otel"}))
    assert [backend.name for backend in backends] == ["otel"]
    backend = backends[0]
    assert (
        isinstance(backend, OtelBackend) and backend.span_sink is None and not backend.accepts(new_trace_id())
    )
    backend.setup()
    assert backend.endpoint == DEFAULT_ENDPOINT and backend.accepts(new_trace_id())
    backend.shutdown()


def test_spans_carry_genai_and_openinference_attributes(langfuse_receiver: LangfuseReceiver) -> None:
    backend = otel_to(langfuse_receiver, headers={"x-api-key": "k1"}, interval=0.05)
    trace_id = new_trace_id()
    _one_run(backend, trace_id)
    backend.flush(5)
    spans = otel_spans(langfuse_receiver, trace_id, 4)
    root, step, tool, bad = (
        spans["llm_interaction"],
        spans["step_plan"],
        spans["tool_search"],
        spans["tool_bad"],
    )
    assert root.parent_span_id is None and step.parent_span_id == root.span_id == bad.parent_span_id
    assert tool.parent_span_id == step.span_id
    assert root.resource["service.name"] == "otel-test"
    a = root.attributes
    assert a["gen_ai.operation.name"] == "invoke_agent" and a["gen_ai.conversation.id"] == "th-1"
    assert a["openinference.span.kind"] == "AGENT" and a["session.id"] == "th-1" and a["user.id"] == "alice"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == a["llm.model_name"] == "m-1"
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (10, 3)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 4 and a["gen_ai.provider.name"] == "acme"
    assert (a["llm.token_count.prompt"], a["llm.token_count.completion"], a["llm.token_count.total"]) == (
        10,
        3,
        13,
    )
    assert (
        a["input.value"] == "hello" and a["output.value"] == "done" and a["input.mime_type"] == "text/plain"
    )
    assert a["ambient.run_id"] == "run-1" and a["ambient.turn"] == 1 and a["ambient.outcome"] == "success"
    t = tool.attributes
    assert t["gen_ai.operation.name"] == "execute_tool" and t["openinference.span.kind"] == "TOOL"
    assert t["gen_ai.tool.name"] == t["tool.name"] == "search" and t["gen_ai.tool.call.id"] == "c1"
    assert json.loads(t["gen_ai.tool.call.arguments"]) == {"query": "life"}
    assert json.loads(t["gen_ai.tool.call.result"]) == {"answer": 42}
    assert t["input.mime_type"] == "application/json"
    assert step.attributes["openinference.span.kind"] == "CHAIN" and "ambient.run_id" not in step.attributes
    assert bad.status_code == 2 and bad.status_message == "boom" and bad.attributes["error.type"] == "_OTHER"
    assert root.status_code == 0  # unset: OpenTelemetry leaves OK to the app
    assert all(headers.get("x-api-key") == "k1" for headers in langfuse_receiver.headers)
    backend.shutdown()


async def test_one_trace_id_in_otel_langfuse_and_mlflow(
    langfuse_receiver: LangfuseReceiver,
    langfuse_backend: Any,
    mlflow_server: MlflowServer,
    mlflow_backend: Any,
) -> None:
    """One run through the middleware to all three backends: the id the client got is the trace id
    of the OTel spans, of the Langfuse spans and of the MLflow trace; Session Metrics as its own trace."""
    otel = otel_to(langfuse_receiver, interval=0.05)
    obs = Observability([langfuse_backend(), mlflow_backend(), otel], flush_timeout=10)
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        streamed = await post_run(url, run_input("th-otel", "r-1"))
    assert await obs.end_session("th-otel")
    await obs.aclose()
    (trace_id,) = streamed.trace_ids
    spans = otel_spans(langfuse_receiver, trace_id, 2)
    assert set(spans) == {"llm_interaction", "tool_search"}
    assert spans["tool_search"].parent_span_id == spans["llm_interaction"].span_id
    assert spans["tool_search"].attributes["gen_ai.tool.call.arguments"] == '{"query": "life"}'
    assert spans["tool_search"].attributes["gen_ai.tool.call.result"] == "42"
    assert spans["llm_interaction"].attributes["gen_ai.usage.input_tokens"] == 12
    langfuse = [
        s for s in langfuse_receiver.spans_by_trace(trace_id) if "langfuse.observation.type" in s.attributes
    ]
    assert {s.name for s in langfuse} == {"llm_interaction", "tool_search"}
    trace = wait_for_trace(mlflow_server.url, trace_id)
    assert trace.info.trace_id == "tr-" + trace_id
    metrics = [
        s
        for s in langfuse_receiver.spans
        if s.name == "Session Metrics" and s.resource.get("service.name") == "otel-test"
    ]
    assert len(metrics) == 1 and metrics[0].trace_id != trace_id and metrics[0].parent_span_id is None
    assert metrics[0].attributes["session.id"] == "th-otel"
    assert metrics[0].attributes["openinference.span.kind"] == "CHAIN"


async def test_no_canary_reaches_the_collector(langfuse_receiver: LangfuseReceiver) -> None:
    otel = otel_to(langfuse_receiver, interval=0.05)
    obs = Observability([otel])  # mask_messages defaults to on
    with serve(TracingMiddleware(canary_app(), observability=obs)) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            for scenario in ("full", "single", "crash"):
                await post(client, url, scenario)
    await obs.aclose()
    spans = langfuse_receiver.wait_for_spans(
        lambda found: (
            sum(s.name == "llm_interaction" for s in found) >= 4
            and any(s.name == "Session Metrics" for s in found)
        )
    )
    text = "\n".join(json.dumps(asdict(span), default=str) for span in spans)
    assert REDACTED in text and "tool_" + REDACTED in text and "gen_ai.tool.call.arguments" in text
    assert MARK not in text


async def test_a_dead_or_hanging_collector_costs_the_stream_nothing() -> None:
    hanging_server = HangingServer()
    hanging = OtelBackend(
        endpoint=hanging_server.url + "/v1/traces", timeout=1, max_queue=50, flush_timeout=3
    )
    dead = OtelBackend(endpoint=f"http://127.0.0.1:{free_port()}/v1/traces", timeout=1, flush_timeout=3)
    obs = Observability([hanging, dead], flush_timeout=3)
    try:
        with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
                started = time.monotonic()
                streams = [
                    await post_run(url, run_input("t-dead", f"r-{i}"), client=client) for i in range(30)
                ]
                elapsed = time.monotonic() - started
        assert elapsed < 15
        assert all(len(streamed.trace_ids) == 1 for streamed in streams)
        sink = hanging.span_sink
        assert sink is not None and sink.pending <= 50 and sink.dropped > 0  # type: ignore[attr-defined]
    finally:
        started = time.monotonic()
        await obs.aclose()
        assert time.monotonic() - started < 12
        hanging_server.close()


def _provider(rate: float = 1.0) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=TraceIdRatioBased(rate), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def test_spans_go_through_an_apps_tracer_provider_with_the_packages_ids() -> None:
    provider, exporter = _provider()
    backend = OtelBackend(tracer_provider=provider, flush_timeout=5)
    trace_id = new_trace_id()
    _one_run(backend, trace_id)
    backend.flush(5)
    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"llm_interaction", "step_plan", "tool_search", "tool_bad"}
    root, step, tool, bad = (
        spans["llm_interaction"],
        spans["step_plan"],
        spans["tool_search"],
        spans["tool_bad"],
    )
    assert {format(span.context.trace_id, "032x") for span in spans.values()} == {trace_id}
    assert root.parent is None and step.parent is not None and step.parent.span_id == root.context.span_id
    assert tool.parent is not None and tool.parent.span_id == step.context.span_id
    assert root.attributes is not None and root.attributes["gen_ai.usage.input_tokens"] == 10
    assert tool.attributes is not None and json.loads(str(tool.attributes["gen_ai.tool.call.arguments"])) == {
        "query": "life"
    }
    assert bad.status.status_code is StatusCode.ERROR and bad.status.description == "boom"
    assert root.start_time is not None and root.end_time is not None and root.start_time <= tool.start_time  # type: ignore[operator]
    # The app's own spans still get the provider's ids.
    with provider.get_tracer("app").start_as_current_span("app-span") as own:
        assert format(own.get_span_context().trace_id, "032x") != trace_id
    backend.shutdown()


def test_the_providers_sampler_and_the_global_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    provider, exporter = _provider(rate=0.0)
    backend = OtelBackend(tracer_provider=provider)
    assert not backend.accepts(new_trace_id())  # its sampler drops every trace: no id announced for it
    backend.shutdown()
    provider, exporter = _provider()
    import opentelemetry.trace

    monkeypatch.setattr(opentelemetry.trace, "get_tracer_provider", lambda: provider)
    for backend in (OtelBackend.from_global(), OtelBackend()):  # no endpoint: the app's SDK provider
        backend.setup()
        assert backend.endpoint is None
        trace_id = new_trace_id()
        _one_run(backend, trace_id)
        backend.flush(5)
        assert {
            s.name for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id
        } == {
            "llm_interaction",
            "step_plan",
            "tool_search",
            "tool_bad",
        }
        backend.shutdown()


async def test_phoenix_shows_the_run_under_the_clients_trace_id(phoenix_server: PhoenixServer) -> None:
    """A real Arize Phoenix server: the run's spans, read back through its REST API under the id the
    client received, with names, parenting, span kinds and the GenAI attributes."""
    assert all(address.endswith("127.0.0.1") or address == "::1" for address in phoenix_server.listeners())
    project = f"ambient-{uuid.uuid4().hex[:8]}"
    otel = OtelBackend(
        endpoint=phoenix_server.url + "/v1/traces",
        resource_attributes={"openinference.project.name": project},
        flush_timeout=10,
    )
    obs = Observability([otel], mask_messages=False, flush_timeout=10)
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        streamed = await post_run(url, run_input("th-phoenix", "r-1"))
    await obs.aclose()
    (trace_id,) = streamed.trace_ids
    spans = {span["name"]: span for span in phoenix_server.wait_for_spans(project, trace_id, 2)}
    assert set(spans) == {"llm_interaction", "tool_search"}
    root, tool = spans["llm_interaction"], spans["tool_search"]
    assert root["context"]["trace_id"] == tool["context"]["trace_id"] == trace_id
    assert tool["parent_id"] == root["context"]["span_id"] and not root.get("parent_id")
    assert (root["span_kind"], tool["span_kind"]) == ("AGENT", "TOOL")
    attributes = root["attributes"]
    assert attributes["gen_ai.operation.name"] == "invoke_agent"
    assert attributes["gen_ai.conversation.id"] == "th-phoenix"
    assert attributes["gen_ai.usage.input_tokens"] == 12
    assert tool["attributes"]["gen_ai.tool.name"] == "search"
    assert tool["attributes"]["gen_ai.tool.call.result"] == "42"
