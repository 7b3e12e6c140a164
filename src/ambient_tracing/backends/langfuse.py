"""Langfuse backend: one ``llm_interaction`` trace per run, its children as typed observations.

Spans are made with ``start_observation`` and never become the current span, so they may stay open
across ``yield`` and tasks. Works with langfuse 4.x and 5.x (same observation API). Nothing here does
network I/O: the SDK exports from its own threads; only ``flush``/``shutdown`` wait for it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
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

from ambient_tracing.backends.base import RUN_SPAN_NAME, RunStart, Span, SpanKind, TokenUsage
from ambient_tracing.backends.langfuse_otlp import (
    GENERATION_LIKE,
    TRACES_PATH,
    TYPES,
    LangfuseMapper,
    basic_auth,
    fit,
    propagated,
    standalone_props,
    usage_details,
)
from ambient_tracing.backends.langfuse_scores import ScoreApi
from ambient_tracing.backends.otlp import DEFAULT_TIMEOUT, OtlpExporter
from ambient_tracing.backends.rating import Rating
from ambient_tracing.backends.record_queue import DEFAULT_BATCH_SIZE, DEFAULT_INTERVAL, DEFAULT_MAX_QUEUE
from ambient_tracing.backends.records import RecordSpan, standalone_record
from ambient_tracing.failures import first_time
from ambient_tracing.ids import new_trace_id, sampled, trace_id_or_new

logger = logging.getLogger(__name__)

DEFAULT_HOST = "https://cloud.langfuse.com"
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
try:
    _SDK_VERSION = version("langfuse")
except PackageNotFoundError:  # pragma: no cover - the import above succeeded
    _SDK_VERSION = ""


class LangfuseBackend:
    """Traces turns to Langfuse.

    The root observation is a ``generation``: only generation-like observations keep ``model`` and
    ``usage_details`` (an ``agent`` drops them), and Langfuse prices a trace from them.

    Unless ``client`` is given, spans are the package's own records (see records.py), sent by OTLP to
    ``{host}/api/public/otel/v1/traces`` with the attributes the SDK would write (langfuse_otlp.py)
    from one exporter thread (otlp.py): ~50x less CPU per span than the SDK. ``client_options``
    ``flush_at``, ``flush_interval`` and ``timeout`` tune that exporter (and ``max_queue``: spans held
    while the host is slow or down, oldest dropped beyond it); all but ``max_queue`` also go to the
    ``Langfuse()`` client that :attr:`client` builds on first use (e.g. for ``create_score``), on its
    own OpenTelemetry ``TracerProvider`` (global provider untouched; SDK resources cached for the same
    public key replaced: the SDK keeps one exporter per public key per process).

    With an app's own ``client``, spans are made with that SDK client (on the span worker thread).
    """

    name = "langfuse"

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
        """Long because it is the constructor: each step is one setting of the client or exporter."""
        self._flush_timeout = flush_timeout
        self._provider: TracerProvider | None = None
        self._closed = False
        self._sample_rate = 1.0  # with an app's own client: its sampler is unknown, trust start_run
        self._environment = environment or os.environ.get("LANGFUSE_TRACING_ENVIRONMENT") or None
        max_queue = int(client_options.pop("max_queue", DEFAULT_MAX_QUEUE))  # ours, not the SDK's
        self._client_options = client_options
        self._client_lock = threading.Lock()
        #: Where ended spans go (records.py); None when an SDK client makes them.
        self.span_sink: OtlpExporter | None = None
        if client is None:
            rate = 1.0 if sample_rate is None else sample_rate
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"sample_rate must be between 0.0 and 1.0, got {rate}")
            self._sample_rate = rate
            public_key = public_key or os.environ.get("LANGFUSE_PUBLIC_KEY") or ""
            secret_key = secret_key or os.environ.get("LANGFUSE_SECRET_KEY") or ""
            host = (
                host or os.environ.get("LANGFUSE_BASE_URL") or os.environ.get("LANGFUSE_HOST") or DEFAULT_HOST
            ).rstrip("/")
            self.span_sink = OtlpExporter(
                "langfuse",
                host + TRACES_PATH,
                LangfuseMapper(
                    public_key=public_key, environment=self._environment, sdk_version=_SDK_VERSION
                ),
                headers={
                    "Authorization": basic_auth(public_key, secret_key),
                    "x-langfuse-public-key": public_key,
                    "x-langfuse-sdk-name": "python",
                    "x-langfuse-sdk-version": _SDK_VERSION,
                },
                # The SDK's own settings and environment variables (an invalid one raises, as there).
                batch_size=int(_option(client_options, "flush_at", "LANGFUSE_FLUSH_AT", DEFAULT_BATCH_SIZE)),
                interval=float(
                    _option(client_options, "flush_interval", "LANGFUSE_FLUSH_INTERVAL", DEFAULT_INTERVAL)
                ),
                timeout=float(_option(client_options, "timeout", "LANGFUSE_TIMEOUT", DEFAULT_TIMEOUT)),
                max_queue=max_queue,
            )
        self._public_key, self._secret_key, self._host = public_key, secret_key, host
        self._client: Langfuse | None = client
        resources = getattr(client, "_resources", None)
        self._scores = ScoreApi(
            base_url=host or getattr(resources, "base_url", None) or "",
            public_key=public_key or getattr(resources, "public_key", None) or "",
            secret_key=secret_key or getattr(resources, "secret_key", None) or "",
            environment=environment,
        )

    @property
    def client(self) -> Langfuse:
        """The SDK client, e.g. for ``create_score`` (built on first use; scores go out on its thread)."""
        with self._client_lock:
            if self._client is None:
                self._provider = TracerProvider(
                    sampler=TraceIdRatioBased(self._sample_rate) if self._sample_rate < 1.0 else ALWAYS_ON,
                    resource=Resource.create(
                        {"langfuse.environment": self._environment} if self._environment else {}
                    ),
                    shutdown_on_exit=False,  # the SDK's exit hook flushes it; ours must not block exit twice
                )
                _forget_cached_resources(self._public_key)
                try:
                    self._client = Langfuse(
                        public_key=self._public_key,
                        secret_key=self._secret_key,
                        base_url=self._host,
                        sample_rate=self._sample_rate,
                        environment=self._environment,
                        tracer_provider=self._provider,
                        **self._client_options,
                    )
                except BaseException:
                    self._provider.shutdown()
                    _forget_cached_resources(self._public_key)
                    raise
            return self._client

    def setup(self) -> None:
        """Nothing to prepare: the client connects lazily from its export threads."""

    def accepts(self, trace_id: str) -> bool:
        """Event loop, no SDK call: whether the sampler (ratio by trace id) keeps this run."""
        return not self._closed and sampled(trace_id, self._sample_rate)

    def start_run(self, run: RunStart) -> Span | None:
        """Open the turn's root under ``run.trace_id``; None when the SDK does not record it (sampled
        out, disabled). Records (no SDK call) unless an app's own SDK client was given."""
        if self.span_sink is not None:
            trace_id = trace_id_or_new(run.trace_id)
            if not self.accepts(trace_id):
                return None
            return RecordSpan.open_run(replace(run, trace_id=trace_id), (self.span_sink,))
        client = self.client
        try:
            props = propagated(run)
            context: TraceContext | None = None
            if run.trace_id:
                if _TRACE_ID.match(run.trace_id.lower()):
                    context = TraceContext(trace_id=run.trace_id.lower())
                    if run.parent_span_id:  # joined a caller's trace: the root is its span's child
                        context["parent_span_id"] = run.parent_span_id
                else:
                    logger.warning("ignoring invalid trace id %r", run.trace_id)
            with _scope(props):
                obs = client.start_observation(
                    name=run.name,
                    as_type="generation",
                    input=run.input,
                    trace_context=context,
                    metadata=dict(run.attributes) if run.attributes else None,
                )
            otel_span = getattr(obs, "_otel_span", None)
            if otel_span is not None and not otel_span.is_recording():
                return None
            if run.start_time_ns is not None:
                _backdate(obs, run.start_time_ns)
            return _LangfuseSpan(obs, props, run.name, "generation", obs.trace_id)
        except Exception:
            logger.warning("Langfuse could not start a turn", exc_info=True)
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
        if self.span_sink is not None:
            trace_id = new_trace_id()
            if self.accepts(trace_id):
                run = RunStart(thread_id, None, user_id, None, runner_type, 0, None, trace_id)
                attributes = dict(metadata) if metadata else None
                self.span_sink.submit(
                    standalone_record(trace_id, name, run, input=input, output=output, attributes=attributes)
                )
            return
        props = standalone_props(name, thread_id, user_id, runner_type, metadata or {})
        try:
            with _scope(props):
                obs = self.client.start_observation(
                    name=name,
                    as_type="span",
                    input=input,
                    output=output,
                    metadata=dict(metadata or {}) or None,
                )
            obs.end()
        except Exception:
            logger.warning("Langfuse could not record span %r", name, exc_info=True)

    needs_trace = False  # a rating without a trace becomes a session score

    def deliver_rating(self, rating: Rating) -> None:
        """Blocking: store the rating as a score (see :mod:`.langfuse_scores`); raises to be retried."""
        self._scores.post(rating)

    def trace_thread(self, trace_id: str) -> str | None:
        """Blocking: the stored trace's session id ("" without one), via the public API; None when
        Langfuse does not hold the trace (yet)."""
        trace = self._scores.trace(trace_id)
        if trace is None:
            return None
        session = trace.get("sessionId")
        return session if isinstance(session, str) else ""

    def stored_thread_id(self, thread_id: str) -> str:
        """The thread id as Langfuse stores it as session id (cut to its 200 character limit)."""
        return fit(thread_id) or ""

    def latest_trace_id(self, thread_id: str) -> str | None:
        """Blocking: the newest run trace of the thread's session, via the public API."""
        return self._scores.latest_trace(self.stored_thread_id(thread_id), RUN_SPAN_NAME)

    def flush(self, timeout: float) -> None:
        """Export what is pending, waiting at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        if self.span_sink is not None:
            self.span_sink.flush(timeout)
        client = self._client
        if client is not None:
            _bounded(client.flush, max(0.0, deadline - time.monotonic()), "flush")

    def shutdown(self) -> None:
        """Flush and stop the SDK's threads (bounded by ``flush_timeout``); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._flush_timeout
        if self.span_sink is not None:
            self.span_sink.shutdown(self._flush_timeout)
        client = self._client
        if client is None:
            return
        resources = getattr(client, "_resources", None)

        def close() -> None:
            client.shutdown()
            if self._provider is not None:
                self._provider.shutdown()
                _forget_cached_resources(getattr(resources, "public_key", None), only=resources)

        _bounded(close, max(0.0, deadline - time.monotonic()), "shutdown")


