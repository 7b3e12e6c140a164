"""Many runs at once through one server: every stream gets its own trace id, every trace holds
only its own run, and the per-thread id registry answers right during and after a run."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import agui_app, run_input
from tests.support.pydantic_agent import (
    answer_text,
    tool_call_id_for,
    weather_agent,
    weather_app,
    weather_report,
)
from tests.support.server import serve

pytestmark = pytest.mark.timeout(60)

RUNS = 120
TIMEOUT = httpx.Timeout(20.0, connect=10.0)
LIMITS = httpx.Limits(max_connections=RUNS + 10, max_keepalive_connections=RUNS + 10)


@dataclass
class Received:
    """What one client saw of its run."""

    thread_id: str
    run_id: str
    city: str
    events: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def trace_ids(self) -> list[str]:
        return [
            e["value"]["traceId"]
            for e in self.events
            if e["type"] == "CUSTOM" and e.get("name") == "ambient:trace_id"
        ]

    @property
    def tool_call_ids(self) -> list[str]:
        return [e["toolCallId"] for e in self.events if e["type"] == "TOOL_CALL_START"]


class SseEvents:
    """Splits a streamed SSE body into the JSON events of its ``data:`` frames, as chunks arrive."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buffer += chunk
        *frames, self._buffer = self._buffer.split(b"\n\n")
        return [json.loads(frame[len(b"data: ") :]) for frame in frames if frame.startswith(b"data: ")]


async def run_one(client: httpx.AsyncClient, url: str, index: int) -> Received:
    city = f"City{index}"
    received = Received(f"thread-{index}", f"run-{index}", city)
    body = run_input(received.thread_id, received.run_id, f"What is the weather in {city}?")
    parser = SseEvents()
    async with client.stream("POST", f"{url}/agent", json=body) as response:
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            for event in parser.feed(chunk):
                if event["type"] == "RUN_STARTED":
                    received.started = time.monotonic()
                elif event["type"] == "RUN_FINISHED":
                    received.finished = time.monotonic()
                received.events.append(event)
    assert parser.feed(b"") == []
    return received


def max_overlap(runs: list[Received]) -> int:
    """The most runs that were streaming at the same moment, as the clients saw them."""
    edges = sorted([(run.started, 1) for run in runs] + [(run.finished, -1) for run in runs])
    most = open_now = 0
    for _, step in edges:
        open_now += step
        most = max(most, open_now)
    return most


async def test_concurrent_runs_each_get_their_own_trace() -> None:
    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False)
    # The scripted model sleeps between chunks, so the runs interleave on the server.
    app = TracingMiddleware(weather_app(weather_agent(delay=0.003)), observability=observability)
    with serve(app) as url:
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS) as client:
            runs = await asyncio.gather(*(run_one(client, url, index) for index in range(RUNS)))

    assert max_overlap(runs) >= RUNS // 4, "the runs did not overlap: the test proves nothing"

    trace_of: dict[str, Received] = {}
    for run in runs:
        [trace_id] = run.trace_ids
        assert run.events[0]["type"] == "RUN_STARTED"
        assert (run.events[0]["threadId"], run.events[0]["runId"]) == (run.thread_id, run.run_id)
        assert run.events[1]["type"] == "CUSTOM"
        assert run.events[-1]["type"] == "RUN_FINISHED"
        assert run.tool_call_ids == [tool_call_id_for(run.city)]
        trace_of[trace_id] = run
    assert len(trace_of) == RUNS, "two streams were told the same trace id"

    assert len(backend.runs) == RUNS
    assert {turn.trace_id for turn in backend.runs} == set(trace_of)
    for turn in backend.runs:
        run = trace_of[turn.trace_id]
        assert turn.run is not None
        assert (turn.run.thread_id, turn.run.run_id) == (run.thread_id, run.run_id)
        assert turn.run.turn_number == 1
        assert turn.input == f"What is the weather in {run.city}?"
        assert turn.output == answer_text(run.city)
        assert turn.error is None
        [tool] = turn.children
        assert tool.name == "tool_get_weather"
        assert tool.attributes["gen_ai.tool.call.id"] in run.tool_call_ids
        assert tool.input == {"city": run.city}
        assert tool.output == weather_report(run.city)
        assert all(span.trace_id == turn.trace_id for span in turn.walk())
        assert len(turn.usage) == 1

    for trace_id, run in trace_of.items():
        assert observability.last_trace_id(run.thread_id) == trace_id
        assert observability.current_trace_id(run.thread_id) is None
    assert backend.open_spans() == []
    assert observability.runs.open_streams == 0  # every stream tracer let go of


