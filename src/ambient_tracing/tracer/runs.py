"""What every :class:`~ambient_tracing.tracer.handlers.StreamTracer` of an app shares: opening a run
under one trace id in every backend, each thread's trace ids and Session Metrics, and the streams
still open (ended at shutdown)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from ambient_tracing.backends.base import RUN_SPAN_NAME, RunStart, Span
from ambient_tracing.failures import warn_once
from ambient_tracing.ids import new_trace_id, parse_trace_id, trace_id_from_run_id
from ambient_tracing.session_metrics.metrics import SessionMetrics, SessionReporter
from ambient_tracing.spans.outgoing import mask_run
from ambient_tracing.spans.stack import SpanStack
from ambient_tracing.tracer.request import CallerTrace
from ambient_tracing.tracer.threads import ThreadRegistry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OpenRun:
    """One traced run: its span (standing for the span in every backend that records it) and id."""

    span: Span
    trace_id: str
    thread_id: str | None
    #: Namespace and workflow attributes the run was recorded with (also on its Session Metrics).
    context: Mapping[str, str] = field(default_factory=dict)


class ClosableStream(Protocol):
    def close(self, error: str | None = None) -> None: ...


class Runs:
    """Opens runs (:meth:`open`) and keeps what they leave behind per thread. ``context`` gives the
    attributes every run carries (namespace, workflow); ``prepare`` is called before a run opens
    (it starts the backends' setup once, for apps without an ASGI lifespan).

    ``trace_id_from_run_id``: a run's trace id is derived from its runId
    (:func:`~ambient_tracing.ids.trace_id_from_run_id`). ``owned_elsewhere(trace_id, thread_id)``
    tells, without blocking, whether the backends hold ``trace_id`` as another thread's trace
    (see :meth:`admit`)."""

    def __init__(
        self,
        spans: SpanStack,
        threads: ThreadRegistry,
        *,
        runner_type: str,
        mask_messages: bool,
        sessions: SessionReporter | None = None,
        context: Callable[[], Mapping[str, str]] = dict,
        prepare: Callable[[], object] = lambda: None,
        trace_id_from_run_id: bool = False,
        owned_elsewhere: Callable[[str, str | None], bool] = lambda trace_id, thread_id: False,
    ) -> None:
        self.spans = spans
        self.threads = threads
        self.runner_type = runner_type
        self.mask_messages = mask_messages
        self.sessions = sessions
        self._context = context
        self._prepare = prepare
        self._open_streams: set[ClosableStream] = set()
        self.closed = False
        self.trace_id_from_run_id = trace_id_from_run_id
        self._owned_elsewhere = owned_elsewhere

    def admit(self, trace_id: str, thread_id: str | None, source: str) -> bool:
        """Whether a caller-chosen ``trace_id`` (from ``source``: a traceparent, a runId) may be the
        id of a run of ``thread_id``. Refused (False, warned once per id) when the id is a trace of
        another thread: in this process's registry, or in the backends as far as they have answered.

        Never blocks: the backends' answer (the feedback route's ownership data) is read from the
        lookup cache, and a lookup is started when it is not there. An id no backend has answered
        for yet is admitted (a brand-new id, the normal case, would otherwise wait on I/O before the
        first byte); the middleware starts the lookup when the request arrives, so by the time the
        id is needed the answer is usually in.
        """
        owner = self.threads.thread_of(trace_id)
        refused = owner != thread_id if owner is not None else self._owned_elsewhere(trace_id, thread_id)
        if refused:
            warn_once(
                logger,
                f"graft:{trace_id}",
                "refusing trace id %s from %s: it is a trace of another thread; the run gets a fresh id",
                trace_id,
                source,
            )
        return not refused

    def derived_trace_id(self, run_id: str | None, thread_id: str | None) -> str | None:
        """The run's id derived from its runId, when that option is on and the id is admitted."""
        if not self.trace_id_from_run_id or not run_id:
            return None
        trace_id = trace_id_from_run_id(run_id)
        return trace_id if trace_id is not None and self.admit(trace_id, thread_id, "runId") else None

    def open(
        self,
        *,
        thread_id: str | None,
        run_id: str | None,
        user_id: str | None,
        user_name: str | None,
        input: Any,
        trace_id: str | None = None,
        caller: CallerTrace | None = None,
        start_time_ns: int | None = None,
    ) -> OpenRun | None:
        """Start the run in every backend under one trace id; None when no backend records it.

        The id is, in order: ``caller``'s (settled and admitted before the stream; the root is then
        a child of the caller's span, if any); ``trace_id`` when it is valid (32 hex or a W3C
        traceparent: an id the app chose); the id derived from ``run_id`` when that option is on
        and the id is admitted; else a new random one. No SDK call happens here (see
        :mod:`ambient_tracing.spans.stack`). None after :meth:`close`: no run is announced that no
        backend would record. The run starts at ``start_time_ns`` (epoch ns), else now.
        """
        if self.closed:
            return None
        self._prepare()
        chosen = (
            (caller.trace_id if caller is not None else None)
            or parse_trace_id(trace_id)
            or self.derived_trace_id(run_id, thread_id)
            or new_trace_id()
        )
        context = dict(self._context())
        run = self._run_start(chosen, thread_id, run_id, user_id, user_name, input, context, start_time_ns)
        if caller is not None:
            run = replace(run, parent_span_id=caller.parent_span_id, root_span_id=caller.root_span_id)
        span = self.spans.open(run)
        if span is None:
            return None
        if thread_id:
            self.threads.run_started(thread_id, chosen)
        return OpenRun(span=span, trace_id=chosen, thread_id=thread_id, context=context)

    def _run_start(
        self,
        trace_id: str,
        thread_id: str | None,
        run_id: str | None,
        user_id: str | None,
        user_name: str | None,
        input: Any,
        context: Mapping[str, str],
        start_time_ns: int | None,
    ) -> RunStart:
        """What the run opens with in every backend: masked (when on) but for the operator's context."""
        run = RunStart(
            name=RUN_SPAN_NAME,
            thread_id=thread_id,
            run_id=run_id,
            user_id=user_id,
            user_name=user_name,
            runner_type=self.runner_type,
            turn_number=self.threads.next_turn_number(thread_id) if thread_id else 1,
            input=input,
            trace_id=trace_id,
            start_time_ns=start_time_ns or time.time_ns(),
            attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": thread_id or ""},
        )
        if self.mask_messages:
            run = mask_run(run)
        # The namespace and workflow are the operator's configuration, not content: never masked.
        return replace(run, attributes={**(run.attributes or {}), **context})

    def ended(self, run: OpenRun) -> None:
        if run.thread_id:
            self.threads.run_ended(run.thread_id, run.trace_id)

    def usage_delta(self, thread_id: str | None, totals: Mapping[str, int]) -> dict[str, int]:
        """The part of a thread's cumulative token counts not reported before (all of it without a thread)."""
        return self.threads.usage_delta(thread_id, totals) if thread_id else dict(totals)

    def session_metrics(
        self, run: OpenRun, user_id: str | None, user_name: str | None
    ) -> SessionMetrics | None:
        """The thread's Session Metrics accumulator, with one more run started (None: not counted)."""
        if self.sessions is None or not run.thread_id:
            return None
        return self.sessions.run_started(run.thread_id, user_id, user_name, run.context)

    def stream_opened(self, stream: ClosableStream) -> None:
        self._open_streams.add(stream)

    def stream_closed(self, stream: ClosableStream) -> None:
        self._open_streams.discard(stream)

    @property
    def open_streams(self) -> int:
        """How many streams have a run open now."""
        return len(self._open_streams)

    def close(self) -> None:
        """No run opens from now on (:meth:`end_open_runs` ends those still open)."""
        self.closed = True

    def end_open_runs(self) -> None:
        """Every run still open ends as cut short by the shutdown (on the tracer worker, as the
        tracers' calls: :mod:`.worker`)."""
        for stream in list(self._open_streams):
            stream.close(error="shutdown before the run finished")