class _LangfuseSpan:
    """One open observation (None: a child the SDK failed to make). Never raises; warns once."""

    def __init__(self, obs: Any, props: Mapping[str, Any], name: str, as_type: str, trace_id: str) -> None:
        self._obs = obs
        self._props = props
        self._name = name
        self._generation = as_type in GENERATION_LIKE
        self._ended = obs is None
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
        as_type = TYPES.get(kind, "span")
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
            details, others = usage_details(usage)
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
        if first_time(logger, f"span:{id(self)}"):  # once per span
            logger.warning("Langfuse could not %s span %r", what, self._name, exc_info=True)


def _backdate(obs: Any, start_time_ns: int) -> None:
    """Set when a deferred span really started. The SDK's ``start_observation`` takes no start time,
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
        logger.debug("no Langfuse resource cache to reset", exc_info=True)


def _option(options: Mapping[str, Any], name: str, variable: str, default: float) -> Any:
    value = options.get(name)
    return value if value is not None else os.environ.get(variable) or default


def _bounded(action: Callable[[], None], timeout: float, what: str) -> None:
    """Run a blocking SDK call on a daemon thread and wait at most ``timeout`` s; never raises."""

    def run() -> None:
        try:
            action()
        except Exception:
            logger.warning("Langfuse %s failed", what, exc_info=True)

    worker = threading.Thread(target=run, name=f"ambient-tracing-langfuse-{what}", daemon=True)
    worker.start()
    worker.join(max(timeout, 0.0))
    if worker.is_alive():
        logger.warning("Langfuse %s did not finish within %.1f s", what, timeout)
