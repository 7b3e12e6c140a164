"""Observability's lifecycle and the rating delivery queue, with in-memory backends."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import ambient_tracing.observability as observability_module
from ambient_tracing import Observability
from ambient_tracing.backends.base import RatingRejected, TraceNotStored
from ambient_tracing.backends.rating import Rating
from ambient_tracing.feedback.delivery import RatingDelivery
from ambient_tracing.feedback.spool import StoreFull
from ambient_tracing.testing import RecordedSpan as RecordedSpanType
from ambient_tracing.testing import RecordingBackend


class FlakySetup(RecordingBackend):
    """Setup fails ``failures`` times (a backend down at startup), then succeeds."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.ready = False

    def setup(self) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("backend down")
        self.ready = True


class Sink:
    """A rating sink that fails until ``up`` and records what it stored."""

    name = "sink"
    needs_trace = True

    def __init__(self, up: bool = True, reject: bool = False) -> None:
        self.up = up
        self.reject = reject
        self.stored: list[Rating] = []

    def deliver_rating(self, rating: Rating) -> None:
        if self.reject:
            raise RatingRejected("400")
        if not self.up:
            raise ConnectionError("down")
        self.stored.append(rating)


def a_rating(trace_id: str | None = "ab" * 16) -> Rating:
    return Rating("thumbs_up", "thread", trace_id, "alice", "m-1", None, None)


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


async def test_a_backend_down_at_startup_is_set_up_once_it_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observability_module, "SETUP_RETRY_SECONDS", 0.02)
    backend = FlakySetup(failures=3)
    obs = Observability([backend])
    await obs.start()  # returns after the first attempt; retries continue in the background
    wait_until(lambda: backend.ready)
    await obs.aclose()


def test_delivery_retries_until_the_sink_is_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ambient_tracing.feedback.delivery.FIRST_RETRY_SECONDS", 0.01)
    sink = Sink(up=False)
    delivery = RatingDelivery([sink], spool=tmp_path / "feedback.db")
    assert delivery.submit(a_rating()).result(10) == ["sink"]  # committed
    time.sleep(0.2)
    assert sink.stored == [] and delivery.pending == 1
    sink.up = True
    wait_until(lambda: delivery.pending == 0)
    assert [r.trace_id for r in sink.stored] == ["ab" * 16]
    delivery.close(1)
    assert delivery.counts() == {"waiting": 0, "set_aside": 0, "deliveries": 0}


def test_a_rejected_rating_is_set_aside_and_one_without_trace_skips_trace_sinks(tmp_path: Path) -> None:
    rejecting = Sink(reject=True)
    delivery = RatingDelivery([rejecting], spool=tmp_path / "feedback.db")
    delivery.submit(a_rating()).result(10)
    assert delivery.submit(a_rating(trace_id=None)).result(10) == []  # no trace, no way to find one
    wait_until(lambda: delivery.pending == 0)
    delivery.close(1)
    assert delivery.counts()["set_aside"] == 1  # kept, not retried


def test_a_rating_whose_trace_is_never_stored_is_set_aside_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ambient_tracing.feedback.delivery.FIRST_RETRY_SECONDS", 0.01)

    class NoTrace(Sink):
        def deliver_rating(self, rating: Rating) -> None:
            raise TraceNotStored(rating.trace_id)

    delivery = RatingDelivery([NoTrace()], spool=tmp_path / "feedback.db", trace_wait_seconds=0.3)
    delivery.submit(a_rating()).result(10)
    wait_until(lambda: delivery.counts()["set_aside"] == 1)
    assert delivery.pending == 0
    delivery.close(1)


def test_old_json_lines_spools_are_imported_once_and_bad_lines_set_aside(tmp_path: Path) -> None:
    spool = tmp_path / "spool.jsonl"  # AMBIENT_FEEDBACK_SPOOL pointing at an old JSON-lines spool
    spool.write_text(a_rating().to_json() + "\nnot json\n" + json.dumps({"kind": "nope"}) + "\n")
    dead = tmp_path / "spool.jsonl.999999999.1.claimed"  # claimed by a pid that cannot exist
    dead.write_text(a_rating("cd" * 16).to_json() + "\n")
    alive = tmp_path / f"spool.jsonl.{os.getppid()}.1.claimed"  # a live process owns this one
    alive.write_text(a_rating("ef" * 16).to_json() + "\n")
    sink = Sink()
    delivery = RatingDelivery([sink], spool=spool)
    delivery.start()
    wait_until(lambda: len(sink.stored) == 2)
    delivery.close(1)
    assert sorted(r.trace_id for r in sink.stored) == ["ab" * 16, "cd" * 16]
    assert alive.exists() and not dead.exists()
    assert spool.read_bytes().startswith(b"SQLite format 3")
    assert delivery.counts() == {"waiting": 0, "set_aside": 2, "deliveries": 0}
    again = RatingDelivery([sink], spool=spool)
    again.start()
    time.sleep(0.3)
    again.close(1)
    assert len(sink.stored) == 2  # imported once


