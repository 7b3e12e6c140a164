"""The small protocol every tracing backend implements.

The tracer speaks only this protocol: it opens one root span per AG-UI run, children under it, and
ends each span exactly once. Backends translate that into a vendor SDK or the package's own span
records (see :class:`TracingBackend` for where each call runs); `setup`, `flush` and `shutdown` are
called from a worker thread and may block. Feedback goes to backends that are :class:`RatingSink`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ambient_tracing.backends.rating import Rating
    from ambient_tracing.backends.records import SpanRecord

#: The name of every run's root span (the origin runner's), which backends also search traces by.
RUN_SPAN_NAME = "llm_interaction"


class SpanKind(StrEnum):
    """What a span stands for; backends map it to their own span/observation types."""

    RUN = "run"  # the root: one per AG-UI run
    TOOL = "tool"
    STEP = "step"
    REASONING = "reasoning"
    SUBAGENT = "subagent"
    GENERATION = "generation"


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one model in one run (from AG-UI ``RUN_FINISHED.usage``)."""

    model: str | None = None
    provider: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    reasoning_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class RunStart:
    """Everything known about a run when its run opens (at RUN_STARTED)."""

    thread_id: str | None
    run_id: str | None
    user_id: str | None
    user_name: str | None
    runner_type: str
    turn_number: int
    input: Any
    # 32 lowercase hex chars chosen by the package (see ids.py): every backend records the run under
    # this id. None only when a backend is called directly, without Observability: it picks one.
    trace_id: str | None = None
    attributes: Mapping[str, Any] | None = None
    # When RUN_STARTED was seen (epoch ns, event loop clock): a deferred root opens later on the span
    # worker and must still start before the children it gets with their own loop times.
    start_time_ns: int | None = None
    # Set by the privacy mask (masking.mask_run): every span of the run is masked before it leaves the
    # process, by whoever builds or encodes it off the event loop (span worker, exporter thread).
    masked: bool = False
    #: The root span's name, given by the tracer.
    name: str = RUN_SPAN_NAME
    #: The caller's span (16 lowercase hex) when the run joins the caller's trace (a trusted W3C
    #: ``traceparent``): the run's root is its child. Every backend records that parent: the package's
    #: records as the root's ``parent_id`` (so any OTLP destination gets it), SDKs through their context.
    parent_span_id: str | None = None
    #: The root span's id when it was chosen before the run opened (announced in ``traceresponse``);
    #: honoured by the package's records, SDKs choose their own.
    root_span_id: int | None = None


@runtime_checkable
class Span(Protocol):
    """An open span of one backend. Ended exactly once by the core."""

    @property
    def trace_id(self) -> str:
        """The trace id as 32 lowercase hex characters."""
        ...

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> Span:
        """Open a child; ``start_time_ns`` (epoch ns) when it started earlier than now."""
        ...

    def set_input(self, input: Any) -> None:
        """Record the span's input once it is known (tool arguments arrive after the call starts)."""
        ...

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
        """End the span (at ``end_time_ns``, epoch ns, when given); ``error`` means ERROR status."""
        ...


class NullSpan:
    """A span that records nothing: stands in for one a backend did not make, or one not kept."""

    trace_id = ""

    def start_child(self, name: str, kind: SpanKind, **_: Any) -> Span:
        return self

    def set_input(self, input: Any) -> None:
        pass

    def end(self, **_: Any) -> None:
        pass


NULL_SPAN: Span = NullSpan()


class SpanSink(Protocol):
    """Takes ended span records (:mod:`~ambient_tracing.backends.records`); never blocks (called on
    the event loop): an OTLP exporter queues them for its own thread."""

    def submit(self, record: SpanRecord) -> None: ...


@runtime_checkable
class TracingBackend(Protocol):
    """One vendor. Its spans are made one of two ways, and nothing it does runs on the event loop:

    - with a ``span_sink`` (not None once set up), the package builds each run's spans as records
      and hands the ended ones to the sink, which exports them on its own thread;
    - without one, ``start_run`` and every call on its spans run on the span worker thread
      (:mod:`ambient_tracing.spans.deferred`), in order, with the times they happened.

    ``accepts(trace_id)`` runs on the event loop and must be cheap (no SDK call): whether a run with
    this id will be recorded (set up, sampled in); the id is announced only if a backend accepts.
    ``start_run`` returns None when the run is not recorded after all.
    """

    name: str

    @property
    def span_sink(self) -> SpanSink | None: ...

    def accepts(self, trace_id: str) -> bool: ...

    def setup(self) -> None:
        """Blocking one-time preparation (experiment lookup, SDK init). Runs in a worker thread."""
        ...

    def start_run(self, run: RunStart) -> Span | None: ...

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
        """Record one already-finished span as its own trace in the thread's session (e.g. ``Session
        Metrics``). Creates the span only, never does network I/O; drops it when not set up."""
        ...

    def flush(self, timeout: float) -> None:
        """Blocking: export what is pending. Runs in a worker thread."""
        ...

    def shutdown(self) -> None:
        """Blocking: release the SDK's resources. Runs in a worker thread."""
        ...


class RatingRejected(Exception):
    """A backend refused a rating for good (e.g. HTTP 400): retrying cannot help, so it is set aside."""


class TraceNotStored(Exception):
    """The rating's trace is not in the backend (yet): retried until it should have been stored."""


@runtime_checkable
class RatingSink(Protocol):
    """A backend that records user feedback. Called from the delivery thread: may block.

    ``deliver_rating`` returns once the rating is stored, raises :class:`RatingRejected` when it never
    will be, :class:`TraceNotStored` while its trace is not there, and anything else to be retried
    later (backend down).
    """

    name: str
    #: True when a rating needs a trace id (MLflow); False when a session-level rating is possible.
    needs_trace: bool

    def deliver_rating(self, rating: Rating) -> None: ...


@runtime_checkable
class TraceFinder(Protocol):
    """A backend that can tell a thread's latest trace (for a rating sent to another replica)."""

    def latest_trace_id(self, thread_id: str) -> str | None:
        """Blocking: the newest trace id (32 hex) recorded for the thread, None if none."""
        ...


@runtime_checkable
class TraceOwner(Protocol):
    """A backend that can tell which thread a stored trace belongs to (ownership of a rating)."""

    def trace_thread(self, trace_id: str) -> str | None:
        """Blocking: the thread id of the stored trace (32 hex), "" when it has none, None when the
        backend does not hold the trace (yet). Raises when the backend cannot answer."""
        ...