async def test_concurrent_turns_of_one_thread_are_numbered_and_kept_apart() -> None:
    """Several runs of the same thread at once: each its own trace, turn numbers 1..n."""
    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False)
    app = TracingMiddleware(agui_app(delay=0.002), observability=observability)
    runs = 20

    async def one(client: httpx.AsyncClient, url: str, index: int) -> tuple[str, str]:
        body = run_input("shared-thread", f"run-{index}")
        parser = SseEvents()
        events: list[dict[str, Any]] = []
        async with client.stream("POST", f"{url}/agent", json=body) as response:
            async for chunk in response.aiter_raw():
                events += parser.feed(chunk)
        [trace_id] = [e["value"]["traceId"] for e in events if e.get("name") == "ambient:trace_id"]
        return f"run-{index}", trace_id

    with serve(app) as url:
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS) as client:
            results = dict(await asyncio.gather(*(one(client, url, index) for index in range(runs))))

    assert len(set(results.values())) == runs
    for turn in backend.runs:
        assert turn.run is not None
        assert results[turn.run.run_id or ""] == turn.trace_id
        assert [child.attributes["gen_ai.tool.call.id"] for child in turn.children] == [
            f"{turn.run.run_id}-call"
        ]
    assert sorted(turn.run.turn_number for turn in backend.runs if turn.run) == list(range(1, runs + 1))
    assert observability.last_trace_id("shared-thread") in set(results.values())
    assert observability.current_trace_id("shared-thread") is None
    assert backend.open_spans() == []


# -- the resolver: current_trace_id / last_trace_id ----------------------------------------------


class Gate:
    """Holds the tool of a run until the test opens it: an asyncio.Event on the server's loop."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    async def wait(self, city: str) -> None:
        self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        self.reached.set()
        await asyncio.wait_for(self._event.wait(), timeout=10)

    def open(self) -> None:
        assert self._loop is not None and self._event is not None
        self._loop.call_soon_threadsafe(self._event.set)


@pytest.fixture
def gated() -> Iterator[tuple[str, Observability, list[Gate]]]:
    """The weather agent, each run's tool held by a fresh Gate (appended to the list)."""
    gates: list[Gate] = []
    lock = threading.Lock()

    async def before_tool(city: str) -> None:
        with lock:
            gate = next(gate for gate in gates if not gate.reached.is_set())
        await gate.wait(city)

    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False)
    app = TracingMiddleware(weather_app(weather_agent(before_tool=before_tool)), observability=observability)
    with serve(app) as url:
        yield url, observability, gates
    assert backend.open_spans() == []


async def gated_run(
    client: httpx.AsyncClient, url: str, observability: Observability, gates: list[Gate], run_id: str
) -> str:
    """One run of thread "t-resolver": checks the resolver while the run is held, then lets it end."""
    thread = "t-resolver"
    gate = Gate()
    gates.append(gate)
    parser = SseEvents()
    trace_id: str | None = None
    body = run_input(thread, run_id, "What is the weather in Oslo?")
    async with client.stream("POST", f"{url}/agent", json=body) as response:
        chunks = response.aiter_raw()
        async for chunk in chunks:
            for event in parser.feed(chunk):
                if event.get("name") == "ambient:trace_id":
                    trace_id = event["value"]["traceId"]
            if trace_id is not None:
                break
        assert trace_id is not None
        assert await asyncio.to_thread(gate.reached.wait, 10), "the run never reached its tool"
        # The run is open on the server: the id its stream announced is the thread's current id.
        assert observability.current_trace_id(thread) == trace_id
        assert observability.last_trace_id(thread) == trace_id
        gate.open()
        async for chunk in chunks:
            parser.feed(chunk)
    assert observability.current_trace_id(thread) is None
    assert observability.last_trace_id(thread) == trace_id
    return trace_id


