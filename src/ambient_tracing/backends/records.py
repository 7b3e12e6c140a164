"""Spans built by the package itself: plain records instead of vendor SDK objects.

A vendor SDK spends 0.1-2 ms of CPU per span (attribute encoding, processors, in-memory traces,
its own export). A :class:`RecordSpan` costs a small object and a few field writes on the event
loop; when it ends, its :class:`SpanRecord` is handed to each sink (an OTLP exporter, see
:mod:`.otlp`), which encodes it on its own thread for its destination. One tree of records serves
every destination of a run, so the spans are built once.
"""

from __future__ import annotations

import operator
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ambient_tracing.backends.base import RunStart, SpanKind, SpanSink, TokenUsage
from ambient_tracing.privacy import (
    MAX_VISIBLE_CHARS,
    mask,
    mask_attributes,
    mask_name,
    mask_text,
    outgoing_payload,
)

_span_ids = random.Random(os.urandom(16))
os.register_at_fork(after_in_child=lambda: _span_ids.seed(os.urandom(16)))


def _new_span_id() -> int:
    return _span_ids.getrandbits(64) or 1


class SpanRecord:
    """One span: who it is, when, what went in and came out. Read by exporters once ended.

    ``run`` is the run's :class:`RunStart` (trace-level facts: session, user, tags), shared by all
    spans of the run. ``standalone`` marks a finished span recorded as its own trace
    (``record_span``, e.g. Session Metrics) rather than a span of a run. ``is_root``: the top span
    of the package's part of the trace (a run's root, a standalone span); its ``parent_id`` is None,
    or the caller's span when the run joined a caller's trace (a remote parent).
    """

    __slots__ = (
        "attributes",
        "end_attributes",
        "end_ns",
        "error",
        "input",
        "input_set",
        "is_root",
        "kind",
        "model",
        "name",
        "output",
        "parent_id",
        "run",
        "span_id",
        "standalone",
        "start_ns",
        "trace_id",
        "usage",
    )

    def __init__(
        self,
        trace_id: str,
        parent_id: int | None,
        name: str,
        kind: SpanKind,
        run: RunStart,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_ns: int | None = None,
        standalone: bool = False,
        is_root: bool | None = None,
        span_id: int | None = None,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id or _new_span_id()
        self.parent_id = parent_id
        self.is_root = parent_id is None if is_root is None else is_root
        self.name = name
        self.kind = kind
        self.run = run
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

    def copy(self) -> SpanRecord:
        """A shallow copy (``copy.copy`` takes five times as long on a slotted object)."""
        twin = SpanRecord.__new__(SpanRecord)
        (
            twin.attributes,
            twin.end_attributes,
            twin.end_ns,
            twin.error,
            twin.input,
            twin.input_set,
            twin.is_root,
            twin.kind,
            twin.model,
            twin.name,
            twin.output,
            twin.parent_id,
            twin.run,
            twin.span_id,
            twin.standalone,
            twin.start_ns,
            twin.trace_id,
            twin.usage,
        ) = _slot_values(self)  # every slot, in __slots__ order (a test checks)
        return twin


_slot_values = operator.attrgetter(*SpanRecord.__slots__)


class RecordSpan:
    """Implements :class:`~ambient_tracing.backends.base.Span` with a :class:`SpanRecord`."""

    __slots__ = ("_ended", "_record", "_sinks")

    def __init__(self, record: SpanRecord, sinks: Sequence[SpanSink]) -> None:
        self._record = record
        self._sinks = sinks
        self._ended = False

    @classmethod
    def open_run(cls, run: RunStart, sinks: Sequence[SpanSink]) -> RecordSpan:
        """The run's root span, under ``run.trace_id`` (which must be set); a child of the caller's
        span when the run joined a caller's trace (``run.parent_span_id``)."""
        assert run.trace_id is not None
        record = SpanRecord(
            run.trace_id,
            int(run.parent_span_id, 16) if run.parent_span_id else None,
            run.name,
            SpanKind.RUN,
            run,
            input=run.input,
            attributes=run.attributes,
            start_ns=run.start_time_ns,
            is_root=True,
            span_id=run.root_span_id,
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
            parent.run,
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
    run: RunStart,
    *,
    input: Any = None,
    output: Any,
    attributes: Mapping[str, Any] | None,
) -> SpanRecord:
    """A finished span that is its own trace (``record_span``): started and ended now."""
    record = SpanRecord(
        trace_id, None, name, SpanKind.STEP, run, input=input, attributes=attributes, standalone=True
    )
    record.output = output
    record.end_ns = record.start_ns
    return record


def outgoing_record(record: SpanRecord, *, json_as_text: bool = False) -> SpanRecord:
    """An ended span record as it leaves the process: its tool payloads as
    :func:`~ambient_tracing.privacy.outgoing_payload` makes them (``json_as_text``: for a
    destination that stores JSON text as its value) and, when its run is masked, everything the
    core passed masked (its RunStart already is). A copy unless it goes as it is (mask off, payloads
    unchanged); run on an exporter's thread."""
    masked = record.run.masked
    input = outgoing_payload(record.input, masked=masked, as_text=json_as_text)
    output = outgoing_payload(record.output, masked=masked, as_text=json_as_text)
    if not masked and input is record.input and output is record.output:
        return record
    outgoing = record.copy()
    outgoing.input, outgoing.output = input, output
    if masked:
        outgoing.name = mask_name(record.name)
        outgoing.attributes = mask_attributes(record.attributes)
        outgoing.error = mask_text(record.error)
        outgoing.model = mask(record.model)
        outgoing.usage = mask_usage(record.usage)
        outgoing.end_attributes = mask_attributes(record.end_attributes)
    return outgoing


def mask_usage(usage: Sequence[TokenUsage]) -> Sequence[TokenUsage]:
    if all(_short(entry.model) and _short(entry.provider) for entry in usage):
        return usage
    return tuple(replace(entry, model=mask(entry.model), provider=mask(entry.provider)) for entry in usage)


def _short(text: str | None) -> bool:
    return text is None or len(text) <= MAX_VISIBLE_CHARS
