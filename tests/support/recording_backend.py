"""A backend that keeps every span in memory: for tests of the core and the doors, where what
matters is which trace operations an event stream produces, not how a vendor stores them."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ambient_tracing import RunStart, SpanKind, TokenUsage


@dataclass
class RecordedSpan:
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
    ended: int = 0
    children: list[RecordedSpan] = field(default_factory=list)
    turn: RunStart | None = None
    #: When the span started and (first) ended, as ticks of one process-wide counter.
    started_at: int = field(default_factory=lambda: next(_CLOCK))
    ended_at: int | None = None

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
        self.children.append(child)
        self.backend_spans().append(child)
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
        self.output, self.error, self.model, self.usage = output, error, model, tuple(usage)
        self.attributes.update(attributes or {})

    def backend_spans(self) -> list[RecordedSpan]:
        root = self
        while root.parent is not None:
            root = root.parent
        return _SPANS[root.trace_id]

    def find(self, name: str) -> RecordedSpan:
        return next(span for span in self.walk() if span.name == name)

    def walk(self) -> list[RecordedSpan]:
        return [self, *itertools.chain.from_iterable(child.walk() for child in self.children)]


_SPANS: dict[str, list[RecordedSpan]] = {}
_CLOCK = itertools.count()


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
    """Implements TracingBackend in memory. ``record`` False acts as a sampled-out backend."""

    name = "recording"

    def __init__(self, *, record: bool = True) -> None:
        self.turns: list[RecordedSpan] = []
        self.records: list[dict[str, Any]] = []  # record_span calls, in order
        self.record = record
        self.flushed = self.closed = 0
        self._lock = threading.Lock()

    def setup(self) -> None:
        pass

    def start_run(self, turn: RunStart) -> RecordedSpan | None:
        if not self.record:
            return None
        trace_id = turn.trace_id or uuid.uuid4().hex
        span = RecordedSpan(
            "llm_interaction",
            SpanKind.RUN,
            trace_id,
            None,
            turn.input,
            dict(turn.attributes or {}),
            turn=turn,
        )
        with self._lock:
            _SPANS[trace_id] = [span]
            self.turns.append(span)
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

    def open_spans(self) -> list[RecordedSpan]:
        return [span for turn in self.turns for span in turn.walk() if span.ended != 1]

    def by_trace(self, trace_id: str) -> RecordedSpan:
        return next(turn for turn in self.turns if turn.trace_id == trace_id)
