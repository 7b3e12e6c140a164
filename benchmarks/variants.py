"""The middleware variants under test, built around the workload app.

``raw``: no middleware. ``mw-none``: TracingMiddleware with ``Observability()`` (no backend).
``mw-mlflow`` / ``mw-langfuse`` / ``mw-both``: TracingMiddleware with those backends (MLflow on a
``sqlite:///`` store, set up before timing). ``mw-mlflow-server`` / ``mw-both-server``: the same with
MLflow against a real ``mlflow server`` child process on 127.0.0.1 (the production setup). MLflow's
tracking URI is process-wide: a process measures either the sqlite or the server variants.
``otel``: OpenTelemetry's ASGI middleware, SDK TracerProvider, a no-op exporter behind a
SimpleSpanProcessor (every span is made, ended and handed to the exporter; nothing is dropped).
``mw-null``: TracingMiddleware with a backend whose spans do nothing (the middleware's own cost).
``otel-nosend``: the same with ``exclude_spans=["send", "receive"]``.
``mw-otel``: TracingMiddleware with the OpenTelemetry backend (``OtelBackend``: the package's OTLP/HTTP
exporter) sending to the loopback receiver. ``otel-otlp``: OpenTelemetry's ASGI middleware with the
SDK's OTLP/HTTP protobuf exporter behind a BatchSpanProcessor, to the same receiver: the same wire
format and destination, so the two differ only in how spans are made and exported.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.base import TracingBackend

from .workload import make_app

ALL = ("raw", "mw-none", "mw-null", "mw-mlflow", "mw-langfuse", "mw-both", "otel", "otel-nosend")
TRACED = ("mw-mlflow", "mw-langfuse", "mw-both")
SERVER = ("mw-mlflow-server", "mw-both-server")
_MLFLOW = ("mw-mlflow", "mw-both", "mw-mlflow-server", "mw-both-server")
_LANGFUSE = ("mw-langfuse", "mw-both", "mw-both-server")
OTEL_GROUP = ("mw-otel", "otel", "otel-otlp")


class NullSpan:
    """A span that records nothing: isolates the middleware's own cost from the vendor SDKs'."""

    trace_id = "0123456789abcdef0123456789abcdef"

    def start_child(self, name: str, kind: Any, **_: Any) -> NullSpan:
        return self

    def set_input(self, input: Any) -> None:
        pass

    def end(self, **_: Any) -> None:
        pass


class NullBackend:
    """``mw-null``: a backend whose spans cost nothing (the middleware's parse/scan cost alone)."""

    name = "null"
    span_sink = None

    def accepts(self, trace_id: str) -> bool:
        return True

    def setup(self) -> None:
        pass

    def start_run(self, turn: Any) -> NullSpan:
        return NullSpan()

    start_turn = start_run  # the name before the layout of issue 10, for before/after runs

    def flush(self, timeout: float) -> None:
        pass

    def shutdown(self) -> None:
        pass


def otel_app(app: ASGIApp, *, exclude: bool) -> ASGIApp:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class NoOpExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(NoOpExporter()))
    return OpenTelemetryMiddleware(
        app, tracer_provider=provider, exclude_spans=["send", "receive"] if exclude else None
    )


