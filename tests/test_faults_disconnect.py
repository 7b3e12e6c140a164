"""Fault suite: the client goes away at 100 random points of a stream (seeded), over real HTTP
(uvicorn; the client closes its socket after N bytes of the response, half with a FIN, half with a
RST) and in-process (ASGI 2.4: ``send`` raises OSError; ASGI 2.3: ``send`` is ignored and
``receive`` answers ``http.disconnect``). After each: no span left open, no error logged (at most a
warning per run), and the server keeps serving."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import agui_app, run_input
from tests.support.asgi_driver import drive, frame, sse_app
from tests.support.pair import ends_of, fetch, strip_ids
from tests.support.server import serve

pytestmark = pytest.mark.timeout(60)

POINTS = 100
SEED = 20240404


def run_frames(thread: str, run: str) -> list[bytes]:
    """A run of ~30 frames: a tool call, text, usage."""
    events = [
        {"type": "RUN_STARTED", "threadId": thread, "runId": run},
        {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": '{"q": '},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": '"life"}'},
        {"type": "TOOL_CALL_END", "toolCallId": "c1"},
        {"type": "TOOL_CALL_RESULT", "toolCallId": "c1", "messageId": "r1", "content": "42"},
        {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"},
        *[{"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": f"word{i} "} for i in range(20)],
        {"type": "TEXT_MESSAGE_END", "messageId": "m1"},
        {
            "type": "RUN_FINISHED",
            "threadId": thread,
            "runId": run,
            "usage": [{"model": "m", "inputTokens": 3, "outputTokens": 20}],
        },
    ]
    return [frame(event) for event in events]


class Counting:
    """Outermost ASGI wrapper: how many requests are inside the app right now."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.active = 0
        self.handled = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self.handled += 1


@dataclass
class Served:
    url: str
    port: int
    counting: Counting
    backend: RecordingBackend
    obs: Observability


def paced_app() -> ASGIApp:
    """A Starlette StreamingResponse (it listens for the disconnect and cancels the stream) of the run
    of the request's threadId/runId, 2 ms between frames."""
    return agui_app(raw=lambda body: run_frames(body["threadId"], body["runId"]), delay=0.002)


@pytest.fixture
def served() -> Iterator[Served]:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    counting = Counting(TracingMiddleware(paced_app(), observability=obs))
    with serve(counting) as url:
        yield Served(url, int(url.rsplit(":", 1)[1]), counting, backend, obs)


class Captured(logging.Handler):
    """Records of ambient_tracing and uvicorn (uvicorn's loggers do not propagate to the root)."""

    names = ("ambient_tracing", "uvicorn", "uvicorn.error", "uvicorn.asgi")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Captured:
        for name in self.names:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            logging.getLogger(name).removeHandler(self)


