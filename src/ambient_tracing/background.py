"""A daemon thread that runs queued calls in order, woken at most once per batch.

The package's two: the tracer worker (:mod:`ambient_tracing.tracer.worker`: the doors hand it what
passed, the tracers run there) and the span worker (:mod:`ambient_tracing.spans.deferred`: vendor
SDK span calls). Queueing a call is a deque append and a flag test (no lock, no system call); the
thread is woken only when it sleeps, and lets calls gather for :data:`BATCH_SECONDS` after that,
so a busy producer costs one wake-up per batch, not one per call.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from ambient_tracing.failures import capture_internal_exceptions

logger = logging.getLogger(__name__)

#: How long the thread lets calls gather after it is woken: one wake-up per batch, not per event.
BATCH_SECONDS = 0.002
#: Queued calls past which :meth:`Worker.submit` refuses new ones (and items per tracer lane).
MAX_BACKLOG = 50_000
#: How often a worker's ``tick`` runs when nothing else wakes the thread.
DEFAULT_TICK_SECONDS = 1.0

T = TypeVar("T")

_workers: weakref.WeakSet[Worker] = weakref.WeakSet()


def drain_workers(timeout: float) -> bool:
    """Blocking: wait until every worker of the process has run the calls queued so far, and those
    they queued on each other meanwhile (the tracer worker's span calls); False on timeout."""
    deadline = time.monotonic() + timeout
    return all(
        worker.drain(max(deadline - time.monotonic(), 0.0))
        for _ in range(2)  # a second pass: what one worker queued on another while draining
        for worker in list(_workers)
    )


class Worker:
    """One daemon thread named ``name`` running queued calls in order, started on first use.

    ``tick`` runs on the thread at least every ``tick_seconds`` (Session Metrics' idle sweep)."""

    def __init__(
        self,
        name: str,
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
        self.name = name
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        _workers.add(self)

    @property
    def backlog(self) -> int:
        """How many calls are queued (a lane counts once, however many items it holds)."""
        return len(self._calls)

    @property
    def on_thread(self) -> bool:
        """Whether the caller runs on this worker's thread."""
        return self._thread is threading.current_thread()

    def submit(self, call: Callable[[], object]) -> bool:
        """Queue ``call``; False (not queued) when :attr:`max_backlog` calls are queued already."""
        if len(self._calls) >= self.max_backlog:
            return False
        self.post(call)
        return True

    def post(self, call: Callable[[], object]) -> None:
        """Queue ``call``, never refused (a caller that must not lose calls bounds itself with
        :attr:`backlog`). After :meth:`close` the call runs at once on the caller's thread."""
        if self._thread is None:
            if self._closed:
                self._run(call)
                return
            self._start()
        self._calls.append(call)
        if self._waiting:
            self._waiting = False
            self._wake.set()

    def call(self, function: Callable[[], T]) -> Future[T]:
        """Run ``function`` on the thread after what is queued (never refused); its result as a future."""
        done: Future[T] = Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(function())
                except BaseException as exc:
                    done.set_exception(exc)

        self.post(run)
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
                thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread = thread
                thread.start()

    def _work(self) -> None:
        calls = self._calls
        next_tick = time.monotonic() + self.tick_seconds
        while True:
            if not calls:
                self._waiting = True
                if not calls:  # checked after raising the flag: a submit in between is not lost
                    # Asleep until woken, or until the next tick is due (never, without a tick).
                    timeout = None if self._tick is None else max(next_tick - time.monotonic(), 0.0)
                    woken = self._wake.wait(timeout)
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
                with capture_internal_exceptions(logger, "a worker tick failed", once="tick"):
                    self._tick()

    @staticmethod
    def _run(call: Callable[[], object]) -> None:
        # Callers guard their own calls; this is a last resort.
        with capture_internal_exceptions(logger, "a queued call failed", once="queued call"):
            call()


def _stop() -> None:
    """The marker that ends the thread (never run)."""