def test_close_keeps_what_is_pending_for_the_next_start(tmp_path: Path) -> None:
    spool = tmp_path / "feedback.db"
    delivery = RatingDelivery([Sink(up=False)], spool=spool)
    for trace in ("ab", "cd"):
        delivery.submit(a_rating(trace * 16)).result(10)
    delivery.close(0.5)
    sink = Sink()
    later = RatingDelivery([sink], spool=spool)
    later.start()
    wait_until(lambda: len(sink.stored) == 2)
    later.close(1)
    assert sorted(r.trace_id for r in sink.stored) == ["ab" * 16, "cd" * 16]


def test_a_queue_that_cannot_be_opened_refuses_then_is_used_once_it_can(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the queue's folder should be")
    sink = Sink()
    delivery = RatingDelivery([sink], spool=blocker / "feedback.db")
    with pytest.raises(StoreFull):
        delivery.submit(a_rating()).result(10)  # refused (503), never acknowledged
    blocker.unlink()  # the volume is usable again
    assert delivery.submit(a_rating("cd" * 16)).result(10) == ["sink"]
    wait_until(lambda: [r.trace_id for r in sink.stored] == ["cd" * 16])
    delivery.close(1)
    assert delivery.counts() == {"waiting": 0, "set_aside": 0, "deliveries": 0}


def test_the_spool_location_comes_from_the_environment() -> None:
    from ambient_tracing import TracingConfig

    assert TracingConfig.from_env({"AMBIENT_FEEDBACK_SPOOL": "/srv/spool.jsonl"}).feedback_spool == Path(
        "/srv/spool.jsonl"
    )
    assert TracingConfig.from_env({}).feedback_spool is None  # the default location is used


# Every backend without a span sink has its span calls run on the span worker, as vendors do.
DeferredRecording = RecordingBackend


async def test_vendor_span_calls_run_on_the_worker_in_order_with_their_times() -> None:
    import threading

    from ambient_tracing import trace_agui_stream
    from tests.support.agui_app import run_input, scripted_run

    backend = DeferredRecording()
    threads: set[str] = set()
    workers: set[threading.Thread] = set()
    original = RecordedSpanType.start_child

    def spy(self: object, *args: object, **kwargs: object) -> object:
        threads.add(threading.current_thread().name)
        workers.add(threading.current_thread())
        assert kwargs["start_time_ns"] is not None  # the time the call happened on the loop
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    RecordedSpanType.start_child = spy  # type: ignore[method-assign]
    try:
        obs = Observability([backend])

        async def events():  # type: ignore[no-untyped-def]
            for event in scripted_run("t-d", "r-d"):
                yield event

        seen = [
            e async for e in trace_agui_stream(events(), observability=obs, run_input=run_input("t-d", "r-d"))
        ]
        assert obs.tracer_worker.drain(5) and obs.spans.worker.drain(5)
    finally:
        RecordedSpanType.start_child = original  # type: ignore[method-assign]
    assert len(seen) == len(scripted_run("t-d", "r-d")) + 1
    [turn] = backend.runs
    assert [child.name for child in turn.children] == ["tool_search"]
    assert turn.children[0].input == {"query": "life"} and turn.children[0].output == "42"
    assert turn.ended == 1 and not backend.open_spans()
    assert threads == {"ambient-tracing-spans"}
    [worker_thread] = workers
    await obs.aclose()
    worker_thread.join(5)
    assert not worker_thread.is_alive()  # aclose ends the worker thread


async def test_new_runs_skip_deferred_backends_while_the_worker_is_far_behind() -> None:
    backend = DeferredRecording()
    obs = Observability([backend])
    obs.spans.worker.max_backlog = -1  # always "behind"
    assert obs.runs.open(thread_id="t", run_id="r", user_id=None, user_name=None, input=None) is None
    await obs.aclose()


def test_an_object_that_is_not_a_backend_is_refused_with_a_clear_error() -> None:
    class Legacy:  # a backend written for the protocol before `accepts` and `span_sink`
        name = "legacy"

        def start_run(self, run: object) -> None:
            return None

    with pytest.raises(TypeError, match="Legacy is not a TracingBackend: it has no span_sink, accepts"):
        Observability([Legacy()])  # type: ignore[list-item]
