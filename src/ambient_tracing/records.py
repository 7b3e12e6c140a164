"""Spans built by the package itself: plain records instead of vendor SDK objects.

A vendor SDK spends 0.1-2 ms of CPU per span (attribute encoding, processors, in-memory traces,
its own export). A :class:`RecordSpan` costs a small object and a few field writes on the event
loop; when it ends, its :class:`SpanRecord` is handed to each sink (an OTLP exporter, see
:mod:`.otlp`), which encodes it on its own thread for its destination. One tree of records serves
every destination of a run, so the spans are built once.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .backends.base import SpanKind, TokenUsage, TurnStart

ROOT_NAME = "llm_interaction"

_span_ids = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _span_ids.seed(os.urandom(16)))


def _new_span_id() -> int:
    return _span_ids.getrandbits(64) or 1


class SpanRecord:
    """One span: who it is, when, what went in and came out. Read by exporters once ended.

    ``turn`` is the run's :class:`TurnStart` (trace-level facts: session, user, tags), shared by all
    spans of the run. ``standalone`` marks a finished span recorded as its own trace
    (``record_span``, e.g. Session Metrics) rather than a run's turn.
    """

    __slots__ = (
        "attributes",
        "end_attributes",
        "end_ns",
        "error",
        "input",
        "input_set",
        "kind",
        "model",
        "name",
        "output",
        "parent_id",
        "span_id",
        "standalone",
        "start_ns",
        "trace_id",
        "turn",
        "usage",
    )

    def __init__(
        self,
        trace_id: str,
        parent_id: int | None,
        name: str,
        kind: SpanKind,
        turn: TurnStart,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_ns: int | None = None,
        standalone: bool = False,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = _new_span_id()
        self.parent_id = parent_id
        self.name = name
        self.kind = kind
        self.turn = turn
        self.input = input
        self.input_set = False  # set_input was called (MLflow's SDK then stores even None)
        self.attributes = attributes
        self.start_ns = start_ns or time.time_ns()
        self.end_ns = 0
        self.output: Any = None
        self.error: str | None = None
        self.model: str | None = None
        self.usage: Sequence[TokenUsage] = ()
        self.end_attributes: Mapping[str, Any] | None = None
        self.standalone = standalone


class SpanSink(Protocol):
    """Takes ended spans; must never block (called on the event loop)."""

    def submit(self, record: SpanRecord) -> None: ...


class RecordSpan:
    """Implements :class:`~ambient_tracing.backends.base.Span` with a :class:`SpanRecord`."""

    __slots__ = ("_ended", "_record", "_sinks")

    def __init__(self, record: SpanRecord, sinks: Sequence[SpanSink]) -> None:
        self._record = record
        self._sinks = sinks
        self._ended = False

    @classmethod
    def open_turn(cls, turn: TurnStart, sinks: Sequence[SpanSink]) -> RecordSpan:
        """The run's root span, under ``turn.trace_id`` (which must be set)."""
        assert turn.trace_id is not None
        record = SpanRecord(
            turn.trace_id,
            None,
            ROOT_NAME,
            SpanKind.TURN,
            turn,
            input=turn.input,
            attributes=turn.attributes,
            start_ns=turn.start_time_ns,
        )
        return cls(record, sinks)

    @property
    def trace_id(self) -> str:
        return self._record.trace_id

    @property
    def record(self) -> SpanRecord:
        return self._record

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> RecordSpan:
        parent = self._record
        child = SpanRecord(
            parent.trace_id,
            parent.span_id,
            name,
            kind,
            parent.turn,
            input=input,
            attributes=attributes,
            start_ns=start_time_ns,
        )
        return RecordSpan(child, self._sinks)

    def set_input(self, input: Any) -> None:
        if not self._ended:
            record = self._record
            record.input = input
            record.input_set = True

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
        record = self._record
        record.output = output
        record.error = error
        record.model = model
        record.usage = usage
        record.end_attributes = attributes
        record.end_ns = end_time_ns or time.time_ns()
        for sink in self._sinks:
            sink.submit(record)


def standalone_record(
    trace_id: str,
    name: str,
    turn: TurnStart,
    *,
    input: Any = None,
    output: Any,
    attributes: Mapping[str, Any] | None,
) -> SpanRecord:
    """A finished span that is its own trace (``record_span``): started and ended now."""
    record = SpanRecord(
        trace_id, None, name, SpanKind.STEP, turn, input=input, attributes=attributes, standalone=True
    )
    record.output = output
    record.end_ns = record.start_ns
    return record
