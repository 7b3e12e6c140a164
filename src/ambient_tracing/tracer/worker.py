"""The tracer worker's lanes: what a door saw, on its way to the thread the tracers run on.

Turning events into spans (parsing each event's JSON, the handlers, Session Metrics counting)
costs a few microseconds per event; on the event loop that is time every other request waits. A
door queues each chunk or event of its stream in a :class:`Lane` in the order it passed and goes
on; the lane is queued once per batch on the tracer worker (a :class:`~ambient_tracing.background.Worker`
that :class:`~ambient_tracing.observability.Observability` owns), which handles its items in order.

Only a run's opening stays on the loop (its id is announced in the stream right after its
RUN_STARTED): :class:`~ambient_tracing.tracer.handlers.RunOpener` there, the rest here. Nothing
queued here waits on I/O (spans leave through the span worker and the exporters' queues), so the
thread keeps up unless the process is out of CPU; past the worker's ``max_backlog`` items a lane
refuses and the door stops tracing that stream (its run ends as an error saying so) rather than
hold memory without bound.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ambient_tracing.background import Worker
from ambient_tracing.failures import capture_internal_exceptions

logger = logging.getLogger(__name__)


class Lane:
    """One stream's items on their way to the tracer worker, handled there in order by ``handle``
    with the time each was put (``time.time_ns()``: when it passed the door, so the spans it opens
    or ends carry that time, not the worker's, which may be a batch or a backlog later).

    :meth:`put` is the hot path: two deque appends and a flag test, no allocation the garbage
    collector tracks (a queued tuple per chunk would be promoted and make full collections come
    sooner). The lane is queued on the worker once per batch, when its first item arrives."""

    __slots__ = ("_handle", "_items", "_max_pending", "_scheduled", "_times", "_worker")

    def __init__(self, worker: Worker, handle: Callable[[Any, int], object]) -> None:
        self._worker = worker
        self._handle = handle
        self._items: deque[Any] = deque()
        self._times: deque[int] = deque()  # one per item that is not a call, in the same order
        self._scheduled = False
        self._max_pending = worker.max_backlog

    def put(self, item: Any) -> bool:
        """Queue ``item``; False (not queued) when the lane is full: the worker is that far behind."""
        items = self._items
        if len(items) >= self._max_pending:
            return False
        self._times.append(time.time_ns())
        items.append(item)  # after its time, then the flag: a drain that has just begun sees both
        if self._scheduled:
            return True
        self._scheduled = True
        return self._worker.submit(self._drain) or self._refused()

    def call(self, function: Callable[[], object]) -> None:
        """Run ``function`` on the worker after the items queued so far, before those queued after
        (never refused: a run's opening and its stream's end are not lost)."""
        self._items.append(_LaneCall(function))
        if not self._scheduled:
            self._scheduled = True
            self._worker.call(self._drain)

    def _refused(self) -> bool:
        """The worker refused to queue the lane: take back the item just put, unless a drain that
        was running meanwhile took it (the loop is the only producer, so it is the last one if it
        is still there): then it was handled and the put stands."""
        self._scheduled = False
        if not self._items:
            return True
        self._items.pop()
        self._times.pop()
        return False

    def _drain(self) -> None:
        # Reset first: an item put while this runs queues the lane again (at worst, an empty drain).
        self._scheduled = False
        items, times, handle = self._items, self._times, self._handle
        while items:
            item = items.popleft()
            if type(item) is _LaneCall:
                with capture_internal_exceptions(logger, "a tracer call failed", once="lane call"):
                    item.function()
            else:
                handle(item, times.popleft())


class _LaneCall:
    """A call queued in a :class:`Lane` among its items."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[[], object]) -> None:
        self.function = function
