"""The span stack, built in one place: for each run, one span that stands for its span in every
backend that records it.

A backend either builds its spans from the package's records (it has a ``span_sink``: Langfuse and
an MLflow tracking server over OTLP) or is called through its SDK on the span worker
(:mod:`.deferred`). One tree of records serves every sink of a run; one queued call per operation
serves every SDK backend; :class:`~.fanout.FanoutSpan` joins the two. Nothing here calls an SDK on
the event loop: ``accepts`` is the backends' cheap check whether they record the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ambient_tracing.backends.base import RunStart, Span, SpanSink, TracingBackend
from ambient_tracing.backends.records import RecordSpan
from ambient_tracing.background import Worker
from ambient_tracing.failures import capture_internal_exceptions, warn_once
from ambient_tracing.spans.deferred import MAX_BACKLOG, open_deferred_run
from ambient_tracing.spans.fanout import FanoutSpan

logger = logging.getLogger(__name__)

#: What the stack asks of every backend (the rest of the protocol is asked by setup, flush, feedback).
_REQUIRED = ("name", "span_sink", "accepts", "start_run", "setup", "flush", "shutdown")


class SpanStack:
    """Opens each run's span in ``backends``; owns the span worker their SDK calls run on."""

    def __init__(self, backends: Sequence[TracingBackend]) -> None:
        for backend in backends:
            missing = [name for name in _REQUIRED if not hasattr(backend, name)]
            if missing:
                raise TypeError(
                    f"{type(backend).__name__} is not a TracingBackend: it has no {', '.join(missing)} "
                    "(see ambient_tracing.backends.TracingBackend)"
                )
        self.backends = tuple(backends)
        #: Where the SDK backends' span calls run, off the event loop.
        self.worker = Worker("ambient-tracing-spans", max_backlog=MAX_BACKLOG)

    @property
    def worker_behind(self) -> bool:
        """Whether the span worker is so far behind that new runs skip the SDK backends."""
        return self.worker.backlog > self.worker.max_backlog

    def open(self, run: RunStart) -> Span | None:
        """The run's root span (``run.trace_id`` set), or None when no backend records it."""
        assert run.trace_id is not None
        sinks: list[SpanSink] = []
        called: list[TracingBackend] = []
        behind = self.worker_behind
        for backend in self.backends:
            if not _accepts(backend, run.trace_id):
                continue
            sink = backend.span_sink
            if sink is not None:
                sinks.append(sink)
            elif behind:
                warn_once(logger, f"behind:{backend.name}", "span worker behind; %s skips runs", backend.name)
            else:
                called.append(backend)
        spans: list[Span] = []
        if sinks:
            spans.append(RecordSpan.open_run(run, tuple(sinks)))
        if called:
            spans.append(open_deferred_run(self.worker, called, run))
        if not spans:
            return None
        return spans[0] if len(spans) == 1 else FanoutSpan(spans, run.trace_id)

    def records(self, trace_id: str) -> bool:
        """Whether some backend would record a run under ``trace_id`` now (the check :meth:`open` makes)."""
        return any(_accepts(backend, trace_id) for backend in self.backends)


def _accepts(backend: TracingBackend, trace_id: str) -> bool:
    what = f"{backend.name} could not tell whether it records a run"
    with capture_internal_exceptions(logger, what, once=f"accepts:{id(backend)}"):
        return bool(backend.accepts(trace_id))
    return False
