"""What a run becomes in any OpenTelemetry backend: GenAI semantic conventions, plus OpenInference.

:class:`OtelMapper` writes the OpenTelemetry GenAI attributes (``gen_ai.operation.name``
``invoke_agent`` / ``execute_tool``, ``gen_ai.conversation.id``, ``gen_ai.usage.*``,
``gen_ai.request.model`` / ``gen_ai.response.model``, ``gen_ai.tool.*``), the OpenInference ones
that Arize Phoenix displays (``openinference.span.kind``, ``input.value`` / ``output.value``,
``session.id``, ``user.id``, ``llm.model_name``, ``llm.token_count.*``, ``tool.name``), the run's
``ambient.*`` facts on the root, and every attribute the tracer gave the span. Values are only
strings, numbers, booleans or lists of strings (anything else as JSON text), so the same mapping
serves OTLP export and an app's own OpenTelemetry SDK ``TracerProvider``. No SDK import: this runs
on an exporter thread.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ambient_tracing.backends.base import SpanKind, TokenUsage
from ambient_tracing.backends.mlflow_otlp import GEN_AI_USAGE, SPAN_TYPES
from ambient_tracing.backends.otlp import NO_ATTRIBUTES, STATUS_ERROR, STATUS_UNSET, Scope
from ambient_tracing.backends.records import SpanRecord

TRACES_PATH = "/v1/traces"
DEFAULT_SERVICE_NAME = "ambient-tracing"
SCOPE_NAME = "ambient_tracing"
#: OpenInference span kinds (what Phoenix shows and filters on): the same as MLflow's span types.
SPAN_KINDS = SPAN_TYPES
#: GenAI operation of spans whose tracer attributes do not name one.
OPERATIONS = {SpanKind.SUBAGENT: "invoke_agent", SpanKind.REASONING: "chat", SpanKind.GENERATION: "chat"}
# TokenUsage field -> OpenInference's token counts (Phoenix sums these into a trace's tokens).
_OPENINFERENCE_USAGE = (
    ("input_tokens", "llm.token_count.prompt"),
    ("output_tokens", "llm.token_count.completion"),
    ("total_tokens", "llm.token_count.total"),
    ("cache_read_tokens", "llm.token_count.prompt_details.cache_read"),
    ("cache_write_tokens", "llm.token_count.prompt_details.cache_write"),
)
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)
_INT64 = 1 << 63


def to_json(value: Any) -> str:
    """``value`` as JSON text (its ``str`` when JSON cannot hold it)."""
    try:
        return _JSON.encode(value)
    except (TypeError, ValueError):
        return _JSON.encode(str(value))


def plain(value: Any) -> Any:
    """A value an OpenTelemetry attribute can hold: str, bool, int, float or a list of strings;
    anything else (mappings, mixed lists, None inside a list) as JSON text."""
    if isinstance(value, str | bool | float):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else str(value)
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return list(value)
    return to_json(value)


def _text(value: Any) -> tuple[str, str]:
    """``(text, mime type)`` of a value: strings as they are (e.g. a tool's text result, arguments
    that were not JSON), anything else as JSON."""
    if isinstance(value, str):
        return value, "text/plain"
    return to_json(value), "application/json"


def usage_attributes(model: str | None, usage: Sequence[TokenUsage]) -> dict[str, Any]:
    """Model and token counts (summed over models) as GenAI and OpenInference attributes."""
    attributes: dict[str, Any] = {}
    model = model or (usage[0].model if usage else None)
    if model:
        attributes["gen_ai.request.model"] = attributes["gen_ai.response.model"] = model
        attributes["llm.model_name"] = model
    for field, gen_ai_key in GEN_AI_USAGE:
        counts = [count for entry in usage if (count := getattr(entry, field)) is not None]
        if counts:
            attributes[gen_ai_key] = sum(counts)
    for field, key in _OPENINFERENCE_USAGE:
        counts = [count for entry in usage if (count := getattr(entry, field)) is not None]
        if counts:
            attributes[key] = sum(counts)
    if "llm.token_count.total" not in attributes and "llm.token_count.prompt" in attributes:
        attributes["llm.token_count.total"] = attributes["llm.token_count.prompt"] + attributes.get(
            "llm.token_count.completion", 0
        )
    providers = {entry.provider for entry in usage if entry.provider}
    if len(providers) == 1:
        attributes["gen_ai.provider.name"] = attributes["llm.provider"] = providers.pop()
    return attributes


def run_attributes(record: SpanRecord) -> dict[str, Any]:
    """The root's trace-level facts: the run's ``ambient.*`` (thread, run, turn, user, runner)."""
    run = record.run
    facts: dict[str, Any] = {
        "ambient.runner_type": run.runner_type,
        "ambient.thread_id": run.thread_id,
        "ambient.user_id": run.user_id,
    }
    if not record.standalone:
        facts.update(
            {
                "ambient.run_id": run.run_id,
                "ambient.turn": run.turn_number,
                "ambient.user_name": run.user_name,
            }
        )
    return {key: value for key, value in facts.items() if value is not None}


class OtelMapper:
    """Records to OpenTelemetry GenAI (and OpenInference) span attributes."""

    def __init__(
        self,
        *,
        service_name: str | None = None,
        resource_attributes: Mapping[str, str] | None = None,
        version: str = "",
    ) -> None:
        self.resource: Mapping[str, Any] = {
            **(resource_attributes or {}),
            "service.name": service_name or DEFAULT_SERVICE_NAME,
            "telemetry.sdk.language": "python",
            "telemetry.sdk.name": "ambient-tracing",
            "telemetry.sdk.version": version,
        }
        self.scope = Scope(SCOPE_NAME, version)
        self.json_as_text = False  # decoded: a payload's mime type says whether it is JSON

    def run_attributes(self, record: SpanRecord) -> Mapping[str, Any]:
        return NO_ATTRIBUTES

    def attributes(self, record: SpanRecord) -> dict[str, Any]:
        """Long because it is one table: GenAI, OpenInference and the package's own attributes."""
        run = record.run
        attributes: dict[str, Any] = {
            "openinference.span.kind": "CHAIN" if record.standalone else SPAN_KINDS.get(record.kind, "CHAIN")
        }
        if not record.standalone and record.kind in OPERATIONS:
            attributes["gen_ai.operation.name"] = OPERATIONS[record.kind]
        if run.thread_id:
            attributes["session.id"] = run.thread_id
            attributes["gen_ai.conversation.id"] = run.thread_id
        if run.user_id:
            attributes["user.id"] = run.user_id
        if record.is_root:
            attributes.update(run_attributes(record))
        for source in (record.attributes, record.end_attributes):
            for key, value in (source or {}).items():
                if value is not None:
                    attributes[key] = plain(value)
        if record.kind is SpanKind.TOOL and not record.standalone:
            self._tool(record, attributes)
        if record.input is not None:
            attributes["input.value"], attributes["input.mime_type"] = _text(record.input)
        if record.output is not None:
            attributes["output.value"], attributes["output.mime_type"] = _text(record.output)
        attributes.update(usage_attributes(record.model, record.usage))
        if record.error is not None:
            attributes.setdefault("error.type", "_OTHER")
        return attributes

    @staticmethod
    def _tool(record: SpanRecord, attributes: dict[str, Any]) -> None:
        name = attributes.get("gen_ai.tool.name")
        if isinstance(name, str):
            attributes["tool.name"] = name
        attributes.setdefault("gen_ai.tool.type", "function")
        if record.input is not None:
            attributes["gen_ai.tool.call.arguments"] = _text(record.input)[0]
        if record.output is not None:
            attributes["gen_ai.tool.call.result"] = _text(record.output)[0]

    def status(self, record: SpanRecord) -> tuple[int, str]:
        if record.error is not None:
            return STATUS_ERROR, record.error
        return STATUS_UNSET, ""
