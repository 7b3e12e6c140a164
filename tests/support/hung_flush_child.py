"""Run as a child process: an Observability whose backend's flush never returns, closed from
``asyncio.run``; prints how long ``aclose`` took. The process must then exit at once."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from ambient_tracing import Observability
from ambient_tracing.testing import RecordingBackend
from ambient_tracing.tracer.handlers import StreamTracer
from ambient_tracing.tracer.request import RunRequest


class FlushNeverReturns(RecordingBackend):
    def flush(self, timeout: float) -> None:
        threading.Event().wait()  # an SDK stuck on a server that never answers


async def main(flush_timeout: float) -> None:
    obs = Observability([FlushNeverReturns()], flush_timeout=flush_timeout, mask_messages=False)
    tracer = StreamTracer(obs.runs, RunRequest())
    tracer.on_event({"type": "RUN_STARTED", "threadId": "t", "runId": "r"})
    start = time.monotonic()
    await obs.aclose()
    print(f"aclose {time.monotonic() - start:.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1])))
