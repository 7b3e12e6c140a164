"""Per-thread trace ids: which runs are open now and which ran last, bounded in size and age."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

DEFAULT_MAX_THREADS = 10_000
DEFAULT_IDLE_SECONDS = 6 * 3600.0


@dataclass(slots=True)
class _Thread:
    # The thread's open runs, oldest first (runs of one thread may overlap).
    open: dict[str, None] = field(default_factory=dict)
    last: str | None = None
    turns: int = 0
    touched: float = 0.0
    #: The last cumulative usage a producer reported for the thread (see :meth:`usage_delta`).
    usage: dict[str, int] | None = None


class ThreadRegistry:
    """Trace ids by AG-UI thread id.

    Threads are kept in least-recently-used order; the oldest are dropped past ``max_threads`` or
    after ``idle_seconds`` without a run, so a long-lived server stays bounded. Thread-safe: runs
    open on the event loop and end on the tracer worker (:mod:`.worker`).
    """

    def __init__(
        self,
        max_threads: int = DEFAULT_MAX_THREADS,
        idle_seconds: float = DEFAULT_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_threads < 1:
            raise ValueError("max_threads must be at least 1")
        self._threads: OrderedDict[str, _Thread] = OrderedDict()
        # Recent trace id -> its thread, so a rating naming another thread's trace can be refused.
        self._trace_threads: OrderedDict[str, str] = OrderedDict()
        self._max_traces = 4 * max_threads
        self._max_threads = max_threads
        self._idle_seconds = idle_seconds
        #: The monotonic clock idle times are measured on (replaceable in tests).
        self.clock = clock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._threads)

    def run_started(self, thread_id: str, trace_id: str) -> None:
        with self._lock:
            thread = self._touch(thread_id)
            thread.open[trace_id] = None
            thread.last = trace_id
            self._trace_threads[trace_id] = thread_id
            if len(self._trace_threads) > self._max_traces:
                self._trace_threads.popitem(last=False)

    def next_turn_number(self, thread_id: str) -> int:
        with self._lock:
            thread = self._touch(thread_id)
            thread.turns += 1
            return thread.turns

    def run_ended(self, thread_id: str, trace_id: str) -> None:
        with self._lock:
            thread = self._touch(thread_id)
            thread.open.pop(trace_id, None)
            if thread.last is None:
                thread.last = trace_id

    def usage_delta(self, thread_id: str, totals: Mapping[str, int]) -> dict[str, int]:
        """What ``totals`` (token counts reported cumulatively for the thread) add since the last report.

        A count lower than the last one is taken as a restarted counter (a new producer session):
        all of it is new.
        """
        with self._lock:
            thread = self._touch(thread_id)
            previous = thread.usage or {}
            thread.usage = dict(totals)
            return {
                key: value - previous.get(key, 0) if value >= previous.get(key, 0) else value
                for key, value in totals.items()
            }

    def current(self, thread_id: str) -> str | None:
        """The newest of the thread's turns that is still open."""
        with self._lock:
            thread = self._get(thread_id)
            return next(reversed(thread.open), None) if thread else None

    def last(self, thread_id: str) -> str | None:
        with self._lock:
            thread = self._get(thread_id)
            return thread.last if thread else None

    def thread_of(self, trace_id: str) -> str | None:
        """The thread a recent trace belongs to; None when this process does not know the trace."""
        with self._lock:
            return self._trace_threads.get(trace_id)

    def _get(self, thread_id: str) -> _Thread | None:
        self._expire(self.clock())
        return self._threads.get(thread_id)

    def _touch(self, thread_id: str) -> _Thread:
        now = self.clock()
        self._expire(now)
        thread = self._threads.get(thread_id)
        if thread is None:
            thread = self._threads[thread_id] = _Thread()
            while len(self._threads) > self._max_threads:
                self._threads.popitem(last=False)
        else:
            self._threads.move_to_end(thread_id)
        thread.touched = now
        return thread

    def _expire(self, now: float) -> None:
        deadline = now - self._idle_seconds
        threads = self._threads
        while threads:
            oldest = next(iter(threads.values()))
            if oldest.touched >= deadline:
                break
            threads.popitem(last=False)
