"""What the package says to an MLflow tracking server over HTTP besides OTLP: the trace metadata
that OTLP ingest cannot set, and the question of which version the server runs. Both run off the
event loop (the exporter thread; :meth:`MlflowBackend.setup`'s worker thread), one try each with a
timeout, and send the credentials MLflow's client would (``MLFLOW_TRACKING_TOKEN``, or
``MLFLOW_TRACKING_USERNAME``/``PASSWORD``).
"""

from __future__ import annotations

import base64
import http.client
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from ambient_tracing.backends.mlflow_otlp import TRACE_ID_PREFIX, custom_metadata, fit_session, trace_tags
from ambient_tracing.backends.records import SpanRecord

#: The first version whose OTLP ingest stores a JSON object's or array's text (an attribute that is
#: a string) as the object: 3.6 stored it as a string holding JSON (mlflow/mlflow#18767).
JSON_TEXT_VERSION = (3, 7)


def auth_headers() -> dict[str, str]:
    """The tracking server's credentials from MLflow's environment variables, as its client sends them."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")}
    return {}


def request(
    tracking_uri: str,
    method: str,
    path: str,
    *,
    timeout: float,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP request to the server (no retry): its status and the first 64 KiB of its body."""
    url = urllib.parse.urlsplit(tracking_uri.rstrip("/"))
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    connection = kind(url.hostname or "", url.port, timeout=timeout)
    try:
        connection.request(method, url.path + path, body=body, headers={**auth_headers(), **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read(1 << 16)
    finally:
        connection.close()


def stores_json_text(tracking_uri: str, timeout: float) -> bool:
    """Whether the server (``GET /version``) stores a JSON text attribute as the value it shows
    (:data:`JSON_TEXT_VERSION` and later). False when it cannot tell: structured values are then
    sent, which every version stores alike."""
    try:
        status, body = request(tracking_uri, "GET", "/version", timeout=timeout)
        numbers = body.decode("ascii").strip().split(".")[:2]
        return status == 200 and tuple(int(number) for number in numbers) >= JSON_TEXT_VERSION
    except (OSError, ValueError, http.client.HTTPException):
        return False


class TraceInfoWriter:
    """Trace metadata that OTLP ingest cannot set (the server derives only session and user from
    spans): after a run's root span was exported, one ``StartTraceV3`` call per trace with the info
    MLflow's own client sends (the server merges it): the environment (``mlflow.user``,
    ``mlflow.source.*``, git), the request/response previews (``mlflow.traceInputs``/``Outputs``),
    ``user_name`` and ``workflow_*``. Runs on the exporter thread; one try with a timeout, never retried."""

    PATH = "/api/3.0/mlflow/traces"

    def __init__(self, tracking_uri: str, experiment_id: str, timeout: float) -> None:
        self._tracking_uri = tracking_uri
        self._experiment_id = experiment_id
        self._timeout = timeout
        self._environment: dict[str, str] | None = None

    def __call__(self, batch: Sequence[SpanRecord]) -> None:
        for record in batch:
            if record.is_root:
                self._write(record)

    def environment(self) -> dict[str, str]:
        """What MLflow's tracer resolves once per process (user, source, git), as it does."""
        if self._environment is None:
            try:
                from mlflow.tracing.utils.environment import resolve_env_metadata

                self._environment = {str(k): str(v) for k, v in resolve_env_metadata().items()}
            except Exception:  # an MLflow without it: the rest of the metadata still goes
                self._environment = {}
        return self._environment

    def _write(self, record: SpanRecord) -> None:
        from mlflow.entities import Trace, TraceData, TraceInfo, TraceLocation, TraceState
        from mlflow.protos.service_pb2 import StartTraceV3
        from mlflow.tracing.constant import TraceMetadataKey
        from mlflow.utils.proto_json_utils import message_to_json

        run = record.run
        metadata = {
            **self.environment(),
            TraceMetadataKey.TRACE_SESSION: fit_session(run.thread_id),
            TraceMetadataKey.TRACE_USER: run.user_id,
            "mlflow.trace_schema.version": "3",
            **custom_metadata(record),
            TraceMetadataKey.INPUTS: preview(record.input),
            TraceMetadataKey.OUTPUTS: preview(record.output),
        }
        info = TraceInfo(
            trace_id=TRACE_ID_PREFIX + record.trace_id,
            trace_location=TraceLocation.from_experiment_id(self._experiment_id),
            request_time=record.start_ns // 1_000_000,
            execution_duration=max(0, record.end_ns - record.start_ns) // 1_000_000,
            state=TraceState.ERROR if record.error is not None else TraceState.OK,
            trace_metadata={key: str(value) for key, value in metadata.items() if value is not None},
            # A root under a caller's span: the server does not read its tags from it (see trace_tags).
            tags=trace_tags(record) if record.parent_id is not None else {},
        )
        trace = Trace(info=info, data=TraceData(spans=[]))
        body = message_to_json(StartTraceV3(trace=trace.to_proto()))  # type: ignore[no-untyped-call]
        status, _ = request(
            self._tracking_uri,
            "POST",
            self.PATH,
            timeout=self._timeout,
            body=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        if status >= 300:
            raise RuntimeError(f"HTTP {status} from {self.PATH}")


def preview(value: Any) -> str:
    """A root's inputs or outputs as MLflow's tracer puts them in the trace metadata: its JSON
    attribute form, cut to 250 characters ("" for none)."""
    if value is None:
        return ""
    from mlflow.tracing.constant import MAX_CHARS_IN_TRACE_INFO_METADATA, TRUNCATION_SUFFIX
    from mlflow.tracing.utils import dump_span_attribute_value

    text = dump_span_attribute_value(value)
    if len(text) > MAX_CHARS_IN_TRACE_INFO_METADATA:
        text = text[: MAX_CHARS_IN_TRACE_INFO_METADATA - len(TRUNCATION_SUFFIX)] + TRUNCATION_SUFFIX
    return text
