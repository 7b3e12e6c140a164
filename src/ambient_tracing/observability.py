"""Observability: the one object an app holds. It only wires the parts together: the backends
(:mod:`.backends`), the span stack (:mod:`.spans`), the runs and their per-thread ids
(:mod:`.tracer.runs`), feedback delivery (:mod:`.feedback`) and Session Metrics
(:mod:`.session_metrics`); and it starts and stops them."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from contextlib import suppress
from pathlib import Path

from ambient_tracing import backends as backends_package
from ambient_tracing.backends.base import RatingSink, TraceFinder, TraceOwner, TracingBackend
from ambient_tracing.backends.rating import Rating
from ambient_tracing.background import Worker
from ambient_tracing.config import (
    DEFAULT_RUNNER_TYPE,
    DEFAULT_SESSION_IDLE_SECONDS,
    FeedbackLimits,
    TracingConfig,
    Workflow,
    active_workflow,
    default_spool_path,
    legacy_spool_path,
)
from ambient_tracing.detached import call_detached
from ambient_tracing.failures import capture_internal_exceptions
from ambient_tracing.feedback.delivery import DEFAULT_TRACE_WAIT_SECONDS, RatingDelivery
from ambient_tracing.feedback.owners import TraceOwners
from ambient_tracing.feedback.ratings import masked_rating
from ambient_tracing.privacy import mask_id
from ambient_tracing.session_metrics.metrics import SessionReporter
from ambient_tracing.session_metrics.pricing import ModelPrice, Pricing
from ambient_tracing.spans.stack import SpanStack
from ambient_tracing.tool_signals import ToolCategoriser
from ambient_tracing.tracer.runs import Runs
from ambient_tracing.tracer.threads import DEFAULT_IDLE_SECONDS, DEFAULT_MAX_THREADS, ThreadRegistry

logger = logging.getLogger(__name__)

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
                "%s setup failed; its runs are not traced until a retry succeeds: %r", backend.name, exc
            )
        return False
    if not first:
        logger.info("%s is set up after a retry; its runs are traced again", backend.name)
    return True


def _flusher(backend: TracingBackend, timeout: float) -> Callable[[], None]:
    def flush_and_shut_down() -> None:
        backend.flush(timeout)
        backend.shutdown()

    return flush_and_shut_down


class Observability:
    """The backends, the runs' trace ids and the feedback queue of one app. Create one, share it.

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
        feedback_limits: FeedbackLimits | None = None,
        trust_traceparent: bool = False,
        trace_id_from_run_id: bool = False,
        result_trace_id: bool = False,
    ) -> None:
        """Long because it is the wiring: each statement builds one part from the options.

        Correlation (README, "Correlating with the frontend"), all off by default:
        ``trust_traceparent`` (a W3C ``traceparent`` request header sets the run's trace id and the
        root's parent), ``trace_id_from_run_id`` (the id is derived from the runId) and
        ``result_trace_id`` (the id also goes in ``RUN_FINISHED.result.traceId``)."""
        self.backends: tuple[TracingBackend, ...] = tuple(backends)
        self._setup_lock = threading.Lock()
        self._setup: Future[None] | None = None
        self._stopping = threading.Event()
        self.mask_messages = mask_messages
        self.flush_timeout = flush_timeout
        #: Whether the middleware lets a ``traceparent`` request header choose the run's trace.
        self.trust_traceparent = trust_traceparent
        #: Whether the doors put the id in ``RUN_FINISHED.result.traceId`` too.
        self.result_trace_id = result_trace_id
        #: The origin runner's namespace (``AGENTIC_SESSION_NAMESPACE``), recorded on every run.
        self.namespace = namespace
        # Read at every run: the active workflow changes while the process runs (config.py reads it).
        self._workflow = workflow
        self._sessions = (
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
        sessions = self._sessions
        #: The thread every stream's tracer runs on: the doors hand it each chunk or event.
        self.tracer_worker = Worker(
            "ambient-tracing-tracer",
            tick=sessions.sweep_if_due if sessions is not None else None,
            tick_seconds=sessions.tick_seconds if sessions is not None else 30.0,
        )
        self.spans = SpanStack(self.backends)
        #: Opening runs and each thread's trace ids: what the doors' tracers share.
        self.runs = Runs(
            self.spans,
            ThreadRegistry(max_threads, thread_idle_seconds),
            runner_type=runner_type,
            mask_messages=mask_messages,
            sessions=self._sessions,
            context=self.run_context,
            prepare=self._begin_setup,
            trace_id_from_run_id=trace_id_from_run_id,
            owned_elsewhere=lambda trace_id, thread_id: self.owners.owned_by_other(
                trace_id, self.stored_thread_id(thread_id)
            ),
        )
        #: Which thread a trace belongs to, asked of the backends (see :mod:`.feedback.owners`).
        self.owners = TraceOwners(
            [backend for backend in self.backends if isinstance(backend, TraceOwner)],
            [backend for backend in self.backends if isinstance(backend, TraceFinder)],
        )
        #: Ratings on their way to the backends, a durable queue (see :mod:`.feedback.delivery`);
        #: ``feedback_retry_seconds``: how long a rating waits for its trace to be stored.
        self.ratings = RatingDelivery(
            [backend for backend in self.backends if isinstance(backend, RatingSink)],
            owners=self.owners,
            spool=feedback_spool or default_spool_path(),
            limits=feedback_limits,
            trace_wait_seconds=feedback_retry_seconds,
            legacy_spools=() if feedback_spool else (legacy_spool_path(),),
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Observability:
        """Configure from the ambient runner's environment variables (see the README's table)."""
        return cls.from_config(TracingConfig.from_env(environ))

    @classmethod
    def from_config(cls, config: TracingConfig) -> Observability:
        return cls(
            backends_package.from_config(config),
            runner_type=config.runner_type,
            mask_messages=config.mask_messages,
            flush_timeout=config.langfuse.flush_timeout if config.langfuse is not None else 30.0,
            feedback_spool=config.feedback_spool,
            feedback_limits=config.feedback_limits,
            session_idle_seconds=config.session_idle_seconds,
            namespace=config.namespace,
            trust_traceparent=config.trust_traceparent,
            trace_id_from_run_id=config.trace_id_from_run_id,
            result_trace_id=config.result_trace_id,
        )

    @property
    def enabled(self) -> bool:
        """Whether any backend is configured; when False the doors pass everything through."""
        return bool(self.backends) and not self.runs.closed

    # -- trace ids ---------------------------------------------------------------------------------

    def current_trace_id(self, thread_id: str) -> str | None:
        """The id of a run of the thread that is still open (the same in every backend)."""
        return self.runs.threads.current(thread_id)

    def last_trace_id(self, thread_id: str) -> str | None:
        """The id of the thread's most recent run, kept after it ends (for feedback)."""
        return self.runs.threads.last(thread_id)

    def thread_of(self, trace_id: str) -> str | None:
        """The thread of a recent trace of this process; None when unknown here."""
        return self.runs.threads.thread_of(trace_id)

    def stored_thread_id(self, thread_id: str | None) -> str | None:
        """A thread id as the backends store it: with masking on, a digest past the mask's limit."""
        return mask_id(thread_id) if self.mask_messages else thread_id

    def run_context(self) -> dict[str, str]:
        """The namespace and the active workflow, as the attributes every run and Session Metrics carry:
        ``ambient.namespace``, ``ambient.workflow`` (its name, for tags) and the origin runner's
        ``workflow_name`` / ``workflow_url`` / ``workflow_branch`` / ``workflow_path``."""
        context = {"ambient.namespace": self.namespace} if self.namespace else {}
        workflow = None
        with capture_internal_exceptions(logger, "could not read the active workflow"):
            workflow = self._workflow() if self._workflow is not None else None
        if workflow is not None:
            context.update(workflow.metadata())
            if workflow.name:
                context["ambient.workflow"] = workflow.name
        return context

    # -- feedback ----------------------------------------------------------------------------------

    def submit_rating(
        self, rating: Rating, *, caller: str | None = None, check_owner: bool = False
    ) -> Future[list[str]]:
        """Queue a rating for every backend that can record it. Never blocks: the future gives their
        names once the rating is committed to the durable queue (StoreFull / TooManyPending when not)."""
        if self.runs.closed:
            raise RuntimeError("observability is closed")
        self._begin_setup()
        if self.mask_messages:  # ids as the traces store them, so owners and traces are found
            rating = masked_rating(rating)
        return self.ratings.submit(rating, caller=caller, check_owner=check_owner)

    async def end_session(self, thread_id: str) -> bool:
        """Emit the thread's ``Session Metrics`` span now; False when it has no unreported activity.

        The spans are made on the reporter's thread; this waits for that (at most
        ``END_SESSION_WAIT_SECONDS``), not for their export, which the backends do in the background.
        """
        sessions = self._sessions
        if sessions is None:
            return False
        deadline = time.monotonic() + END_SESSION_WAIT_SECONDS
        # Behind the events the doors handed over: they count too.
        queued = self.tracer_worker.call(lambda: sessions.end_session(thread_id))
        try:
            done = await asyncio.wait_for(asyncio.wrap_future(queued), END_SESSION_WAIT_SECONDS)
        except TimeoutError:
            return True  # the tracer worker is behind: the report is still queued
        if done is None:
            return False
        with suppress(TimeoutError):  # a backend stalled: the report is still queued
            await asyncio.wait_for(asyncio.wrap_future(done), max(deadline - time.monotonic(), 0.0))
        return True

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

    def _end_open_runs(self) -> None:
        """On the tracer worker: end every open run, then report every thread's Session Metrics."""
        self.runs.end_open_runs()
        if self._sessions is not None:
            self._sessions.close()

    async def aclose(self) -> None:
        """End every open run, flush every backend off the event loop, and shut them down.

        Returns within ``flush_timeout`` plus a grace whatever the SDKs do: what is still hung is
        left on daemon threads that do not hold up the process's exit."""
        if self.runs.closed:
            return
        self.runs.close()
        self._stopping.set()
        deadline = time.monotonic() + self.flush_timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        async def detached(call: Callable[[], object], bound: float, what: str) -> None:
            await call_detached(call, bound + CLOSE_GRACE_SECONDS, what)

        # After what the doors handed over: the runs still open end, then Session Metrics are reported.
        self.tracer_worker.call(self._end_open_runs)
        tracers = self.tracer_worker
        await detached(lambda: tracers.close(left()), left(), "tracer worker")

        ratings_wait = min(5.0, left())  # accepted ratings are on disk already: only threads stop
        await detached(lambda: self.ratings.close(ratings_wait), ratings_wait, "rating delivery")
        sessions = self._sessions
        if sessions is not None:
            await detached(lambda: sessions.drain(left()), left(), "session metrics")
        await detached(lambda: self.spans.worker.close(left()), left(), "span worker")
        await asyncio.gather(
            *(
                detached(_flusher(backend, left()), left(), f"{backend.name} flush")
                for backend in self.backends
            )
        )
