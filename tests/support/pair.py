"""One app served twice over real HTTP: through TracingMiddleware and plainly, to compare bytes.

The app's POST /agent/{name} runs a scenario the test registered (a function of the request body
that returns a Starlette response), so one pair of servers serves every test of a module.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.testing import RecordedSpan, RecordingBackend
from tests.support.server import serve

Scenario = Callable[[bytes], Awaitable[Response] | Response]
Chunk = bytes | float  # a float between chunks: sleep that many seconds


class ScenarioApp:
    """A Starlette app whose routes are registered by the tests; it remembers what it received."""

    def __init__(self) -> None:
        self.scenarios: dict[str, Scenario] = {}
        self.bodies: dict[str, list[bytes]] = defaultdict(list)
        #: Per scenario, how many of its streams the app produced to the end without an exception.
        self.completed: dict[str, int] = defaultdict(int)
        self.lifespan: list[str] = []
        self._names = itertools.count()
        self.app = Starlette(
            routes=[
                Route("/agent/{name}", self._agent, methods=["POST", "GET"]),
                Route("/health", self._health),
                WebSocketRoute("/ws", self._websocket),
            ],
            lifespan=self._lifespan,
        )

    def add(self, scenario: Scenario, name: str | None = None) -> str:
        """Register ``scenario``; returns the path that runs it."""
        name = name or f"s{next(self._names)}"
        self.scenarios[name] = scenario
        return f"/agent/{name}"

    def stream(
        self,
        name: str,
        chunks: Iterable[Chunk] | Callable[[], AsyncIterator[bytes]],
        *,
        status: int = 200,
        media_type: str = "text/event-stream",
        headers: dict[str, str] | None = None,
    ) -> StreamingResponse:
        """A streaming response of ``chunks`` (bytes, or float pauses) that counts its completion."""

        async def body() -> AsyncIterator[bytes]:
            if callable(chunks):
                async for chunk in chunks():
                    yield chunk
            else:
                for chunk in chunks:
                    if isinstance(chunk, float):
                        await asyncio.sleep(chunk)
                    else:
                        yield chunk
            self.completed[name] += 1

        return StreamingResponse(body(), status_code=status, media_type=media_type, headers=headers)

    def add_stream(self, chunks: Iterable[Chunk], **options: Any) -> str:
        """Register a scenario streaming the same ``chunks`` every time; returns its path."""
        name = f"s{next(self._names)}"
        frozen = list(chunks)
        return self.add(lambda body: self.stream(name, frozen, **options), name)

    async def _agent(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await request.body()
        self.bodies[name].append(body)
        response = self.scenarios[name](body)
        return await response if asyncio.iscoroutine(response) else response  # type: ignore[return-value]

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def _websocket(self, websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"echo: {text}")
        await websocket.close()

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.lifespan.append("startup")
        yield
        self.lifespan.append("shutdown")


@dataclass
class Pair:
    traced: str
    plain: str
    app: ScenarioApp
    backend: RecordingBackend
    obs: Observability

    def runs(self, thread_id: str) -> list[RecordedSpan]:
        """The turns recorded for ``thread_id``, in order."""
        return [
            turn for turn in self.backend.runs if turn.run is not None and turn.run.thread_id == thread_id
        ]

    async def ended_turn(self, thread_id: str, timeout: float = 5.0) -> RecordedSpan:
        """The one turn of ``thread_id`` once it has ended (the response's last bytes are sent
        before the run's end is traced), waiting at most ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while True:
                turns = self.runs(thread_id)
                if len(turns) == 1 and turns[0].ended:
                    return turns[0]
                await asyncio.sleep(0.01)


@contextmanager
def serve_pair(
    *, others: Iterable[Any] = (), record: bool = True, **middleware_options: Any
) -> Iterator[Pair]:
    """The pair of servers; the traced one records to a RecordingBackend (plus ``others``); with
    ``record`` False that backend records nothing (like a sampled-out one)."""
    backend = RecordingBackend(record=record)
    obs = Observability([*others, backend], mask_messages=False)
    scenarios = ScenarioApp()
    traced_app = TracingMiddleware(scenarios.app, observability=obs, **middleware_options)
    with serve(traced_app) as traced, serve(scenarios.app) as plain:
        yield Pair(traced, plain, scenarios, backend, obs)


# -- the client side ------------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int
    headers: list[tuple[bytes, bytes]]
    raw: bytes
    chunks: list[bytes] = field(default_factory=list)

    def comparable_headers(self) -> list[tuple[bytes, bytes]]:
        return [(name.lower(), value) for name, value in self.headers if name.lower() != b"date"]


async def fetch(
    base_url: str,
    path: str,
    *,
    body: bytes | dict[str, Any] | list[Any] = b"",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
    client: httpx.AsyncClient | None = None,
) -> Fetched:
    """The whole response, read as raw bytes the way a browser's fetch reader would (bounded)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    own = client is None
    client = client or httpx.AsyncClient(timeout=timeout)
    try:
        async with asyncio.timeout(timeout + 1):
            async with client.stream(method, base_url + path, content=content, headers=headers) as response:
                chunks = [chunk async for chunk in response.aiter_raw()]
                return Fetched(response.status_code, list(response.headers.raw), b"".join(chunks), chunks)
    finally:
        if own:
            await client.aclose()


# -- reading a traced stream ----------------------------------------------------------------------

ID_FRAME = re.compile(
    rb'data: \{"type":"CUSTOM","name":"ambient:trace_id","value":\{"traceId":"([0-9a-f]{32})"\},'
    rb'"timestamp":\d{13}\}\n\n'
)


def strip_ids(raw: bytes) -> tuple[bytes, list[tuple[int, str]]]:
    """``raw`` without the injected id frames, and (position in that stripped stream, trace id) of each."""
    parts: list[bytes] = []
    found: list[tuple[int, str]] = []
    start = length = 0
    for match in ID_FRAME.finditer(raw):
        parts.append(raw[start : match.start()])
        length += match.start() - start
        found.append((length, match.group(1).decode()))
        start = match.end()
    parts.append(raw[start:])
    return b"".join(parts), found


_LINE = re.compile(rb"([^\r\n]*)(\r\n|\r|\n)")


def frames(raw: bytes) -> list[tuple[int, Any]]:
    """(end offset, parsed JSON data or the raw data bytes when not JSON) of each frame that has data.

    A simple reader independent of the package's scanner: a frame ends with an empty line.
    """
    found: list[tuple[int, Any]] = []
    data: list[bytes] = []
    for match in _LINE.finditer(raw):
        line = match.group(1)
        if not line:
            if data:
                text = b"\n".join(data)
                try:
                    found.append((match.end(), json.loads(text)))
                except ValueError:
                    found.append((match.end(), text))
            data = []
        elif line == b"data" or line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
    return found


def ends_of(raw: bytes, kind: str) -> list[int]:
    """Where each frame of event type ``kind`` ends."""
    return [end for end, event in frames(raw) if isinstance(event, dict) and event.get("type") == kind]


def sse(event: dict[str, Any] | bytes | str, eol: bytes = b"\n") -> bytes:
    """One frame, the way the AG-UI encoder writes it (with the given line ending)."""
    if isinstance(event, dict):
        event = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    if isinstance(event, str):
        event = event.encode()
    return b"data: " + event + eol + eol


def run_events(thread: str, run: str, *middle: dict[str, Any], finished: bool = True) -> list[dict[str, Any]]:
    return [
        {"type": "RUN_STARTED", "threadId": thread, "runId": run},
        *middle,
        *([{"type": "RUN_FINISHED", "threadId": thread, "runId": run}] if finished else []),
    ]
