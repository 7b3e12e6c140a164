"""MLflow backend: one ``llm_interaction`` trace per turn, made with ``start_span_no_context``.

Spans are never the current span (they stay open across ``yield``), parents are explicit, and the
experiment is resolved once in :meth:`MlflowBackend.setup` (a worker thread). Export is MLflow's own
asynchronous queue: nothing here waits on the network except ``flush``/``shutdown``.

MLflow tracing is process-wide (one tracking URI, one exporter): create one ``MlflowBackend`` per
process. The trace id of a turn is chosen by the package (``TurnStart.trace_id``, 32 hex) and
becomes MLflow's ``tr-<32 hex>``: MLflow's tracer is an OpenTelemetry tracer, and
:class:`_ChosenTraceIds` (an OpenTelemetry ``IdGenerator`` wrapped around MLflow's own) hands it the id.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from functools import cached_property
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator

try:
    import mlflow
    import mlflow.tracing.provider as mlflow_provider
    from mlflow import MlflowClient
    from mlflow.entities import AssessmentSource, LiveSpan, SpanStatus, SpanStatusCode, SpanType
    from mlflow.tracing.constant import SpanAttributeKey, TraceMetadataKey
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the MLflow backend needs mlflow: pip install 'ambient-tracing[mlflow]'") from exc

from ..ids import new_trace_id, sampled
from ..ratings import Rating
from .base import NULL_SPAN, Span, SpanKind, TokenUsage, TurnStart

logger = logging.getLogger("ambient_tracing")

ROOT_NAME = "llm_interaction"
TRACE_ID_PREFIX = "tr-"
_SPAN_TYPES = {
    SpanKind.TURN: SpanType.AGENT,
    SpanKind.TOOL: SpanType.TOOL,
    SpanKind.STEP: SpanType.CHAIN,
    SpanKind.REASONING: SpanType.LLM,
    SpanKind.SUBAGENT: SpanType.AGENT,
    SpanKind.GENERATION: SpanType.LLM,
}
# TokenUsage field -> key of MLflow's ``mlflow.chat.tokenUsage`` (summed into the trace's token usage).
_MLFLOW_USAGE = (
    ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"),
    ("total_tokens", "total_tokens"),
    ("cache_read_tokens", "cache_read_input_tokens"),
    ("cache_write_tokens", "cache_creation_input_tokens"),
)
_GEN_AI_USAGE = (
    ("input_tokens", "gen_ai.usage.input_tokens"),
    ("output_tokens", "gen_ai.usage.output_tokens"),
    ("reasoning_tokens", "gen_ai.usage.reasoning_tokens"),
    ("cache_read_tokens", "gen_ai.usage.cache_read.input_tokens"),
    ("cache_write_tokens", "gen_ai.usage.cache_creation.input_tokens"),
)


def artifacts_beside(tracking_uri: str, experiment_name: str) -> str | None:
    """For a ``sqlite:///`` store, an artifact location next to the database file (``mlartifacts/
    <experiment>`` in its folder) rather than MLflow's default, ``./mlruns`` of whatever directory the
    app was started from. None for other stores: a server or database chooses its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment_name).strip("-.") or "experiment"
    return (Path(path).resolve().parent / "mlartifacts" / folder).as_uri()


def to_mlflow_trace_id(trace_id: str) -> str:
    """``tr-<hex>`` from a bare 32 hex id (an id already in MLflow's form is returned as is)."""
    return trace_id if trace_id.startswith(TRACE_ID_PREFIX) else TRACE_ID_PREFIX + trace_id


