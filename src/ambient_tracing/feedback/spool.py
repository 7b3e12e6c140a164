"""The durable rating queue: one SQLite file (standard library) shared by every process on a host.

A rating is one row of ``ratings``; each backend it still has to reach is one row of
``deliveries``, so every backend is delivered to on its own. Processes (workers, an old and a new
pod on one volume) share the file: a delivery is claimed inside a write transaction by setting its
``owner`` and ``lease_until``, so one process delivers it at a time, and a process that dies leaves
leases that expire (at once on this host, when its pid is gone). Nothing here is async: every
method blocks on file I/O and is called from the package's own threads, never the event loop.

A delivery that cannot be done (undecodable row, refused by the backend, trace never stored, trace of
another thread) is *set aside*: kept with its reason, logged by id (never its text), no longer
retried and no longer counted against the limits; the oldest set-aside rows beyond
``max_set_aside`` rows or ``max_bytes`` bytes are deleted. On disk: at most ``max_bytes`` waiting plus
``max_bytes`` set aside (64 MiB each by default), and the WAL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ambient_tracing.backends.rating import Rating
from ambient_tracing.config import FeedbackLimits
from ambient_tracing.failures import warn_once

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
LEASE_SECONDS = 300.0
_SQLITE_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rating_key TEXT NOT NULL,
    thread_id TEXT,
    caller TEXT,
    check_owner INTEGER NOT NULL DEFAULT 0,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL,
    set_aside TEXT
);
CREATE INDEX IF NOT EXISTS ratings_key ON ratings (rating_key) WHERE set_aside IS NULL;
CREATE INDEX IF NOT EXISTS ratings_thread ON ratings (thread_id) WHERE set_aside IS NULL;
CREATE INDEX IF NOT EXISTS ratings_caller ON ratings (caller) WHERE set_aside IS NULL;
CREATE INDEX IF NOT EXISTS ratings_unchecked ON ratings (check_owner) WHERE set_aside IS NULL;
CREATE TABLE IF NOT EXISTS deliveries (
    rating_id INTEGER NOT NULL REFERENCES ratings (id) ON DELETE CASCADE,
    sink TEXT NOT NULL,
    due REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease_until REAL,
    set_aside TEXT,
    PRIMARY KEY (rating_id, sink)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (sink, due) WHERE set_aside IS NULL;
"""


class StoreFull(Exception):
    """The store holds its limit of ratings (or bytes): answer 503, drop nothing already accepted."""


class TooManyPending(Exception):
    """This thread or caller has its limit of ratings waiting for delivery: answer 429."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery this process holds the lease of."""

    rating_id: int
    sink: str
    body: bytes
    version: int
    check_owner: bool
    created: float
    attempts: int


