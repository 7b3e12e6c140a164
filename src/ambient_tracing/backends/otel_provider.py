"""Span records replayed into an app's own OpenTelemetry SDK ``TracerProvider`` (Logfire, a distro).

:class:`ProviderSink` is a span sink like the OTLP exporter: ``submit`` appends to a bounded queue
(oldest dropped and counted when full) and one daemon thread replays each ended record as an SDK span
with the record's own trace id, span id, parent id, start and end times, so the provider's
processors and exporters send the same tree, under the same id, as every other backend. The ids are
handed to the SDK's ``Tracer`` by an ``IdGenerator`` wrapped around the provider's own (only on the
replay thread, while a record is replayed: other spans of the app get the provider's ids).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from ambient_tracing.backends.base import RUN_SPAN_NAME
from ambient_tracing.backends.otel_mapper import SCOPE_NAME, OtelMapper
from ambient_tracing.backends.otlp import STATUS_ERROR
from ambient_tracing.backends.record_queue import DEFAULT_BATCH_SIZE, DEFAULT_MAX_QUEUE, RecordQueue
from ambient_tracing.backends.records import SpanRecord
from ambient_tracing.failures import capture_internal_exceptions, warn_once

logger = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_WRAPPED = ("tracer", "_tracer", "_real_tracer", "_delegate")  # proxies that wrap an SDK tracer


class ChosenIds(IdGenerator):
    """The wrapped generator's ids, except while :meth:`choose` has set ids on the calling thread."""

    def __init__(self, inner: IdGenerator) -> None:
        self.inner = inner
        self._chosen = threading.local()

    def choose(self, trace_id: int, span_id: int) -> None:
        self._chosen.ids = (trace_id, span_id)

    def clear(self) -> None:
        self._chosen.ids = None

    def generate_trace_id(self) -> int:
        ids = getattr(self._chosen, "ids", None)
        return ids[0] if ids else self.inner.generate_trace_id()

    def generate_span_id(self) -> int:
        ids = getattr(self._chosen, "ids", None)
        return ids[1] if ids else self.inner.generate_span_id()

    def is_trace_id_random(self) -> bool:
        if getattr(self._chosen, "ids", None):
            return True  # the package's ids are random 128 bits (ids.py)
        probe = getattr(self.inner, "is_trace_id_random", None)
        return bool(probe()) if callable(probe) else False


def sdk_tracer(tracer: Any) -> Any | None:
    """The OpenTelemetry SDK ``Tracer`` behind ``tracer`` (unwrapping proxies), None when there is none."""
    for _ in range(4):
        if hasattr(tracer, "id_generator") and hasattr(tracer, "sampler"):
            return tracer
        tracer = next(
            (inner for name in _WRAPPED if (inner := getattr(tracer, name, None)) is not None), None
        )
        if tracer is None:
            return None
    return None


def chosen_ids(tracer: Any) -> ChosenIds:
    """The tracer's id generator, wrapped once so that it can hand out chosen ids."""
    generator = tracer.id_generator
    if not isinstance(generator, ChosenIds):
        generator = ChosenIds(generator)
        tracer.id_generator = generator
    return generator


def root_sampled(tracer: Any, trace_id: str) -> bool:
    """Whether the tracer's sampler keeps a root span with this trace id (no parent)."""
    result = tracer.sampler.should_sample(Context(), int(trace_id, 16), RUN_SPAN_NAME)
    return bool(result.decision.is_sampled())


class ProviderSink(RecordQueue):
    """Replays ended span records into a ``TracerProvider`` from its own thread (the queue and the
    thread are :class:`~.record_queue.RecordQueue`'s).

    ``provider`` is called on that thread for the provider to use (e.g. the global one, looked up
    each batch so that a provider installed later is found). A flush also waits (bounded) for the
    provider's own ``force_flush``; the app's provider is never shut down.
    """

    def __init__(
        self,
        provider: Callable[[], Any],
        mapper: OtelMapper,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        interval: float = 0.2,
    ) -> None:
        super().__init__(
            "otel",
            thread_name="ambient-tracing-otel",
            max_queue=max_queue,
            batch_size=batch_size,
            interval=interval,
        )
        self._provider = provider
        self.mapper = mapper

    def tracer(self) -> Any | None:
        """The provider's SDK tracer for the package's scope; None (warned once) when it has none."""
        with capture_internal_exceptions(logger, "OpenTelemetry tracer provider failed", once="tracer"):
            found = sdk_tracer(self._provider().get_tracer(SCOPE_NAME, self.mapper.scope.version))
            if found is None:
                warn_once(
                    logger,
                    "not-sdk",
                    "OpenTelemetry tracing is off: the TracerProvider is not the OpenTelemetry SDK's "
                    "(install one, e.g. opentelemetry.sdk.trace.TracerProvider, or give an endpoint)",
                )
            return found
        return None

    def _deliver(self, batch: list[SpanRecord]) -> None:
        tracer = self.tracer()
        if tracer is None:
            self.failed += len(batch)
            return
        ids = chosen_ids(tracer)
        for record in batch:
            try:
                self._replay(tracer, ids, record)
                self.exported += 1
            except Exception as exc:
                self.failed += 1
                warn_once(logger, "replay", "otel could not replay a span: %r", exc)
            finally:
                ids.clear()

    def _after_flush(self) -> None:
        with capture_internal_exceptions(logger, "OpenTelemetry force_flush failed", once="flush"):
            force_flush = getattr(self._provider(), "force_flush", None)
            if callable(force_flush):
                force_flush(10_000)

    def _replay(self, tracer: Any, ids: ChosenIds, record: SpanRecord) -> None:
        trace_id = int(record.trace_id, 16)
        context = Context()
        if record.parent_id is not None:
            parent = SpanContext(trace_id, record.parent_id, is_remote=record.is_root, trace_flags=_SAMPLED)
            context = trace.set_span_in_context(NonRecordingSpan(parent), context)
        ids.choose(trace_id, record.span_id)
        span = tracer.start_span(
            record.name,
            context=context,
            attributes={**self.mapper.run_attributes(record), **self.mapper.attributes(record)},
            start_time=record.start_ns,
        )
        ids.clear()
        code, message = self.mapper.status(record)
        if code == STATUS_ERROR:
            span.set_status(Status(StatusCode.ERROR, message))
        span.end(end_time=max(record.end_ns, record.start_ns))
