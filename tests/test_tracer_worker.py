"""Tracing runs on the tracer worker, off the event loop: what the loop still does (streaming,
opening runs, announcing ids, each thread's current id) does not wait for it; a worker that is
stuck or far behind costs the stream nothing and is bounded; shutdown is bounded too."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

import pytest
from ag_ui.encoder import EventEncoder

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.background import Worker
from ambient_tracing.doors.stream import trace_agui_stream
from ambient_tracing.testing import RecordedSpan, RecordingBackend
from ambient_tracing.tracer.worker import Lane
from tests.support.agui_app import run_input, scripted_run
from tests.support.asgi_driver import drive, sse_app
from tests.support.pair import fetch, serve_pair, sse, strip_ids
from tests.support.server import serve

pytestmark = pytest.mark.timeout(30)


def encoded(events: list) -> list[bytes]:  # type: ignore[type-arg]
    encoder = EventEncoder()
    return [encoder.encode(event).encode() for event in events]


def hold(worker: Worker) -> threading.Event:
    """Keep ``worker`` busy until the returned event is set (at most 20 s)."""
    release = threading.Event()
    worker.call(lambda: release.wait(20))
    return release


async def test_a_stuck_tracer_worker_does_not_hold_up_the_stream_or_its_id() -> None:
    with serve_pair() as pair:
        release = hold(pair.obs.tracer_worker)
        try:
            path = pair.app.add_stream(encoded(scripted_run("t-stuck", "r-stuck")))
            started = time.monotonic()
            traced = await fetch(pair.traced, path, body=run_input("t-stuck", "r-stuck"))
            plain = await fetch(pair.plain, path, body=run_input("t-stuck", "r-stuck"))
            assert time.monotonic() - started < 5
            stripped, [(_, trace_id)] = strip_ids(traced.raw)
            assert stripped == plain.raw  # every byte, and the id, while the worker is stuck
            # What the loop keeps is current already: the id, and the run's end as the client saw it.
            assert pair.obs.last_trace_id("t-stuck") == trace_id
            assert pair.obs.current_trace_id("t-stuck") is None
        finally:
            release.set()
        [turn] = pair.runs("t-stuck")  # traced in full once the worker is free
        assert turn.trace_id == trace_id and turn.ended == 1 and turn.error is None
        assert [child.name for child in turn.children] == ["tool_search"]
        assert turn.output == "The answer is 42. "


async def test_a_worker_far_behind_leaves_the_stream_whole_and_says_the_run_was_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ambient_tracing")
    with serve_pair() as pair:
        pair.obs.tracer_worker.max_backlog = 3  # lanes take their bound from the worker
        release = hold(pair.obs.tracer_worker)
        try:
            events = scripted_run("t-behind", "r-behind", text=" ".join(["word"] * 40))
            path = pair.app.add_stream(encoded(events))
            traced = await fetch(pair.traced, path, body=run_input("t-behind", "r-behind"))
            plain = await fetch(pair.plain, path, body=run_input("t-behind", "r-behind"))
            stripped, [(_, trace_id)] = strip_ids(traced.raw)
            assert stripped == plain.raw
        finally:
            release.set()
        [turn] = pair.runs("t-behind")
        assert turn.trace_id == trace_id and turn.ended == 1
        assert turn.error is not None and "tracer worker was behind" in turn.error
        assert any("tracer worker is behind" in record.getMessage() for record in caplog.records)


async def test_a_run_start_the_loop_cannot_see_is_still_traced_without_an_id() -> None:
    # JSON escapes in the type: the loop looks for the bytes RUN_, the worker parses every event.
    escaped = b'data: {"type":"RUN\\u005fSTARTED","threadId":"t-esc","runId":"r-esc"}\n\n'
    chunks = [
        escaped,
        sse({"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant"}),
        sse({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "hello"}),
        sse({"type": "TEXT_MESSAGE_END", "messageId": "m"}),
        sse({"type": "RUN_FINISHED", "threadId": "t-esc", "runId": "r-esc"}),
    ]
    with serve_pair() as pair:
        path = pair.app.add_stream(chunks)
        traced = await fetch(pair.traced, path, body=run_input("t-esc", "r-esc"))
        assert traced.raw == b"".join(chunks)  # nothing announced, nothing changed
        [turn] = pair.runs("t-esc")
        assert turn.output == "hello" and turn.ended == 1 and turn.error is None
        assert pair.obs.last_trace_id("t-esc") == turn.trace_id


async def test_aclose_is_bounded_when_the_tracer_worker_never_finishes() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], flush_timeout=1.0)
    release = hold(obs.tracer_worker)
    try:
        started = time.monotonic()
        await obs.aclose()
        assert time.monotonic() - started < 1.0 + 3.0
    finally:
        release.set()


async def test_after_aclose_a_stream_is_passed_through_without_an_id() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    chunks = encoded(scripted_run("t-late", "r-late"))

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            for reply in ("lifespan.startup.complete", "lifespan.shutdown.complete"):
                await receive()
                await send({"type": reply})
            return
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with serve(TracingMiddleware(app, observability=obs)) as url:
        await obs.aclose()
        traced = await fetch(url, "/agent", body=run_input("t-late", "r-late"))
    assert traced.raw == b"".join(chunks) and backend.runs == []


def test_a_lane_hands_items_over_in_order_across_batches_with_the_time_each_was_put() -> None:
    worker = Worker("test")
    seen: list[tuple[int, int]] = []
    lane = Lane(worker, lambda item, at: seen.append((item, at)))
    put_at: list[tuple[int, int]] = []
    for index in range(20_000):
        before = time.time_ns()
        assert lane.put(index)
        put_at.append((before, time.time_ns()))
        if index % 997 == 0:
            time.sleep(0.001)  # let the worker drain mid-way: the lane is queued again
    done = threading.Event()
    lane.call(done.set)
    assert done.wait(10)
    assert [item for item, _ in seen] == list(range(20_000))
    assert all(low <= at <= high for (_, at), (low, high) in zip(seen, put_at, strict=True))
    assert worker.close(5)


def test_a_lane_refuses_past_its_bound_while_the_worker_is_stuck() -> None:
    worker = Worker("test", max_backlog=10)
    release = hold(worker)
    seen: list[int] = []
    lane = Lane(worker, lambda item, at: seen.append(item))
    accepted = [lane.put(index) for index in range(15)]
    assert accepted == [True] * 10 + [False] * 5
    release.set()
    assert worker.drain(5)
    assert seen == list(range(10))
    assert worker.close(5)


async def test_concurrent_streams_each_get_their_own_run_in_full() -> None:
    with serve_pair() as pair:
        threads = [f"t-many-{index}" for index in range(20)]
        paths = [pair.app.add_stream(encoded(scripted_run(thread, f"{thread}-r"))) for thread in threads]
        fetched = await asyncio.gather(
            *(
                fetch(pair.traced, path, body=run_input(thread, f"{thread}-r"))
                for thread, path in zip(threads, paths, strict=True)
            )
        )
        for thread, response in zip(threads, fetched, strict=True):
            [(_, trace_id)] = strip_ids(response.raw)[1]
            [turn] = pair.runs(thread)
            assert turn.trace_id == trace_id and turn.output == "The answer is 42. " and turn.ended == 1
            assert [child.name for child in turn.children] == ["tool_search"]


def _text_run(thread: str, run: str, deltas: list[str], start: bytes | None = None) -> list[bytes]:
    message = f"{run}-m"
    return [
        start or sse({"type": "RUN_STARTED", "threadId": thread, "runId": run}),
        sse({"type": "TEXT_MESSAGE_START", "messageId": message, "role": "assistant"}),
        *(sse({"type": "TEXT_MESSAGE_CONTENT", "messageId": message, "delta": delta}) for delta in deltas),
        sse({"type": "TEXT_MESSAGE_END", "messageId": message}),
        sse({"type": "RUN_FINISHED", "threadId": thread, "runId": run}),
    ]


async def _traced_with_a_worker_keeping_up(
    chunks: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> tuple[bytes, list[bytes], RecordingBackend]:
    """The stream through the middleware, paused between chunks so the tracer worker keeps up (and
    tells the loop what it does not want); the body, the chunks the worker was fed, the backend."""
    from ambient_tracing.doors.body_tracer import BodyTracer

    fed: list[bytes] = []
    feed = BodyTracer.feed

    def spy(self: BodyTracer, chunk: bytes, at_ns: int | None = None) -> None:
        fed.append(chunk)
        feed(self, chunk, at_ns)

    monkeypatch.setattr(BodyTracer, "feed", spy)
    backend = RecordingBackend()
    obs = Observability([backend])
    app = TracingMiddleware(sse_app(chunks, pause=0.02), observability=obs)
    driven = await drive(app, [json.dumps(run_input("t", "r")).encode()])
    assert obs.tracer_worker.drain(5)
    return driven.body, fed, backend


async def test_frames_the_tracer_does_not_want_are_not_handed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = _text_run("t-skip", "r-skip", ["0123456789"] * 30)
    body, fed, backend = await _traced_with_a_worker_keeping_up(chunks, monkeypatch)
    stripped, [(_, trace_id)] = strip_ids(body)
    assert stripped == b"".join(chunks)
    # With the mask on, text past 51 characters is not kept: the worker says so once it has seen
    # enough, and the loop stops handing those deltas over; the end still arrives.
    assert len(fed) < len(chunks) - 15
    [turn] = backend.runs
    assert turn.trace_id == trace_id and turn.ended == 1 and turn.error is None
    assert turn.output == "[REDACTED FOR PRIVACY]"


@pytest.mark.parametrize(
    "hidden",
    [
        b'data: {"type":"RUN\\u005fSTARTED","threadId":"t-hid","runId":"r-2"}\n\n',
        b'data: {"threadId":"t-hid","runId":"r-2","type":"\\u0052UN_STARTED"}\n\n',
    ],
)
async def test_a_hidden_run_start_ends_passing_over(hidden: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between runs no text is wanted; a run the loop cannot see start (its type written with
    escapes) wants it again: its text is traced, though the loop was told text was unwanted."""
    first = _text_run("t-hid", "r-1", ["0123456789"] * 10)
    stray = [sse({"type": "TEXT_MESSAGE_CONTENT", "messageId": "x", "delta": "stray"})] * 5
    second = _text_run("t-hid", "r-2", ["hello"], start=hidden)
    chunks = first + stray + second
    body, fed, backend = await _traced_with_a_worker_keeping_up(chunks, monkeypatch)
    assert strip_ids(body)[0] == b"".join(chunks)
    assert fed.count(stray[0]) < len(stray)  # strays were passed over...
    assert fed[-len(second) - 1 : -1] == second  # ...nothing after the hidden start was
    assert [turn.output for turn in backend.runs] == ["[REDACTED FOR PRIVACY]", "hello"]


