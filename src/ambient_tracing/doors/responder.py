"""One AG-UI request's bytes: copy the RunAgentInput the app reads, watch the SSE body it sends.

Every body chunk is forwarded in order and unchanged, and traced only after its bytes are out; the
one addition is a ``CUSTOM ambient:trace_id`` frame sent right after each run's RUN_STARTED frame.
Opt-in additions (README, "Correlating with the frontend"): a ``traceresponse`` header when the
run's id is settled at response start (a trusted ``traceparent``, or ``trace_id_from_run_id``), and
``RUN_FINISHED.result.traceId`` (:mod:`.result_id`). A response that declares ``Content-Length``
gets neither body addition (its length must stay true); headers can always be added.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ambient_tracing.doors.request_body import RequestBody
from ambient_tracing.doors.result_id import with_result_trace_id
from ambient_tracing.doors.sse import SseScanner
from ambient_tracing.failures import capture_internal_exceptions
from ambient_tracing.ids import (
    TraceParent,
    new_span_id,
    parse_traceparent,
    trace_id_from_run_id,
    traceresponse,
)
from ambient_tracing.observability import Observability
from ambient_tracing.tracer.handlers import StreamTracer
from ambient_tracing.tracer.request import CallerTrace

logger = logging.getLogger(__name__)

TRACE_ID_EVENT_NAME = "ambient:trace_id"


def trace_id_frame(trace_id: str) -> bytes:
    """The SSE frame announcing ``trace_id``, as the AG-UI encoder would write it."""
    payload = {
        "type": "CUSTOM",
        "name": TRACE_ID_EVENT_NAME,
        "value": {"traceId": trace_id},
        "timestamp": int(time.time() * 1000),
    }
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def request_traceparent(scope: Scope) -> TraceParent | None:
    """The request's ``traceparent`` header, strictly valid, or None (absent, invalid, repeated)."""
    values = [value for name, value in scope.get("headers", ()) if name.lower() == b"traceparent"]
    return parse_traceparent(values[0]) if len(values) == 1 else None


def with_header(message: Message, name: bytes, value: str) -> Message:
    """A copy of a response start with one more header; everything else as it was."""
    return {**message, "headers": [*message.get("headers", ()), (name, value.encode("latin-1"))]}


def declares_length(message: Message) -> bool:
    """Whether a response start declares ``Content-Length``: then no byte may be added to its body."""
    return any(name.lower() == b"content-length" for name, _ in message.get("headers", ()))


def is_event_stream(message: Message) -> bool:
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


