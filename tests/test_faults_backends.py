"""Fault suite, backends: an MLflow server killed mid-run and restarted; a Langfuse host answering
503, then hanging. The client's stream never changes and is never held up; what reaches the backend
is decided by each SDK's own export retries, asserted here exactly as measured.

What we found (mlflow 3.17, langfuse 5.0 on opentelemetry-exporter-otlp-proto-http 1.45):

* **MLflow** has no queue that survives an outage. A trace is exported when its root span ends, and
  every span when it ends, each by one HTTP request retried with exponential backoff
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 retries, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``
  2: about 4 minutes in all) in MLflow's export worker threads. A run that ends while the server is
  down is therefore stored complete if the server is back before those retries run out, and is
  dropped otherwise, with one WARNING from ``mlflow.tracing.export.mlflow_v3`` ("Failed to send trace
  to MLflow backend"); the spans of a dropped trace are dropped silently (DEBUG). A run that is open
  while the server is down and ends after it is back loses nothing (nothing is sent while it is open).
* **Langfuse**: spans wait in the OpenTelemetry BatchSpanProcessor queue (2048 spans, then dropped
  with a warning) and go out in batches; each batch is retried on 503 / connection errors / timeouts
  with backoff 1 s, 2 s, 4 s, ... but only within the client's ``timeout`` (``LANGFUSE_TIMEOUT``,
  default 5 s) per batch. A 503 or a hang shorter than that: the batch is delivered once the host
  answers. Longer: the batch is dropped with an ERROR from the OTLP exporter ("Failed to export spans
  batch due to timeout, max retries or shutdown"); spans ended after the host recovers are delivered.

The package itself logs nothing in either case: export failures are the SDKs' business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ag_ui.core import (
    BaseEvent,
    EventType,
    RunFinishedEvent,
    RunStartedEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.encoder import EventEncoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ambient_tracing import Observability, TracingMiddleware
from tests.support.agui_app import run_input
from tests.support.fixtures_mlflow import MlflowServer
from tests.support.langfuse_receiver import TRACES_PATH, LangfuseReceiver
from tests.support.pair import Fetched, ends_of, fetch, strip_ids
from tests.support.server import serve

# -- a gated AG-UI app: a run can be held open (before its tool result) until the test releases it --


class Gates:
    """Per run id, a threading.Event the app waits for (polled on the loop, bounded) mid-run."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}

    def hold(self, run_id: str) -> None:
        self._events[run_id] = threading.Event()

    def release(self, run_id: str) -> None:
        self._events[run_id].set()

    async def wait(self, run_id: str, timeout: float = 60.0) -> None:
        event = self._events.get(run_id)
        deadline = time.monotonic() + timeout
        while event is not None and not event.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


def run_events(thread_id: str, run_id: str, *, tool: bool) -> tuple[list[BaseEvent], list[BaseEvent]]:
    """A run split where the gate holds it: before and after its tool result (text only: no tool)."""
    start: list[BaseEvent] = [RunStartedEvent(type=EventType.RUN_STARTED, thread_id=thread_id, run_id=run_id)]
    call = f"{run_id}-call"
    if tool:
        start += [
            ToolCallStartEvent(type=EventType.TOOL_CALL_START, tool_call_id=call, tool_call_name="search"),
            ToolCallArgsEvent(type=EventType.TOOL_CALL_ARGS, tool_call_id=call, delta='{"query": "life"}'),
            ToolCallEndEvent(type=EventType.TOOL_CALL_END, tool_call_id=call),
        ]
    end: list[BaseEvent] = []
    if tool:
        end.append(
            ToolCallResultEvent(
                type=EventType.TOOL_CALL_RESULT, tool_call_id=call, message_id=f"{run_id}-r", content="42"
            )
        )
    end += [
        TextMessageStartEvent(type=EventType.TEXT_MESSAGE_START, message_id=f"{run_id}-m", role="assistant"),
        *[
            TextMessageContentEvent(type=EventType.TEXT_MESSAGE_CONTENT, message_id=f"{run_id}-m", delta=word)
            for word in ("The ", "answer ", "is ", "42.")
        ],
        TextMessageEndEvent(type=EventType.TEXT_MESSAGE_END, message_id=f"{run_id}-m"),
        RunFinishedEvent(type=EventType.RUN_FINISHED, thread_id=thread_id, run_id=run_id),
    ]
    return start, end


