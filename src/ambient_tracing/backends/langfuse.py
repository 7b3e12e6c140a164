"""Langfuse backend: one ``llm_interaction`` trace per turn, its children as typed observations.

Spans are made with ``start_observation`` and never become the current span, so they may stay open
across ``yield`` and tasks. Works with langfuse 4.x and 5.x (same observation API). Nothing here does
network I/O: the SDK exports from its own threads; only ``flush``/``shutdown`` wait for it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

try:
    from langfuse import Langfuse, propagate_attributes
    from langfuse.types import TraceContext
    from opentelemetry import trace as otel_trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the Langfuse backend needs the langfuse SDK: pip install 'ambient-tracing[langfuse]'"
    ) from exc

from ..ids import sampled
from ..ratings import Rating
from .base import Span, SpanKind, TokenUsage, TurnStart
from .langfuse_scores import ScoreApi

logger = logging.getLogger("ambient_tracing")

ROOT_NAME = "llm_interaction"
_MAX_PROPAGATED = 200  # Langfuse drops propagated values longer than this (v5: after JSON encoding)
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_TYPES = {
    SpanKind.TURN: "agent",
    SpanKind.TOOL: "span",  # the origin runner's type, which its dashboards filter on
    SpanKind.STEP: "span",
    SpanKind.REASONING: "span",
    SpanKind.SUBAGENT: "agent",
    SpanKind.GENERATION: "generation",
}
_GENERATION_LIKE = frozenset({"generation", "embedding"})  # only these keep model/usage_details
# Turn attributes that also become trace tags, as the origin runner tagged its traces.
_TAG_ATTRIBUTES = (
    ("ambient.namespace", "namespace"),
    ("gen_ai.request.model", "model"),
    ("ambient.workflow", "workflow"),
)
# Turn attributes that also become trace metadata, under the origin runner's names.
_TRACE_METADATA = (
    ("ambient.namespace", "namespace"),
    ("workflow_name", "workflow_name"),
    ("workflow_url", "workflow_url"),
    ("workflow_branch", "workflow_branch"),
    ("workflow_path", "workflow_path"),
)
_USAGE_KEYS = (
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("total_tokens", "total"),
    ("reasoning_tokens", "reasoning"),
    ("cache_read_tokens", "cache_read_input_tokens"),
    ("cache_write_tokens", "cache_creation_input_tokens"),
)


class LangfuseBackend:
    """Traces turns to Langfuse.

    The root observation is a ``generation``: only generation-like observations keep ``model`` and
    ``usage_details`` (an ``agent`` drops them), and Langfuse prices a trace from them.

    Unless ``client`` is given, the backend builds its own ``Langfuse`` client on its own OpenTelemetry
    ``TracerProvider`` (sampler from ``sample_rate``, global provider untouched), and replaces any
    SDK resources cached for the same public key: the SDK keeps one exporter per public key per
    process, so a second client with the same key but another host would export to the first host.
    ``client_options`` are passed to ``Langfuse()`` (e.g. ``flush_at``, ``flush_interval``, ``timeout``).
    """

    name = "langfuse"
    defer_spans = True  # each span call costs ~0.1-0.2 ms of CPU: keep it off the event loop

    def __init__(
        self,
        *,
        public_key: str | None = None,
        secret_key: str | None = None,
        host: str | None = None,
        sample_rate: float | None = None,
        flush_timeout: float = 30.0,
        environment: str | None = None,
        client: Langfuse | None = None,
        **client_options: Any,
    ) -> None:
        self._flush_timeout = flush_timeout
        self._provider: TracerProvider | None = None
        self._closed = False
        self._sample_rate = 1.0  # with an app's own client: its sampler is unknown, trust start_turn
        if client is None:
            rate = 1.0 if sample_rate is None else sample_rate
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"sample_rate must be between 0.0 and 1.0, got {rate}")
            self._sample_rate = rate
            self._provider = TracerProvider(
                sampler=TraceIdRatioBased(rate) if rate < 1.0 else ALWAYS_ON,
                resource=Resource.create({"langfuse.environment": environment} if environment else {}),
                shutdown_on_exit=False,  # the SDK's own exit hook flushes it; ours must not block exit twice
            )
            _forget_cached_resources(public_key)
            try:
                client = Langfuse(
                    public_key=public_key,
                    secret_key=secret_key,
                    base_url=host,
                    sample_rate=rate,
                    environment=environment,
                    tracer_provider=self._provider,
                    **client_options,
                )
            except BaseException:
                self._provider.shutdown()
                _forget_cached_resources(public_key)
                raise
        self._client = client
        resources = getattr(client, "_resources", None)
        self._scores = ScoreApi(
            base_url=host or getattr(resources, "base_url", None) or "",
            public_key=public_key or getattr(resources, "public_key", None) or "",
            secret_key=secret_key or getattr(resources, "secret_key", None) or "",
            environment=environment,
        )

    @property
    def client(self) -> Langfuse:
        """The SDK client, e.g. for ``create_score`` (scores go out on the SDK's own thread)."""
        return self._client

    def setup(self) -> None:
        """Nothing to prepare: the client connects lazily from its export threads."""

    def accepts(self, trace_id: str) -> bool:
        """Event loop, no SDK call: whether the sampler (ratio by trace id) keeps this run."""
        return not self._closed and sampled(trace_id, self._sample_rate)

    def start_turn(self, turn: TurnStart) -> Span | None:
        """Open the turn's root under ``turn.trace_id``; None when the SDK does not record it (sampled
        out, disabled). The package runs it on its span worker thread."""
        try:
            props = _propagated(turn)
            context: TraceContext | None = None
            if turn.trace_id:
                if _TRACE_ID.match(turn.trace_id.lower()):
                    context = TraceContext(trace_id=turn.trace_id.lower())
                else:
                    logger.warning("ambient-tracing: ignoring invalid trace id %r", turn.trace_id)
            with _scope(props):
                obs = self._client.start_observation(
                    name=ROOT_NAME,
                    as_type="generation",
                    input=turn.input,
                    trace_context=context,
                    metadata=dict(turn.attributes) if turn.attributes else None,
                )
            otel_span = getattr(obs, "_otel_span", None)
            if otel_span is not None and not otel_span.is_recording():
                return None
            return _LangfuseSpan(obs, props, ROOT_NAME, "generation", obs.trace_id)
        except Exception:
            logger.warning("ambient-tracing: Langfuse could not start a turn", exc_info=True)
            return None

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
        """A finished ``span`` observation as its own trace named ``name`` in the thread's session."""
        tags, context = _context(runner_type, metadata or {})
        props = {
            "session_id": _fit(thread_id),
            "user_id": _fit(user_id),
            "tags": tags,
            "trace_name": name,
            "metadata": {"runner_type": _fit(runner_type), "thread_id": _fit(thread_id), **context},
        }
        try:
            with _scope({key: value for key, value in props.items() if value is not None}):
                obs = self._client.start_observation(
                    name=name,
                    as_type="span",
                    input=input,
                    output=output,
                    metadata=dict(metadata or {}) or None,
                )
            obs.end()
        except Exception:
            logger.warning("ambient-tracing: Langfuse could not record span %r", name, exc_info=True)

    needs_trace = False  # a rating without a trace becomes a session score

    def deliver_rating(self, rating: Rating) -> None:
        """Blocking: store the rating as a score (see :mod:`.langfuse_scores`); raises to be retried."""
        self._scores.post(rating)

    def flush(self, timeout: float) -> None:
        """Export what is pending, waiting at most ``timeout`` seconds."""
        _bounded(self._client.flush, timeout, "flush")

    def shutdown(self) -> None:
        """Flush and stop the SDK's threads (bounded by ``flush_timeout``); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        resources = getattr(self._client, "_resources", None)

        def close() -> None:
            self._client.shutdown()
            if self._provider is not None:
                self._provider.shutdown()
                _forget_cached_resources(getattr(resources, "public_key", None), only=resources)

        _bounded(close, self._flush_timeout, "shutdown")


class _LangfuseSpan:
    """One open observation (None: a child the SDK failed to make). Never raises; warns once."""

    def __init__(self, obs: Any, props: Mapping[str, Any], name: str, as_type: str, trace_id: str) -> None:
        self._obs = obs
        self._props = props
        self._name = name
        self._generation = as_type in _GENERATION_LIKE
        self._ended = obs is None
        self._warned = False
        self._trace_id = trace_id

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
        as_type = _TYPES.get(kind, "span")
        obs = None
        if self._obs is not None:
            try:
                with _scope(self._props):
                    obs = self._obs.start_observation(
                        name=name, as_type=as_type, input=input, metadata=dict(attributes or {}) or None
                    )
                if start_time_ns is not None:
                    _backdate(obs, start_time_ns)
            except Exception:
                self._warn(f"start child {name!r} of")
        return _LangfuseSpan(obs, self._props, name, as_type, self._trace_id)

    def set_input(self, input: Any) -> None:
        if not self._ended:
            try:
                self._obs.update(input=input)
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
        try:
            metadata = dict(attributes or {})
            details, others = _usage_details(usage)
            if others:
                metadata["usage_by_model"] = others
            update: dict[str, Any] = {"output": output}
            if self._generation:
                update.update(model=model or (usage[0].model if usage else None), usage_details=details)
            elif details:
                metadata["usage"] = details  # span-like observations drop usage_details
            if error is not None:
                update.update(level="ERROR", status_message=error)
            update["metadata"] = metadata or None
            self._obs.update(**{key: value for key, value in update.items() if value is not None})
        except Exception:
            self._warn("record the end of")
        try:
            self._obs.end(end_time=end_time_ns)
        except Exception:
            self._warn("end")

    def _warn(self, what: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("ambient-tracing: Langfuse could not %s span %r", what, self._name, exc_info=True)


def _backdate(obs: Any, start_time_ns: int) -> None:
    """Set when a deferred child really started. The SDK's ``start_observation`` takes no start time,
    so this sets the OpenTelemetry SDK span's own field (stable across OpenTelemetry SDK releases)."""
    otel_span = getattr(obs, "_otel_span", None)
    if otel_span is not None and hasattr(otel_span, "_start_time"):
        otel_span._start_time = start_time_ns


@contextmanager
def _scope(props: Mapping[str, Any]) -> Iterator[None]:
    # INVALID_SPAN as the current span for the call: a root never joins the app's own trace, and
    # propagate_attributes does not stamp our attributes on whatever span happens to be current.
    # Both are entered and left within this synchronous call, so no context leaks across tasks.
    with otel_trace.use_span(otel_trace.INVALID_SPAN), propagate_attributes(**props):
        yield


def _propagated(turn: TurnStart) -> dict[str, Any]:
    """Trace-level attributes put on every observation of the turn (strings of <= 200 chars)."""
    tags, context = _context(turn.runner_type, turn.attributes or {})
    metadata = {
        **context,
        "runner_type": turn.runner_type,
        "turn": turn.turn_number,
        "thread_id": turn.thread_id,
        "run_id": turn.run_id,
        "user_name": turn.user_name,
    }
    props = {
        "user_id": _fit(turn.user_id),
        "session_id": _fit(turn.thread_id),
        "tags": tags,
        "trace_name": ROOT_NAME,
        "metadata": {key: _fit(value) for key, value in metadata.items() if value is not None},
    }
    return {key: value for key, value in props.items() if value is not None}


def _context(runner_type: str, attributes: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The trace tags (``runner:``, ``namespace:``, ``model:``, ``workflow:`` as the origin runner
    tagged) and the trace metadata (namespace and ``workflow_*``) that a span's attributes give."""
    tags = [f"runner:{runner_type}"]
    tags += [f"{prefix}:{attributes[key]}" for key, prefix in _TAG_ATTRIBUTES if attributes.get(key)]
    metadata = {name: _fit(attributes[key]) or "" for key, name in _TRACE_METADATA if attributes.get(key)}
    return [tag for tag in map(_fit, tags) if tag], metadata


def _fit(value: object) -> str | None:
    """``str(value)`` cut so that even its JSON form (how SDK v5 measures) fits the 200 char limit."""
    if value is None:
        return None
    text = str(value)[:_MAX_PROPAGATED]
    while (excess := len(json.dumps(text, ensure_ascii=False)) - _MAX_PROPAGATED) > 0:
        text = text[:-excess]
    return text


def _usage_details(usage: Sequence[TokenUsage]) -> tuple[dict[str, int] | None, list[dict[str, Any]]]:
    """Usage for the span and, with several models, the entries after the first (for metadata)."""

    def counts(entry: TokenUsage) -> dict[str, int]:
        return {key: value for field, key in _USAGE_KEYS if (value := getattr(entry, field)) is not None}

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


def _forget_cached_resources(public_key: str | None, only: object = None) -> None:
    """Drop the SDK's per-public-key resource cache entry (private SDK state, same in 4.x and 5.x)."""
    if not public_key:
        return
    try:
        from langfuse._client.resource_manager import LangfuseResourceManager

        with LangfuseResourceManager._lock:
            if only is None or LangfuseResourceManager._instances.get(public_key) is only:
                LangfuseResourceManager._instances.pop(public_key, None)
    except Exception:  # pragma: no cover - an SDK without this cache
        logger.debug("ambient-tracing: no Langfuse resource cache to reset", exc_info=True)


def _bounded(action: Callable[[], None], timeout: float, what: str) -> None:
    """Run a blocking SDK call on a daemon thread and wait at most ``timeout`` s; never raises."""

    def run() -> None:
        try:
            action()
        except Exception:
            logger.warning("ambient-tracing: Langfuse %s failed", what, exc_info=True)

    worker = threading.Thread(target=run, name=f"ambient-tracing-langfuse-{what}", daemon=True)
    worker.start()
    worker.join(max(timeout, 0.0))
    if worker.is_alive():
        logger.warning("ambient-tracing: Langfuse %s did not finish within %.1f s", what, timeout)