class MlflowBackend:
    """Traces turns to an MLflow tracking store (``sqlite:///...``, ``http://...``, databricks, ...).

    :meth:`setup` sets the tracking URI (process-wide, as ``mlflow.set_tracking_uri`` does), creates
    the experiment if missing and warms MLflow's tracer. Until it has finished, turns are not recorded
    in MLflow (``start_turn`` returns None): the middleware runs it at application startup.
    Sampling is MLflow's own (``MLFLOW_TRACE_SAMPLING_RATIO``); a sampled-out run is not recorded.
    """

    name = "mlflow"
    defer_spans = True  # each span call costs ~0.1-0.3 ms of CPU: keep it off the event loop

    def __init__(self, *, tracking_uri: str, experiment_name: str = "ambient-code-sessions") -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._experiment_id: str | None = None
        self._sampling_ratio = 1.0
        self._lock = threading.Lock()

    @property
    def experiment_id(self) -> str | None:
        """The experiment's id once :meth:`setup` has resolved it."""
        return self._experiment_id

    @cached_property
    def client(self) -> MlflowClient:
        """A client of the same tracking store (blocking calls: use it from a worker thread)."""
        return MlflowClient(tracking_uri=self.tracking_uri)

    def setup(self) -> None:
        """Blocking: point MLflow at the store, get or create the experiment, warm the tracer."""
        with self._lock:
            if self._experiment_id is not None:
                return
            if mlflow.get_tracking_uri() != self.tracking_uri:
                mlflow.set_tracking_uri(self.tracking_uri)
            client = self.client
            experiment = client.get_experiment_by_name(self.experiment_name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(
                    self.experiment_name,
                    artifact_location=artifacts_beside(self.tracking_uri, self.experiment_name),
                )
            )
            # The first span of a process builds MLflow's tracer provider (~0.1 s): do it here, not
            # on the event loop. A span that is never ended is never exported.
            mlflow.start_span_no_context("ambient-tracing-warmup", experiment_id=experiment_id)
            self._sampling_ratio = _sampling_ratio()
            self._experiment_id = experiment_id

    def accepts(self, trace_id: str) -> bool:
        """Event loop, no SDK call: set up, and sampled in by ``MLFLOW_TRACE_SAMPLING_RATIO``."""
        return self._experiment_id is not None and sampled(trace_id, self._sampling_ratio)

    def start_turn(self, turn: TurnStart) -> Span | None:
        """Open the turn's root span under ``turn.trace_id``; None before setup or when MLflow does
        not record the run. Blocking SDK work: the package runs it on its span worker thread."""
        experiment_id = self._experiment_id
        if experiment_id is None:
            return None
        trace_id = turn.trace_id or new_trace_id()
        tags = {
            "ambient.thread_id": turn.thread_id,
            "ambient.run_id": turn.run_id,
            # The origin runner's trace tags (its session is the AG-UI thread).
            "ambient.session_id": turn.thread_id,
            "ambient.user_id": turn.user_id,
            **_context_tags(turn.attributes or {}),
        }
        metadata = {
            TraceMetadataKey.TRACE_SESSION: turn.thread_id,
            TraceMetadataKey.TRACE_USER: turn.user_id,
            "user_name": turn.user_name,
            **_context_metadata(turn.attributes or {}),
        }
        attributes = {
            **(turn.attributes or {}),
            "ambient.runner_type": turn.runner_type,
            "ambient.session_id": turn.thread_id,
            "ambient.user_id": turn.user_id,
            "ambient.user_name": turn.user_name,
            "ambient.turn": turn.turn_number,
        }
        try:
            with _ChosenTraceIds.next(trace_id):
                span = mlflow.start_span_no_context(
                    ROOT_NAME,
                    span_type=SpanType.AGENT,
                    inputs=turn.input,
                    attributes=_present(attributes),
                    tags=_present(tags),
                    metadata=_present(metadata),
                    experiment_id=experiment_id,
                )
        except Exception:
            logger.warning("ambient-tracing: MLflow could not start a turn", exc_info=True)
            return None
        if not isinstance(span, LiveSpan) or span.trace_id != TRACE_ID_PREFIX + trace_id:
            if isinstance(span, LiveSpan):  # MLflow did not take the id: never record a second one
                logger.warning("ambient-tracing: MLflow did not adopt trace id %s", trace_id)
                with suppress(Exception):
                    span.end(status="ERROR")
            return None  # a NoOpSpan (tracing disabled, sampled out): its id must never reach a client
        return _MlflowSpan(span, trace_id)

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
        """A trace whose root span ``name`` has ``metadata`` as attributes and ``output`` as outputs;
        tagged ``ambient.thread_id`` (and ``ambient.source`` from ``metadata["source"]``)."""
        experiment_id = self._experiment_id
        if experiment_id is None:
            return
        source = (metadata or {}).get("source")
        tags = {
            "ambient.thread_id": thread_id,
            "ambient.source": source if isinstance(source, str) else None,
            "ambient.session_id": thread_id,
            "ambient.user_id": user_id,
            **_context_tags(metadata or {}),
        }
        trace_metadata = {
            TraceMetadataKey.TRACE_SESSION: thread_id,
            TraceMetadataKey.TRACE_USER: user_id,
            **_context_metadata(metadata or {}),
        }
        attributes = {
            **(metadata or {}),
            "ambient.runner_type": runner_type,
            "ambient.session_id": thread_id,
            "ambient.user_id": user_id,
        }
        try:
            span = mlflow.start_span_no_context(
                name,
                span_type=SpanType.CHAIN,
                inputs=input,
                attributes=_present(attributes),
                tags=_present(tags),
                metadata=_present(trace_metadata),
                experiment_id=experiment_id,
            )
            span.end(outputs=output)
        except Exception:
            logger.warning("ambient-tracing: MLflow could not record span %r", name, exc_info=True)

    def flush(self, timeout: float) -> None:
        """Blocking: wait for MLflow's export queue to drain (about a second even when nearly empty)."""
        mlflow.flush_trace_async_logging(terminate=False)

    def shutdown(self) -> None:
        """Nothing to release: MLflow's exporter is process-wide and flushes itself at exit."""

    # -- feedback (called from the rating delivery thread; blocking) --------------------------------

    needs_trace = True

    def deliver_rating(self, rating: Rating) -> None:
        """Record a rating as an assessment; raises while the trace is not stored yet (retried).

        Thumbs are a ``user-feedback`` feedback (bool), corrections a ``user-correction`` expectation,
        both with source HUMAN and the user id. The same (message, user) rating again is a no-op; a
        different value overrides the earlier assessment, so the trace keeps one valid rating.
        """
        assert rating.trace_id is not None
        trace_id = to_mlflow_trace_id(rating.trace_id)
        trace = self.client.get_trace(trace_id)  # raises "not found" until MLflow has exported it
        source = AssessmentSource(source_type="HUMAN", source_id=rating.user_id or "anonymous")
        metadata = dict(rating.metadata)
        earlier = _earlier_assessment(trace.info.assessments, rating)
        if rating.kind == "correction":
            if earlier is not None:
                if earlier.value == rating.value:
                    return
                mlflow.delete_assessment(trace_id=trace_id, assessment_id=earlier.assessment_id)
            mlflow.log_expectation(
                trace_id=trace_id, name=rating.name, value=rating.value, source=source, metadata=metadata
            )
        elif earlier is None:
            mlflow.log_feedback(
                trace_id=trace_id,
                name=rating.name,
                value=rating.value,
                source=source,
                rationale=rating.comment,
                metadata=metadata,
            )
        elif earlier.value != rating.value or earlier.rationale != rating.comment:
            mlflow.override_feedback(
                trace_id=trace_id,
                assessment_id=earlier.assessment_id,
                value=rating.value,
                rationale=rating.comment,
                source=source,
                metadata=metadata,
            )

    def latest_trace_id(self, thread_id: str) -> str | None:
        """Blocking: the newest trace of the thread in this experiment (tag ``ambient.thread_id``)."""
        if self._experiment_id is None or "'" in thread_id or "\\" in thread_id:
            return None
        traces = self.client.search_traces(
            locations=[self._experiment_id],
            # Only runs: the thread's Session Metrics traces carry the same tag.
            filter_string=f"tags.`ambient.thread_id` = '{thread_id}' AND trace.name = '{ROOT_NAME}'",
            order_by=["timestamp_ms DESC"],
            max_results=1,
            include_spans=False,
        )
        return traces[0].info.trace_id.removeprefix(TRACE_ID_PREFIX) if traces else None