def gated_app(gates: Gates) -> Starlette:
    """POST /agent: a run with a tool call, unless its runId starts with "solo" (text only, one span)."""

    async def agent(request: Request) -> Response:
        body = await request.json()
        run_id = body["runId"]
        encoder = EventEncoder()
        before, after = run_events(body["threadId"], run_id, tool=not run_id.startswith("solo"))

        async def stream() -> Any:
            for event in before:
                yield encoder.encode(event).encode()
            await gates.wait(run_id)
            for event in after:
                yield encoder.encode(event).encode()

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/agent", agent, methods=["POST"])])


def check_stream(traced: Fetched, plain: Fetched) -> str:
    """The traced stream is the plain one plus one id frame right after RUN_STARTED; returns the id."""
    assert traced.status == plain.status == 200
    stripped, ids = strip_ids(traced.raw)
    assert stripped == plain.raw
    assert [position for position, _ in ids] == ends_of(plain.raw, "RUN_STARTED")
    [(_, trace_id)] = ids
    return trace_id


class Streaming:
    """A traced run read on the test's loop in a task: its id as soon as announced, its bytes at the end."""

    def __init__(self, client: httpx.AsyncClient, url: str, thread_id: str, run_id: str) -> None:
        self.chunks: list[bytes] = []
        self.ended_at = 0.0
        self.announced = asyncio.Event()
        self.task = asyncio.create_task(self._read(client, url, run_input(thread_id, run_id)))

    async def _read(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Fetched:
        async with client.stream("POST", f"{url}/agent", json=body) as response:
            async for chunk in response.aiter_raw():
                self.chunks.append(chunk)
                if b"ambient:trace_id" in b"".join(self.chunks):
                    self.announced.set()
            self.ended_at = time.monotonic()
            return Fetched(response.status_code, list(response.headers.raw), b"".join(self.chunks))

    async def result(self, timeout: float = 30.0) -> Fetched:
        return await asyncio.wait_for(self.task, timeout)


class LogRecords(logging.Handler):
    """Collects the records of some loggers (MLflow's do not propagate to the root logger)."""

    def __init__(self, *names: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._loggers = [logging.getLogger(name) for name in names]

    def __enter__(self) -> LogRecords:
        for logger in self._loggers:
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger in self._loggers:
            logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in list(self.records) if r.levelno >= level]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


async def await_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


# -- MLflow ---------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(server: MlflowServer) -> None:
    """SIGKILL the server and every process it started (by pid): a crash, not a graceful stop."""
    process: subprocess.Popen[bytes] | None = server._process
    server._process = None
    if process is None:
        return
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=10)
    wait_until(lambda: not server.healthy(), 10, "the killed server stops answering")


def stored_spans(server: MlflowServer, trace_id: str) -> list[str] | None:
    """Names of the stored trace's spans, or None when MLflow has no such trace."""
    from mlflow import MlflowClient

    from ambient_tracing.backends.mlflow import to_mlflow_trace_id

    try:
        trace = MlflowClient(tracking_uri=server.url).get_trace(to_mlflow_trace_id(trace_id))
    except Exception:
        return None
    return sorted(span.name for span in trace.data.spans)


COMPLETE = ["llm_interaction", "tool_search"]
COMPLETE_SPANS = len(COMPLETE)