def owner_id() -> str:
    """``host:pid:nonce``: who holds a lease (the pid lets a restart on this host take it back)."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


class RatingStore:
    """One connection to the queue file. Not thread-safe: one per thread."""

    def __init__(self, path: Path, limits: FeedbackLimits | None = None) -> None:
        self.path = path
        self.limits = limits or FeedbackLimits()
        prepare_location(path)
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")  # acknowledged means on disk
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._write() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
        _restrict(path)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock now, waits up to busy_timeout)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- accepting ----------------------------------------------------------------------------------

    def add_many(
        self, items: Sequence[tuple[Rating, Sequence[str], bool, str | None]]
    ) -> list[Exception | None]:
        """Store ratings in one transaction: (rating, sinks, check_owner, caller) each; per item None
        (stored) or the StoreFull / TooManyPending it got. Committed before it returns."""
        results: list[Exception | None] = []
        now = time.time()
        with self._write() as db:
            for rating, sinks, check_owner, caller in items:
                try:
                    self._add(db, rating, sinks, check_owner, caller, now)
                    results.append(None)
                except (StoreFull, TooManyPending) as exc:
                    results.append(exc)
        return results

    def _add(
        self,
        db: sqlite3.Connection,
        rating: Rating,
        sinks: Sequence[str],
        check_owner: bool,
        caller: str | None,
        now: float,
    ) -> None:
        body = rating.to_json().encode("utf-8")
        row = db.execute(
            "SELECT id, check_owner FROM ratings WHERE rating_key = ? AND set_aside IS NULL", (rating.key,)
        ).fetchone()
        if row is not None:
            # The same rating again (a retry, a changed mind): replace it in place, no new row.
            check = bool(row[1]) and check_owner
            db.execute(
                "UPDATE ratings SET body = ?, size = ?, version = version + 1, check_owner = ?, created = ?"
                " WHERE id = ?",
                (body, len(body), check, now, row[0]),
            )
            for sink in sinks:
                db.execute(
                    "INSERT INTO deliveries (rating_id, sink, due) VALUES (?, ?, ?)"
                    " ON CONFLICT (rating_id, sink) DO UPDATE SET due = excluded.due, attempts = 0",
                    (row[0], sink, now),
                )
            return
        self._check_limits(db, len(body), rating.thread_id, caller, check_owner)
        cursor = db.execute(
            "INSERT INTO ratings (rating_key, thread_id, caller, check_owner, body, size, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rating.key, rating.thread_id, caller, check_owner, body, len(body), now),
        )
        db.executemany(
            "INSERT INTO deliveries (rating_id, sink, due) VALUES (?, ?, ?)",
            [(cursor.lastrowid, sink, now) for sink in sinks],
        )

    def _check_limits(
        self, db: sqlite3.Connection, size: int, thread_id: str | None, caller: str | None, check_owner: bool
    ) -> None:
        limits = self.limits
        rows, stored = db.execute(
            "SELECT count(*), total(size) FROM ratings WHERE set_aside IS NULL"
        ).fetchone()
        if rows >= limits.max_rows or stored + size > limits.max_bytes:
            raise StoreFull("the feedback queue is full; try again later")
        if check_owner:
            (unchecked,) = db.execute(
                "SELECT count(*) FROM ratings WHERE check_owner = 1 AND set_aside IS NULL"
            ).fetchone()
            if unchecked >= limits.max_unchecked:
                raise StoreFull("too many ratings for traces not stored yet; try again later")
        if thread_id is not None:
            (count,) = db.execute(
                "SELECT count(*) FROM ratings WHERE thread_id = ? AND set_aside IS NULL", (thread_id,)
            ).fetchone()
            if count >= limits.max_per_thread:
                raise TooManyPending("too many ratings of this thread are waiting; try again later")
        if caller is not None:
            (count,) = db.execute(
                "SELECT count(*) FROM ratings WHERE caller = ? AND set_aside IS NULL", (caller,)
            ).fetchone()
            if count >= limits.max_per_caller:
                raise TooManyPending("too many of your ratings are waiting; try again later")

    # -- delivering ---------------------------------------------------------------------------------

    def claim(self, sink: str, owner: str, limit: int) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries to ``sink`` for ``owner`` (oldest due first)."""
        now = time.time()
        with self._write() as db:
            rows = db.execute(
                "SELECT d.rating_id, r.body, r.version, r.check_owner, r.created, d.attempts"
                " FROM deliveries d JOIN ratings r ON r.id = d.rating_id"
                " WHERE d.sink = ? AND d.set_aside IS NULL AND d.due <= ?"
                " AND (d.lease_until IS NULL OR d.lease_until < ?)"
                " ORDER BY r.check_owner, d.due LIMIT ?",  # checked ratings first: a flood of unchecked waits
                (sink, now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE deliveries SET owner = ?, lease_until = ?, attempts = attempts + 1"
                " WHERE rating_id = ? AND sink = ?",
                [(owner, now + LEASE_SECONDS, row[0], sink) for row in rows],
            )
        return [
            Claimed(row[0], sink, bytes(row[1]), row[2], bool(row[3]), row[4], row[5] + 1) for row in rows
        ]

    def next_due(self, sink: str) -> float | None:
        """When the next delivery to ``sink`` is due (epoch seconds); None when none is waiting."""
        row = self._db.execute(
            "SELECT min(max(due, coalesce(lease_until, 0))) FROM deliveries"
            " WHERE sink = ? AND set_aside IS NULL",
            (sink,),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def delivered(self, claimed: Claimed) -> None:
        """The delivery is done: forget it (and the rating once no backend still needs it). A rating
        replaced while it was being delivered is delivered again instead."""
        with self._write() as db:
            (version,) = db.execute(
                "SELECT version FROM ratings WHERE id = ?", (claimed.rating_id,)
            ).fetchone() or (None,)
            if version is not None and version != claimed.version:
                db.execute(
                    "UPDATE deliveries SET owner = NULL, lease_until = NULL, due = ? "
                    "WHERE rating_id = ? AND sink = ?",
                    (time.time(), claimed.rating_id, claimed.sink),
                )
                return
            db.execute(
                "DELETE FROM deliveries WHERE rating_id = ? AND sink = ?", (claimed.rating_id, claimed.sink)
            )
            db.execute(
                "DELETE FROM ratings WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM deliveries WHERE rating_id = ?)",
                (claimed.rating_id, claimed.rating_id),
            )

    def retry_at(self, claimed: Claimed, due: float) -> None:
        """Not delivered this time: release the lease, try again at ``due`` (epoch seconds)."""
        with self._write() as db:
            db.execute(
                "UPDATE deliveries SET owner = NULL, lease_until = NULL, due = ?"
                " WHERE rating_id = ? AND sink = ?",
                (due, claimed.rating_id, claimed.sink),
            )

    def set_aside(self, rating_id: int, sink: str | None, reason: str) -> None:
        """Stop trying ``sink`` (every sink when None) for this rating; keep the row with ``reason``."""
        logger.warning("rating #%d set aside (%s): %s", rating_id, sink or "all", reason)
        with self._write() as db:
            if sink is None:
                db.execute(
                    "UPDATE deliveries SET set_aside = ?, owner = NULL, lease_until = NULL"
                    " WHERE rating_id = ?",
                    (reason, rating_id),
                )
            else:
                db.execute(
                    "UPDATE deliveries SET set_aside = ?, owner = NULL, lease_until = NULL"
                    " WHERE rating_id = ? AND sink = ?",
                    (reason, rating_id, sink),
                )
            db.execute(
                "UPDATE ratings SET set_aside = ? WHERE id = ? AND NOT EXISTS "
                "(SELECT 1 FROM deliveries WHERE rating_id = ? AND set_aside IS NULL)",
                (reason, rating_id, rating_id),
            )
            self._prune(db)

    def _prune(self, db: sqlite3.Connection) -> None:
        """Delete the oldest set-aside rows beyond ``max_set_aside`` rows or ``max_bytes`` bytes."""
        rows = db.execute(
            "SELECT id FROM (SELECT id, row_number() OVER newest AS n, sum(size) OVER newest AS kept"
            " FROM ratings WHERE set_aside IS NOT NULL WINDOW newest AS (ORDER BY id DESC))"
            " WHERE n > ? OR kept > ? ORDER BY id DESC",
            (self.limits.max_set_aside, self.limits.max_bytes),
        ).fetchall()
        if rows:
            logger.warning("deleting %d old set-aside rating(s) (#%d and older)", len(rows), rows[0][0])
            db.executemany("DELETE FROM ratings WHERE id = ?", rows)

    def release(self, owner: str) -> None:
        """Give back every lease ``owner`` holds (at shutdown): another process or the next start
        delivers them."""
        with self._write() as db:
            db.execute("UPDATE deliveries SET owner = NULL, lease_until = NULL WHERE owner = ?", (owner,))

    def release_dead_owners(self) -> None:
        """Leases of processes of this host that are gone are free at once (not only when they expire)."""
        host = socket.gethostname()
        owners = [
            row[0]
            for row in self._db.execute("SELECT DISTINCT owner FROM deliveries WHERE owner IS NOT NULL")
        ]
        dead = [owner for owner in owners if _dead_here(owner, host)]
        if dead:
            with self._write() as db:
                db.executemany(
                    "UPDATE deliveries SET owner = NULL, lease_until = NULL WHERE owner = ?",
                    [(owner,) for owner in dead],
                )

    # -- reading (tests, operators) -----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Ratings waiting, set aside, and deliveries waiting."""
        waiting, aside = self._db.execute(
            "SELECT total(set_aside IS NULL), total(set_aside IS NOT NULL) FROM ratings"
        ).fetchone()
        (deliveries,) = self._db.execute("SELECT count(*) FROM deliveries WHERE set_aside IS NULL").fetchone()
        return {"waiting": int(waiting), "set_aside": int(aside), "deliveries": int(deliveries)}

    # -- importing the JSON-lines spool of earlier versions ------------------------------------------

    def import_lines(self, lines: Sequence[bytes], sinks: Sequence[str], source: str) -> int:
        """Store ratings of an old JSON-lines spool (no limits: they were accepted already); a line
        that is not a rating is kept set aside. Returns how many were queued."""
        now = time.time()
        queued = 0
        with self._write() as db:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rating = Rating.from_json(line)
                except ValueError as exc:
                    logger.warning("%s line %d is not a rating (%s); set aside", source, number, exc)
                    db.execute(
                        "INSERT INTO ratings (rating_key, body, size, created, set_aside)"
                        " VALUES ('', ?, ?, ?, ?)",
                        (line, len(line), now, f"not a rating ({source} line {number})"),
                    )
                    continue
                body = rating.to_json().encode("utf-8")
                cursor = db.execute(
                    "INSERT INTO ratings (rating_key, thread_id, body, size, created) VALUES (?, ?, ?, ?, ?)",
                    (rating.key, rating.thread_id, body, len(body), now),
                )
                db.executemany(
                    "INSERT INTO deliveries (rating_id, sink, due) VALUES (?, ?, ?)",
                    [(cursor.lastrowid, sink, now) for sink in sinks],
                )
                queued += 1
            self._prune(db)
        return queued


def prepare_location(path: Path) -> None:
    """Create the folder 0700 and the file 0600 (ratings hold unmasked comments); an existing JSON-lines
    spool at ``path`` is moved aside to ``<path>.jsonl-import`` for :func:`import_old_spool`."""
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(folder.stat().st_mode)
    if mode & 0o077:
        warn_once(
            logger,
            f"open:{folder}",
            "the feedback queue's folder %s is open to other users (%o); make it 0700",
            folder,
            mode,
        )
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as file:
            head = file.read(len(_SQLITE_MAGIC))
        if head != _SQLITE_MAGIC:
            with contextlib.suppress(FileNotFoundError):
                path.rename(old_spool_path(path, os.getpid()))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def old_spool_path(path: Path, pid: int) -> Path:
    return path.with_name(f"{path.name}.{pid}.jsonl-import")


def _restrict(path: Path) -> None:
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(OSError):
            if file.exists() and stat.S_IMODE(file.stat().st_mode) & 0o077:
                file.chmod(0o600)


def _dead_here(owner: str, host: str) -> bool:
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False
    return not pid_alive(int(parts[1]))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def import_old_spools(store: RatingStore, sinks: Sequence[str], legacy: Sequence[Path] = ()) -> int:
    """Queue the ratings of JSON-lines spools of earlier versions once: the file moved aside from the
    queue's path, files claimed by processes that are gone, and ``legacy`` paths. Each is renamed
    for this process first, so two processes starting together do not both import it."""
    path = store.path
    names = [path.name, *(old.name for old in legacy)]
    candidates = [old for old in legacy if old.exists()]
    for name in names:
        for pattern in (".*.jsonl-import", ".*.claimed", ".*.importing"):
            candidates += sorted(path.parent.glob(name + pattern))
    queued = 0
    for candidate in candidates:
        pid = _pid_in(candidate, names)
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            continue
        mine = path.with_name(f"{path.name}.{os.getpid()}.{time.time_ns()}.importing")
        try:
            candidate.rename(mine)
        except FileNotFoundError:
            continue
        queued += store.import_lines(mine.read_bytes().splitlines(), sinks, candidate.name)
        mine.unlink()
    if queued:
        logger.info("queued %d rating(s) from an earlier JSON-lines spool", queued)
    return queued


def _pid_in(candidate: Path, names: Sequence[str]) -> int | None:
    for name in names:
        if candidate.name.startswith(name + "."):
            first = candidate.name[len(name) + 1 :].split(".", 1)[0]
            return int(first) if first.isdigit() else None
    return None
