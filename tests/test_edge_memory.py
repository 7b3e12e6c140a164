"""Memory per in-flight request: a body that is not a run's input is never held by the middleware.

Twenty 4 MiB uploads are held in flight (the app has read and dropped every chunk, and waits) while
tracemalloc counts what Python still holds: deterministic, unlike RSS. The benchmark
(``python -m benchmarks.uploads``) measures RSS for 200 uploads through uvicorn.
"""

from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc
from collections.abc import Iterator

import pytest
from ag_ui.encoder import EventEncoder
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.doors.request_body import MAX_REQUEST_BYTES, PREFIX_BYTES, RequestBody
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import scripted_run
from tests.support.asgi_driver import http_scope

pytestmark = pytest.mark.timeout(60)

UPLOADS = 20
UPLOAD_BYTES = 4 * 1024 * 1024
CHUNK = 64 * 1024
#: What one in-flight upload may hold beyond the app without the middleware: a few chunks at most.
HELD_PER_UPLOAD = 4 * CHUNK


class Uploads:
    """An upload route that reads the body chunk by chunk, drops it, then waits until released."""

    def __init__(self) -> None:
        self.read = 0
        self.release = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/upload", self._upload, methods=["POST"]),
                Route("/agent", self._agent, methods=["POST"]),
            ]
        )

    async def _upload(self, request: Request) -> Response:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        self.read += 1
        await self.release.wait()
        return JSONResponse({"size": size})

    async def _agent(self, request: Request) -> Response:
        await request.body()
        encoder = EventEncoder()
        frames = [encoder.encode(event).encode() for event in scripted_run("t-mem", "r-mem")]
        return StreamingResponse(iter(frames), media_type="text/event-stream")


def messages(head: bytes, total: int) -> Iterator[Message]:
    """``total`` bytes as ``http.request`` messages, each chunk made when it is asked for (nothing
    holds it but whoever receives it)."""
    sent = len(head)
    yield {"type": "http.request", "body": head, "more_body": True}
    while sent < total:
        size = min(CHUNK, total - sent)
        sent += size
        yield {"type": "http.request", "body": bytes(size), "more_body": sent < total}


async def upload(app: ASGIApp, content_type: bytes | None, head: bytes) -> list[Message]:
    body = messages(head, UPLOAD_BYTES)
    scope = http_scope("/upload")
    scope["headers"] = [(b"content-length", str(UPLOAD_BYTES).encode())]
    if content_type:
        scope["headers"].append((b"content-type", content_type))
    sent: list[Message] = []

    async def receive() -> Message:
        message = next(body, None)
        if message is None:  # read to the end: the client stays connected
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}
        return message

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def held_in_flight(app: ASGIApp, uploads: Uploads, content_type: bytes | None, head: bytes) -> int:
    """Bytes Python holds while UPLOADS uploads are in flight, their bodies read by the app."""
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    tasks = [asyncio.create_task(upload(app, content_type, head)) for _ in range(UPLOADS)]
    async with asyncio.timeout(30):
        while uploads.read < UPLOADS:
            await asyncio.sleep(0.01)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    uploads.release.set()
    for sent in await asyncio.gather(*tasks):
        assert sent[0]["status"] == 200
        assert json.loads(sent[1]["body"]) == {"size": UPLOAD_BYTES}
    return held


@pytest.mark.parametrize(
    ("content_type", "head"),
    [
        (b"multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=f\r\n\r\n"),
        (b"application/octet-stream", b"\x00\x01"),
        (None, b"\x89PNG\r\n"),  # untyped, not JSON
        (b"application/json", b'{"blob": "'),  # JSON, but no key of a RunAgentInput
        (b"application/json", b'["a list", "'),
    ],
    ids=["multipart", "octet-stream", "untyped", "json-object", "json-list"],
)
async def test_uploads_in_flight_hold_no_more_than_without_the_middleware(
    content_type: bytes | None, head: bytes
) -> None:
    tracemalloc.start()
    try:
        plain = Uploads()
        without = await held_in_flight(plain.app, plain, content_type, head)
        traced = Uploads()
        obs = Observability([RecordingBackend()], mask_messages=False)
        with_middleware = await held_in_flight(
            TracingMiddleware(traced.app, observability=obs), traced, content_type, head
        )
        await obs.aclose()
    finally:
        tracemalloc.stop()
    assert without < UPLOADS * HELD_PER_UPLOAD  # the app itself holds no body
    assert with_middleware - without < UPLOADS * HELD_PER_UPLOAD, (with_middleware, without)


async def test_a_run_still_gets_its_input_when_the_body_is_kept() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    app = TracingMiddleware(Uploads().app, observability=obs)
    body = json.dumps({"threadId": "t-mem", "messages": [{"role": "user", "content": "hi there"}]}).encode()
    for content_type in (b"application/json", b"text/plain;charset=UTF-8", None):
        sent: list[Message] = []
        scope = http_scope("/agent")
        scope["headers"] = [(b"content-type", content_type)] if content_type else []
        parts = iter([{"type": "http.request", "body": body[:7], "more_body": True}, {"body": body[7:]}])

        async def receive(parts: Iterator[Message] = parts) -> Message:
            return {"type": "http.request", **next(parts)}

        async def send(message: Message, sent: list[Message] = sent) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent[0]["status"] == 200
    await obs.aclose()
    assert [turn.input for turn in backend.runs] == ["hi there"] * 3


def fed(*chunks: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> RequestBody:
    body = RequestBody(headers or [(b"content-type", b"application/json")])
    for index, chunk in enumerate(chunks):
        body.feed(chunk, index < len(chunks) - 1)
    return body


def test_what_counts_as_a_run_input() -> None:
    run = json.dumps({"threadId": "t", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert fed(run).request.thread_id == "t"
    assert fed(b"\xef\xbb\xbf \n" + run).request.user_message == "hi"  # BOM and blanks before it
    at = run.index(b"threadId") + 3  # the key straddles two chunks
    assert fed(run[:at], run[at:]).request.thread_id == "t"
    assert fed(*[run[i : i + 1] for i in range(len(run))]).request.thread_id == "t"  # byte by byte
    late = b'{"other": "' + b"x" * PREFIX_BYTES + b'", ' + run[1:]
    assert fed(late).request.thread_id is None  # no RunAgentInput key near the start: let go
    early = b'{"state": "' + b"x" * PREFIX_BYTES + b'", ' + run[1:]
    assert fed(early).request.thread_id == "t"
    for headers in (
        [(b"content-type", b"multipart/form-data; boundary=x")],
        [(b"content-type", b"application/x-www-form-urlencoded")],
        [(b"content-length", str(MAX_REQUEST_BYTES + 1).encode())],
    ):
        assert fed(run, headers=headers).request.thread_id is None
    for headers in ([(b"content-type", b"application/vnd.api+json")], [(b"content-type", b"text/plain")]):
        assert fed(run, headers=headers).request.thread_id == "t"
