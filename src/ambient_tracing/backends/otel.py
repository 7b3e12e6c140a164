"""OpenTelemetry backend: the same spans, under the same trace id, in any OTLP backend.

Arize Phoenix, Logfire, Grafana Tempo, Jaeger, Honeycomb, Datadog, an OpenTelemetry Collector: the
package's span records (records.py) go out with the GenAI semantic conventions (otel_mapper.py)
either by its own OTLP/HTTP protobuf exporter (otlp.py: bounded queue, own thread, a dead collector
costs the stream nothing) or, when the app already has an OpenTelemetry SDK ``TracerProvider``, replayed
into that provider off the event loop (otel_provider.py) so its processors and exporters send them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from ambient_tracing.backends.base import RunStart, Span, SpanSink
from ambient_tracing.backends.otel_mapper import SCOPE_NAME, TRACES_PATH, OtelMapper
from ambient_tracing.backends.otlp import DEFAULT_TIMEOUT, OtlpExporter
from ambient_tracing.backends.record_queue import DEFAULT_INTERVAL, DEFAULT_MAX_QUEUE
from ambient_tracing.backends.records import RecordSpan, standalone_record
from ambient_tracing.failures import capture_internal_exceptions
from ambient_tracing.ids import new_trace_id, sampled, trace_id_or_new

if TYPE_CHECKING:
    from ambient_tracing.backends.otel_provider import ProviderSink

logger = logging.getLogger(__name__)

#: Where spans go when neither an endpoint nor a provider is given, and no SDK provider is installed.
DEFAULT_ENDPOINT = "http://localhost:4318" + TRACES_PATH
try:
    _VERSION = version("ambient-tracing")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = ""


class OtelBackend:
    """Traces runs to an OpenTelemetry backend. One of:

    - ``endpoint`` (the full traces URL, e.g. ``http://127.0.0.1:6006/v1/traces``), ``headers``,
      ``service_name``, ``resource_attributes``: the package's own OTLP/HTTP protobuf exporter;
    - ``tracer_provider``: an OpenTelemetry SDK ``TracerProvider`` (or a proxy wrapping one, as
      Logfire installs): spans are replayed into it on one daemon thread;
    - neither (:meth:`from_global` says it explicitly): at :meth:`setup`, the global provider if the
      app installed an SDK one, else :data:`DEFAULT_ENDPOINT`.

    ``sample_rate`` samples runs by the ratio of their trace id (as OpenTelemetry's ``traceidratio``);
    with a provider, its sampler decides too.
    """

    name = "otel"

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        headers: Mapping[str, str] | None = None,
        service_name: str | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        tracer_provider: Any = None,
        use_global: bool = False,
        sample_rate: float = 1.0,
        timeout: float = DEFAULT_TIMEOUT,
        interval: float = DEFAULT_INTERVAL,
        compress: bool = True,
        max_queue: int = DEFAULT_MAX_QUEUE,
        flush_timeout: float = 30.0,
    ) -> None:
        """Long because it is the constructor: one line per setting."""
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0.0 and 1.0, got {sample_rate}")
        if endpoint is not None and tracer_provider is not None:
            raise ValueError("give an endpoint or a tracer_provider, not both")
        self.mapper = OtelMapper(
            service_name=service_name, resource_attributes=resource_attributes, version=_VERSION
        )
        self._endpoint = endpoint
        self._headers = dict(headers or {})
        self._exporter_options: dict[str, Any] = {
            "timeout": timeout,
            "interval": interval,
            "compress": compress,
            "max_queue": max_queue,
        }
        self._sample_rate = sample_rate
        self._flush_timeout = flush_timeout
        self._use_global = use_global
        self._closed = False
        self._sink: OtlpExporter | ProviderSink | None = None
        self._tracer: Any = None  # the provider's SDK tracer (provider path): its sampler decides too
        if endpoint is not None:
            self._sink = self._exporter(endpoint)
        elif tracer_provider is not None:
            self._use_provider(lambda: tracer_provider)
            self.setup()  # no I/O: the provider's tracer, for its sampler

    @classmethod
    def from_global(cls, **options: Any) -> OtelBackend:
        """Spans through the global ``TracerProvider`` the app installed (looked up at :meth:`setup`)."""
        return cls(use_global=True, **options)

    @property
    def span_sink(self) -> SpanSink | None:
        return self._sink

    @property
    def endpoint(self) -> str | None:
        """Where the package's exporter sends spans (None when they go through a provider)."""
        return self._sink.endpoint if isinstance(self._sink, OtlpExporter) else None

    def setup(self) -> None:
        """Without an endpoint or provider: the global SDK provider when there is one, else the default
        endpoint (:meth:`from_global`: the global provider, whatever it is)."""
        if self._sink is None:
            from opentelemetry import trace

            if self._use_global or _is_sdk_provider(trace.get_tracer_provider()):
                self._use_provider(trace.get_tracer_provider)
            else:
                self._sink = self._exporter(DEFAULT_ENDPOINT)
        sink = self._sink
        if sink is not None and not isinstance(sink, OtlpExporter) and self._tracer is None:
            self._tracer = sink.tracer()

    def accepts(self, trace_id: str) -> bool:
        """Event loop, no I/O: set up, sampled in (and, with a provider, kept by its sampler)."""
        if self._closed or self._sink is None or not sampled(trace_id, self._sample_rate):
            return False
        if isinstance(self._sink, OtlpExporter):
            return True
        tracer = self._tracer
        if tracer is None:
            return False
        from ambient_tracing.backends.otel_provider import root_sampled

        with capture_internal_exceptions(logger, "OpenTelemetry sampler failed", once="sampler"):
            return root_sampled(tracer, trace_id)
        return False

    def start_run(self, run: RunStart) -> Span | None:
        """The run's root record under ``run.trace_id`` (no SDK call); None when not recorded."""
        sink = self._sink
        trace_id = trace_id_or_new(run.trace_id)
        if sink is None or not self.accepts(trace_id):
            return None
        return RecordSpan.open_run(replace(run, trace_id=trace_id), (sink,))

    def record_span(
        self,
        name: str,
        *,
        thread_id: str,
        user_id: str | None,
        runner_type: str,
        input: Any = None,
        output: Any = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """One finished span as its own trace (e.g. Session Metrics), in the thread's session."""
        trace_id = new_trace_id()
        sink = self._sink
        if sink is None or not self.accepts(trace_id):
            return
        run = RunStart(thread_id, None, user_id, None, runner_type, 0, None, trace_id)
        attributes = dict(metadata) if metadata else None
        sink.submit(standalone_record(trace_id, name, run, input=input, output=output, attributes=attributes))

    def flush(self, timeout: float) -> None:
        if self._sink is not None:
            self._sink.flush(timeout)

    def shutdown(self) -> None:
        """Flush (bounded by ``flush_timeout``) and stop the exporter; an app's provider keeps running."""
        if self._closed:
            return
        self._closed = True
        if self._sink is not None:
            self._sink.shutdown(self._flush_timeout)

    def _exporter(self, endpoint: str) -> OtlpExporter:
        return OtlpExporter("otel", endpoint, self.mapper, headers=self._headers, **self._exporter_options)

    def _use_provider(self, provider: Any) -> None:
        from ambient_tracing.backends.otel_provider import ProviderSink

        options = self._exporter_options
        self._sink = ProviderSink(
            provider, self.mapper, max_queue=options["max_queue"], interval=min(options["interval"], 0.2)
        )
        self._tracer = None


def _is_sdk_provider(provider: Any) -> bool:
    """An installed provider that makes real spans (not the API's proxy or no-op one)."""
    from ambient_tracing.backends.otel_provider import sdk_tracer

    if type(provider).__module__.startswith("opentelemetry.trace"):
        return False
    with capture_internal_exceptions(logger, "OpenTelemetry tracer provider failed", once="probe"):
        return sdk_tracer(provider.get_tracer(SCOPE_NAME, _VERSION)) is not None
    return False