class _MlflowSpan:
    """One open MLflow span. Never raises; warns once."""

    __slots__ = ("_ended", "_span", "_trace_id", "_warned")

    def __init__(self, span: LiveSpan, trace_id: str) -> None:
        self._span = span
        self._trace_id = trace_id
        self._ended = False
        self._warned = False

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
            extra = dict(attributes or {})
            model = model or (usage[0].model if usage else None)
            if model:
                extra[SpanAttributeKey.MODEL] = model
                extra["llm.model_name"] = model
                extra["gen_ai.request.model"] = model
            if usage:
                extra.update(_usage_attributes(usage))
            if error is not None:
                # LiveSpan.set_status accepts a SpanStatus (its docstring says so; its annotation not).
                span.set_status(SpanStatus(SpanStatusCode.ERROR, description=error))  # type: ignore[arg-type]
            span.end(outputs=output, attributes=extra or None, end_time_ns=end_time_ns)
        except Exception:
            self._warn("end")
            with suppress(Exception):
                span.end(end_time_ns=end_time_ns)

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "ambient-tracing: MLflow could not %s span %r", what, self._span.name, exc_info=True
            )


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


def _sampling_ratio() -> float:
    """MLflow's ``MLFLOW_TRACE_SAMPLING_RATIO`` (its sampler is OpenTelemetry's ratio by trace id)."""
    try:
        from mlflow.environment_variables import MLFLOW_TRACE_SAMPLING_RATIO

        ratio = MLFLOW_TRACE_SAMPLING_RATIO.get()  # type: ignore[no-untyped-call]
        return 1.0 if ratio is None else float(ratio)
    except Exception:
        return 1.0


