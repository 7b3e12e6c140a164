"""The thread the tracers run on: the doors hand it what they saw, the event loop only streams.

Turning events into spans (parsing each event's JSON, the handlers, Session Metrics counting)
costs a few microseconds per event; on the event loop that is time every other request waits. A
door queues each chunk or event here in the order it passed (:meth:`TracerWorker.submit`: a deque
append, no lock, no system call) and goes on; one daemon thread runs the queued calls in that order.
The thread is woken at most once per :data:`BATCH_SECONDS`, so a busy stream's events are traced in
batches and waking it costs the loop nothing per event.

Only a run's opening stays on the loop (its id is announced in the stream right after its
RUN_STARTED): :class:`~ambient_tracing.tracer.handlers.RunOpener` there, the rest here. Nothing
queued here waits on I/O (spans leave through the span worker and the exporters' queues), so the
thread keeps up unless the process is out of CPU; past :attr:`TracerWorker.max_backlog` queued
calls, :meth:`~TracerWorker.submit` refuses and the door stops tracing that stream (its run ends as
an error saying so) rather than hold memory without bound.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ambient_tracing.failures import capture_internal_exceptions

logger = logging.getLogger(__name__)

#: How long the thread lets calls gather after it is woken: one wake-up per batch, not per event.
BATCH_SECONDS = 0.002
#: Queued calls past which :meth:`TracerWorker.submit` refuses new ones (and items per :class:`Lane`).
MAX_BACKLOG = 50_000
#: How often :attr:`TracerWorker.tick` runs when nothing else wakes the thread.
DEFAULT_TICK_SECONDS = 1.0

T = TypeVar("T")

_workers: weakref.WeakSet[TracerWorker] = weakref.WeakSet()


def drain_tracer_workers(timeout: float) -> bool:
    """Blocking: wait until every tracer worker of the process has run the calls queued so far."""
    deadline = time.monotonic() + timeout
    return all(worker.drain(max(deadline - time.monotonic(), 0.0)) for worker in list(_workers))


class TracerWorker:
    """One daemon thread running submitted calls in order, started on first use.

    ``tick`` runs on the thread at least every ``tick_seconds`` (Session Metrics' idle sweep)."""

    def __init__(
        self,
        *,
        tick: Callable[[], object] | None = None,
        tick_seconds: float = DEFAULT_TICK_SECONDS,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self._calls: deque[Callable[[], object]] = deque()
        self._wake = threading.Event()
        self._waiting = False  # the thread is (about to be) asleep on _wake: a submit must set it
        self._tick = tick
        self.tick_seconds = tick_seconds
        self.max_backlog = max_backlog
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        _workers.add(self)

    @property
    def on_thread(self) -> bool:
        """Whether the caller runs on this worker's thread."""
        return self._thread is threading.current_thread()

    def submit(self, call: Callable[[], object]) -> bool:
        """Queue ``call``; False (not queued) when the backlog is full. After :meth:`close` the
        call runs at once on the caller's thread."""
        calls = self._calls
        if len(calls) >= self.max_backlog:
            return False
        if self._thread is None:
            if self._closed:
                self._run(call)
                return True
            self._start()
        calls.append(call)
        if self._waiting:
            self._waiting = False
            self._wake.set()
        return True

    def call(self, function: Callable[[], T]) -> Future[T]:
        """Run ``function`` on the thread after what is queued (never refused); its result as a future."""
        done: Future[T] = Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(function())
                except BaseException as exc:
                    done.set_exception(exc)

        calls = self._calls
        if self._thread is None and self._closed:
            run()
            return done
        if self._thread is None:
            self._start()
        calls.append(run)
        self._wake.set()
        return done

    def drain(self, timeout: float) -> bool:
        """Blocking: wait until every call queued so far has run; False on timeout."""
        if self._thread is None or self.on_thread or (self._waiting and not self._calls):
            return True  # nothing queued and nothing running (asleep only once all has run)
        try:
            self.call(lambda: None).result(timeout)
        except TimeoutError:
            return False
        return True

    def close(self, timeout: float) -> bool:
        """Blocking: run what is queued, then stop the thread; later calls run on the caller's thread."""
        drained = self.drain(timeout)
        with self._lock:
            thread, self._thread = self._thread, None
            self._closed = True
        if thread is not None:
            self._calls.append(_stop)
            self._wake.set()
        return drained

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                thread = threading.Thread(target=self._work, name="ambient-tracing-tracer", daemon=True)
                self._thread = thread
                thread.start()

    def _work(self) -> None:
        calls = self._calls
        next_tick = time.monotonic() + self.tick_seconds
        while True:
            if not calls:
                self._waiting = True
                if not calls:  # checked after raising the flag: a submit in between is not lost
                    woken = self._wake.wait(max(next_tick - time.monotonic(), 0.0))
                    self._wake.clear()
                    if woken:
                        time.sleep(BATCH_SECONDS)  # let a busy stream's next events gather
                self._waiting = False
            while calls:
                call = calls.popleft()
                if call is _stop:
                    return
                self._run(call)
            if self._tick is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self.tick_seconds
                with capture_internal_exceptions(logger, "a tracer worker tick failed", once="tick"):
                    self._tick()

    @staticmethod
    def _run(call: Callable[[], object]) -> None:
        # Tracers guard their own calls; this is a last resort.
        with capture_internal_exceptions(logger, "a tracer call failed", once="tracer call"):
            call()


class Lane:
    """One stream's items on their way to the tracer worker, handled there in order by ``handle``.

    :meth:`put` is the hot path: a deque append and a flag test, no allocation the garbage
    collector tracks (a queued tuple per chunk would be promoted and make full collections come
    sooner). The lane is queued on the worker once per batch, when its first item arrives."""

    __slots__ = ("_handle", "_items", "_max_pending", "_scheduled", "_worker")

    def __init__(self, worker: TracerWorker, handle: Callable[[Any], object]) -> None:
        self._worker = worker
        self._handle = handle
        self._items: deque[Any] = deque()
        self._scheduled = False
        self._max_pending = worker.max_backlog

    def put(self, item: Any) -> bool:
        """Queue ``item``; False (not queued) when the lane is full: the worker is that far behind."""
        items = self._items
        if len(items) >= self._max_pending:
            return False
        items.append(item)  # first, then the flag: a drain that has just begun still sees it
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
        self._items.pop()
        self._scheduled = False
        return False

    def _drain(self) -> None:
        # Reset first: an item put while this runs queues the lane again (at worst, an empty drain).
        self._scheduled = False
        items, handle = self._items, self._handle
        while items:
            item = items.popleft()
            if type(item) is _LaneCall:
                with capture_internal_exceptions(logger, "a tracer call failed", once="lane call"):
                    item.function()
            else:
                handle(item)


class _LaneCall:
    """A call queued in a :class:`Lane` among its items."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[[], object]) -> None:
        self.function = function


def _stop() -> None:
    """The marker that ends the thread (never run)."""
