"""One AG-UI request's bytes: copy the RunAgentInput the app reads, watch the SSE body it sends.

Every body chunk is forwarded in order and unchanged, and handed to the tracer worker, which
traces its events (:mod:`.body_tracer`); the one addition is a ``CUSTOM ambient:trace_id`` frame
sent right after each run's RUN_STARTED frame. On the event loop a chunk costs a few C-level checks:
only a chunk that may hold a run's start or end (its bytes contain ``RUN_``), or one that does not
end at a frame boundary, is scanned there; a run is opened there, so its id can follow its frame.
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
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ambient_tracing.doors.body_tracer import BodyTracer, event_type, parse_event
from ambient_tracing.doors.request_body import RequestBody
from ambient_tracing.doors.result_id import with_result_trace_id
from ambient_tracing.doors.sse import SseScanner
from ambient_tracing.failures import capture_internal_exceptions, warn_once
from ambient_tracing.ids import (
    TraceParent,
    new_span_id,
    parse_traceparent,
    trace_id_from_run_id,
    traceresponse,
)
from ambient_tracing.observability import Observability
from ambient_tracing.tracer.handlers import RunOpener, StreamTracer
from ambient_tracing.tracer.request import CallerTrace
from ambient_tracing.tracer.runs import OpenRun
from ambient_tracing.tracer.worker import Lane

logger = logging.getLogger(__name__)

TRACE_ID_EVENT_NAME = "ambient:trace_id"
# The events the loop looks at: a run's start (opened and announced there) and end (result.traceId).
_RUN_EVENTS = frozenset({"RUN_STARTED", "RUN_FINISHED", "RUN_ERROR"})


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
    """One request: reads the RunAgentInput from the request body, hands the SSE body to the
    tracer worker, passes every byte on."""

    __slots__ = (
        "_announce",
        "_app",
        "_body",
        "_body_tracer",
        "_caller",
        "_disconnected",
        "_fast",
        "_finished",
        "_generation",
        "_lane",
        "_observability",
        "_open_run_now",
        "_opener",
        "_receive",
        "_scanner",
        "_scope",
        "_send",
        "_skipping",
        "_traceparent",
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
        # Finds the frames of the chunks the loop looks at; None when the response is not traced.
        self._scanner: SseScanner | None = None
        self._opener: RunOpener | None = None
        self._body_tracer: BodyTracer | None = None
        self._lane: Lane | None = None  # the chunks on their way to the body tracer
        # True while the scanner is at a frame boundary: a chunk that ends at one and holds no
        # RUN_ is then handed over without a look (see send).
        self._fast = False
        # One frame of a type the tracer does not want (BodyTracer.unwanted, valid while the
        # generation, bumped at each chunk that may start a run, is the same) is not handed over;
        # a chunk with a \u escape (may spell RUN_STARTED without those bytes) ends that for good.
        self._skipping = True
        self._generation = 0
        # The run open on this stream, as the loop sees it (result.traceId, the thread's current id).
        self._open_run_now: OpenRun | None = None
        self._finished = False
        self._disconnected = False
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

    def send(self, message: Message) -> Awaitable[None]:
        """The app's ``send``. The hot path, a plain function returning the server's own ``send``
        awaitable: a chunk that is one frame of a type the tracer does not want now is passed on
        untouched; one that ends at a frame boundary and starts or ends no run (a message other
        than a body chunk has no body ending in a blank line) is queued for the tracer worker as it
        is passed on. Runs for every chunk of every stream, so every test is the cheapest that
        CPython offers for it: operators over method calls (a slice compared, ``in`` for one byte),
        but ``bytes.find`` for a substring (twice as fast as ``in`` there)."""
        if self._fast:
            body = message.get("body", b"")
            if self._skipping:
                generation, unwanted = self._body_tracer.unwanted  # type: ignore[union-attr]
                if (
                    body.startswith(unwanted)
                    and generation == self._generation
                    and body[-2:] == b"\n\n"  # the chunk ends in a blank line...
                    and 10 not in body[:-2]  # ...right after its first line: it is that one frame
                    and 13 not in body  # (no CR making more lines of it)
                    and message.get("more_body", False)
                ):
                    return self._send(message)  # a frame the tracer does not want
            if (
                (body[-2:] == b"\n\n" or body[-4:] == b"\r\n\r\n")  # ends at a frame boundary
                and body.find(b"RUN_") < 0
                and message.get("more_body", False)
            ):
                if self._skipping and 92 in body and body.find(b"\\u") >= 0:
                    self._skipping = False  # it may hide a run's start: see __init__
                if not self._lane.put(body):  # type: ignore[union-attr]
                    self._fell_behind()
                return self._send(message)
        return self._send_other(message)

    async def _send_other(self, message: Message) -> None:
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
        """A chunk the loop looks at: its frames found, each run's start sent, the run opened and
        its id frame sent; the rest of the chunk sent; the chunk handed to the tracer worker."""
        self._fast = False
        body: bytes = message.get("body", b"")
        more_body: bool = message.get("more_body", False)
        try:
            frames = self._frames(body, more_body)
        except Exception as exc:  # the app's bytes matter more than the trace
            self._stop_tracing(exc)
            await self._send(message)
            return
        start = 0
        for frame in frames:
            if frame.kind != "RUN_STARTED":
                if frame.kind == "RUN_FINISHED" and (replaced := self._result_frame(body, frame)) is not None:
                    await self._send_part(body[start : frame.start])
                    await self._send_part(replaced)
                    start = frame.end
                self._run_ended()
                continue
            await self._send_part(body[start : frame.end])
            start = frame.end
            trace_id = self._open_run(frame)
            if trace_id is not None and self._announce:
                await self._send_part(trace_id_frame(trace_id))
        await self._send(message if start == 0 else {**message, "body": body[start:]})
        self._hand_over(body)
        if not more_body:
            self._close(None)
        elif self._scanner is not None:
            self._fast = self._scanner.at_boundary

    def _result_frame(self, body: bytes, frame: _Frame) -> bytes | None:
        """The RUN_FINISHED frame with ``result.traceId`` (opt-in), or None to send it as it is: when
        off, when the body has a declared length, when the run is not traced, and when the frame is
        not one canonical ``data: <json>\n\n`` whole in this chunk (its bytes are never re-split)."""
        trace_id = self._open_run_now.trace_id if self._open_run_now is not None else None
        if not (self._observability.result_trace_id and self._announce and trace_id):
            return None
        if body[frame.start : frame.end] != b"data: " + frame.data + b"\n\n":
            return None
        data = None
        with capture_internal_exceptions(logger, "could not add result.traceId", once="result_trace_id"):
            data = with_result_trace_id(frame.data, trace_id)
        return None if data is None else b"data: " + data + b"\n\n"

    async def _send_part(self, part: bytes) -> None:
        if part:
            await self._send({"type": "http.response.body", "body": part, "more_body": True})

    def _frames(self, body: bytes, more_body: bool) -> list[_Frame]:
        """The chunk's complete events that start or end a run, each with its end offset."""
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
            typed = event_type(data)
            event = None
            if typed is not None:
                kind: Any = typed[0]
            elif b"RUN_" in data:  # not written type-first: parsed to learn whether it is a run's
                event = parse_event(data)
                kind = event.get("type") if event is not None else None
            else:
                continue
            if kind in _RUN_EVENTS:
                frames.append(_Frame(begin, end, data, kind, event))
        return frames

    def _open_run(self, frame: _Frame) -> str | None:
        """Open the run a RUN_STARTED frame starts; its id, or None when it is not traced."""
        if self._scanner is None:
            return None  # tracing stopped earlier in this chunk
        try:
            body_tracer, opener = self._ensure_tracing()
        except Exception as exc:
            self._stop_tracing(exc)
            return None
        event = frame.event if frame.event is not None else parse_event(frame.data)
        if event is None:
            return None
        opened = None
        with capture_internal_exceptions(logger, "could not open a run"):
            opened = opener.open(event)
        body_tracer.opened.append((frame.data, opened))
        self._run_ended()
        self._open_run_now = opened
        return opened.trace_id if opened is not None else None

    def _run_ended(self) -> None:
        """The stream's open run ended (its end seen, or the stream's): its thread's current trace
        id changes now, as the client sees the end; its spans end on the tracer worker."""
        opened, self._open_run_now = self._open_run_now, None
        if opened is not None:
            with capture_internal_exceptions(logger, "could not mark a run ended"):
                self._observability.runs.ended(opened)

    def _hand_over(self, body: bytes) -> None:
        """Give the tracer worker a chunk whose bytes are out."""
        if self._scanner is None:
            return
        try:
            self._ensure_tracing()
        except Exception as exc:
            self._stop_tracing(exc)
            return
        if self._skipping:  # else no answer of the tracer's is read again: nothing to mark
            self._generation += 1  # the chunk may start a run: what was unwanted may be wanted
            self._lane.call(self._body_tracer.next_generation)  # type: ignore[union-attr]
        if not self._lane.put(body):  # type: ignore[union-attr]
            self._fell_behind()

    def _ensure_tracing(self) -> tuple[BodyTracer, RunOpener]:
        body_tracer, opener = self._body_tracer, self._opener
        if body_tracer is None or opener is None:
            user_id, user_name = self._user(self._scope)
            request = self._body.finish().with_user(user_id, user_name)
            runs = self._observability.runs
            opener = self._opener = RunOpener(runs, request.with_caller(self._caller))
            # The settled id is the loop's to give: a run the worker opens itself gets a fresh one.
            body_tracer = self._body_tracer = BodyTracer(StreamTracer(runs, request))
            self._lane = Lane(self._observability.tracer_worker, body_tracer.feed)
        return body_tracer, opener

    def _fell_behind(self) -> None:
        warn_once(logger, "tracer worker behind", "the tracer worker is behind; responses go untraced")
        self._scanner = None
        self._fast = False
        self._close("not traced to the end: the tracer worker was behind")

    def _stop_tracing(self, exc: Exception) -> None:
        logger.warning("stopped tracing this response after an error: %r", exc)
        self._scanner = None
        self._fast = False
        self._close(f"tracing error: {exc!r}")

    def _close(self, error: str | None) -> None:
        self._run_ended()
        body_tracer, self._body_tracer = self._body_tracer, None
        if body_tracer is not None and self._lane is not None:
            ended_ns = time.time_ns()
            self._lane.call(lambda: body_tracer.close(error, ended_ns))


class _Frame(NamedTuple):
    start: int  # offset in the chunk just after the previous frame (0: it may have begun earlier)
    end: int  # offset in the chunk just after the frame's blank line
    data: bytes
    kind: str  # RUN_STARTED, RUN_FINISHED or RUN_ERROR
    event: dict[str, Any] | None  # the parsed event, when it had to be parsed already
