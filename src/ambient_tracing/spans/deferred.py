"""Vendor span calls off the event loop.

A vendor SDK spends 0.1-0.3 ms of CPU per span call (attribute encoding, processors, MLflow's
in-memory trace): on the event loop that is 5-10 us per AG-UI event at one tool call per 50 events.
A :class:`DeferredSpan` records each call with the time it happened and hands it to one worker
thread, which replays the calls in order with those times (``start_time_ns`` / ``end_time_ns``),
so the spans are the same, just built a moment later. Opening the run is queued too
(:func:`open_deferred_run`): the package chose the trace id, so nothing on the event loop waits on
an SDK. A hanging SDK call holds up only this thread (an :class:`~ambient_tracing.background.Worker`);
streams and the tracers go on.

Calls are never dropped or reordered (a lost ``end`` would leave a span open in the SDK). Instead,
while the worker is more than :data:`MAX_BACKLOG` calls behind, new runs are not traced in the
deferred backends (``SpanStack.worker_behind``); runs already open are capped in spans by the core,
so the backlog stays bounded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ambient_tracing.backends.base import RunStart, Span, SpanKind, TokenUsage, TracingBackend
from ambient_tracing.background import Worker
from ambient_tracing.spans.fanout import FanoutSpan
from ambient_tracing.spans.outgoing import OutgoingSpan

logger = logging.getLogger(__name__)

#: Queued span calls past which new runs skip the SDK backends.
MAX_BACKLOG = 20_000


class DeferredSpan:
    """Implements :class:`Span` by queueing every call on the span worker."""

    __slots__ = ("_span", "_worker", "trace_id")

    def __init__(self, worker: Worker, trace_id: str, span: Span | None = None) -> None:
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

        self._worker.post(start)
        return child

    def set_input(self, input: Any) -> None:
        def set_input() -> None:
            if self._span is not None:
                self._span.set_input(input)

        self._worker.post(set_input)

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

        self._worker.post(end)


def open_deferred_run(worker: Worker, backends: Sequence[TracingBackend], run: RunStart) -> DeferredSpan:
    """The turn's root in ``backends``, opened on the worker under ``run.trace_id`` (already set).
    What the spans get is prepared there too, on the worker (see masking.OutgoingSpan)."""
    assert run.trace_id is not None
    root = DeferredSpan(worker, run.trace_id)

    def start() -> None:
        spans = [span for backend in backends if (span := _start_run(backend, run)) is not None]
        if spans:
            fanout = FanoutSpan(spans, root.trace_id)
            root._span = OutgoingSpan(fanout, run.masked)

    worker.post(start)
    return root


def _start_run(backend: TracingBackend, run: RunStart) -> Span | None:
    try:
        return backend.start_run(run)
    except Exception as exc:  # a backend must never break the app
        logger.warning("%s could not start a run: %r", backend.name, exc)
        return None
