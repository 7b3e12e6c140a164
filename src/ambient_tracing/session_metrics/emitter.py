"""One daemon thread that runs jobs handed over by the event loop, in order (Session Metrics).

Recording a span costs a vendor SDK milliseconds; a thousand threads going idle at once froze the
loop for seconds. The loop only queues the job; a hung SDK stalls this thread, never the loop,
and never the process's exit (daemon). The queue is bounded: past it, jobs are dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

logger = logging.getLogger(__name__)

#: Jobs waiting at most; past this (a backend stalled for long) new jobs are dropped with a warning.
MAX_QUEUED_JOBS = 10_000

Job = Callable[[], None]


class Emitter:
    """Runs submitted jobs on its own daemon thread, started on first use."""

    def __init__(self, name: str, max_queued: int = MAX_QUEUED_JOBS) -> None:
        self._name = name
        self._max_queued = max_queued
        self._queue: queue.Queue[tuple[Job, Future[None]]] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def submit(self, job: Job, *, always: bool = False) -> Future[None]:
        """Queue ``job``; the future completes when it has run (or at once when it was dropped:
        past the bound, unless ``always``)."""
        done: Future[None] = Future()
        if not always and self._queue.qsize() >= self._max_queued:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("%s is behind; %d jobs dropped", self._name, self.dropped)
            done.set_result(None)
            return done
        self._queue.put((job, done))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        return done

    def drain(self, timeout: float) -> bool:
        """Blocking: wait until everything queued so far has run; False on timeout."""
        try:
            self.submit(lambda: None, always=True).result(timeout)  # a marker, never dropped
        except TimeoutError:
            return False
        return True

    def _work(self) -> None:
        while True:
            job, done = self._queue.get()
            try:
                job()
            except Exception:
                logger.warning("a %s job failed", self._name, exc_info=True)
            finally:
                done.set_result(None)
