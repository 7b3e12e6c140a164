"""The Python door: trace an ``AsyncIterator[BaseEvent]`` the way the middleware traces bytes."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from enum import Enum
from functools import cache
from typing import Any

from ag_ui.core import BaseEvent, CustomEvent, EventType
from pydantic import BaseModel

from ambient_tracing.doors.nesting import request_traced
from ambient_tracing.doors.responder import TRACE_ID_EVENT_NAME
from ambient_tracing.doors.result_id import result_with_trace_id
from ambient_tracing.failures import capture_internal_exceptions, warn_once
from ambient_tracing.observability import Observability
from ambient_tracing.tracer.handlers import RunOpener, StreamTracer
from ambient_tracing.tracer.request import RunRequest
from ambient_tracing.tracer.runs import OpenRun
from ambient_tracing.tracer.worker import Lane

logger = logging.getLogger(__name__)


async def trace_agui_stream(
    events: AsyncIterator[BaseEvent],
    observability: Observability,
    run_input: Any = None,
    *,
    user_id: str | None = None,
    user_name: str | None = None,
) -> AsyncIterator[BaseEvent]:
    """Yield every event of ``events`` unchanged, tracing each run; after each RUN_STARTED that
    is traced, also yield ``CustomEvent(name="ambient:trace_id", value={"traceId": ...})``.

    ``run_input`` (a RunAgentInput or its dict) gives the thread, run and user message. With
    ``result_trace_id`` on, a traced run's RUN_FINISHED is yielded as a copy whose ``result`` carries
    ``traceId`` (see :mod:`.result_id`). When the
    consumer stops early, the run is ended as cancelled and ``events`` is closed too. Inside a
    request that :class:`~ambient_tracing.TracingMiddleware` traces, events pass through untouched
    (the middleware records the run and sends its id once).

    Long because a generator's cleanup has to sit where ``GeneratorExit`` arrives, in one frame.
    """
    if not observability.enabled or request_traced():  # behind TracingMiddleware: it traces the bytes
        try:
            async for event in events:
                yield event
        except GeneratorExit:
            await _close(events)
            raise
        return
    request = RunRequest.from_input(run_input).with_user(user_id, user_name)
    opener = RunOpener(observability.runs, request)
    traced: _TracedEvents | None = _TracedEvents(observability, request)
    try:
        async for event in events:
            kind = getattr(event, "type", None)
            trace_id = None
            if traced is not None:
                if observability.result_trace_id:
                    event = _with_result_trace_id(event, traced.open_trace_id)
                if kind == EventType.RUN_STARTED:
                    trace_id = traced.start_run(opener, event)
                else:
                    if kind in (EventType.RUN_FINISHED, EventType.RUN_ERROR):
                        traced.run_ended()
                    if not traced.submit(event):
                        traced = None
            yield event
            if trace_id is not None:
                yield trace_id_event(trace_id)
    except GeneratorExit:
        if traced is not None:
            traced.close("cancelled: the consumer stopped reading")
        await _close(events)
        raise
    except BaseException as exc:
        if traced is not None:
            traced.close(f"{type(exc).__name__}: {exc}")
        raise
    if traced is not None:
        traced.close(None)


class _TracedEvents:
    """One stream's events on their way to the tracer worker, where its tracer runs; runs are
    opened here, on the caller's loop, so their id is yielded right after their RUN_STARTED."""

    __slots__ = ("_lane", "_open", "_runs", "_tracer")

    def __init__(self, observability: Observability, request: RunRequest) -> None:
        self._runs = observability.runs
        self._open: OpenRun | None = None  # the run open now, as the caller's loop sees it
        # The settled id (if any) is the opener's to give.
        self._tracer = tracer = StreamTracer(observability.runs, request.with_caller(None))

        def trace(event: BaseEvent, at_ns: int) -> None:
            tracer.clock.now_ns = at_ns  # when the event passed: its spans' times
            try:
                tracer.on_event(_EventView(event))
            except Exception as exc:  # tracing must never break the stream
                tracer.warn("could not trace a %s event: %r", getattr(event, "type", "?"), exc)

        self._lane = Lane(observability.tracer_worker, trace)

    def start_run(self, opener: RunOpener, event: BaseEvent) -> str | None:
        """Open the run ``event`` starts; its trace id, or None when it is not traced."""
        opened = None
        with capture_internal_exceptions(logger, "could not open a run"):
            opened = opener.open(_EventView(event))
        tracer = self._tracer
        self._lane.call(lambda: tracer.start_run(opened))
        self.run_ended()
        self._open = opened
        return opened.trace_id if opened is not None else None

    @property
    def open_trace_id(self) -> str | None:
        return self._open.trace_id if self._open is not None else None

    def run_ended(self) -> None:
        """The open run ended: its thread's current trace id changes now (its spans end on the worker)."""
        opened, self._open = self._open, None
        if opened is not None:
            with capture_internal_exceptions(logger, "could not mark a run ended"):
                self._runs.ended(opened)

    def submit(self, event: BaseEvent) -> bool:
        """Hand ``event`` to the tracer; False when the worker is too far behind (tracing stops)."""
        if self._lane.put(event):
            return True
        warn_once(logger, "tracer worker behind", "the tracer worker is behind; some streams are not traced")
        self.close("not traced to the end: the tracer worker was behind")
        return False

    def close(self, error: str | None) -> None:
        self.run_ended()
        tracer, ended_ns = self._tracer, time.time_ns()

        def close() -> None:
            tracer.clock.now_ns = ended_ns  # what is still open ends when the stream did
            tracer.close(error)

        self._lane.call(close)


def _with_result_trace_id(event: BaseEvent, trace_id: str | None) -> BaseEvent:
    """A RUN_FINISHED of a traced run with ``result.traceId`` (a copy; rules in :mod:`.result_id`)."""
    if trace_id is None or getattr(event, "type", None) != EventType.RUN_FINISHED:
        return event
    with capture_internal_exceptions(logger, "could not add result.traceId", once="result_trace_id"):
        changed, result = result_with_trace_id(getattr(event, "result", None), trace_id)
        if changed:
            return event.model_copy(update={"result": result})
    return event


async def _close(events: AsyncIterator[BaseEvent]) -> None:
    """Close the source, as ``async for`` on it would not (an async generator keeps its frame)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def trace_id_event(trace_id: str) -> CustomEvent:
    """The AG-UI event that tells the client which trace its run is."""
    return CustomEvent(
        type=EventType.CUSTOM,
        name=TRACE_ID_EVENT_NAME,
        value={"traceId": trace_id},
        timestamp=int(time.time() * 1000),
    )


@cache
def _field_name(wire_name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", wire_name).lower()


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return [_plain(item) for item in value]
    return value


class _EventView(Mapping[str, Any]):
    """An AG-UI event model read by its wire (camelCase) keys, without dumping the whole model."""

    __slots__ = ("_event",)

    def __init__(self, event: BaseEvent) -> None:
        self._event = event

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self._event, _field_name(key), None)
        if value is None:
            extra = self._event.model_extra
            value = extra.get(key) if extra else None
        return default if value is None else _plain(value)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._event.model_dump(by_alias=True, exclude_none=True))

    def __len__(self) -> int:
        return len(self._event.model_dump(by_alias=True, exclude_none=True))
