"""What a run becomes in Langfuse: the attributes the Langfuse SDK would write, built from records.

Langfuse ingests OTLP/HTTP at ``{host}/api/public/otel/v1/traces`` (Basic auth with the key pair).
:class:`LangfuseMapper` writes the same span attributes as the SDK (observation type, input/output,
metadata, model, usage details, level and status message; on every span the trace-level
``session.id``, ``user.id``, ``langfuse.trace.*``), so the trace looks the same in Langfuse as when
the SDK made it. No SDK import: this runs on the OTLP exporter thread.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any

from ambient_tracing.backends.base import RunStart, SpanKind, TokenUsage
from ambient_tracing.backends.otlp import STATUS_ERROR, STATUS_UNSET, Scope
from ambient_tracing.backends.records import SpanRecord

TRACES_PATH = "/api/public/otel/v1/traces"
SDK_SCOPE = "langfuse-sdk"  # Langfuse reads spans of this scope as its SDK's own
_MAX_PROPAGATED = 200  # Langfuse drops propagated values longer than this (v5: after JSON encoding)
TYPES = {
    SpanKind.RUN: "generation",  # only generation-like observations keep model and usage_details
    SpanKind.TOOL: "span",  # the origin runner's type, which its dashboards filter on
    SpanKind.STEP: "span",
    SpanKind.REASONING: "span",
    SpanKind.SUBAGENT: "agent",
    SpanKind.GENERATION: "generation",
}
GENERATION_LIKE = frozenset({"generation", "embedding"})
# Turn attributes that also become trace tags, as the origin runner tagged its traces.
TAG_ATTRIBUTES = (
    ("ambient.namespace", "namespace"),
    ("gen_ai.request.model", "model"),
    ("ambient.workflow", "workflow"),
)
# Turn attributes that also become trace metadata, under the origin runner's names.
TRACE_METADATA = (
    ("ambient.namespace", "namespace"),
    ("workflow_name", "workflow_name"),
    ("workflow_url", "workflow_url"),
    ("workflow_branch", "workflow_branch"),
    ("workflow_path", "workflow_path"),
)
USAGE_KEYS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("total_tokens", "total"),
    ("reasoning_tokens", "reasoning"),
    ("cache_read_tokens", "cache_read_input_tokens"),
    ("cache_write_tokens", "cache_creation_input_tokens"),
)


def basic_auth(public_key: str, secret_key: str) -> str:
    return "Basic " + base64.b64encode(f"{public_key}:{secret_key}".encode()).decode("ascii")


def fit(value: object) -> str | None:
    """``str(value)`` cut so that even its JSON form (how SDK v5 measures) fits the 200 char limit."""
    if value is None:
        return None
    text = str(value)[:_MAX_PROPAGATED]
    while (excess := len(json.dumps(text, ensure_ascii=False)) - _MAX_PROPAGATED) > 0:
        text = text[:-excess]
    return text


def context(runner_type: str, attributes: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The trace tags (``runner:``, ``namespace:``, ``model:``, ``workflow:`` as the origin runner
    tagged) and the trace metadata (namespace and ``workflow_*``) that a span's attributes give."""
    tags = [f"runner:{runner_type}"]
    tags += [f"{prefix}:{attributes[key]}" for key, prefix in TAG_ATTRIBUTES if attributes.get(key)]
    metadata = {name: fit(attributes[key]) or "" for key, name in TRACE_METADATA if attributes.get(key)}
    return [tag for tag in map(fit, tags) if tag], metadata


def propagated(run: RunStart) -> dict[str, Any]:
    """Trace-level values put on every observation of the run (strings of <= 200 chars)."""
    tags, trace_context = context(run.runner_type, run.attributes or {})
    metadata = {
        **trace_context,
        "runner_type": run.runner_type,
        "turn": run.turn_number,
        "thread_id": run.thread_id,
        "run_id": run.run_id,
        "user_name": run.user_name,
    }
    props = {
        "user_id": fit(run.user_id),
        "session_id": fit(run.thread_id),
        "tags": tags,
        "trace_name": run.name,
        "metadata": {key: fit(value) for key, value in metadata.items() if value is not None},
    }
    return {key: value for key, value in props.items() if value is not None}


