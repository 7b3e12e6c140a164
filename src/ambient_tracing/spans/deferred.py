"""Vendor span calls off the event loop.

A vendor SDK spends 0.1-0.3 ms of CPU per span call (attribute encoding, processors, MLflow's
in-memory trace): on the event loop that is 5-10 us per AG-UI event at one tool call per 50 events.
A :class:`DeferredSpan` records each call with the time it happened and hands it to one worker
thread, which replays the calls in order with those times (``start_time_ns`` / ``end_time_ns``),
so the spans are the same, just built a moment later. Opening the run is queued too
(:func:`open_deferred_run`): the package chose the trace id, so nothing on the event loop waits on
an SDK. A hanging SDK call holds up only this thread; the loop keeps streaming, and once the backlog
passes :data:`MAX_BACKLOG` new runs skip the deferred backends until it drains.

Calls are never dropped or reordered (a lost ``end`` would leave a span open in the SDK). Instead,
while the worker is more than :data:`MAX_BACKLOG` calls behind, new runs are not traced in the
deferred backends (:attr:`SpanWorker.overloaded`); runs already open are capped in spans by the
core, so the backlog stays bounded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ambient_tracing.backends.base import RunStart, Span, SpanKind, TokenUsage, TracingBackend
from ambient_tracing.failures import capture_internal_exceptions
from ambient_tracing.spans.fanout import FanoutSpan
from ambient_tracing.spans.outgoing import OutgoingSpan

logger = logging.getLogger(__name__)

MAX_BACKLOG = 20_000

Call = Callable[[], None]
_STOP = threading.Event()  # a sentinel: the worker thread ends when it reaches it


_workers: weakref.WeakSet[SpanWorker] = weakref.WeakSet()


def drain_span_workers(timeout: float) -> bool:
    """Blocking: wait until every span worker of the process has run the calls queued so far (for
    tests, see :mod:`ambient_tracing.testing`); False when one did not within ``timeout``."""
    deadline = time.monotonic() + timeout
    return all(worker.drain(max(deadline - time.monotonic(), 0.0)) for worker in list(_workers))


class SpanWorker:
    """One daemon thread that runs queued span calls in order. Started on first use."""

    def __init__(self, max_backlog: int = MAX_BACKLOG) -> None:
        self._queue: queue.SimpleQueue[Call | threading.Event] = queue.SimpleQueue()
        #: Queued calls past which :attr:`overloaded` is True.
        self.max_backlog = max_backlog
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        _workers.add(self)

    @property
    def overloaded(self) -> bool:
        """Whether the worker is so far behind that new runs should not add to its queue."""
        return self._queue.qsize() > self.max_backlog

    def submit(self, call: Call) -> None:
        if self._thread is None:
            if self._closed:
                self._run(call)  # after close (a run ended by shutdown): nothing else is queued
                return
            self._start()
        self._queue.put(call)

    def drain(self, timeout: float) -> bool:
        """Blocking: wait until every call queued so far has run; False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Blocking: run what is queued, then stop the thread; later calls run on the caller's thread."""
        drained = self.drain(timeout)
        with self._lock:
            thread, self._thread = self._thread, None
            self._closed = True
        if thread is not None:
            self._queue.put(_STOP)
        return drained

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._work, name="ambient-tracing-spans", daemon=True)
                thread.start()
                self._thread = thread

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._run(item)

    def _run(self, call: Call) -> None:
        # Backends guard their own calls; this is a last resort.
        with capture_internal_exceptions(logger, "a deferred span call failed", once="span call"):
            call()


class DeferredSpan:
    """Implements :class:`Span` by queueing every call on a :class:`SpanWorker`."""

    __slots__ = ("_span", "_worker", "trace_id")

    def __init__(self, worker: SpanWorker, trace_id: str, span: Span | None = None) -> None:
        self._worker = worker
        self._span = span  # set by the worker once the child exists
        self.trace_id = trace_id

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> DeferredSpan:
        child = DeferredSpan(self._worker, self.trace_id)
        started = start_time_ns or time.time_ns()

        def start() -> None:
            if self._span is not None:
                child._span = self._span.start_child(
                    name, kind, input=input, attributes=attributes, start_time_ns=started
                )

        self._worker.submit(start)
        return child

    def set_input(self, input: Any) -> None:
        def set_input() -> None:
            if self._span is not None:
                self._span.set_input(input)

        self._worker.submit(set_input)

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
        ended = end_time_ns or time.time_ns()

        def end() -> None:
            if self._span is not None:
                self._span.end(
                    output=output,
                    error=error,
                    model=model,
                    usage=usage,
                    attributes=attributes,
                    end_time_ns=ended,
                )

        self._worker.submit(end)


def open_deferred_run(worker: SpanWorker, backends: Sequence[TracingBackend], run: RunStart) -> DeferredSpan:
    """The turn's root in ``backends``, opened on the worker under ``run.trace_id`` (already set).
    What the spans get is prepared there too, on the worker (see masking.OutgoingSpan)."""
    assert run.trace_id is not None
    root = DeferredSpan(worker, run.trace_id)

    def start() -> None:
        spans = [span for backend in backends if (span := _start_run(backend, run)) is not None]
        if spans:
            fanout = FanoutSpan(spans, root.trace_id)
            root._span = OutgoingSpan(fanout, run.masked)

    worker.submit(start)
    return root


def _start_run(backend: TracingBackend, run: RunStart) -> Span | None:
    try:
        return backend.start_run(run)
    except Exception as exc:  # a backend must never break the app
        logger.warning("%s could not start a run: %r", backend.name, exc)
        return None
