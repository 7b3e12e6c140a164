"""For tests of apps that use the package (and the package's own): a backend that keeps every span
in memory, on the same path the vendor SDK backends take (its calls run on the span worker).

    backend = RecordingBackend()
    app = TracingMiddleware(agent_app, observability=Observability([backend]))
    ...  # run the agent
    run = backend.runs[-1]           # waits for the span worker first
    assert run.find("tool_search").output == {"hits": 3}

Reading :attr:`RecordingBackend.runs` (or :meth:`~RecordingBackend.by_trace`) first waits, at most a
few seconds, until every span call made so far has reached the backend.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambient_tracing.backends.base import RunStart, SpanKind, SpanSink, TokenUsage
from ambient_tracing.background import drain_workers

#: How long reading the recorded spans waits for the span worker.
DRAIN_SECONDS = 10.0

_CLOCK = itertools.count()


@dataclass(eq=False)
class RecordedSpan:
    """One span as the tracer made it: what went in and came out, its children, when it ended."""

    name: str
    kind: SpanKind
    trace_id: str
    parent: RecordedSpan | None
    input: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)
    output: Any = None
    error: str | None = None
    model: str | None = None
    usage: tuple[TokenUsage, ...] = ()
    #: How many times it was ended (the tracer ends each span exactly once).
    ended: int = 0
    children: list[RecordedSpan] = field(default_factory=list)
    #: What the run opened with (on a run's root span).
    run: RunStart | None = None
    #: When the span started and (first) ended, as ticks of one process-wide counter.
    started_at: int = field(default_factory=lambda: next(_CLOCK))
    ended_at: int | None = None
    #: Its start and (first) end time as the tracer gave them (``time.time_ns()``; now when none was).
    start_time_ns: int = field(default_factory=time.time_ns)
    end_time_ns: int | None = None

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> RecordedSpan:
        child = RecordedSpan(name, kind, self.trace_id, self, input, dict(attributes or {}))
        if start_time_ns:
            child.start_time_ns = start_time_ns
        self.children.append(child)
        return child

    def set_input(self, input: Any) -> None:
        self.input = input

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
        self.ended += 1
        if self.ended_at is None:
            self.ended_at = next(_CLOCK)
            self.end_time_ns = end_time_ns or time.time_ns()
        self.output, self.error, self.model, self.usage = output, error, model, tuple(usage)
        self.attributes.update(attributes or {})

    def find(self, name: str) -> RecordedSpan:
        """The first span named ``name`` in this subtree (StopIteration when none)."""
        return next(span for span in self.walk() if span.name == name)

    def walk(self) -> list[RecordedSpan]:
        """This span and every span under it, depth first (without recursion: spans nest deep)."""
        found: list[RecordedSpan] = []
        pending = [self]
        while pending:
            span = pending.pop()
            found.append(span)
            pending.extend(reversed(span.children))
        return found


def outliving_spans(root: RecordedSpan) -> list[str]:
    """Spans under ``root`` that are still open, or ended after their parent: should be none."""
    found = []
    for span in root.walk():
        parent = span.parent
        if span.ended_at is None:
            found.append(f"{span.name} never ended")
        elif parent is not None and parent.ended_at is not None and span.ended_at > parent.ended_at:
            found.append(f"{span.name} outlives {parent.name}")
    return found


class RecordingBackend:
    """A :class:`~ambient_tracing.backends.base.TracingBackend` in memory. ``record=False`` acts as a
    sampled-out backend (it accepts no run)."""

    name = "recording"
    span_sink: SpanSink | None = None

    def __init__(self, *, record: bool = True) -> None:
        self._runs: list[RecordedSpan] = []
        #: ``record_span`` calls (Session Metrics), in order, each with the flushes before it.
        self.records: list[dict[str, Any]] = []
        self.record = record
        self.flushed = self.closed = 0
        self._lock = threading.Lock()

    @property
    def runs(self) -> list[RecordedSpan]:
        """The root span of every run recorded so far, once the tracer and span workers have caught up."""
        drain_workers(DRAIN_SECONDS)
        with self._lock:
            return list(self._runs)

    def by_trace(self, trace_id: str) -> RecordedSpan:
        return next(run for run in self.runs if run.trace_id == trace_id)

    def open_spans(self) -> list[RecordedSpan]:
        """Spans not ended exactly once."""
        return [span for run in self.runs for span in run.walk() if span.ended != 1]

    def accepts(self, trace_id: str) -> bool:
        return self.record

    def setup(self) -> None:
        pass

    def start_run(self, run: RunStart) -> RecordedSpan | None:
        if not self.record:
            return None
        span = RecordedSpan(
            run.name,
            SpanKind.RUN,
            run.trace_id or uuid.uuid4().hex,
            None,
            run.input,
            dict(run.attributes or {}),
            run=run,
            start_time_ns=run.start_time_ns or time.time_ns(),
        )
        with self._lock:
            self._runs.append(span)
        return span

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
        with self._lock:
            self.records.append(
                {
                    "name": name,
                    "thread_id": thread_id,
                    "user_id": user_id,
                    "runner_type": runner_type,
                    "input": input,
                    "output": output,
                    "metadata": dict(metadata or {}),
                    "flushed_before": self.flushed,
                }
            )

    def flush(self, timeout: float) -> None:
        self.flushed += 1

    def shutdown(self) -> None:
        self.closed += 1
