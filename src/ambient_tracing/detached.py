"""Blocking SDK calls at shutdown, on daemon threads of our own, waited for with a deadline.

``asyncio.to_thread`` would run them on the loop's default executor, whose threads the loop joins
when it closes: one SDK call hung on a server that never answers would keep the process alive for
ever. A daemon thread left behind does not stop the interpreter from exiting.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextlib import suppress

logger = logging.getLogger(__name__)


async def call_detached(action: Callable[[], object], timeout: float, what: str) -> bool:
    """Run ``action`` on a new daemon thread; wait at most ``timeout`` s. True when it finished in
    time (its exception, if any, is logged); False when it is still running and is left behind."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def work() -> None:
        try:
            action()
        except Exception as exc:
            logger.warning("%s failed: %r", what, exc)
        finally:
            with suppress(RuntimeError):  # the loop is closed already: nobody waits any more
                loop.call_soon_threadsafe(settle)

    threading.Thread(target=work, name=f"ambient-tracing-{what}", daemon=True).start()
    try:
        await asyncio.wait_for(done, max(timeout, 0.0))
    except TimeoutError:
        logger.warning("%s did not finish within %.1f s; left behind", what, timeout)
        return False
    return True