@pytest.fixture
def own_mlflow_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowServer]:
    """An MLflow server of this test only (killed at the end). MLflow's process-wide tracking URI
    (module state and MLFLOW_TRACKING_URI) is put back as it was. Without its job runner (unused by
    tracing) the server starts faster on a small machine."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    previous = utils._tracking_uri  # None when never set: get_tracking_uri() would invent a default
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    server = MlflowServer(tmp_path).start()
    try:
        yield server
    finally:
        kill(server)
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None: unset (and tracing reset)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@pytest.mark.timeout(170)
async def test_mlflow_killed_mid_run_and_restarted(
    own_mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three runs open when the server is killed (SIGKILL); spans go by OTLP from the package's exporter:

    * "dropped" ends while it is down, with 1 retry: its batch is given up (counted, one warning);
    * "retried" ends while it is down, with up to 60 retries (backoff to 8 s): delivered complete after
      the restart;
    * "spanning" ends after the restart: complete.

    Every stream is byte-identical to the unwrapped app's plus its id frame, and ends at once.
    """
    from ambient_tracing.backends.mlflow import MlflowBackend

    server = own_mlflow_server
    backend = MlflowBackend(
        tracking_uri=server.url, experiment_name="faults", retries=1, timeout=2, interval=0.1
    )
    backend.setup()
    exporter = backend.span_sink
    assert exporter is not None
    obs = Observability([backend], mask_messages=False)
    gates = Gates()
    app = gated_app(gates)
    runs = ("warm", "dropped", "retried", "spanning")
    with (
        LogRecords("mlflow", "ambient_tracing") as logs,
        serve(TracingMiddleware(app, observability=obs)) as traced,
        serve(app) as plain,
    ):
        # Held streams stay silent through the kill and the restart (30 s and more on a loaded machine).
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=180)) as client:
            plain_runs = {run: await fetch(plain, "/agent", body=run_input(f"t-{run}", run)) for run in runs}

            # Healthy: a run is stored complete.
            warm = check_stream(
                await fetch(traced, "/agent", body=run_input("t-warm", "warm")), plain_runs["warm"]
            )
            await asyncio.to_thread(
                wait_until, lambda: stored_spans(server, warm) == COMPLETE, 20, "the warm-up trace"
            )

            for run in runs[1:]:
                gates.hold(run)
            streams = {run: Streaming(client, traced, f"t-{run}", run) for run in runs[1:]}
            for stream in streams.values():
                await asyncio.wait_for(stream.announced.wait(), 10)

            await asyncio.to_thread(kill, server)

            # Ends while the server is down; one retry (after 0.5 s): dropped, counted, one warning.
            released = time.monotonic()
            gates.release("dropped")
            dropped = check_stream(await streams["dropped"].result(), plain_runs["dropped"])
            assert streams["dropped"].ended_at - released < 1.0  # not held up by the dead server
            await await_until(lambda: exporter.failed >= COMPLETE_SPANS, 15, "the dropped trace given up")

            # Ends while the server is down; its export is retried (backoff 0.5, 1, 2, 4, 8, 8, ... s)
            # past the restart.
            exporter._retries = 60
            released = time.monotonic()
            gates.release("retried")
            retried = check_stream(await streams["retried"].result(), plain_runs["retried"])
            assert streams["retried"].ended_at - released < 1.0

            await asyncio.to_thread(server.start)

            gates.release("spanning")
            spanning = check_stream(await streams["spanning"].result(), plain_runs["spanning"])

            await asyncio.to_thread(
                wait_until, lambda: stored_spans(server, spanning) == COMPLETE, 20, "the spanning trace"
            )
            await asyncio.to_thread(
                wait_until, lambda: stored_spans(server, retried) == COMPLETE, 60, "the retried trace"
            )
            # Every export of the dropped run failed long ago (no retries): it never arrives.
            assert stored_spans(server, dropped) is None

            # And the server keeps serving traced runs.
            after = check_stream(
                await fetch(traced, "/agent", body=run_input("t-warm", "warm")), plain_runs["warm"]
            )
            await asyncio.to_thread(
                wait_until, lambda: stored_spans(server, after) == COMPLETE, 20, "a run after the restart"
            )

    assert len({warm, dropped, retried, spanning, after}) == 5
    warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
    assert len([m for m in warnings if "mlflow export: cannot reach" in m]) == 1, (
        warnings
    )  # once, not per try
    assert exporter.failed == COMPLETE_SPANS  # only the dropped run's spans
    await obs.aclose()


# -- Langfuse -------------------------------------------------------------------------------------

LANGFUSE_TIMEOUT = 2  # seconds per batch: retried after ~1 s, dropped after ~1-2 s of failure


