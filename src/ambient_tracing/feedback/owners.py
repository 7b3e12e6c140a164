"""Which thread a trace belongs to, asked of the backends themselves (cached, never on the event loop).

A rating may name a trace this process never saw (another replica ran it, the process restarted, the
trace left the in-memory registry). The backends hold the answer: MLflow tags every run trace with
``ambient.thread_id``, Langfuse stores the thread as the trace's session id. Lookups block, so they run
in the package's own daemon threads (:class:`Workers`), not the loop's default executor whose threads
are joined at interpreter exit and would hold shutdown up if a backend hangs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from ambient_tracing.backends.base import TraceFinder, TraceOwner

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Known traces are remembered this long; "no backend holds it" only briefly (it may be on its way).
FOUND_SECONDS = 3600.0
MISSING_SECONDS = 2.0
CACHE_SIZE = 4096
LOOKUP_THREADS = 2
LOOKUP_QUEUE = 64
#: How long the endpoint waits for an answer before leaving the check to the delivery.
LOOKUP_TIMEOUT = 3.0

Verdict = Literal["same", "other", "missing"]


class Busy(Exception):
    """Every lookup thread is busy and the queue is full: decide without the lookup."""


class Workers:
    """A few daemon threads running blocking calls from a bounded queue."""

    def __init__(self, name: str, threads: int, max_queue: int) -> None:
        self._name = name
        self._count = threads
        self._queue: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue(max_queue)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Queue ``call``; raises :class:`Busy` when the queue is full, RuntimeError once closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("closed")
            if not self._threads:
                for number in range(self._count):
                    thread = threading.Thread(target=self._run, name=f"{self._name}-{number}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
        future: Future[T] = Future()
        try:
            self._queue.put_nowait((call, future))
        except queue.Full:
            raise Busy from None
        return future

    def close(self) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                break  # busy threads are daemons: they end with the process

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)


@dataclass(frozen=True, slots=True)
class Stored:
    """What the backends that hold a trace say about its thread: (backend, thread as stored)."""

    threads: tuple[tuple[Any, str], ...]

    def verdict(self, thread_id: str | None) -> Verdict:
        """``same`` when every backend that knows a thread says ``thread_id`` (or none is named)."""
        if thread_id is None:
            return "same"
        for backend, stored in self.threads:
            if stored and stored != _stored_form(backend, thread_id):
                return "other"
        return "same"

    @property
    def thread_id(self) -> str | None:
        """The trace's thread as the first backend (MLflow, which keeps it whole) stored it."""
        return next((stored for _, stored in self.threads if stored), None)


class TraceOwners:
    """Cached ownership and latest-trace lookups over the backends that can answer them."""

    def __init__(self, owners: Sequence[TraceOwner], finders: Sequence[TraceFinder]) -> None:
        self.owners = tuple(owners)
        self.finders = tuple(finders)
        self._cache: OrderedDict[str, tuple[float, Stored | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._workers = Workers("ambient-tracing-lookup", LOOKUP_THREADS, LOOKUP_QUEUE)

    def lookup(self, trace_id: str) -> Stored | None:
        """Blocking: who holds the trace (None: no backend does yet). Raises when no backend that
        could hold it answered."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(trace_id)
            if cached is not None and cached[0] > now:
                return cached[1]
        answers: list[tuple[Any, str]] = []
        failure: Exception | None = None
        for backend in self.owners:
            try:
                stored = backend.trace_thread(trace_id)
            except Exception as exc:
                failure = exc
                continue
            if stored is not None:
                answers.append((backend, stored))
        if not answers and failure is not None:
            raise failure
        result = Stored(tuple(answers)) if answers else None
        with self._lock:
            self._cache[trace_id] = (now + (FOUND_SECONDS if answers else MISSING_SECONDS), result)
            self._cache.move_to_end(trace_id)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return result

    async def find(self, trace_id: str) -> Stored | Literal["unknown"] | None:
        """:meth:`lookup` from the event loop, in the lookup threads, bounded by LOOKUP_TIMEOUT;
        ``"unknown"`` when no answer came (failed, busy, too slow): check at delivery then."""
        if not self.owners:
            return "unknown"
        try:
            future = self._workers.submit(lambda: self.lookup(trace_id))
            return await asyncio.wait_for(asyncio.wrap_future(future), LOOKUP_TIMEOUT)
        except Exception as exc:
            logger.debug("owner of trace %s not known now: %r", trace_id, exc)
            return "unknown"

    def answered(self, trace_id: str) -> Stored | Literal["unknown"] | None:
        """Never blocks: the cached answer of :meth:`lookup` (``"unknown"`` when there is none yet, or
        no backend can answer); when none, a lookup is started in the lookup threads, so a later
        call has it. For a trace id chosen by a caller (see :meth:`Runs.admit
        <ambient_tracing.tracer.runs.Runs.admit>`), checked without delaying the stream."""
        if not self.owners:
            return "unknown"
        with self._lock:
            cached = self._cache.get(trace_id)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
        self.prefetch(trace_id)
        return "unknown"

    def owned_by_other(self, trace_id: str, stored_thread_id: str | None) -> bool:
        """Never blocks: whether the backends have answered that ``trace_id`` is a trace of a thread
        other than ``stored_thread_id`` (as stored); False while no answer is cached."""
        stored = self.answered(trace_id)
        return isinstance(stored, Stored) and stored.verdict(stored_thread_id) == "other"

    def prefetch(self, trace_id: str) -> None:
        """Start looking ``trace_id`` up in the lookup threads (when busy or closed: not at all)."""
        if not self.owners:
            return
        try:
            self._workers.submit(lambda: self.lookup(trace_id))
        except Exception as exc:  # Busy, closed: the check then relies on this process's registry
            logger.debug("owner of trace %s not looked up: %r", trace_id, exc)

    def latest_trace_id(self, thread_id: str) -> str | None:
        """Blocking: the thread's newest trace in the first backend that knows one. Raises when every
        backend failed."""
        failure: Exception | None = None
        for finder in self.finders:
            try:
                if trace_id := finder.latest_trace_id(thread_id):
                    return trace_id
            except Exception as exc:
                failure = exc
        if failure is not None:
            raise failure  # retried: the one that failed may hold it
        return None

    def close(self) -> None:
        self._workers.close()


def _stored_form(backend: Any, thread_id: str) -> str:
    convert = getattr(backend, "stored_thread_id", None)
    return str(convert(thread_id)) if callable(convert) else thread_id
