"""Delivers ratings from the durable queue (:mod:`.spool`) to the backends, each on its own thread.

The endpoint hands a rating to :meth:`RatingDelivery.submit`; one writer thread commits it to the
SQLite queue (batching whatever arrived meanwhile into one transaction) and only then resolves the
future the endpoint awaits, so ``recorded: true`` means on disk. One thread per backend then claims
due deliveries (a lease, so processes sharing the file deliver each once), records them and forgets
them. A backend that is down or slow delays only its own deliveries.

Retries: backend errors are retried with backoff (capped at ``MAX_RETRY_INTERVAL``) for as long as it
takes; a trace that is not stored is waited for ``trace_wait_seconds`` after the rating, then the
rating is set aside. Ratings whose owner could not be checked when they came are checked here before
anything is sent.

Memory: acknowledged ratings wait in the file, not in memory. Held at a time: ``CLAIM_BATCH`` per
backend being delivered, and up to ``MAX_WAITING_WRITES`` + ``WRITE_BATCH`` not yet committed (each
of a request still waiting for its answer; more get 503). Each is at most ``MAX_STORED_BYTES``
(256 KiB): ≤ 28 MiB with two backends whatever the number pending, ~100 KiB for 1 KiB ratings.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from ambient_tracing.backends.base import RatingRejected, RatingSink, TraceNotStored
from ambient_tracing.backends.rating import Rating
from ambient_tracing.config import FeedbackLimits
from ambient_tracing.feedback.owners import TraceOwners
from ambient_tracing.feedback.spool import (
    Claimed,
    RatingStore,
    StoreFull,
    import_old_spools,
    owner_id,
)

logger = logging.getLogger(__name__)

FIRST_RETRY_SECONDS = 1.0
#: Retries at a steady pace first: MLflow stores a trace ~5 s after its run, then says "not found".
STEADY_ATTEMPTS = 10
MAX_RETRY_INTERVAL = 30.0
#: How long after a rating its trace may take to be stored before the rating is set aside.
DEFAULT_TRACE_WAIT_SECONDS = 120.0
#: A backend thread looks for work (e.g. from other processes) at least this often.
POLL_SECONDS = 1.0
CLAIM_BATCH = 8
WRITE_BATCH = 32
MAX_WAITING_WRITES = 64

_Write = tuple[Rating, list[str], bool, "str | None", "Future[list[str]]"]


class RatingDelivery:
    """The durable queue of ratings and the threads that record them in every sink."""

    def __init__(
        self,
        sinks: Sequence[RatingSink],
        *,
        owners: TraceOwners | None = None,
        spool: Path,
        limits: FeedbackLimits | None = None,
        trace_wait_seconds: float = DEFAULT_TRACE_WAIT_SECONDS,
        legacy_spools: Sequence[Path] = (),
    ) -> None:
        self.sinks = {sink.name: sink for sink in sinks}
        self.spool = spool
        self.limits = limits or FeedbackLimits()
        self.trace_wait_seconds = trace_wait_seconds
        self.owners = owners or TraceOwners((), ())
        self._legacy = tuple(legacy_spools)
        self._owner = owner_id()
        self._writes: queue.Queue[_Write | None] = queue.Queue(MAX_WAITING_WRITES)
        self._wake = {name: threading.Event() for name in self.sinks}
        self._ready = threading.Event()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the writer and one thread per sink (no I/O here: they open the file). Idempotent."""
        with self._lock:
            if self._threads or self._closing.is_set():
                return
            self._threads.append(
                threading.Thread(target=self._write_loop, name="ambient-tracing-feedback-store", daemon=True)
            )
            self._threads += [
                threading.Thread(
                    target=self._deliver_loop,
                    args=(name,),
                    name=f"ambient-tracing-ratings-{name}",
                    daemon=True,
                )
                for name in self.sinks
            ]
            for thread in self._threads:
                thread.start()

    def submit(
        self, rating: Rating, *, caller: str | None = None, check_owner: bool = False
    ) -> Future[list[str]]:
        """Queue a rating for the writer; the future gives the sinks it is stored for once committed
        (StoreFull / TooManyPending when refused). Never blocks."""
        future: Future[list[str]] = Future()
        names = sorted(
            name
            for name, sink in self.sinks.items()
            if rating.trace_id or not sink.needs_trace or self.owners.finders
        )
        if not names:
            future.set_result([])
            return future
        if self._closing.is_set():
            raise RuntimeError("the rating delivery is closed")
        self.start()
        try:
            self._writes.put_nowait((rating, names, check_owner, caller, future))
        except queue.Full:
            future.set_exception(StoreFull("too many ratings arriving at once; try again later"))
        return future

    def close(self, timeout: float) -> None:
        """Blocking: commit what was submitted, stop the threads (within ``timeout``), give back leases.

        Nothing is lost: every rating stays in the file until a backend has it, for the next start
        or another process to deliver."""
        deadline = time.monotonic() + timeout
        self._closing.set()
        for wake in self._wake.values():
            wake.set()
        with contextlib.suppress(queue.Full):
            self._writes.put(None, timeout=max(0.0, deadline - time.monotonic()))
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.owners.close()
        if self._ready.is_set():
            try:
                store = RatingStore(self.spool, self.limits)
                try:
                    store.release(self._owner)
                finally:
                    store.close()
            except Exception as exc:
                logger.warning("could not release rating leases: %r", exc)

    @property
    def pending(self) -> int:
        """Blocking (reads the file): deliveries still waiting, of every process sharing it."""
        return self.counts()["deliveries"]

    def counts(self) -> dict[str, int]:
        """Blocking: ratings waiting, set aside, and deliveries waiting, in the shared file."""
        store = RatingStore(self.spool, self.limits)
        try:
            return store.counts()
        finally:
            store.close()

    # -- the writer ---------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        store = self._open_store()
        while True:
            first = self._writes.get()
            batch = [first] if first is not None else []
            while first is not None and len(batch) < WRITE_BATCH:
                try:
                    item = self._writes.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    first = None
                    break
                batch.append(item)
            if batch:
                store = store or self._open_store()  # the file may have become usable again
                self._commit(store, batch)
            if first is None:
                if store is not None:
                    store.close()
                return

    def _open_store(self) -> RatingStore | None:
        try:
            store = RatingStore(self.spool, self.limits)
            store.release_dead_owners()
            import_old_spools(store, sorted(self.sinks), self._legacy)
        except Exception as exc:
            logger.error("the feedback queue %s cannot be used: %r", self.spool, exc)
            return None
        finally:
            self._ready.set()
        logger.info("feedback queue at %s", self.spool)
        return store

    def _commit(self, store: RatingStore | None, batch: list[_Write]) -> None:
        try:
            if store is None:
                raise RuntimeError("the feedback queue cannot be opened")
            results = store.add_many(
                [(rating, names, check, caller) for rating, names, check, caller, _ in batch]
            )
        except Exception as exc:
            logger.error("%d rating(s) not stored: %r", len(batch), exc)
            for *_, future in batch:
                future.set_exception(StoreFull("the feedback queue cannot store ratings now"))
            return
        for (_, names, *_rest, future), error in zip(batch, results, strict=True):
            if error is None:
                future.set_result(names)
            else:
                future.set_exception(error)
        for wake in self._wake.values():
            wake.set()

    # -- one thread per sink ------------------------------------------------------------------------

    def _deliver_loop(self, name: str) -> None:
        self._ready.wait()
        wake = self._wake[name]
        store: RatingStore | None = None
        while not self._closing.is_set():
            try:
                store = store or RatingStore(self.spool, self.limits)
                claimed = store.claim(name, self._owner, CLAIM_BATCH)
                for item in claimed:
                    if self._closing.is_set():
                        break  # the rest stays leased to us until close() gives it back
                    self._deliver(store, name, item)
                if claimed:
                    continue
                due = store.next_due(name)
                wait = POLL_SECONDS if due is None else min(POLL_SECONDS, max(0.0, due - time.time()))
            except Exception as exc:
                logger.warning("rating delivery to %s paused: %r", name, exc)
                wait = POLL_SECONDS
            wake.wait(wait)
            wake.clear()
        if store is not None:
            store.close()

    def _deliver(self, store: RatingStore, name: str, item: Claimed) -> None:
        try:
            rating = Rating.from_json(item.body)
        except ValueError as exc:
            store.set_aside(item.rating_id, None, f"cannot be decoded ({exc})")
            return
        now = time.time()
        waited_out = now > item.created + self.trace_wait_seconds
        sink = self.sinks[name]
        try:
            if item.check_owner and rating.trace_id:
                stored = self.owners.lookup(rating.trace_id)
                if stored is None:
                    if waited_out:
                        store.set_aside(item.rating_id, None, "its trace was never stored")
                    else:
                        store.retry_at(item, now + _backoff(item.attempts))
                    return
                if stored.verdict(rating.thread_id) == "other":
                    store.set_aside(item.rating_id, None, "its trace belongs to another thread")
                    return
            if rating.trace_id is None and rating.thread_id and self.owners.finders:
                rating = rating.with_trace(self.owners.latest_trace_id(rating.thread_id))
            if sink.needs_trace and rating.trace_id is None:
                logger.info("rating #%d has no trace; not sent to %s", item.rating_id, name)
                store.delivered(item)
                return
            sink.deliver_rating(rating)
        except RatingRejected as exc:
            store.set_aside(item.rating_id, name, f"{name} refused it ({type(exc).__name__})")
        except TraceNotStored:
            if waited_out:
                store.set_aside(item.rating_id, name, f"its trace was never stored in {name}")
            else:
                store.retry_at(item, now + _backoff(item.attempts))
        except Exception as exc:
            logger.debug("%s rating delivery failed, will retry: %r", name, exc)
            store.retry_at(item, time.time() + _backoff(item.attempts))
        else:
            store.delivered(item)


def _backoff(attempts: int) -> float:
    """1 s for the first attempts (a trace is usually stored within seconds), then doubling to 30 s."""
    return min(MAX_RETRY_INTERVAL, FIRST_RETRY_SECONDS * 2.0 ** max(0, attempts - STEADY_ATTEMPTS))