def _earlier_assessment(assessments: Sequence[Any], rating: Rating) -> Any:
    """The valid assessment this rating replaces: same name, same user, same message."""
    for assessment in assessments:
        source = assessment.source
        if (
            assessment.name == rating.name
            and getattr(assessment, "valid", True) is not False
            and source is not None
            and source.source_id == (rating.user_id or "anonymous")
            and (assessment.metadata or {}).get("messageId") == rating.message_id
        ):
            return assessment
    return None


_CONTEXT_TAGS = ("ambient.namespace", "ambient.workflow")
_CONTEXT_METADATA = ("workflow_name", "workflow_url", "workflow_branch", "workflow_path")


def _context_tags(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Namespace and workflow name as trace tags, to filter runs by them."""
    return {key: str(attributes[key]) for key in _CONTEXT_TAGS if attributes.get(key)}


def _context_metadata(attributes: Mapping[str, Any]) -> dict[str, str]:
    """The origin runner's ``workflow_*`` keys as trace metadata."""
    return {key: str(attributes[key]) for key in _CONTEXT_METADATA if attributes.get(key)}


def _present(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _usage_attributes(usage: Sequence[TokenUsage]) -> dict[str, Any]:
    """``mlflow.chat.tokenUsage`` (summed over models, feeds the trace's token usage) and gen_ai.usage.*."""

    def total(field: str) -> int | None:
        counts = [value for entry in usage if (value := getattr(entry, field)) is not None]
        return sum(counts) if counts else None

    chat_usage = {key: value for field, key in _MLFLOW_USAGE if (value := total(field)) is not None}
    if "total_tokens" not in chat_usage and {"input_tokens", "output_tokens"} <= chat_usage.keys():
        chat_usage["total_tokens"] = chat_usage["input_tokens"] + chat_usage["output_tokens"]
    attributes: dict[str, Any] = {
        key: value for field, key in _GEN_AI_USAGE if (value := total(field)) is not None
    }
    if chat_usage:
        attributes[SpanAttributeKey.CHAT_USAGE] = chat_usage
    providers = {entry.provider for entry in usage if entry.provider}
    if len(providers) == 1:
        attributes[SpanAttributeKey.MODEL_PROVIDER] = attributes["gen_ai.provider.name"] = providers.pop()
    return attributes