@pytest.mark.parametrize("with_tick", [False, True])
def test_an_idle_worker_sleeps(with_tick: bool) -> None:
    """Idle, a worker uses no CPU: without a tick it sleeps until woken (it once spun once its
    first tick time had passed), with one it wakes only to run it."""
    ticks: list[float] = []
    worker = Worker(
        "idle", tick=(lambda: ticks.append(time.monotonic())) if with_tick else None, tick_seconds=0.05
    )
    native_id = worker.call(threading.get_native_id).result(5)

    def cpu_seconds() -> float:
        with open(f"/proc/self/task/{native_id}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(1.0)
    assert cpu_seconds() - before < 0.2  # a spinning thread would use most of the second
    assert (len(ticks) >= 5) is with_tick
    assert worker.close(5)


TOOL_SECONDS = 0.3  # how long the scripted tool runs: the gap between its START and RESULT events
# The server may stamp a stream's end a moment after its client saw the end; the held worker gets
# to the events a second later.
END_SLACK_NS = 200_000_000


def _slow_tool_run(thread_id: str, run_id: str) -> list[Any]:
    """A run whose tool takes TOOL_SECONDS (a float between events: sleep that long)."""
    events = scripted_run(thread_id, run_id)
    return [*events[:5], TOOL_SECONDS, *events[5:]]  # after TOOL_CALL_END, before its RESULT


def _assert_timed_as_on_the_wire(turn: Any, started: int, finished: int) -> None:
    tool = turn.find("tool_search")
    assert started <= turn.start_time_ns <= tool.start_time_ns <= finished
    assert tool.end_time_ns is not None and turn.end_time_ns is not None
    assert tool.end_time_ns - tool.start_time_ns >= TOOL_SECONDS * 1e9 * 0.9
    assert tool.end_time_ns <= turn.end_time_ns <= finished + END_SLACK_NS  # not when the worker got to them


async def _through_the_middleware_with_the_worker_held(
    thread_id: str, chunks: list[bytes | float]
) -> tuple[RecordedSpan, int, int]:
    """Stream ``chunks`` (a float: sleep that long) through the middleware on uvicorn while the
    tracer worker is held until a second after the response ended: the run, and the response's
    start and end times as its client saw them."""
    with serve_pair() as pair:
        release = hold(pair.obs.tracer_worker)
        try:
            path = pair.app.add_stream(chunks)
            started = time.time_ns()
            await fetch(pair.traced, path, body=run_input(thread_id, f"r-{thread_id}"))
            finished = time.time_ns()
            await asyncio.sleep(1.0)  # the worker is still held: every event waits for it
        finally:
            release.set()
        [turn] = pair.runs(thread_id)
    return turn, started, finished


async def test_spans_carry_the_times_their_events_passed_the_middleware_not_the_workers() -> None:
    """The tracer worker handles a stream's chunks a batch later, or (here) a backlog of a second
    later, all at once: the spans still start and end when their events passed, so a tool's
    duration is the one on the wire."""
    script = _slow_tool_run("t-timed", "r-t-timed")
    chunks = [chunk if isinstance(chunk, float) else encoded([chunk])[0] for chunk in script]
    turn, started, finished = await _through_the_middleware_with_the_worker_held("t-timed", chunks)
    _assert_timed_as_on_the_wire(turn, started, finished)


async def _through_the_python_door_with_the_worker_held(
    script: list[Any],
) -> tuple[RecordedSpan, int, int, int]:
    """Stream ``script`` (events; a float: sleep that long) through ``trace_agui_stream`` while the
    tracer worker is held until a second after it ends: the run, the stream's start and end times,
    and how many events came out."""
    recorder = RecordingBackend()
    obs = Observability([recorder])
    await obs.start()
    release = hold(obs.tracer_worker)

    async def events() -> Any:
        for item in script:
            if isinstance(item, float):
                await asyncio.sleep(item)
            else:
                yield item

    try:
        started = time.time_ns()
        count = len([event async for event in trace_agui_stream(events(), obs)])
        finished = time.time_ns()
        await asyncio.sleep(1.0)
    finally:
        release.set()
    [turn] = recorder.runs
    await obs.aclose()
    return turn, started, finished, count


async def test_the_python_door_times_spans_as_its_events_passed_too() -> None:
    script = _slow_tool_run("t-timed-py", "r-timed-py")
    turn, started, finished, count = await _through_the_python_door_with_the_worker_held(script)
    assert count == len(script)  # every event (the sleep is not one), and the id
    _assert_timed_as_on_the_wire(turn, started, finished)


async def test_what_a_cut_stream_leaves_open_ends_when_the_stream_ended() -> None:
    # Up to TOOL_CALL_END (no result, no RUN_FINISHED), then the producer stops a while later.
    script = [*scripted_run("t-cut", "r-cut")[:5], TOOL_SECONDS]
    turn, started, finished, count = await _through_the_python_door_with_the_worker_held(script)
    assert count == 6
    assert turn.error == "stream ended before RUN_FINISHED"
    _assert_timed_as_on_the_wire(turn, started, finished)  # the tool ends with the stream


async def test_a_response_cut_short_ends_its_open_spans_when_it_ended() -> None:
    chunks: list[bytes | float] = [*encoded(scripted_run("t-cut-mw", "r-t-cut-mw")[:5]), TOOL_SECONDS]
    turn, started, finished = await _through_the_middleware_with_the_worker_held("t-cut-mw", chunks)
    assert turn.error == "stream ended before RUN_FINISHED"
    _assert_timed_as_on_the_wire(turn, started, finished)  # the tool ends with the response


async def test_a_run_the_worker_opens_itself_starts_when_its_event_passed() -> None:
    escaped = b'data: {"type":"RUN\\u005fSTARTED","threadId":"t-esc-time","runId":"r-t-esc-time"}\n\n'
    events = encoded(scripted_run("t-esc-time", "r-t-esc-time"))
    chunks = [escaped, *events[1:5], TOOL_SECONDS, *events[5:]]
    turn, started, finished = await _through_the_middleware_with_the_worker_held("t-esc-time", chunks)
    _assert_timed_as_on_the_wire(turn, started, finished)


def test_a_refused_put_whose_item_a_running_drain_took_stands() -> None:
    """The worker may refuse to queue a lane (its backlog full) while a drain of that lane, begun
    earlier, is still running and takes the item just put: the put then stands (the item was
    handled) and nothing raises into the response that put it."""

    class RacingWorker:
        max_backlog = 10

        def submit(self, call: Any) -> bool:
            call()  # the drain that was running takes the item...
            return False  # ...and the worker's backlog is full

    seen: list[int] = []
    lane = Lane(RacingWorker(), lambda item, at: seen.append(item))  # type: ignore[arg-type]
    assert lane.put(1) and lane.put(2)
    assert seen == [1, 2]
