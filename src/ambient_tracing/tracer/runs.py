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
from ambient_tracing.ids import new_trace_id, parse_trace_id
from ambient_tracing.session_metrics.metrics import SessionMetrics, SessionReporter
from ambient_tracing.spans.outgoing import mask_run
from ambient_tracing.spans.stack import SpanStack
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
    (it starts the backends' setup once, for apps without an ASGI lifespan)."""

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

    def open(
        self,
        *,
        thread_id: str | None,
        run_id: str | None,
        user_id: str | None,
        user_name: str | None,
        input: Any,
        trace_id: str | None = None,
    ) -> OpenRun | None:
        """Start the run in every backend under one trace id; None when no backend records it.

        The id is ``trace_id`` when it is valid (32 hex or a W3C traceparent: a caller-chosen id),
        else a new random one. No SDK call happens here (see :mod:`ambient_tracing.spans.stack`).
        None after :meth:`close`: no run is announced that no backend would record.
        """
        if self.closed:
            return None
        self._prepare()
        chosen = parse_trace_id(trace_id) or new_trace_id()
        context = dict(self._context())
        run = self._run_start(chosen, thread_id, run_id, user_id, user_name, input, context)
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
            start_time_ns=time.time_ns(),
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
        """No run opens from now on; every run still open ends as cut short by the shutdown."""
        self.closed = True
        for stream in list(self._open_streams):
            stream.close(error="shutdown before the run finished")