def otel_otlp_app(app: ASGIApp, endpoint: str) -> tuple[ASGIApp, Callable[[], None]]:
    """OpenTelemetry's ASGI middleware exporting by OTLP/HTTP protobuf; and what flushes it."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))

    def flush() -> None:
        provider.force_flush(30_000)

    return OpenTelemetryMiddleware(app, tracer_provider=provider), flush


def otel_backend(host: str) -> TracingBackend:
    from ambient_tracing.backends.otel import OtelBackend

    return OtelBackend(endpoint=host + "/v1/traces")


def langfuse_backend(host: str, **options: Any) -> TracingBackend:
    from ambient_tracing.backends.langfuse import LangfuseBackend

    key = uuid.uuid4().hex[:12]
    options.setdefault("flush_timeout", 30.0)
    return LangfuseBackend(
        public_key=f"pk-lf-bench-{key}", secret_key=f"sk-lf-bench-{key}", host=host, **options
    )


def mlflow_backend(tracking_uri: str, *, setup: bool = True) -> TracingBackend:
    from ambient_tracing.backends.mlflow import MlflowBackend

    backend = MlflowBackend(tracking_uri=tracking_uri, experiment_name="bench")
    if setup:
        backend.setup()
    return backend


def drain_workers() -> None:
    """Wait for the tracer and span workers (as each tree of the package names them)."""
    try:
        from ambient_tracing.background import drain_workers as drain_all
    except ImportError:
        pass
    else:
        drain_all(60.0)
        return
    try:
        from ambient_tracing.tracer.worker import drain_tracer_workers
    except ImportError:
        pass
    else:
        drain_tracer_workers(60.0)
    try:
        from ambient_tracing.spans.deferred import drain_span_workers
    except ImportError:
        pass
    else:
        drain_span_workers(60.0)


@dataclass
class Variants:
    """Builds each variant's ASGI app; the backends are made once and shared by the variants."""

    mlflow_uri: str | None = None
    langfuse_host: str | None = None
    mlflow_server_uri: str | None = None
    mask_messages: bool = True
    _mlflow: TracingBackend | None = field(default=None, init=False)
    _langfuse: TracingBackend | None = field(default=None, init=False)
    _otel: TracingBackend | None = field(default=None, init=False)
    _flushers: dict[str, Callable[[], None]] = field(default_factory=dict, init=False)
    observabilities: list[Observability] = field(default_factory=list, init=False)

    def mlflow(self, server: bool = False) -> TracingBackend:
        if self._mlflow is None:
            uri = self.mlflow_server_uri if server else self.mlflow_uri
            assert uri, "no MLflow tracking URI"
            self._mlflow = mlflow_backend(uri)
        assert self._mlflow.tracking_uri == (self.mlflow_server_uri if server else self.mlflow_uri), (  # type: ignore[attr-defined]
            "sqlite and server MLflow variants cannot share a process"
        )
        return self._mlflow

    def langfuse(self) -> TracingBackend:
        if self._langfuse is None:
            assert self.langfuse_host, "no Langfuse host"
            self._langfuse = langfuse_backend(self.langfuse_host)
        return self._langfuse

    def otel(self) -> TracingBackend:
        if self._otel is None:
            assert self.langfuse_host, "no receiver"
            self._otel = otel_backend(self.langfuse_host)
        return self._otel

    def build(self, name: str, app: ASGIApp | None = None) -> ASGIApp:
        app = app or make_app()
        if name == "raw":
            return app
        if name == "otel":
            return otel_app(app, exclude=False)
        if name == "otel-nosend":
            return otel_app(app, exclude=True)
        if name == "otel-otlp":
            assert self.langfuse_host, "no receiver"
            app, self._flushers[name] = otel_otlp_app(app, self.langfuse_host + "/v1/traces")
            return app
        backends: list[TracingBackend] = []
        if name == "mw-otel":
            backends.append(self.otel())
        if name in _MLFLOW:
            backends.append(self.mlflow(server=name in SERVER))
        if name in _LANGFUSE:
            backends.append(self.langfuse())
        if name == "mw-null":
            backends.append(NullBackend())  # type: ignore[arg-type]
        if name != "mw-none" and not backends:
            raise ValueError(f"unknown variant {name!r}")
        observability = Observability(backends, mask_messages=self.mask_messages)
        self.observabilities.append(observability)
        return TracingMiddleware(app, observability=observability)

    def close(self) -> None:
        """Export what is pending and stop the SDK threads (before the receiver or the store goes)."""
        if self._mlflow is not None:
            self._mlflow.flush(30.0)
        if self._langfuse is not None:
            self._langfuse.shutdown()
        if self._otel is not None:
            self._otel.shutdown()
        for flush in self._flushers.values():
            flush()

    def flusher(self, name: str) -> Callable[[], None]:
        """What waits for the variant's background export (so its CPU lands in the measurement):
        the package's own workers first (the tracer worker, then the span worker), then the export."""
        actions: list[Callable[[], None]] = [drain_workers] if name.startswith("mw-") else []
        if name in _MLFLOW:
            backend = self.mlflow(server=name in SERVER)
            actions.append(lambda: backend.flush(30.0))
        if name in _LANGFUSE:
            langfuse = self.langfuse()
            actions.append(lambda: langfuse.flush(30.0))
        if name == "mw-otel":
            otel = self.otel()
            actions.append(lambda: otel.flush(30.0))
        if name in self._flushers:
            actions.append(self._flushers[name])

        def flush() -> None:
            for action in actions:
                action()

        return flush
