"""Delivers ratings to the backends from one worker thread: retried with backoff, spooled at shutdown.

A rating the endpoint accepted is never dropped silently. It is retried (the backend is down, MLflow
has not stored the trace yet) for ``retry_seconds``; what is still pending then, or at :meth:`close`,
is appended to a JSON-lines spool file that the next :meth:`start` delivers. Backends record ratings
idempotently (a fixed id per trace, message, user and name), so delivering one twice is harmless.

Several processes may share a spool: each claims the file by renaming it before reading it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

try:
    from fcntl import LOCK_EX, flock
except ImportError:  # pragma: no cover - Windows: appends are not locked against other processes
    flock = None  # type: ignore[assignment]

from .backends.base import RatingRejected, RatingSink, TraceFinder
from .ratings import Rating

logger = logging.getLogger("ambient_tracing")

FIRST_RETRY_SECONDS = 1.0
#: Retries at a steady pace first: MLflow stores a trace ~5 s after its run, then says "not found".
STEADY_ATTEMPTS = 10
MAX_RETRY_INTERVAL = 30.0
DEFAULT_RETRY_SECONDS = 600.0
MAX_PENDING = 10_000


@dataclass(slots=True)
class _Job:
    rating: Rating
    pending: set[str]
    resolved: bool = False
    attempts: int = 0
    first_try: float = field(default_factory=time.monotonic)


class RatingDelivery:
    """A queue of ratings and the thread that records them in every sink."""

    def __init__(
        self,
        sinks: Sequence[RatingSink],
        *,
        finders: Sequence[TraceFinder] = (),
        spool: Path | None = None,
        retry_seconds: float = DEFAULT_RETRY_SECONDS,
    ) -> None:
        self.sinks = {sink.name: sink for sink in sinks}
        self.spool = spool
        self.retry_seconds = retry_seconds
        self._finders = tuple(finders)
        self._queue: list[tuple[float, int, _Job]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._busy: _Job | None = None
        self._claimed: list[Path] = []

    @property
    def pending(self) -> int:
        """Ratings not yet recorded in every sink (queued or being delivered)."""
        with self._wake:
            return len(self._queue) + (self._busy is not None)

    def start(self) -> None:
        """Blocking (file I/O): claim the spool, queue what it holds, start the worker. Idempotent."""
        with self._wake:
            if self._thread is not None or self._closing:
                return
            self._thread = threading.Thread(target=self._work, name="ambient-tracing-ratings", daemon=True)
        for rating in self._claim_spool():
            self.submit(rating)
        self._thread.start()

    def submit(self, rating: Rating) -> list[str]:
        """Queue a rating; returns the sinks it is queued for. Never blocks on I/O."""
        names = {
            name
            for name, sink in self.sinks.items()
            if rating.trace_id or not sink.needs_trace or self._finders
        }
        if not names:
            return []
        with self._wake:
            if len(self._queue) >= MAX_PENDING:
                raise OverflowError("too many ratings waiting for delivery")
            self._push(_Job(rating, names), time.monotonic())
        return sorted(names)

    def close(self, timeout: float) -> None:
        """Blocking: try every pending rating once more (within ``timeout``), spool the rest, stop."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._closing = True
            self._queue = [(0.0, order, job) for _, order, job in self._queue]  # due now
            heapq.heapify(self._queue)
            self._wake.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._wake:
            # A delivery still blocked in a backend call is spooled too: recording it twice is harmless.
            left = [job for _, _, job in self._queue] + ([self._busy] if self._busy else [])
            self._queue.clear()
        self._write_spool(left)

    # -- the worker ---------------------------------------------------------------------------------

    def _push(self, job: _Job, due: float) -> None:
        heapq.heappush(self._queue, (due, next(self._order), job))
        self._wake.notify()

    def _work(self) -> None:
        while True:
            with self._wake:
                while True:
                    if not self._queue:
                        if self._closing:
                            return
                        self._wake.wait()
                        continue
                    due = self._queue[0][0]
                    wait = due - time.monotonic()
                    if wait <= 0:
                        break
                    if self._closing:
                        return  # only future retries left: they go to the spool
                    self._wake.wait(wait)
                _, _, job = heapq.heappop(self._queue)
                self._busy = job
            try:
                self._attempt(job)
            finally:
                with self._wake:
                    self._busy = None
                    if job.pending:
                        self._reschedule(job)

    def _reschedule(self, job: _Job) -> None:
        if self._closing:
            # One last try was made; keep the job queued (not due) for close() to spool.
            heapq.heappush(self._queue, (float("inf"), next(self._order), job))
            return
        if time.monotonic() - job.first_try > self.retry_seconds:
            logger.warning(
                "ambient-tracing: rating %s not delivered to %s after %.0f s; spooled for the next start",
                job.rating.key,
                ", ".join(sorted(job.pending)),
                self.retry_seconds,
            )
            self._write_spool([job])
            return
        backoff = 2 ** max(0, job.attempts - STEADY_ATTEMPTS)
        delay = min(MAX_RETRY_INTERVAL, FIRST_RETRY_SECONDS * backoff)
        self._push(job, time.monotonic() + delay)

    def _attempt(self, job: _Job) -> None:
        job.attempts += 1
        if job.rating.trace_id is None and not job.resolved:
            try:
                job.rating = job.rating.with_trace(self._find_trace(job.rating.thread_id))
            except Exception as exc:
                logger.debug("ambient-tracing: trace lookup failed, will retry: %r", exc)
                return
            job.resolved = True
        for name in sorted(job.pending):
            sink = self.sinks[name]
            if sink.needs_trace and job.rating.trace_id is None:
                logger.info("ambient-tracing: rating %s has no trace; not sent to %s", job.rating.key, name)
                job.pending.discard(name)
                continue
            try:
                sink.deliver_rating(job.rating)
            except RatingRejected as exc:
                logger.warning("ambient-tracing: %s refused rating %s: %s", name, job.rating.key, exc)
            except Exception as exc:
                logger.debug("ambient-tracing: %s rating delivery failed, will retry: %r", name, exc)
                continue
            job.pending.discard(name)

    def _find_trace(self, thread_id: str | None) -> str | None:
        if not thread_id:
            return None
        for finder in self._finders:
            if trace_id := finder.latest_trace_id(thread_id):
                return trace_id
        return None

    # -- the spool ----------------------------------------------------------------------------------

    def _claim_spool(self) -> list[Rating]:
        """Take the spool file (and files claimed by processes that died) for this process."""
        spool = self.spool
        if spool is None:
            return []
        candidates = [spool, *spool.parent.glob(f"{spool.name}.*.claimed")]
        ratings: list[Rating] = []
        for path in candidates:
            if path != spool and _owner_alive(path):
                continue
            claimed = spool.with_name(f"{spool.name}.{os.getpid()}.{time.time_ns()}.claimed")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue
            self._claimed.append(claimed)
            for line in claimed.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        ratings.append(Rating.from_json(line))
                    except (ValueError, TypeError) as exc:
                        logger.warning("ambient-tracing: skipping a bad line in %s: %r", claimed, exc)
        if ratings:
            logger.info("ambient-tracing: delivering %d spooled rating(s) from %s", len(ratings), spool)
        return ratings

    def _write_spool(self, jobs: list[_Job]) -> None:
        spool = self.spool
        if spool is None:
            if jobs:
                logger.warning("ambient-tracing: %d rating(s) not delivered and no spool set", len(jobs))
            return
        try:
            if jobs:
                spool.parent.mkdir(parents=True, exist_ok=True)
                with spool.open("a", encoding="utf-8") as file:
                    if flock is not None:
                        flock(file, LOCK_EX)
                    file.writelines(job.rating.to_json() + "\n" for job in jobs)
                logger.warning("ambient-tracing: %d rating(s) spooled to %s", len(jobs), spool)
            if self._closing:
                for claimed in self._claimed:
                    with contextlib.suppress(FileNotFoundError):
                        claimed.unlink()
                self._claimed.clear()
        except OSError as exc:
            logger.error("ambient-tracing: could not spool %d rating(s) to %s: %r", len(jobs), spool, exc)


def _owner_alive(claimed: Path) -> bool:
    """Whether the process that claimed ``<spool>.<pid>.<ns>.claimed`` still runs."""
    try:
        pid = int(claimed.name.split(".")[-3])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
