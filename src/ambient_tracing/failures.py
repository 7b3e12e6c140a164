"""One way to fail safely. The package's first promise is that tracing never breaks the app it
traces: whatever a backend, an SDK or a hostile input does inside the package is caught here, logged
(at most once per cause where it could repeat per event), and the app's work goes on.

    with capture_internal_exceptions(logger, "mlflow could not start a run"):
        span = backend.start_run(run)

Each module logs through its own ``logging.getLogger(__name__)`` (all under ``ambient_tracing``),
so the logger name says where a message comes from.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Distinct "once" keys remembered; past this, repeated causes are logged again (memory stays bounded).
MAX_ONCE_KEYS = 10_000

_seen: set[tuple[str, str]] = set()
_lock = threading.Lock()


def first_time(logger: logging.Logger, key: str) -> bool:
    """True the first time ``key`` is seen for ``logger`` (then False, up to :data:`MAX_ONCE_KEYS`)."""
    entry = (logger.name, key)
    with _lock:
        if entry in _seen:
            return False
        if len(_seen) >= MAX_ONCE_KEYS:
            _seen.clear()
        _seen.add(entry)
        return True


def warn_once(logger: logging.Logger, key: str, message: str, *args: object) -> None:
    """Log a warning the first time ``key`` is seen for ``logger``."""
    if first_time(logger, key):
        logger.warning(message, *args)


@contextmanager
def capture_internal_exceptions(
    logger: logging.Logger, what: str, *, once: str | None = None, details: bool = True
) -> Iterator[None]:
    """Run the block; an ``Exception`` in it is logged as a warning ``"<what>: <exception>"`` and
    swallowed. ``once``: a key, so a cause that repeats per call is logged once. ``details=False``
    logs only the exception's type (its text may hold credentials)."""
    try:
        yield
    except Exception as exc:
        if once is None or first_time(logger, once):
            logger.warning("%s: %s", what, repr(exc) if details else type(exc).__name__)