class RunResponder:
    """One request: reads the RunAgentInput from the request body, traces the SSE body, passes
    every byte on."""

    __slots__ = (
        "_announce",
        "_app",
        "_body",
        "_caller",
        "_disconnected",
        "_finished",
        "_observability",
        "_receive",
        "_scanner",
        "_scope",
        "_send",
        "_skip",
        "_traceparent",
        "_tracer",
        "_user",
    )

    def __init__(
        self,
        app: ASGIApp,
        observability: Observability,
        user: Callable[[Scope], tuple[str | None, str | None]],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self._app = app
        self._user = user
        self._observability = observability
        self._scope = scope
        self._receive = receive
        self._send = send
        self._body = RequestBody(scope.get("headers", ()))
        self._scanner: SseScanner | None = None
        self._tracer: StreamTracer | None = None
        self._finished = False
        self._disconnected = False
        self._skip: bytes | None = None  # see _sent_whole_frame
        # False for a body of declared length: its runs are traced, their ids not inserted.
        self._announce = True
        self._caller: CallerTrace | None = None  # the run's id when settled at response start
        self._traceparent = request_traceparent(scope) if observability.trust_traceparent else None
        if self._traceparent is not None:  # the owner check reads the answer at response start
            observability.owners.prefetch(self._traceparent.trace_id)

    @property
    def traces_response(self) -> bool:
        """Whether the response is an SSE stream being traced (known once its start is sent)."""
        return self._scanner is not None

    async def run(self) -> None:
        try:
            await self._app(self._scope, self.receive, self.send)
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
            self._body.feed(message.get("body", b""), message.get("more_body", False))
            if not message.get("more_body", False):
                self._prefetch_owner()
        elif kind == "http.disconnect":
            self._disconnected = True
        return message

    async def send(self, message: Message) -> None:
        skip = self._skip
        if skip is not None:
            # The hot path: one more whole frame of a type just found not worth tracing.
            body = message.get("body", b"")
            if (
                body.startswith(skip)
                and body.find(10) == len(body) - 2  # one line, then the blank line
                and body[-1] == 10
                and 13 not in body
                and message.get("more_body", False)
            ):
                await self._send(message)
                return
        kind = message["type"]
        if kind == "http.response.body" and self._scanner is not None:
            await self._send_traced(message)
            return
        if kind == "http.response.start":
            if is_event_stream(message):
                self._scanner = SseScanner()
                self._announce = not declares_length(message)
                message = self._with_traceresponse(message)
            else:
                self._body.drop()  # not a run: its request body is not needed
        await self._send(message)

    def _prefetch_owner(self) -> None:
        """With runId-derived ids, start the ownership lookup of the id as soon as the body is in,
        so its answer is more likely there at response start (see :meth:`_settle_caller`)."""
        if self._traceparent is not None or not self._observability.runs.trace_id_from_run_id:
            return
        with capture_internal_exceptions(logger, "could not look the run's derived trace id up"):
            run_id = self._body.finish().run_id
            derived = trace_id_from_run_id(run_id) if run_id else None
            if derived is not None:
                self._observability.owners.prefetch(derived)

    def _with_traceresponse(self, message: Message) -> Message:
        """Settle the run's id now if the request gives it (a trusted traceparent, else the runId
        when ids derive from it), admitted as :meth:`Runs.admit <ambient_tracing.tracer.runs.Runs.admit>`
        decides; the response start then carries it in ``traceresponse``."""
        try:
            self._caller = caller = self._settle_caller()
            if caller is None or not self._observability.spans.records(caller.trace_id):
                return message
            assert caller.root_span_id is not None
            return with_header(message, b"traceresponse", traceresponse(caller.trace_id, caller.root_span_id))
        except Exception as exc:  # the response matters more than the header
            logger.warning("could not settle the run's trace id at response start: %r", exc)
            self._caller = None
            return message

    def _settle_caller(self) -> CallerTrace | None:
        runs = self._observability.runs
        parent = self._traceparent
        if parent is None and not runs.trace_id_from_run_id:
            return None
        request = self._body.finish()
        thread_id = request.thread_id
        if parent is not None and runs.admit(parent.trace_id, thread_id, "traceparent"):
            return CallerTrace(parent.trace_id, parent.parent_span_id, new_span_id())
        run_id = request.run_id
        derived = trace_id_from_run_id(run_id) if runs.trace_id_from_run_id and run_id else None
        if derived is not None and runs.admit(derived, thread_id, "runId"):
            return CallerTrace(derived, None, new_span_id(), run_id)
        return None

    async def _send_traced(self, message: Message) -> None:
        """Forward one body chunk and trace its events after their bytes are out. Only a run's
        opening waits for tracing: its bytes go out, then the run opens, then its id frame."""
        self._skip = None
        body: bytes = message.get("body", b"")
        more_body: bool = message.get("more_body", False)
        if more_body and await self._sent_whole_frame(message, body):
            return
        try:
            frames = self._frames(body, more_body)
        except Exception as exc:  # the app's bytes matter more than the trace
            self._stop_tracing(exc)
            await self._send(message)
            return
        start = 0
        later: list[_Frame] = []
        for frame in frames:
            if frame.kind == "RUN_FINISHED" and (replaced := self._result_frame(body, frame)) is not None:
                await self._send_part(body[start : frame.start])
                await self._send_part(replaced)
                start = frame.end
                later.append(frame)
                continue
            if frame.kind != "RUN_STARTED":
                later.append(frame)
                continue
            await self._send_part(body[start : frame.end])
            start = frame.end
            self._trace_all(later)
            later = []
            trace_id = self._trace(frame)
            if trace_id is not None and self._announce:
                await self._send_part(trace_id_frame(trace_id))
        await self._send(message if start == 0 else {**message, "body": body[start:]})
        self._trace_all(later)
        if not more_body:
            self._close(None)

    def _result_frame(self, body: bytes, frame: _Frame) -> bytes | None:
        """The RUN_FINISHED frame with ``result.traceId`` (opt-in), or None to send it as it is: when
        off, when the body has a declared length, when the run is not traced, and when the frame is
        not one canonical ``data: <json>\n\n`` whole in this chunk (its bytes are never re-split)."""
        tracer = self._tracer
        if not (self._observability.result_trace_id and self._announce and tracer and tracer.trace_id):
            return None
        if body[frame.start : frame.end] != b"data: " + frame.data + b"\n\n":
            return None
        data = None
        with capture_internal_exceptions(logger, "could not add result.traceId", once="result_trace_id"):
            data = with_result_trace_id(frame.data, tracer.trace_id)
        return None if data is None else b"data: " + data + b"\n\n"

    async def _sent_whole_frame(self, message: Message, body: bytes) -> bool:
        """The common case, kept flat: a chunk that is one whole frame, type-first, of a run already
        traced. Sent, then traced; a type the tracer does not want now is not parsed, and frames of
        that type pass on the hot path in :meth:`send` until the next traced chunk."""
        tracer = self._tracer
        scanner = self._scanner
        if tracer is None or scanner is None:
            return False
        data = scanner.whole_frame(body)
        if data is None:
            return False
        typed = _event_type(data)
        if typed is None or typed[0] == "RUN_STARTED":
            return False  # parsed or announced on the general path; the scanner saw nothing yet
        if typed[0] == "RUN_FINISHED" and self._observability.result_trace_id:
            return False  # result.traceId is added on the general path
        kind, end = typed
        await self._send(message)
        if tracer.wants(kind):
            self._trace_data(tracer, data)
        else:
            self._skip = body[: 6 + end + 1]  # up to the closing quote of the type
        return True

    async def _send_part(self, part: bytes) -> None:
        if part:
            await self._send({"type": "http.response.body", "body": part, "more_body": True})

    def _frames(self, body: bytes, more_body: bool) -> list[_Frame]:
        """The chunk's complete events, each with its end offset and its type when known."""
        scanner = self._scanner
        assert scanner is not None
        found = scanner.feed(body)
        if not more_body:
            self._finished = True
            found += [(len(body), data) for _, data in scanner.finish()]
        frames = []
        start = 0
        for end, data in found:
            begin, start = start, end
            if data is None:
                continue
            typed = _event_type(data)
            kind: Any = typed[0] if typed is not None else None
            event = None
            if kind is None:  # not written type-first: parse it now to learn whether it opens a run
                event = self._parse(data)
                if event is None:
                    continue
                kind = event.get("type")
            frames.append(_Frame(begin, end, data, kind if isinstance(kind, str) else None, event))
        return frames

    def _trace_all(self, frames: list[_Frame]) -> None:
        for frame in frames:
            self._trace(frame)

    def _trace(self, frame: _Frame) -> str | None:
        """Feed one event to the tracer; the trace id to announce when it opened a traced run."""
        if self._scanner is None:
            return None  # tracing stopped after an error
        try:
            tracer = self._ensure_tracer()
            if frame.kind is not None and not tracer.wants(frame.kind):
                return None  # most text deltas, once the recorded text is full: not worth parsing
            event = frame.event if frame.event is not None else self._parse(frame.data)
        except Exception as exc:
            self._stop_tracing(exc)
            return None
        if event is None:
            return None
        try:
            return tracer.on_event(event)
        except Exception as exc:
            tracer.warn("could not trace a %.40r event: %r", event.get("type"), exc)
            return None

    def _trace_data(self, tracer: StreamTracer, data: bytes) -> None:
        """Feed one event of a run already open to the tracer (its bytes are out already)."""
        event = self._parse(data)
        if event is None:
            return
        try:
            tracer.on_event(event)
        except Exception as exc:
            tracer.warn("could not trace a %.40r event: %r", event.get("type"), exc)

    def _parse(self, data: bytes) -> dict[str, Any] | None:
        """The event as a dict; None for JSON that is not an object, and for non-JSON (with a warning)."""
        try:
            event = json.loads(data)
        except ValueError:
            self._ensure_tracer().warn("an SSE data line is not JSON; passed through untraced: %.80r", data)
            return None
        return event if isinstance(event, dict) else None

    def _ensure_tracer(self) -> StreamTracer:
        tracer = self._tracer
        if tracer is None:
            user_id, user_name = self._user(self._scope)
            request = self._body.finish().with_user(user_id, user_name).with_caller(self._caller)
            tracer = self._tracer = StreamTracer(self._observability.runs, request)
        return tracer

    def _stop_tracing(self, exc: Exception) -> None:
        logger.warning("stopped tracing this response after an error: %r", exc)
        self._scanner = None
        self._close(f"tracing error: {exc!r}")

    def _close(self, error: str | None) -> None:
        if self._tracer is not None:
            try:
                self._tracer.close(error)
            except Exception as exc:
                logger.warning("could not end a trace: %r", exc)
            self._tracer = None


class _Frame(NamedTuple):
    start: int  # offset in the chunk just after the previous frame (0: it may have begun earlier)
    end: int  # offset in the chunk just after the frame's blank line
    data: bytes
    kind: str | None  # the event's type, when known without parsing
    event: dict[str, Any] | None  # the parsed event, when it had to be parsed already


def _event_type(data: bytes) -> tuple[str, int] | None:
    """The ``type`` of an event written type-first (as the AG-UI encoders do), without parsing it,
    and the offset of its closing quote."""
    if data.startswith(b'{"type":'):
        start = 9 if data[8:9] == b'"' else 10 if data[8:10] == b' "' else 0
        end = data.find(b'"', start) if start else -1
        if end > 0:
            return data[start:end].decode("latin-1"), end
    return None
