"""The MLflow SDK's path, for a store the package does not send spans to by OTLP (``sqlite:///``,
databricks, ...): a run's spans made with ``start_span_no_context``, on the span worker.

Spans are never the current span (they stay open across ``yield``) and parents are explicit.
Export is MLflow's own asynchronous queue. The trace id of a run is chosen by the package
(``RunStart.trace_id``, 32 hex) and becomes MLflow's ``tr-<32 hex>``: MLflow's tracer is an
OpenTelemetry tracer, and :class:`_ChosenTraceIds` (an OpenTelemetry ``IdGenerator`` wrapped around
MLflow's own) hands it the id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import mlflow
import mlflow.tracing.provider as mlflow_provider
from mlflow.entities import LiveSpan, SpanStatus, SpanStatusCode, SpanType
from mlflow.tracing.constant import TraceMetadataKey
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator

from ambient_tracing.backends.base import NULL_SPAN, RunStart, Span, SpanKind, TokenUsage
from ambient_tracing.backends.mlflow_otlp import (
    SPAN_TYPES,
    TRACE_ID_PREFIX,
    context_metadata,
    context_tags,
    end_attributes,
    fit_conversation,
    fit_session,
    present,
)
from ambient_tracing.failures import first_time

logger = logging.getLogger(__name__)

_SPAN_TYPES = {kind: getattr(SpanType, name) for kind, name in SPAN_TYPES.items()}


def _skip_missing_prediction_context() -> None:
    """With mlflow-skinny (no numpy) ``mlflow.pyfunc`` cannot be imported, and MLflow retries that
    import (a failed import is not cached) several times per root span: milliseconds each. Without
    pyfunc there is no prediction context, so MLflow is told so once, here."""
    try:
        import mlflow.pyfunc.context  # noqa: F401
    except (ImportError, KeyError):
        import mlflow.tracing.utils as tracing_utils

        if hasattr(tracing_utils, "_try_get_prediction_context"):
            tracing_utils._try_get_prediction_context = lambda: None


_skip_missing_prediction_context()


def start_sdk_run(run: RunStart, trace_id: str, experiment_id: str) -> Span | None:
    """The run's root span under ``trace_id``; None when MLflow does not record it (tracing off,
    sampled out, or it would not take the id). Blocking: called on the span worker."""
    tags, metadata, attributes = _root_fields(run)
    try:
        with _ChosenTraceIds.next(trace_id):
            span = mlflow.start_span_no_context(
                run.name,
                span_type=SpanType.AGENT,
                inputs=run.input,
                attributes=present(attributes),
                tags=present(tags),
                metadata=present(metadata),
                experiment_id=experiment_id,
                start_time_ns=run.start_time_ns,
            )
    except Exception:
        logger.warning("MLflow could not start a turn", exc_info=True)
        return None
    if not isinstance(span, LiveSpan) or span.trace_id != TRACE_ID_PREFIX + trace_id:
        if isinstance(span, LiveSpan):  # MLflow did not take the id: never record a second one
            logger.warning("MLflow did not adopt trace id %s", trace_id)
            with suppress(Exception):
                span.end(status="ERROR")
        return None  # a NoOpSpan (tracing disabled, sampled out): its id must never reach a client
    return _MlflowSpan(span, trace_id)


def record_sdk_span(
    name: str,
    experiment_id: str,
    thread_id: str,
    user_id: str | None,
    runner_type: str,
    input: Any,
    output: Any,
    metadata: Mapping[str, Any] | None,
) -> None:
    """A span that is its own trace (Session Metrics), started and ended now."""
    tags, trace_metadata, attributes = _standalone_fields(thread_id, user_id, runner_type, metadata or {})
    try:
        span = mlflow.start_span_no_context(
            name,
            span_type=SpanType.CHAIN,
            inputs=input,
            attributes=present(attributes),
            tags=present(tags),
            metadata=present(trace_metadata),
            experiment_id=experiment_id,
        )
        span.end(outputs=output)
    except Exception:
        logger.warning("MLflow could not record span %r", name, exc_info=True)


def _root_fields(run: RunStart) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The tags, trace metadata and attributes of a run's root span (the origin runner's names)."""
    context = run.attributes or {}
    tags = {
        "ambient.thread_id": run.thread_id,
        "ambient.run_id": run.run_id,
        # The origin runner's trace tags (its session is the AG-UI thread).
        "ambient.session_id": run.thread_id,
        "ambient.user_id": run.user_id,
        **context_tags(context),
    }
    metadata = {
        TraceMetadataKey.TRACE_SESSION: fit_session(run.thread_id),
        TraceMetadataKey.TRACE_USER: run.user_id,
        "user_name": run.user_name,
        **context_metadata(context),
    }
    attributes = {
        **fit_conversation(context),
        "ambient.runner_type": run.runner_type,
        "ambient.session_id": run.thread_id,
        "ambient.user_id": run.user_id,
        "ambient.user_name": run.user_name,
        "ambient.turn": run.turn_number,
        # MLflow's SDK cannot open a root under a remote parent without a context manager around
        # the whole run (start_span_no_context gives a no-op span), so on this path the run's root
        # stays the trace's root, under the caller's trace id, and names the caller's span here.
        "ambient.caller_span_id": run.parent_span_id,
    }
    return tags, metadata, attributes


