"""What a run becomes in MLflow: the span attributes MLflow's SDK would write, built from records.

An MLflow tracking server (3.6 and later) ingests OTLP/HTTP at ``{uri}/v1/traces`` (header
``x-mlflow-experiment-id``) and builds the trace from the spans: span type, inputs and outputs
from ``mlflow.spanType`` / ``mlflow.spanInputs`` / ``mlflow.spanOutputs``, token usage summed from
``mlflow.chat.tokenUsage``, trace tags from the root's ``mlflow.traceTag.<key>`` attributes, the
session from ``session.id`` and the user from ``user.id``. :class:`MlflowMapper` writes those; the
rest of the trace metadata (previews, environment, ``user_name``, ``workflow_*``) follows in one
``StartTraceV3`` call per trace (backends/mlflow_server.py), so the trace looks as when the SDK made it
(the root span has ``session.id``/``user.id`` attributes besides). No SDK import: this runs on the
OTLP exporter thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ambient_tracing.backends.base import SpanKind, TokenUsage
from ambient_tracing.backends.otlp import NO_ATTRIBUTES, NULL, STATUS_ERROR, STATUS_OK, Scope
from ambient_tracing.backends.records import SpanRecord

TRACES_PATH = "/v1/traces"
#: MLflow's limit on a session id (trace metadata): the server refuses the whole trace past it.
MAX_SESSION_CHARS = 250
CONVERSATION = "gen_ai.conversation.id"
EXPERIMENT_HEADER = "x-mlflow-experiment-id"
TRACE_ID_PREFIX = "tr-"
TAG_PREFIX = "mlflow.traceTag."
SPAN_TYPES = {
    SpanKind.RUN: "AGENT",
    SpanKind.TOOL: "TOOL",
    SpanKind.STEP: "CHAIN",
    SpanKind.REASONING: "LLM",
    SpanKind.SUBAGENT: "AGENT",
    SpanKind.GENERATION: "LLM",
}
# TokenUsage field -> key of MLflow's ``mlflow.chat.tokenUsage`` (summed into the trace's token usage).
MLFLOW_USAGE = (
    ("input_tokens", "input_tokens"),
    ("output_tokens", "output_tokens"),
    ("total_tokens", "total_tokens"),
    ("cache_read_tokens", "cache_read_input_tokens"),
    ("cache_write_tokens", "cache_creation_input_tokens"),
)
GEN_AI_USAGE = (
    ("input_tokens", "gen_ai.usage.input_tokens"),
    ("output_tokens", "gen_ai.usage.output_tokens"),
    ("reasoning_tokens", "gen_ai.usage.reasoning_tokens"),
    ("cache_read_tokens", "gen_ai.usage.cache_read.input_tokens"),
    ("cache_write_tokens", "gen_ai.usage.cache_creation.input_tokens"),
)


_CONTEXT_TAGS = ("ambient.namespace", "ambient.workflow")
_CONTEXT_METADATA = ("workflow_name", "workflow_url", "workflow_branch", "workflow_path")


def context_tags(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Namespace and workflow name as trace tags, to filter runs by them."""
    return {key: str(attributes[key]) for key in _CONTEXT_TAGS if attributes.get(key)}


def context_metadata(attributes: Mapping[str, Any]) -> dict[str, str]:
    """The origin runner's ``workflow_*`` keys as trace metadata."""
    return {key: str(attributes[key]) for key in _CONTEXT_METADATA if attributes.get(key)}


def custom_metadata(record: SpanRecord) -> dict[str, str]:
    """A root's trace metadata beyond session, user and previews: workflow_* and user_name."""
    metadata = context_metadata(record.attributes or {})
    if not record.standalone and record.run.user_name:
        metadata["user_name"] = record.run.user_name
    return metadata


