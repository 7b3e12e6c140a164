"""Observability: the one object an app holds. It owns the backends and the per-thread trace ids."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .backends.base import RatingSink, Span, TraceFinder, TraceOwner, TracingBackend, TurnStart
from .config import (
    DEFAULT_RUNNER_TYPE,
    TracingConfig,
    Workflow,
    active_workflow,
    default_spool_path,
    legacy_spool_path,
)
from .deferred import SpanWorker, open_deferred_turn
from .delivery import DEFAULT_TRACE_WAIT_SECONDS, RatingDelivery
from .detached import call_detached
from .fanout import FanoutSpan
from .ids import new_trace_id, parse_trace_id
from .masking import OutgoingSpan, mask_id, mask_rating, mask_turn
from .metrics import DEFAULT_SESSION_IDLE_SECONDS, SessionMetrics, SessionReporter
from .owners import TraceOwners
from .pricing import ModelPrice, Pricing
from .ratings import Rating
from .records import RecordSpan, SpanSink
from .registry import DEFAULT_IDLE_SECONDS, DEFAULT_MAX_THREADS, ThreadRegistry
from .spool import Limits
from .tool_signals import ToolCategoriser

if TYPE_CHECKING:
    from .core import StreamTracer

logger = logging.getLogger("ambient_tracing")


#: What aclose allows past ``flush_timeout`` for the steps that bound themselves by it.
CLOSE_GRACE_SECONDS = 1.0
END_SESSION_WAIT_SECONDS = 5.0
SETUP_RETRY_SECONDS = 2.0
MAX_SETUP_RETRY_SECONDS = 60.0


def _try_setup(backend: TracingBackend, *, first: bool) -> bool:
    try:
        backend.setup()
    except Exception as exc:
        if first:
            logger.warning(
                "ambient-tracing: %s setup failed; its runs are not traced until a retry succeeds: %r",
                backend.name,
                exc,
            )
        return False
    if not first:
        logger.info("ambient-tracing: %s is set up after a retry; its runs are traced again", backend.name)
    return True


def _accepts(backend: TracingBackend, trace_id: str) -> bool:
    """Whether a deferred backend will record a run with this id (no SDK call; see base.py)."""
    accepts = getattr(backend, "accepts", None)
    if accepts is None:
        return True
    try:
        return bool(accepts(trace_id))
    except Exception as exc:
        logger.warning("ambient-tracing: %s could not tell whether it records a run: %r", backend.name, exc)
        return False


def _flusher(backend: TracingBackend, timeout: float) -> Callable[[], None]:
    def flush_and_shut_down() -> None:
        backend.flush(timeout)
        backend.shutdown()

    return flush_and_shut_down


@dataclass(frozen=True, slots=True)
class Turn:
    """One traced run: its span in every backend that records it, under one trace id."""

    span: Span
    trace_id: str
    thread_id: str | None
    #: Namespace and workflow attributes the run was recorded with (also on its Session Metrics).
    context: Mapping[str, str] = field(default_factory=dict)


class Observability:
    """Backends plus the trace id state of every thread. Create one per app and share it.

    Build it from the environment with :meth:`from_env`, or pass backend objects::

        obs = Observability([MlflowBackend(tracking_uri="sqlite:///mlflow.db")])

    With no backend it is a passthrough: the doors see :attr:`enabled` is False and do nothing.
    """

    def __init__(
        self,
        backends: Sequence[TracingBackend] = (),
        *,
        runner_type: str = DEFAULT_RUNNER_TYPE,
        mask_messages: bool = True,
        flush_timeout: float = 30.0,
        max_threads: int = DEFAULT_MAX_THREADS,
        thread_idle_seconds: float = DEFAULT_IDLE_SECONDS,
        session_metrics: bool = True,
        session_idle_seconds: float | None = DEFAULT_SESSION_IDLE_SECONDS,
        pricing: Pricing | Mapping[str, ModelPrice] | None = None,
        tool_category: ToolCategoriser | None = None,
        namespace: str | None = None,
        workflow: Callable[[], Workflow | None] | None = active_workflow,
        clarification_names: Iterable[str] | None = None,
        feedback_spool: Path | None = None,
        feedback_retry_seconds: float = DEFAULT_TRACE_WAIT_SECONDS,
        feedback_limits: Limits | None = None,
    ) -> None:
        self.backends: tuple[TracingBackend, ...] = tuple(backends)
        self.runner_type = runner_type
        self.mask_messages = mask_messages
        #: The origin runner's namespace (``AGENTIC_SESSION_NAMESPACE``), recorded on every run.
        self.namespace = namespace
        # Read at every run: the active workflow changes while the process runs (config.py reads it).
        self._workflow = workflow
        self.flush_timeout = flush_timeout
        self._threads = ThreadRegistry(max_threads, thread_idle_seconds)
        self._open_streams: set[StreamTracer] = set()
        self._setup_lock = threading.Lock()
        self._setup: Future[None] | None = None
        self._closed = False
        self._stopping = threading.Event()
        # Vendor span calls after a turn opens run here, off the event loop (see deferred.py).
        self._span_worker = SpanWorker()
        #: Which thread a trace belongs to, asked of the backends (see :mod:`ambient_tracing.owners`).
        self.owners = TraceOwners(
            [backend for backend in self.backends if isinstance(backend, TraceOwner)],
            [backend for backend in self.backends if isinstance(backend, TraceFinder)],
        )
        #: Ratings on their way to the backends: a durable queue (see :mod:`ambient_tracing.delivery`).
        #: ``feedback_retry_seconds``: how long a rating waits for its trace to be stored.
        self.ratings = RatingDelivery(
            [backend for backend in self.backends if isinstance(backend, RatingSink)],
            owners=self.owners,
            spool=feedback_spool or default_spool_path(),
            limits=feedback_limits,
            trace_wait_seconds=feedback_retry_seconds,
            legacy_spools=() if feedback_spool else (legacy_spool_path(),),
        )
        # Session Metrics (see metrics.py): None when switched off.
        self._sessions: SessionReporter | None = (
            SessionReporter(
                lambda: self.backends,
                runner_type=runner_type,
                pricing=pricing,
                tool_category=tool_category,
                clarification_names=clarification_names,
                idle_seconds=session_idle_seconds,
                max_threads=max_threads,
                mask=lambda: self.mask_messages,
            )
            if session_metrics
            else None
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Observability:
        """Configure from the ambient runner's environment variables (see the README's table)."""
        return cls.from_config(TracingConfig.from_env(environ))

    @classmethod
    def from_config(cls, config: TracingConfig) -> Observability:
        backends: list[TracingBackend] = []
        flush_timeout = 30.0
        if config.langfuse is not None:
            settings = config.langfuse
            flush_timeout = settings.flush_timeout
            try:
                from .backends.langfuse import LangfuseBackend

                backends.append(
                    LangfuseBackend(
                        public_key=settings.public_key,
                        secret_key=settings.secret_key,
                        host=settings.host,
                        sample_rate=settings.sample_rate,
                        flush_timeout=settings.flush_timeout,
                    )
                )
            except ImportError:
                logger.warning(
                    "ambient-tracing: Langfuse tracing is off: LANGFUSE_ENABLED is set but the langfuse "
                    "package is not installed (pip install 'ambient-tracing[langfuse]')"
                )
            except Exception as exc:
                # As the origin runner did: run without Langfuse. Only the exception's type is logged;
                # its text may carry the keys or the host's credentials.
                logger.warning(
                    "ambient-tracing: Langfuse tracing is off: the Langfuse client could not be created "
                    "(%s; check the LANGFUSE_* variables)",
                    type(exc).__name__,
                )
        if config.mlflow is not None:
            try:
                from .backends.mlflow import MlflowBackend

                backends.append(
                    MlflowBackend(
                        tracking_uri=config.mlflow.tracking_uri,
                        experiment_name=config.mlflow.experiment_name,
                    )
                )
            except ImportError:
                logger.warning(
                    "ambient-tracing: MLflow tracing is off: MLFLOW_TRACING_ENABLED is set but the mlflow "
                    "package is not installed (pip install 'ambient-tracing[mlflow]')"
                )
            except Exception as exc:
                logger.warning(
                    "ambient-tracing: MLflow tracing is off: the MLflow backend could not be created (%s)",
                    type(exc).__name__,
                )
        return cls(
            backends,
            runner_type=config.runner_type,
            mask_messages=config.mask_messages,
            flush_timeout=flush_timeout,
            feedback_spool=config.feedback_spool,
            feedback_limits=config.feedback_limits,
            session_idle_seconds=config.session_idle_seconds,
            namespace=config.namespace,
        )

    @property
    def enabled(self) -> bool:
        """Whether any backend is configured; when False the doors pass everything through."""
        return bool(self.backends) and not self._closed

    # -- trace ids ---------------------------------------------------------------------------------

    def current_trace_id(self, thread_id: str) -> str | None:
        """The id of the thread's open turn (the same in every backend)."""
        return self._threads.current(thread_id)

    def last_trace_id(self, thread_id: str) -> str | None:
        """The id of the thread's most recent turn, kept after it ends (for feedback)."""
        return self._threads.last(thread_id)

    def thread_of(self, trace_id: str) -> str | None:
        """The thread of a recent trace of this process; None when unknown here."""
        return self._threads.thread_of(trace_id)

    def stored_thread_id(self, thread_id: str | None) -> str | None:
        """A thread id as the backends store it: with masking on, a digest past the mask's limit."""
        return mask_id(thread_id) if self.mask_messages else thread_id

    def submit_rating(
        self, rating: Rating, *, caller: str | None = None, check_owner: bool = False
    ) -> Future[list[str]]:
        """Queue a rating for every backend that can record it. Never blocks: the future gives their
        names once the rating is committed to the durable queue (StoreFull / TooManyPending when not)."""
        if self._closed:
            raise RuntimeError("observability is closed")
        if self._setup is None:
            self._begin_setup()
        if self.mask_messages:  # ids as the traces store them, so owners and traces are found
            rating = mask_rating(rating)
        return self.ratings.submit(rating, caller=caller, check_owner=check_owner)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare every backend (experiment lookup, SDK init) in a worker thread, once.

        The middleware awaits this at ASGI lifespan startup; runs that arrive before it completes
        are still traced by backends that need no preparation.
        """
        await asyncio.wrap_future(self._begin_setup())

    def _begin_setup(self) -> Future[None]:
        with self._setup_lock:
            if self._setup is None:
                self._setup = Future()
                threading.Thread(
                    target=self._setup_backends,
                    args=(self._setup,),
                    name="ambient-tracing-setup",
                    daemon=True,
                ).start()
            return self._setup

    def _setup_backends(self, done: Future[None]) -> None:
        self.ratings.start()  # first: delivery to each backend does not wait for the others' setup
        failed = [backend for backend in self.backends if not _try_setup(backend, first=True)]
        done.set_result(None)
        # A backend that was down at startup is retried with backoff until it comes up or we close.
        delay = SETUP_RETRY_SECONDS
        while failed and not self._stopping.wait(delay):
            failed = [backend for backend in failed if not _try_setup(backend, first=False)]
            delay = min(delay * 2, MAX_SETUP_RETRY_SECONDS)

    async def aclose(self) -> None:
        """End every open run, flush every backend off the event loop, and shut them down."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        for stream in list(self._open_streams):
            stream.close(error="shutdown before the run finished")
        if self._sessions is not None:
            self._sessions.close()  # Session Metrics spans, before the flush below sends them
        # One deadline for everything: whatever the SDKs do, aclose returns within flush_timeout plus
        # a grace, and what is still hung is left on daemon threads that do not hold up the exit.
        deadline = time.monotonic() + self.flush_timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        # Ratings first: accepted ones are on disk already; this only stops their threads.
        ratings_wait = min(5.0, left())
        await call_detached(
            lambda: self.ratings.close(ratings_wait), ratings_wait + CLOSE_GRACE_SECONDS, "rating delivery"
        )
        if self._sessions is not None:
            sessions = self._sessions
            await call_detached(
                lambda: sessions.drain(left()), left() + CLOSE_GRACE_SECONDS, "session metrics"
            )
        await call_detached(
            lambda: self._span_worker.close(left()), left() + CLOSE_GRACE_SECONDS, "span worker"
        )
        await asyncio.gather(
            *(
                call_detached(
                    _flusher(backend, left()), left() + CLOSE_GRACE_SECONDS, f"{backend.name} flush"
                )
                for backend in self.backends
            )
        )

    async def end_session(self, thread_id: str) -> bool:
        """Emit the thread's ``Session Metrics`` span now; False when it has no unreported activity.

        The spans are made on the reporter's thread; this waits for that (at most
        ``END_SESSION_WAIT_SECONDS``), not for their export, which the backends do in the background.
        """
        done = self._sessions.end_session(thread_id) if self._sessions is not None else None
        if done is None:
            return False
        with suppress(TimeoutError):  # a backend stalled: the report is still queued
            await asyncio.wait_for(asyncio.wrap_future(done), END_SESSION_WAIT_SECONDS)
        return True

    # -- used by the doors -------------------------------------------------------------------------

    def open_turn(
        self,
        *,
        thread_id: str | None,
        run_id: str | None,
        user_id: str | None,
        user_name: str | None,
        input: Any,
        trace_id: str | None = None,
    ) -> Turn | None:
        """Start the run's turn in every backend under one trace id; None when no backend records it.

        The id is ``trace_id`` when it is valid (32 hex or a W3C traceparent: a caller-chosen id),
        else a new random one. No SDK call happens here: backends with a ``span_sink`` get the
        package's own span records (exported on their thread), SDK backends open the turn on the
        span worker. The id is announced when one of them :meth:`accepts <TracingBackend>` it.
        None after :meth:`aclose`: no run is announced that no backend would record.
        """
        if self._closed:
            return None
        if self._setup is None:
            self._begin_setup()
        chosen = parse_trace_id(trace_id) or new_trace_id()
        context = self.run_context()
        turn = TurnStart(
            thread_id=thread_id,
            run_id=run_id,
            user_id=user_id,
            user_name=user_name,
            runner_type=self.runner_type,
            turn_number=self._threads.next_turn_number(thread_id) if thread_id else 1,
            input=input,
            trace_id=chosen,
            start_time_ns=time.time_ns(),
            attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": thread_id or ""},
        )
        if self.mask_messages:
            turn = mask_turn(turn)
        # The namespace and workflow are the operator's configuration, not content: never masked.
        turn = replace(turn, attributes={**(turn.attributes or {}), **context})
        spans: list[Span] = []
        overloaded = self._span_worker.overloaded
        deferred: list[TracingBackend] = []
        sinks: list[SpanSink] = []
        for backend in self.backends:
            sink = getattr(backend, "span_sink", None)
            if sink is not None:  # spans built by the package, exported on the backend's own thread
                if _accepts(backend, chosen):
                    sinks.append(sink)
                continue
            if getattr(backend, "defer_spans", False):
                if overloaded:
                    logger.warning("ambient-tracing: span worker behind; %s skips this run", backend.name)
                elif _accepts(backend, chosen):
                    deferred.append(backend)
                continue
            try:  # an in-process backend without SDK calls: opened (and masked) here
                span = backend.start_turn(turn)
            except Exception as exc:
                logger.warning("ambient-tracing: %s could not start a turn: %r", backend.name, exc)
                continue
            if span is not None:
                spans.append(OutgoingSpan(span, turn.masked))
        if sinks:
            # One tree of records for every such backend: built once, encoded per destination.
            spans.append(RecordSpan.open_turn(turn, tuple(sinks)))
        if deferred:
            # One queued call per operation for all vendor backends; the worker fans it out.
            spans.append(open_deferred_turn(self._span_worker, deferred, turn))
        if not spans:
            return None
        if thread_id:
            self._threads.turn_started(thread_id, chosen)
        # What the core passes is prepared (JSON decoded; masked, new fields included) where each
        # kind of span is built or encoded: in-process spans here, the others off the loop.
        span = spans[0] if len(spans) == 1 else FanoutSpan(spans, chosen)
        return Turn(span=span, trace_id=chosen, thread_id=thread_id, context=context)

    def usage_delta(self, thread_id: str | None, totals: Mapping[str, int]) -> dict[str, int]:
        """The part of a thread's cumulative token counts not reported before (all of it without a thread)."""
        return self._threads.usage_delta(thread_id, totals) if thread_id else dict(totals)

    def turn_ended(self, turn: Turn) -> None:
        if turn.thread_id:
            self._threads.turn_ended(turn.thread_id, turn.trace_id)

    def run_context(self) -> dict[str, str]:
        """The namespace and the active workflow, as the attributes every run and Session Metrics carry:
        ``ambient.namespace``, ``ambient.workflow`` (its name, for tags) and the origin runner's
        ``workflow_name`` / ``workflow_url`` / ``workflow_branch`` / ``workflow_path``."""
        context = {"ambient.namespace": self.namespace} if self.namespace else {}
        try:
            workflow = self._workflow() if self._workflow is not None else None
        except Exception as exc:
            logger.warning("ambient-tracing: could not read the active workflow: %r", exc)
            workflow = None
        if workflow is not None:
            context.update(workflow.metadata())
            if workflow.name:
                context["ambient.workflow"] = workflow.name
        return context

    def session_metrics(
        self,
        thread_id: str | None,
        user_id: str | None,
        user_name: str | None = None,
        context: Mapping[str, str] | None = None,
    ) -> SessionMetrics | None:
        """The thread's Session Metrics accumulator, with one more run started (None: not counted)."""
        if self._sessions is None or not thread_id:
            return None
        return self._sessions.run_started(thread_id, user_id, user_name, context)

    def stream_opened(self, stream: StreamTracer) -> None:
        self._open_streams.add(stream)

    def stream_closed(self, stream: StreamTracer) -> None:
        self._open_streams.discard(stream)