def langfuse_spans(receiver: LangfuseReceiver, trace_id: str) -> list[str]:
    return sorted(span.name for span in receiver.spans_by_trace(trace_id))


def export_requests(receiver: LangfuseReceiver) -> int:
    return sum(1 for method, path in list(receiver.requests) if (method, path) == ("POST", TRACES_PATH))


@pytest.mark.timeout(120)
async def test_langfuse_answering_503_then_hanging(
    langfuse_receiver: LangfuseReceiver, langfuse_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each outage is shorter or longer than what the package's OTLP exporter waits for a batch (a 2 s
    timeout per request here, 10 s by default; 3 retries after 0.5, 1 and 2 s):

    * 503 until the first export attempt was refused, then healthy: delivered (by the retry 0.5 s later);
    * 503 until the exporter gave up: dropped, counted in ``failed``, one warning;
    * hanging longer than the timeout on every try: dropped, counted;
    * hanging 0.5 s (then answering 503), then healthy: delivered by the retry;
    * healthy again: delivered.

    Every stream is the unwrapped app's plus its id frame, and takes no longer than a healthy one.
    The runs meant to be dropped have one span (no tool), so one batch: all or nothing.
    """
    caplog.set_level(logging.WARNING)
    receiver = langfuse_receiver
    backend = langfuse_backend(timeout=LANGFUSE_TIMEOUT, flush_at=512, flush_interval=0.2)
    obs = Observability([backend], mask_messages=False)
    gates = Gates()
    app = gated_app(gates)
    exporter = backend.span_sink
    assert exporter is not None

    def give_ups() -> int:
        return int(exporter.failed)  # the runs meant to be dropped have one span

    with serve(TracingMiddleware(app, observability=obs)) as traced, serve(app) as plain:
        async with httpx.AsyncClient(timeout=10) as client:

            async def run(run_id: str) -> str:
                body = run_input(f"t-{run_id}", run_id)
                expected = await fetch(plain, "/agent", body=body, client=client)
                started = time.monotonic()
                response = await fetch(traced, "/agent", body=body, client=client)
                assert time.monotonic() - started < 1.0, "the stream waited for Langfuse"
                return check_stream(response, expected)

            # 1. 503 for the first attempt only.
            receiver.mode = "503"
            before = export_requests(receiver)
            short_503 = await run("short-503")
            await await_until(lambda: export_requests(receiver) > before, 5, "an export attempt")
            receiver.mode = "ok"
            await await_until(
                lambda: langfuse_spans(receiver, short_503) == COMPLETE, 10, "the run after a short 503"
            )
            assert give_ups() == 0

            # 2. 503 until the exporter gives the batch up.
            receiver.mode = "503"
            long_503 = await run("solo-long-503")
            await await_until(lambda: give_ups() == 1, 15, "the exporter giving up on 503")
            receiver.mode = "ok"

            # 3. Hanging past the timeout.
            receiver.mode = "hang"
            receiver.hang_seconds = 10
            long_hang = await run("solo-long-hang")
            await await_until(lambda: give_ups() == 2, 30, "the exporter giving up on a hang")

            # 4. Hanging briefly (the held request is then answered 503), then healthy.
            receiver.hang_seconds = 0.5
            before = export_requests(receiver)
            short_hang = await run("short-hang")
            await await_until(lambda: export_requests(receiver) > before, 5, "an export attempt")
            receiver.mode = "ok"
            await await_until(
                lambda: langfuse_spans(receiver, short_hang) == COMPLETE, 10, "the run after a short hang"
            )

            # 5. Healthy.
            healthy = await run("healthy")
            await await_until(lambda: langfuse_spans(receiver, healthy) == COMPLETE, 10, "a healthy run")

    # The batches exported in order: everything before the healthy run has been decided.
    assert langfuse_spans(receiver, long_503) == []
    assert langfuse_spans(receiver, long_hang) == []
    assert give_ups() == 2
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("ambient_tracing")]
    assert 1 <= len(ours) <= 2 and all("langfuse export" in m for m in ours), ours  # once per kind
    await obs.aclose()
