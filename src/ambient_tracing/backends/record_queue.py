"""Ended span records on their way out of the process: a bounded queue and one daemon thread.

The common part of every span sink the package builds (:class:`~.otlp.OtlpExporter`, which POSTs
OTLP; :class:`~.otel_provider.ProviderSink`, which replays records into an app's TracerProvider).
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from ambient_tracing.backends.records import SpanRecord, outgoing_record
from ambient_tracing.failures import warn_once

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 10_000
DEFAULT_BATCH_SIZE = 512
DEFAULT_INTERVAL = 1.0


class RecordQueue:
    """``submit`` never blocks and never raises: it appends to a queue of at most ``max_queue``
    records (when full, the oldest is dropped and counted in ``dropped``; the first drop is logged).
    One daemon thread, started on first use, takes batches of ``batch_size`` (at the latest every
    ``interval`` seconds), prepares them as they leave the process (``outgoing_record``: JSON decoded,
    or kept as text for a destination that stores it as its value, ``json_as_text``; the privacy mask)
    and hands each to :meth:`_deliver`, which a subclass writes and which counts ``exported`` /
    ``failed``. ``flush`` and ``shutdown`` block, each bounded by its timeout."""

    def __init__(
        self,
        name: str,
        *,
        thread_name: str,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        interval: float = DEFAULT_INTERVAL,
        json_as_text: bool = False,
    ) -> None:
        self.name = name
        self._thread_name = thread_name
        self._queue: deque[SpanRecord] = deque(maxlen=max(1, max_queue))
        self._batch_size = max(1, batch_size)
        self._interval = max(0.001, interval)
        self._json_as_text = json_as_text
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[threading.Event] = []
        self._thread: threading.Thread | None = None
        self._stuck = False  # the last flush timed out: the destination is not answering
        self.exported = 0
        self.dropped = 0
        self.failed = 0

    # -- any thread, never blocks --------------------------------------------------------------

    def submit(self, record: SpanRecord) -> None:
        queue = self._queue
        if len(queue) == queue.maxlen:
            self.dropped += 1  # deque(maxlen) drops the oldest on append
            if self.dropped == 1:
                logger.warning(
                    "%s is behind (%d spans queued); dropping the oldest spans (counted in .dropped; "
                    "not logged again)",
                    self.name,
                    queue.maxlen,
                )
        queue.append(record)
        if self._thread is None:
            self._start()
        elif len(queue) >= self._batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- blocking ---------------------------------------------------------------------------------

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far was delivered (or given up); False on timeout."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return not self._queue
        done = threading.Event()
        with self._lock:
            self._waiters.append(done)
        self._wake.set()
        flushed = done.wait(max(timeout, 0.0))
        self._stuck = not flushed
        return flushed

    def shutdown(self, timeout: float) -> bool:
        """Flush (bounded by ``timeout``; not again when the last flush already timed out), then
        stop the thread; later records are dropped."""
        flushed = self.flush(0.0 if self._stuck else timeout)
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, min(timeout, 1.0)))
        return flushed

    # -- the sink's thread ------------------------------------------------------------------------

    def _deliver(self, batch: list[SpanRecord]) -> None:
        """Send one prepared batch; count ``exported`` / ``failed``. Runs on the sink's thread."""
        raise NotImplementedError

    def _after_flush(self) -> None:
        """What a flush adds once the queue is empty (e.g. the provider's own flush)."""

    def _on_stop(self) -> None:
        """Release what the thread held (e.g. a connection)."""

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopping.is_set():
                thread = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
                self._thread = thread
                thread.start()

    def _outgoing(self, batch: list[SpanRecord]) -> list[SpanRecord]:
        """The batch as it leaves the process; a record that cannot be prepared is counted in
        ``failed`` and left out, never ending the thread (the rest of the batch still goes)."""
        outgoing = []
        for record in batch:
            try:
                outgoing.append(outgoing_record(record, json_as_text=self._json_as_text))
            except Exception as exc:
                self.failed += 1
                warn_once(logger, "unprepared", "%s: a span could not be prepared: %r", self.name, exc)
        return outgoing

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            with self._lock:
                waiters, self._waiters = self._waiters, []
            queue = self._queue
            while queue and not self._stopping.is_set():
                batch = [queue.popleft() for _ in range(min(self._batch_size, len(queue)))]
                outgoing = self._outgoing(batch)
                if outgoing:
                    self._deliver(outgoing)
            if waiters:
                self._after_flush()
            for waiter in waiters:
                waiter.set()
        self._on_stop()