def request_bytes(thread: str, run: str) -> bytes:
    body = json.dumps(run_input(thread, run)).encode()
    head = (
        f"POST /agent HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def read_then_close(port: int, thread: str, run: str, cut: int | None, reset: bool) -> bytes:
    """Send the request, read ``cut`` bytes of the raw response (all of it when None), close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    got = b""
    try:
        writer.write(request_bytes(thread, run))
        await writer.drain()
        async with asyncio.timeout(10):
            while cut is None or len(got) < cut:
                chunk = await reader.read(1 if cut is None else max(1, min(4096, cut - len(got))))
                if not chunk:
                    break
                got += chunk
                if cut is None and got.endswith(b"\r\n0\r\n\r\n"):
                    break
    finally:
        if reset:  # RST instead of FIN
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        writer.close()
        try:
            async with asyncio.timeout(5):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            pass
    return got


async def settle(counting: Counting, handled: int) -> None:
    """Wait (bounded) until ``handled`` requests have left the app and none is inside."""
    deadline = time.monotonic() + 15
    while counting.handled < handled or counting.active:
        assert time.monotonic() < deadline, f"{counting.active} requests still in the app"
        await asyncio.sleep(0.01)


async def normal_run(served: Served, thread: str) -> None:
    """A whole run still works: the app's bytes plus the id frame, traced and ended."""
    response = await fetch(served.url, "/agent", body=run_input(thread, "r"), timeout=10)
    stripped, ids = strip_ids(response.raw)
    assert stripped == b"".join(run_frames(thread, "r"))
    assert [position for position, _ in ids] == ends_of(stripped, "RUN_STARTED")
    turn = served.backend.by_trace(ids[0][1])
    assert turn.error is None and turn.output is not None


async def test_client_disconnects_at_random_points_over_http(served: Served) -> None:
    rng = random.Random(SEED)
    full = await read_then_close(served.port, "t-full", "r", None, reset=False)
    assert full.endswith(b"\r\n0\r\n\r\n"), "the whole chunked response"
    cuts = sorted(rng.randrange(1, len(full)) for _ in range(POINTS))
    handled = served.counting.handled
    with Captured() as logs:
        for batch in range(0, POINTS, 20):
            points = cuts[batch : batch + 20]
            got = await asyncio.gather(
                *(
                    read_then_close(served.port, f"t-cut-{batch + i}", "r", cut, reset=rng.random() < 0.5)
                    for i, cut in enumerate(points)
                )
            )
            assert [len(g) for g in got] == points
            handled += len(points)
            await settle(served.counting, handled)
            assert served.backend.open_spans() == []
            await normal_run(served, f"t-after-{batch}")
            handled += 1
            await settle(served.counting, handled)
            assert served.backend.open_spans() == []
    cut_turns = [t for t in served.backend.runs if t.run and (t.run.thread_id or "").startswith("t-cut-")]
    # Every request whose RUN_STARTED the app sent has a trace, ended exactly once.
    assert 0 < len(cut_turns) <= POINTS
    assert all(span.ended == 1 for turn in cut_turns for span in turn.walk())
    assert any(turn.error and "disconnect" in turn.error for turn in cut_turns), "no cut hit a live stream"
    assert served.obs.runs.open_streams == 0
    assert [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR] == []
    assert len(logs.records) <= POINTS


@pytest.mark.parametrize("kind", ["bare", "starlette"])
@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
async def test_client_disconnects_at_random_points_in_process(spec_version: str, kind: str) -> None:
    """A bare ASGI app (ignores the disconnect; under 2.4 send raises into it) and a Starlette
    StreamingResponse (under 2.3 it hears http.disconnect and cancels its stream)."""
    rng = random.Random(SEED)
    path = "/agent"
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    chunks = run_frames("t", "r")
    # Some chunks split frames, some hold several: cut points land anywhere.
    whole = b"".join(chunks)
    bounds = sorted({0, len(whole), *(rng.randrange(len(whole)) for _ in range(25))})
    pieces = [whole[a:b] for a, b in itertools.pairwise(bounds)]
    inner = sse_app(pieces) if kind == "bare" else agui_app(raw=lambda body: pieces)
    app = TracingMiddleware(inner, observability=obs)
    full = await drive(app, [json.dumps(run_input("t", "r")).encode()], path=path)
    total = len(full.body)
    caplog_records: list[logging.LogRecord] = []
    with Captured() as logs:
        for _ in range(POINTS):
            cut = rng.randrange(1, total)
            try:
                driven = await drive(
                    app,
                    [b'{"threadId": "t", "runId": "r"}'],
                    cut_after=cut,
                    spec_version=spec_version,
                    path=path,
                )
            except (OSError, ClientDisconnect):
                pass  # ASGI 2.4: the app sees send raise, as under a real server; it passes through
            else:
                assert driven.disconnected
            assert backend.open_spans() == []
            assert obs.runs.open_streams == 0
        caplog_records = logs.records
    assert len(backend.runs) == POINTS + 1  # every cut comes after RUN_STARTED's frame began
    assert [r.getMessage() for r in caplog_records if r.levelno >= logging.ERROR] == []
    assert len(caplog_records) <= POINTS
    after = await drive(app, [json.dumps(run_input("t", "r")).encode()], path=path)
    assert strip_ids(after.body)[0] == whole
    assert backend.open_spans() == []
