"""MLflow backend: one ``llm_interaction`` trace per run, in an MLflow tracking store.

An ``http(s)://`` tracking server gets the package's own span records by OTLP (mlflow_otlp.py: what
a record becomes there; mlflow_server.py: the rest of what is said to the server); any other store
(``sqlite:///``, databricks) gets spans made by MLflow's SDK on the span worker (mlflow_sdk.py). The
experiment is resolved once in :meth:`MlflowBackend.setup` (a worker thread); ratings become
assessments. MLflow tracing is process-wide (one tracking URI, one exporter): create one
``MlflowBackend`` per process.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

try:
    import mlflow
    import mlflow.tracing.provider as mlflow_provider
    from mlflow import MlflowClient
    from mlflow.entities import AssessmentSource, Expectation, Feedback
    from mlflow.exceptions import MlflowException
    from mlflow.tracing.client import TracingClient
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the MLflow backend needs mlflow: pip install 'ambient-tracing[mlflow]'") from exc

from ambient_tracing.backends.base import (
    RUN_SPAN_NAME,
    RunStart,
    Span,
    TraceNotStored,
)
from ambient_tracing.backends.mlflow_otlp import (
    EXPERIMENT_HEADER,
    TRACE_ID_PREFIX,
    TRACES_PATH,
    MlflowMapper,
)
from ambient_tracing.backends.mlflow_sdk import record_sdk_span, start_sdk_run
from ambient_tracing.backends.mlflow_server import TraceInfoWriter, auth_headers, stores_json_text
from ambient_tracing.backends.otlp import DEFAULT_TIMEOUT, OtlpExporter
from ambient_tracing.backends.rating import Rating
from ambient_tracing.backends.records import RecordSpan, standalone_record
from ambient_tracing.ids import new_trace_id, sampled, trace_id_or_new

logger = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 10.0


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
    in MLflow (``start_run`` returns None): the middleware runs it at application startup.
    Sampling is MLflow's own (``MLFLOW_TRACE_SAMPLING_RATIO``); a sampled-out run is not recorded.
    """

    name = "mlflow"

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_name: str = "ambient-code-sessions",
        otlp: bool | None = None,
        **exporter_options: Any,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        #: Spans go to the tracking server by OTLP (``{uri}/v1/traces``) instead of through the SDK:
        #: by default for an ``http(s)://`` tracking server. A ``sqlite:///`` store keeps the SDK.
        self.otlp = tracking_uri.startswith(("http://", "https://")) if otlp is None else otlp
        self._exporter_options = exporter_options
        #: Where ended spans go (records.py) once set up over OTLP; None with the SDK path.
        self.span_sink: OtlpExporter | None = None
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
            self._sampling_ratio = _sampling_ratio()
            if self.otlp:
                options = {"timeout": DEFAULT_TIMEOUT, **self._exporter_options}
                timeout = float(options["timeout"])
                json_text = stores_json_text(self.tracking_uri, timeout)
                self.span_sink = OtlpExporter(
                    "mlflow",
                    self.tracking_uri.rstrip("/") + TRACES_PATH,
                    MlflowMapper(experiment_id, json_as_text=json_text),
                    headers={EXPERIMENT_HEADER: experiment_id, **auth_headers()},
                    on_exported=TraceInfoWriter(self.tracking_uri, experiment_id, timeout),
                    **options,
                )
            else:
                # The first span of a process builds MLflow's tracer provider (~0.1 s): do it here,
                # not on the event loop. A span that is never ended is never exported.
                mlflow.start_span_no_context("ambient-tracing-warmup", experiment_id=experiment_id)
            self._experiment_id = experiment_id

    def accepts(self, trace_id: str) -> bool:
        """Event loop, no SDK call: set up, and sampled in by ``MLFLOW_TRACE_SAMPLING_RATIO``."""
        return (
            self._experiment_id is not None
            and sampled(trace_id, self._sampling_ratio)
            and mlflow_provider.is_tracing_enabled()  # in memory: never waits
        )

    def start_run(self, run: RunStart) -> Span | None:
        """Open the turn's root span under ``run.trace_id``; None before setup or when MLflow does
        not record the run. Blocking SDK work: the package runs it on its span worker thread."""
        experiment_id = self._experiment_id
        if experiment_id is None:
            return None
        trace_id = trace_id_or_new(run.trace_id)
        if self.span_sink is not None:
            if not sampled(trace_id, _sampling_ratio()) or not mlflow_provider.is_tracing_enabled():
                return None
            return RecordSpan.open_run(replace(run, trace_id=trace_id), (self.span_sink,))
        return start_sdk_run(run, trace_id, experiment_id)

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
        if self.span_sink is not None:
            trace_id = new_trace_id()
            if self.accepts(trace_id):
                run = RunStart(thread_id, None, user_id, None, runner_type, 0, None, trace_id)
                attributes = dict(metadata) if metadata else None
                self.span_sink.submit(
                    standalone_record(trace_id, name, run, input=input, output=output, attributes=attributes)
                )
            return
        record_sdk_span(name, experiment_id, thread_id, user_id, runner_type, input, output, metadata)

    def flush(self, timeout: float) -> None:
        """Blocking: wait for the OTLP exporter (bounded by ``timeout``), or MLflow's export queue to
        drain (about a second even when nearly empty)."""
        if self.span_sink is not None:
            self.span_sink.flush(timeout)
        else:
            mlflow.flush_trace_async_logging(terminate=False)

    def shutdown(self) -> None:
        """Stop the OTLP exporter after a flush bounded by 10 s. With the SDK path: nothing to
        release (MLflow's exporter is process-wide and flushes itself at exit)."""
        if self.span_sink is not None:
            self.span_sink.shutdown(SHUTDOWN_SECONDS)

    # -- feedback (called from the rating delivery thread; blocking) --------------------------------

    needs_trace = True

    @cached_property
    def _traces(self) -> TracingClient:
        """Trace and assessment calls on this store, independent of :meth:`setup` and the global URI."""
        return TracingClient(self.tracking_uri)

    def deliver_rating(self, rating: Rating) -> None:
        """Record a rating as an assessment; raises TraceNotStored while the trace is not stored yet.

        Thumbs are a ``user-feedback`` feedback (bool, comment as rationale), corrections a
        ``user-correction`` expectation (comment in its metadata), both with source HUMAN and the
        user id. The same (message, user) rating again updates that one assessment in place, so a
        changed mind leaves one valid assessment and adds no row.
        """
        assert rating.trace_id is not None
        trace_id = to_mlflow_trace_id(rating.trace_id)
        info = self._trace_info(trace_id)
        if info is None:
            raise TraceNotStored(trace_id)
        source = AssessmentSource(source_type="HUMAN", source_id=rating.user_id or "anonymous")
        metadata = dict(rating.metadata)
        assessment: Feedback | Expectation
        if rating.kind == "correction":
            if rating.comment:
                metadata["comment"] = rating.comment
            assessment = Expectation(name=rating.name, value=rating.value, source=source, metadata=metadata)
        else:
            assessment = Feedback(
                name=rating.name,
                value=rating.value,
                source=source,
                rationale=rating.comment,
                metadata=metadata,
            )
        earlier = _earlier_assessment(info.assessments or [], rating)
        if earlier is None:
            self._traces.log_assessment(trace_id, assessment)
        elif not _same(earlier, assessment):
            self._traces.update_assessment(trace_id, earlier.assessment_id, assessment)

    def trace_thread(self, trace_id: str) -> str | None:
        """Blocking: the trace's ``ambient.thread_id`` tag ("" without one); None when not stored."""
        info = self._trace_info(to_mlflow_trace_id(trace_id))
        if info is None:
            return None
        return str((info.tags or {}).get("ambient.thread_id") or "")

    def _trace_info(self, trace_id: str) -> Any:
        try:
            return self._traces.get_trace_info(trace_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def latest_trace_id(self, thread_id: str) -> str | None:
        """Blocking: the newest trace of the thread in this experiment (tag ``ambient.thread_id``)."""
        if self._experiment_id is None or "'" in thread_id or "\\" in thread_id:
            return None
        traces = self.client.search_traces(
            locations=[self._experiment_id],
            # Only runs: the thread's Session Metrics traces carry the same tag.
            filter_string=f"tags.`ambient.thread_id` = '{thread_id}' AND trace.name = '{RUN_SPAN_NAME}'",
            order_by=["timestamp_ms DESC"],
            max_results=1,
            include_spans=False,
        )
        return traces[0].info.trace_id.removeprefix(TRACE_ID_PREFIX) if traces else None


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


def _same(earlier: Any, new: Feedback | Expectation) -> bool:
    return bool(
        earlier.value == new.value
        and earlier.rationale == new.rationale
        and (earlier.metadata or {}) == (new.metadata or {})
    )