def _standalone_fields(
    thread_id: str, user_id: str | None, runner_type: str, metadata: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The tags, trace metadata and attributes of a span recorded as its own trace (Session Metrics)."""
    source = metadata.get("source")
    tags = {
        "ambient.thread_id": thread_id,
        "ambient.source": source if isinstance(source, str) else None,
        "ambient.session_id": thread_id,
        "ambient.user_id": user_id,
        **context_tags(metadata),
    }
    trace_metadata = {
        TraceMetadataKey.TRACE_SESSION: fit_session(thread_id),
        TraceMetadataKey.TRACE_USER: user_id,
        **context_metadata(metadata),
    }
    attributes = {
        **metadata,
        "ambient.runner_type": runner_type,
        "ambient.session_id": thread_id,
        "ambient.user_id": user_id,
    }
    return tags, trace_metadata, attributes


class _MlflowSpan:
    """One open MLflow span. Never raises; warns once."""

    __slots__ = ("_ended", "_span", "_trace_id")

    def __init__(self, span: LiveSpan, trace_id: str) -> None:
        self._span = span
        self._trace_id = trace_id
        self._ended = False

    @property
    def trace_id(self) -> str:
        return self._trace_id

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> Span:
        try:
            child = mlflow.start_span_no_context(
                name,
                span_type=_SPAN_TYPES.get(kind, SpanType.UNKNOWN),
                parent_span=self._span,
                inputs=input,
                attributes=dict(attributes) if attributes else None,
                start_time_ns=start_time_ns,
            )
        except Exception:
            self._warn(f"start child {name!r} of")
            child = None
        if not isinstance(child, LiveSpan):
            return NULL_SPAN
        return _MlflowSpan(child, self._trace_id)

    def set_input(self, input: Any) -> None:
        if not self._ended:
            try:
                self._span.set_inputs(input)
            except Exception:
                self._warn("set the input of")

    def end(
        self,
        *,
        output: Any = None,
        error: str | None = None,
        model: str | None = None,
        usage: Sequence[TokenUsage] = (),
        attributes: Mapping[str, Any] | None = None,
        end_time_ns: int | None = None,
    ) -> None:
        if self._ended:
            return
        self._ended = True
        span = self._span
        try:
            extra = {**(attributes or {}), **end_attributes(model, usage)}
            if error is not None:
                # LiveSpan.set_status accepts a SpanStatus (its docstring says so; its annotation not).
                span.set_status(SpanStatus(SpanStatusCode.ERROR, description=error))  # type: ignore[arg-type]
            span.end(outputs=output, attributes=extra or None, end_time_ns=end_time_ns)
        except Exception:
            self._warn("end")
            with suppress(Exception):
                span.end(end_time_ns=end_time_ns)

    def _warn(self, what: str) -> None:
        if first_time(logger, f"span:{id(self)}"):  # once per span
            logger.warning("MLflow could not %s span %r", what, self._span.name, exc_info=True)


class _ChosenTraceIds(IdGenerator):
    """MLflow's OpenTelemetry id generator, except that a root opened inside :meth:`next` on this
    thread gets the package's id. Installed on MLflow's tracer provider on first use (and again
    after ``mlflow.tracing.reset()`` builds a new provider)."""

    _pending = threading.local()

    def __init__(self, inner: IdGenerator) -> None:
        self._inner = inner

    @classmethod
    @contextmanager
    def next(cls, trace_id: str) -> Iterator[None]:
        provider = mlflow_provider.provider.get()
        if isinstance(provider, TracerProvider) and not isinstance(provider.id_generator, cls):
            chosen = cls(provider.id_generator)
            provider.id_generator = chosen  # type: ignore[assignment]  # tracers made from now on use it
            for tracer in list(getattr(provider, "_tracers", {}).values()):  # the SDK caches tracers
                if hasattr(tracer, "id_generator"):
                    tracer.id_generator = chosen
        cls._pending.trace_id = int(trace_id, 16)
        try:
            yield
        finally:
            cls._pending.trace_id = None

    def generate_span_id(self) -> int:
        return self._inner.generate_span_id()

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._pending, "trace_id", None)
        if trace_id is None:
            return self._inner.generate_trace_id()
        self._pending.trace_id = None  # one root per call
        return trace_id