def present(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def usage_attributes(usage: Sequence[TokenUsage]) -> dict[str, Any]:
    """``mlflow.chat.tokenUsage`` (summed over models, feeds the trace's token usage) and gen_ai.usage.*."""

    def total(field: str) -> int | None:
        counts = [value for entry in usage if (value := getattr(entry, field)) is not None]
        return sum(counts) if counts else None

    chat_usage = {key: value for field, key in MLFLOW_USAGE if (value := total(field)) is not None}
    if "total_tokens" not in chat_usage and {"input_tokens", "output_tokens"} <= chat_usage.keys():
        chat_usage["total_tokens"] = chat_usage["input_tokens"] + chat_usage["output_tokens"]
    attributes: dict[str, Any] = {
        key: value for field, key in GEN_AI_USAGE if (value := total(field)) is not None
    }
    if chat_usage:
        attributes["mlflow.chat.tokenUsage"] = chat_usage
    providers = {entry.provider for entry in usage if entry.provider}
    if len(providers) == 1:
        attributes["mlflow.llm.provider"] = attributes["gen_ai.provider.name"] = providers.pop()
    return attributes


def end_attributes(model: str | None, usage: Sequence[TokenUsage]) -> dict[str, Any]:
    """What ``end`` adds for the model and token usage (the same on both MLflow paths)."""
    extra: dict[str, Any] = {}
    model = model or (usage[0].model if usage else None)
    if model:
        extra["mlflow.llm.model"] = model
        extra["llm.model_name"] = model
        extra["gen_ai.request.model"] = model
    if usage:
        extra.update(usage_attributes(usage))
    return extra


class MlflowMapper:
    """Records to MLflow span attributes; the root carries the trace's tags."""

    def __init__(self, experiment_id: str, *, json_as_text: bool = False) -> None:
        self.experiment_id = experiment_id
        self.resource: Mapping[str, Any] = {}  # a service.name would become a trace tag
        self.scope = Scope("ambient_tracing")
        #: Whether a tool payload that came as JSON text may go as that text: for a server that
        #: stores it as the value it shows (backends/mlflow_server.py); it saves encoding it here.
        self.json_as_text = json_as_text

    def run_attributes(self, record: SpanRecord) -> Mapping[str, Any]:
        return NO_ATTRIBUTES

    def attributes(self, record: SpanRecord) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        if record.is_root:
            attributes.update(self._trace_level(record))
            attributes["mlflow.experimentId"] = self.experiment_id
        attributes.update(fit_conversation(record.attributes or {}))
        attributes["mlflow.traceRequestId"] = TRACE_ID_PREFIX + record.trace_id
        span_type = SPAN_TYPES.get(record.kind, "UNKNOWN")
        attributes["mlflow.spanType"] = span_type
        attributes["mlflow.spanLogLevel"] = 10 if span_type == "CHAIN" else 20  # as MLflow 3.17 sets it
        if record.input is not None:
            attributes["mlflow.spanInputs"] = record.input
        elif record.input_set:
            attributes["mlflow.spanInputs"] = NULL  # as the SDK's set_inputs(None) stores it
        if record.output is not None:
            attributes["mlflow.spanOutputs"] = record.output
        attributes.update(record.end_attributes or {})
        attributes.update(end_attributes(record.model, record.usage))
        return attributes

    def status(self, record: SpanRecord) -> tuple[int, str]:
        if record.error is not None:
            return STATUS_ERROR, record.error
        return STATUS_OK, ""

    @staticmethod
    def _trace_level(record: SpanRecord) -> dict[str, Any]:
        """Root span: the run's attributes, the trace tags, session and user."""
        run = record.run
        attributes: dict[str, Any] = {
            "ambient.runner_type": run.runner_type,
            "ambient.session_id": run.thread_id,
            "ambient.user_id": run.user_id,
        }
        if not record.standalone:
            attributes["ambient.user_name"] = run.user_name
            attributes["ambient.turn"] = run.turn_number
        # Session and user as OTLP ingest reads them, so the trace has them from its first moment
        # (the rest of its metadata follows in one StartTraceV3 call).
        attributes["session.id"] = fit_session(run.thread_id) or None
        attributes["user.id"] = run.user_id
        for key, value in trace_tags(record).items():
            attributes[TAG_PREFIX + key] = value
        return present(attributes)


def trace_tags(record: SpanRecord) -> dict[str, str]:
    """The trace tags of a root record (the origin runner's, and ``mlflow.traceName``). The server
    reads them from a root span's ``mlflow.traceTag.<key>`` attributes, but only from a span without
    a parent: a run that joined a caller's trace sends them in its StartTraceV3 call too."""
    run = record.run
    tags: dict[str, Any] = {"ambient.thread_id": run.thread_id}
    if record.standalone:
        source = (record.attributes or {}).get("source")
        tags["ambient.source"] = source if isinstance(source, str) else None
    else:
        tags["ambient.run_id"] = run.run_id
    tags["ambient.session_id"] = run.thread_id  # the origin runner's trace tags
    tags["ambient.user_id"] = run.user_id
    tags.update(context_tags(record.attributes or {}))
    tags["mlflow.traceName"] = record.name
    return {key: value for key, value in tags.items() if value is not None}


def fit_session(thread_id: str | None) -> str | None:
    """The thread as MLflow's session id, cut to its limit; the ``ambient.thread_id`` tag keeps the
    id whole (ownership of ratings is read from the tag)."""
    return thread_id[:MAX_SESSION_CHARS] if thread_id else thread_id


def fit_conversation(attributes: Mapping[str, Any]) -> Mapping[str, Any]:
    """``gen_ai.conversation.id`` cut as :func:`fit_session`: MLflow reads the session from it too."""
    conversation = attributes.get(CONVERSATION)
    if not isinstance(conversation, str) or len(conversation) <= MAX_SESSION_CHARS:
        return attributes
    return {**attributes, CONVERSATION: fit_session(conversation)}
