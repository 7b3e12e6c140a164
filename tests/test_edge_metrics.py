"""Session Metrics for many threads going idle together: made off the event loop, a bounded
number of threads looked at per tick of the tracer worker, none lost."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from ambient_tracing import Observability
from ambient_tracing.session_metrics.emitter import Emitter
from ambient_tracing.session_metrics.metrics import MAX_SWEEP_PER_TICK, SessionReporter
from ambient_tracing.testing import RecordingBackend
from ambient_tracing.tracer.handlers import StreamTracer
from ambient_tracing.tracer.request import RunRequest


class ThreadNotingBackend(RecordingBackend):
    """Remembers on which thread each Session Metrics span was made."""

    def __init__(self) -> None:
        super().__init__()
        self.record_threads: list[threading.Thread] = []

    def record_span(self, name: str, **options: Any) -> None:
        self.record_threads.append(threading.current_thread())
        super().record_span(name, **options)


def one_run(obs: Observability, thread_id: str) -> None:
    """One run traced on the tracer worker, as the doors do (Session Metrics live there)."""
    obs.tracer_worker.call(lambda: trace_run(obs, thread_id)).result(5)


def trace_run(obs: Observability, thread_id: str) -> None:
    tracer = StreamTracer(obs.runs, RunRequest(thread_id=thread_id))
    for event in (
        {"type": "RUN_STARTED", "threadId": thread_id, "runId": "r"},
        {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "Read"},
        {"type": "TOOL_CALL_RESULT", "toolCallId": "c", "messageId": "m", "content": "ok"},
        {"type": "RUN_FINISHED", "threadId": thread_id, "runId": "r"},
    ):
        tracer.on_event(event)


async def test_many_idle_threads_are_reported_off_the_loop_and_none_is_lost() -> None:
    backend = ThreadNotingBackend()
    obs = Observability([backend], session_idle_seconds=0.2, mask_messages=False)
    threads = 3 * MAX_SWEEP_PER_TICK + 5
    for index in range(threads):
        one_run(obs, f"t{index}")
    async with asyncio.timeout(20):
        while len(backend.records) < threads:
            await asyncio.sleep(0.05)
    assert sorted(record["thread_id"] for record in backend.records) == sorted(
        f"t{i}" for i in range(threads)
    )
    assert threading.current_thread() not in backend.record_threads
    assert all(record["output"]["tool_calls_total"] == 1 for record in backend.records)
    await obs.aclose()
    assert len(backend.records) == threads  # nothing reported twice at shutdown


def test_a_sweep_looks_at_no_more_threads_than_its_limit() -> None:
    reporter = SessionReporter(lambda: [], runner_type="test", idle_seconds=1.0)
    for index in range(500):
        session = reporter.run_started(f"t{index}", None)
        assert session is not None
        session.run_ended(())
    busy = reporter.run_started("busy", None)  # a run still open: never reported by a sweep
    assert busy is not None
    later = time.monotonic() + 10
    assert reporter.sweep(now=later, limit=MAX_SWEEP_PER_TICK) == MAX_SWEEP_PER_TICK
    assert len(reporter) == 501 - MAX_SWEEP_PER_TICK
    while reporter.sweep(now=later, limit=MAX_SWEEP_PER_TICK):
        pass
    assert len(reporter) == 1
    assert reporter.drain(5)


async def test_shutdown_reports_every_thread_even_with_many() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], session_idle_seconds=None, mask_messages=True)
    for index in range(300):
        one_run(obs, f"t{index}-" + "x" * 60)  # ids over the mask's limit: reported as digests
    await obs.aclose()
    ids = {record["thread_id"] for record in backend.records}
    assert len(ids) == 300 and all(thread_id.startswith("masked-") for thread_id in ids)
    assert all(record["output"]["thread_id"] == record["thread_id"] for record in backend.records)


def test_the_emitter_drops_past_its_bound_but_drain_still_waits() -> None:
    emitter = Emitter("test-emitter", max_queued=2)
    entered, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def stall() -> None:
        entered.set()
        release.wait(5)
        ran.append(0)

    emitter.submit(stall)
    assert entered.wait(5)  # the thread is busy; the queue is empty
    for index in range(1, 5):
        emitter.submit(lambda index=index: ran.append(index))  # type: ignore[misc]
    assert emitter.dropped == 2
    assert not emitter.drain(0.2)  # the marker is queued behind the stalled job, not dropped
    release.set()
    assert emitter.drain(5)
    assert ran == [0, 1, 2]