def standalone_props(
    name: str, thread_id: str, user_id: str | None, runner_type: str, metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """Trace-level values of a ``record_span`` trace (e.g. Session Metrics)."""
    tags, trace_context = context(runner_type, metadata)
    props = {
        "session_id": fit(thread_id),
        "user_id": fit(user_id),
        "tags": tags,
        "trace_name": name,
        "metadata": {"runner_type": fit(runner_type), "thread_id": fit(thread_id), **trace_context},
    }
    return {key: value for key, value in props.items() if value is not None}


def usage_details(usage: Sequence[TokenUsage]) -> tuple[dict[str, int] | None, list[dict[str, Any]]]:
    """Usage for the span and, with several models, the entries after the first (for metadata)."""
    if not usage:
        return None, []

    def counts(entry: TokenUsage) -> dict[str, int]:
        return {key: value for field, key in USAGE_KEYS if (value := getattr(entry, field)) is not None}

    same_model = len({entry.model for entry in usage}) == 1
    details: dict[str, int] = {}
    for entry in usage if same_model else usage[:1]:
        for key, count in counts(entry).items():
            details[key] = details.get(key, 0) + count
    others = (
        []
        if same_model
        else [{"model": entry.model, "provider": entry.provider, **counts(entry)} for entry in usage[1:]]
    )
    return details or None, others


# Built once: json.dumps with any non-default option builds a new encoder on every call.
_JSON = json.JSONEncoder(default=str)
_COMPACT_JSON = json.JSONEncoder(default=str, separators=(",", ":"), ensure_ascii=False)


def _json(value: Any, encoder: json.JSONEncoder = _JSON) -> str:
    try:
        return encoder.encode(value)
    except (TypeError, ValueError):  # e.g. keys JSON cannot have: the text form rather than nothing
        return encoder.encode(str(value))


def _serialize(value: Any) -> str | None:
    """The SDK's input/output encoding: strings as they are, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return _json(value)


def _metadata_value(value: Any) -> str:
    """The SDK v5 metadata encoding: every value JSON-encoded, strings included."""
    if type(value) is str:
        return encode_basestring(value)  # what json.dumps(value, ensure_ascii=False) returns
    return _json(value, _COMPACT_JSON)


def trace_attributes(props: Mapping[str, Any]) -> dict[str, Any]:
    """Trace-level props as the span attributes ``propagate_attributes`` writes."""
    attributes: dict[str, Any] = {}
    if "user_id" in props:
        attributes["user.id"] = props["user_id"]
    if "session_id" in props:
        attributes["session.id"] = props["session_id"]
    if "trace_name" in props:
        attributes["langfuse.trace.name"] = props["trace_name"]
    if props.get("tags"):
        attributes["langfuse.trace.tags"] = list(props["tags"])
    for key, value in (props.get("metadata") or {}).items():
        attributes[f"langfuse.trace.metadata.{key}"] = _metadata_value(value)
    return attributes


class LangfuseMapper:
    """Records to the span attributes of the Langfuse SDK (v5 encoding)."""

    def __init__(self, *, public_key: str, environment: str | None = None, sdk_version: str = "") -> None:
        self.environment = environment
        self.resource: Mapping[str, Any] = {
            "service.name": "ambient-tracing",
            "telemetry.sdk.language": "python",
            "telemetry.sdk.name": "opentelemetry",
            **({"langfuse.environment": environment} if environment else {}),
        }
        self.scope = Scope(SDK_SCOPE, sdk_version, {"public_key": public_key})
        self.json_as_text = True  # input and output are strings; JSON text stays as it came
        self._trace_cache: tuple[int, dict[str, Any]] | None = None

    def _trace_level(self, record: SpanRecord) -> dict[str, Any]:
        run = record.run
        cached = self._trace_cache
        if cached is not None and cached[0] == id(run) and not record.standalone:
            return cached[1]
        if record.standalone:
            props = standalone_props(
                record.name, run.thread_id or "", run.user_id, run.runner_type, record.attributes or {}
            )
        else:
            props = propagated(run)
        attributes = trace_attributes(props)
        if not record.standalone:
            self._trace_cache = (id(run), attributes)
        return attributes

    def run_attributes(self, record: SpanRecord) -> Mapping[str, Any]:
        """The trace-level attributes ``propagate_attributes`` writes on every span of the trace."""
        return self._trace_level(record)

    def attributes(self, record: SpanRecord) -> dict[str, Any]:
        as_type = TYPES.get(record.kind, "span")
        generation = as_type in GENERATION_LIKE
        attributes: dict[str, Any] = {}
        if self.environment:
            attributes["langfuse.environment"] = self.environment
        attributes["langfuse.observation.type"] = as_type
        if record.is_root:
            attributes["langfuse.internal.is_app_root"] = True
        if record.input is not None:
            attributes["langfuse.observation.input"] = _serialize(record.input)
        if record.output is not None:
            attributes["langfuse.observation.output"] = _serialize(record.output)
        metadata = dict(record.attributes or {})
        metadata.update(record.end_attributes or {})
        usage = record.usage
        details, others = usage_details(usage)
        if others:
            metadata["usage_by_model"] = others
        if generation:
            model = record.model or (usage[0].model if usage else None)
            if model:
                attributes["langfuse.observation.model.name"] = model
            if details:
                attributes["langfuse.observation.usage_details"] = _json(details)
        elif details:
            metadata["usage"] = details  # span-like observations drop usage_details
        if record.error is not None:
            attributes["langfuse.observation.level"] = "ERROR"
            attributes["langfuse.observation.status_message"] = record.error
        for key, value in metadata.items():
            if value is not None:
                attributes[f"langfuse.observation.metadata.{key}"] = _metadata_value(value)
        return attributes

    def status(self, record: SpanRecord) -> tuple[int, str]:
        if record.error is not None:
            return STATUS_ERROR, record.error
        return STATUS_UNSET, ""