async def test_current_trace_id_while_open_and_last_after(
    gated: tuple[str, Observability, list[Gate]],
) -> None:
    url, observability, gates = gated
    assert observability.current_trace_id("t-resolver") is None
    assert observability.last_trace_id("t-resolver") is None
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        first = await gated_run(client, url, observability, gates, "run-1")
        second = await gated_run(client, url, observability, gates, "run-2")
    assert first != second
    assert observability.last_trace_id("t-resolver") == second
    assert observability.current_trace_id("t-resolver") is None
    assert observability.last_trace_id("never-seen") is None
    assert observability.current_trace_id("never-seen") is None


# -- the registry stays bounded -------------------------------------------------------------------


async def sequential_runs(url: str, threads: list[str]) -> dict[str, str]:
    """Run each thread once, one after another; the id each stream announced, by thread."""
    announced: dict[str, str] = {}
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for thread in threads:
            response = await client.post(f"{url}/agent", json=run_input(thread, f"{thread}-run"))
            events = SseEvents().feed(response.content)
            [announced[thread]] = [
                e["value"]["traceId"] for e in events if e.get("name") == "ambient:trace_id"
            ]
    return announced


async def test_registry_drops_the_least_recent_threads_past_max_threads() -> None:
    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False, max_threads=10, thread_idle_seconds=3600)
    threads = [f"bounded-{index}" for index in range(15)]
    with serve(TracingMiddleware(agui_app(), observability=observability)) as url:
        announced = await sequential_runs(url, threads)
        # A new turn on an old thread makes it the most recent: it is kept, the next oldest goes.
        again = await sequential_runs(url, ["bounded-5", "bounded-15"])

    assert len(backend.runs) == 17  # the registry forgets ids, the traces are all recorded
    # 15 threads keep 5..14; bounded-5 is then touched again, so bounded-15 pushes out bounded-6.
    for thread in [*threads[:5], "bounded-6"]:
        assert observability.last_trace_id(thread) is None, thread
    assert observability.last_trace_id("bounded-5") == again["bounded-5"]
    for thread in threads[7:]:
        assert observability.last_trace_id(thread) == announced[thread], thread
    assert observability.last_trace_id("bounded-15") == again["bounded-15"]
    assert len(observability.runs.threads) == 10


async def test_registry_drops_idle_threads() -> None:
    backend = RecordingBackend()
    observability = Observability([backend], mask_messages=False, thread_idle_seconds=0.5)
    now = [0.0]  # a manual clock: a loaded machine must not decide what counts as idle
    observability.runs.threads.clock = lambda: now[0]
    with serve(TracingMiddleware(agui_app(), observability=observability)) as url:
        first = await sequential_runs(url, ["idle-a", "idle-b"])
        assert observability.last_trace_id("idle-a") == first["idle-a"]
        now[0] += 0.3
        second = await sequential_runs(url, ["idle-b"])  # touched again: its idle time restarts
        now[0] += 0.3
        # idle-a has been idle 0.6 s, idle-b only 0.3 s.
        assert observability.last_trace_id("idle-a") is None
        assert observability.last_trace_id("idle-b") == second["idle-b"]
        now[0] += 0.6
        assert observability.last_trace_id("idle-b") is None
        assert len(observability.runs.threads) == 0
        # A forgotten thread starts counting its turns afresh.
        third = await sequential_runs(url, ["idle-b"])
        assert observability.last_trace_id("idle-b") == third["idle-b"]
    assert [turn.run.turn_number for turn in backend.runs if turn.run] == [1, 1, 2, 1]
    assert backend.open_spans() == []
