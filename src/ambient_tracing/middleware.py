"""The ASGI door: trace every AG-UI run an app streams, and tell the browser its trace id.

A pure ASGI middleware in the manner of Starlette's GZipMiddleware: per request, a responder
wraps ``receive`` (to copy the RunAgentInput the app reads) and ``send`` (to watch the SSE body).
Body chunks are forwarded as they come, in order and unchanged; the only addition is one
``CUSTOM ambient:trace_id`` frame right after each run's RUN_STARTED frame.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .core import StreamTracer
from .feedback import Authorize, feedback_endpoint
from .observability import Observability
from .request import RunRequest
from .sse import SseScanner

logger = logging.getLogger("ambient_tracing")

TRACE_ID_EVENT_NAME = "ambient:trace_id"
#: Request bodies larger than this are not kept for tracing (the app still reads all of them).
MAX_REQUEST_BYTES = 4 * 1024 * 1024

UserResolver = Callable[[Scope], "tuple[str | None, str | None]"]


def trace_id_frame(trace_id: str) -> bytes:
    """The SSE frame announcing ``trace_id``, as the AG-UI encoder would write it."""
    payload = {
        "type": "CUSTOM",
        "name": TRACE_ID_EVENT_NAME,
        "value": {"traceId": trace_id},
        "timestamp": int(time.time() * 1000),
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class TracingMiddleware:
    """Wrap an ASGI app so every AG-UI run it streams becomes a trace.

    ``app.add_middleware(TracingMiddleware)`` configures itself from the environment and owns
    that :class:`Observability` (started and closed with the app's lifespan). Pass
    ``observability=`` to share one you own. The user comes from ``user_id_header`` /
    ``user_name_header``, or from ``user_resolver(scope) -> (user_id, user_name)``.
    ``feedback_path="/feedback"`` also serves :func:`~ambient_tracing.feedback_endpoint` there
    (POST), with ``feedback_authorize`` as its ``authorize`` hook.
    """

    app: ASGIApp
    observability: Observability | None = None
    user_id_header: str = "x-current-user-id"
    user_name_header: str = "x-current-user-name"
    user_resolver: UserResolver | None = None
    #: How long lifespan startup waits for backend preparation before serving anyway.
    startup_timeout: float = 10.0
    feedback_path: str | None = None
    feedback_authorize: Authorize | None = None
    _owns_observability: bool = field(init=False, default=False)
    _feedback_endpoint: Callable[[Request], Awaitable[Response]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.observability is None:
            self.observability = Observability.from_env()
            self._owns_observability = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        observability = self.observability
        assert observability is not None
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
        elif scope["type"] == "http" and self.feedback_path and scope["path"] == self.feedback_path:
            await self._feedback(scope, receive, send)
        elif scope["type"] != "http" or scope["method"] != "POST" or not observability.enabled:
            await self.app(scope, receive, send)
        else:
            await _RunResponder(self, observability, scope, receive, send).run()

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST":
            response: Response = PlainTextResponse("Method Not Allowed", 405, headers={"Allow": "POST"})
        else:
            assert self.observability is not None
            if self._feedback_endpoint is None:
                self._feedback_endpoint = feedback_endpoint(
                    self.observability, authorize=self.feedback_authorize
                )
            response = await self._feedback_endpoint(Request(scope, receive))
        await response(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        observability = self.observability
        assert observability is not None

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and observability.enabled:
                try:
                    await asyncio.wait_for(asyncio.shield(observability.start()), self.startup_timeout)
                except TimeoutError:
                    logger.warning(
                        "ambient-tracing: backends not ready after %ss; serving, and tracing once ready",
                        self.startup_timeout,
                    )
            elif message["type"] == "lifespan.shutdown.complete" and self._owns_observability:
                await observability.aclose()
            await send(message)

        return lifespan_send

    def _user(self, scope: Scope) -> tuple[str | None, str | None]:
        if self.user_resolver is not None:
            return self.user_resolver(scope)
        wanted = {self.user_id_header.lower().encode(): 0, self.user_name_header.lower().encode(): 1}
        found: list[str | None] = [None, None]
        for name, value in scope.get("headers", ()):
            index = wanted.get(name)
            if index is not None and value:
                found[index] = value.decode("latin-1")
        return found[0], found[1]


def _is_event_stream(message: Message) -> bool:
    if not 200 <= message.get("status", 200) < 300:
        return False
    content_type = encoding = b""
    for name, value in message.get("headers", ()):
        lowered = name.lower()
        if lowered == b"content-type":
            content_type = value.lower()
        elif lowered == b"content-encoding":
            encoding = value.lower()
    return content_type.startswith(b"text/event-stream") and encoding in (b"", b"identity")


class _RunResponder:
    """One request: copies the request body, traces the SSE body, passes every byte on."""

    __slots__ = (
        "_body",
        "_body_size",
        "_disconnected",
        "_finished",
        "_middleware",
        "_observability",
        "_receive",
        "_scanner",
        "_scope",
        "_send",
        "_tracer",
    )

    def __init__(
        self,
        middleware: TracingMiddleware,
        observability: Observability,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self._middleware = middleware
        self._observability = observability
        self._scope = scope
        self._receive = receive
        self._send = send
        self._body: list[bytes] = []
        self._body_size = 0
        self._scanner: SseScanner | None = None
        self._tracer: StreamTracer | None = None
        self._finished = False
        self._disconnected = False

    async def run(self) -> None:
        try:
            await self._middleware.app(self._scope, self.receive, self.send)
        except asyncio.CancelledError:
            self._close("cancelled: client disconnected")
            raise
        except BaseException as exc:
            self._close(f"{type(exc).__name__}: {exc}")
            raise
        if self._scanner is not None and not self._finished:
            self._close("cancelled: client disconnected" if self._disconnected else "response ended early")

    async def receive(self) -> Message:
        message = await self._receive()
        kind = message["type"]
        if kind == "http.request":
            body = message.get("body", b"")
            self._body_size += len(body)
            if self._body_size <= MAX_REQUEST_BYTES:
                self._body.append(body)
        elif kind == "http.disconnect":
            self._disconnected = True
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if _is_event_stream(message):
                self._scanner = SseScanner()
            else:
                self._body_size = MAX_REQUEST_BYTES + 1  # not a run: stop copying the request body
                self._body.clear()
        elif kind == "http.response.body" and self._scanner is not None:
            body = message.get("body", b"")
            more_body = message.get("more_body", False)
            inserted = self._trace(body, more_body)
            if inserted is not None:
                message = {**message, "body": inserted}
        await self._send(message)

    def _trace(self, body: bytes, more_body: bool) -> bytes | None:
        """Feed one body chunk to the tracer; the chunk with id frames inserted, or None if unchanged."""
        scanner = self._scanner
        assert scanner is not None
        try:
            frames = scanner.feed(body)
            if not more_body:
                self._finished = True
                frames += [(len(body), data) for _, data in scanner.finish()]
            insertions: list[tuple[int, bytes]] = []
            for offset, data in frames:
                if data is not None:
                    trace_id = self._on_data(data)
                    if trace_id is not None:
                        insertions.append((offset, trace_id_frame(trace_id)))
            if not more_body:
                self._close(None)
        except Exception as exc:  # the app's bytes matter more than the trace
            logger.warning("ambient-tracing: stopped tracing this response after an error: %r", exc)
            self._scanner = None
            self._close(f"tracing error: {exc!r}")
            return None
        return _insert(body, insertions) if insertions else None

    def _on_data(self, data: bytes) -> str | None:
        tracer = self._tracer
        if tracer is None:
            user_id, user_name = self._middleware._user(self._scope)
            request = RunRequest.from_body(b"".join(self._body)).with_user(user_id, user_name)
            self._body.clear()
            tracer = self._tracer = StreamTracer(self._observability, request)
        kind = _event_type(data)
        if kind is not None and not tracer.wants(kind):
            return None  # most text deltas, once the recorded text is full: not worth parsing
        try:
            event = json.loads(data.decode())
        except ValueError:
            tracer.warn("an SSE data line is not JSON; passed through untraced: %.80r", data)
            return None
        if not isinstance(event, dict):
            return None
        try:
            return tracer.on_event(event)
        except Exception as exc:
            tracer.warn("could not trace a %.40r event: %r", event.get("type"), exc)
            return None

    def _close(self, error: str | None) -> None:
        if self._tracer is not None:
            try:
                self._tracer.close(error)
            except Exception as exc:
                logger.warning("ambient-tracing: could not end a trace: %r", exc)
            self._tracer = None


def _event_type(data: bytes) -> str | None:
    """The ``type`` of an event written type-first (as the AG-UI encoders do), without parsing it."""
    if data.startswith(b'{"type":'):
        start = 9 if data[8:9] == b'"' else 10 if data[8:10] == b' "' else 0
        end = data.find(b'"', start) if start else -1
        if end > 0:
            return data[start:end].decode("latin-1")
    return None


def _insert(body: bytes, insertions: list[tuple[int, bytes]]) -> bytes:
    parts: list[bytes] = []
    start = 0
    for offset, frame in insertions:
        parts += (body[start:offset], frame)
        start = offset
    parts.append(body[start:])
    return b"".join(parts)
