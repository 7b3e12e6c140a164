"""One SSE response body traced on the tracer worker (:mod:`ambient_tracing.tracer.worker`).

The responder hands every chunk here after its bytes are out, in order; this finds the events,
parses those the tracer wants now, and feeds them to the stream's
:class:`~ambient_tracing.tracer.handlers.StreamTracer`. Runs are opened on the event loop (their
ids are announced in the stream); each comes with its RUN_STARTED frame's data, so it is matched
to that frame here. A RUN_STARTED the loop did not see (its type written with JSON escapes) is
opened here, its id not announced.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from ambient_tracing import fast_json
from ambient_tracing.doors.sse import SseScanner
from ambient_tracing.tracer.handlers import StreamTracer
from ambient_tracing.tracer.runs import OpenRun

logger = logging.getLogger(__name__)

#: At most this many event types are published to the loop as unwanted at once (they come from the
#: wire; the loop tests each chunk against all of them).
MAX_UNWANTED_TYPES = 8


class BodyTracer:
    """Traces the events of one SSE body; every method runs on the tracer worker."""

    __slots__ = ("_generation", "_scanner", "_skip", "_tracer", "opened", "unwanted")

    def __init__(self, tracer: StreamTracer) -> None:
        self._tracer = tracer
        self._scanner: SseScanner | None = SseScanner()
        # The start of the last whole frame, up to its type's closing quote, when the tracer did
        # not want that type: more frames of it are passed over without a look (most text deltas).
        self._skip: bytes | None = None
        #: Runs the loop opened, oldest first, with the data of their RUN_STARTED frame. The loop
        #: appends one before handing over the chunk that holds the frame.
        self.opened: deque[tuple[bytes, OpenRun | None]] = deque()
        # How many chunks that may start a run the loop has marked (see next_generation).
        self._generation = 0
        #: ``(generation, prefixes)``, written here, read by the loop: a chunk that is one frame
        #: starting with one of ``prefixes`` (``data: {"type":"<type>"``) is not wanted as long as
        #: the loop's generation is the same (see ``RunResponder.send``).
        self.unwanted: tuple[int, tuple[bytes, ...]] = (0, ())

    def next_generation(self) -> None:
        """The loop handed over a chunk that may start a run (what the tracer wants may change
        from there): what was published as unwanted before it no longer holds. Queued by the loop
        in the lane right before that chunk."""
        self._generation += 1

    def feed(self, chunk: bytes, at_ns: int | None = None) -> None:
        """Trace the events that ended in ``chunk``, which passed the responder at ``at_ns``
        (``time.time_ns()``; None: now). Long because it is the worker's hot path, kept flat: a
        frame of the type just passed over, then a whole frame, then the general scan."""
        skip = self._skip
        if (
            skip is not None
            and chunk.startswith(skip)
            and chunk[-2:] == b"\n\n"  # one line, then the blank line ending the chunk
            and 10 not in chunk[:-2]
            and 13 not in chunk  # and no CR making more lines of it
        ):
            return
        self._skip = None
        scanner = self._scanner
        if scanner is None:
            return
        self._tracer.clock.now_ns = at_ns
        data = scanner.whole_frame(chunk)
        if data is not None:
            typed = event_type(data)
            if typed is not None and not self._tracer.wants(typed[0]):
                # "data: " + the JSON up to the type's closing quote: unwanted until a run starts.
                self._skip = skip = chunk[: 6 + typed[1] + 1]
                self._publish_unwanted(skip)
                return
            self._handle(data)
            return
        try:
            frames = scanner.feed(chunk)
        except Exception as exc:  # never expected: the scanner takes any bytes
            self._stop(exc)
            return
        for _, data in frames:
            if data is not None:
                self._event(data, event_type(data))

    def _publish_unwanted(self, prefix: bytes) -> None:
        generation, prefixes = self.unwanted
        if generation != self._generation:
            prefixes = ()
        if prefix not in prefixes and len(prefixes) < MAX_UNWANTED_TYPES:
            self.unwanted = (self._generation, (*prefixes, prefix))  # one write: the loop reads it whole

    def close(self, error: str | None, at_ns: int | None = None) -> None:
        """The body ended at ``at_ns`` (``error`` None: completely): trace what is left, end what
        is open."""
        self._tracer.clock.now_ns = at_ns
        scanner = self._scanner
        if scanner is not None and error is None:
            for _, data in scanner.finish():
                if data is not None:
                    self._event(data, event_type(data))
        self._scanner = None
        tracer = self._tracer
        while self.opened:  # opened on the loop, its frame never reached here: ended, not leaked
            tracer.start_run(self.opened.popleft()[1])
        try:
            tracer.close(error)
        except Exception as exc:
            logger.warning("could not end a trace: %r", exc)

    def _event(self, data: bytes, typed: tuple[str, int] | None) -> None:
        if typed is None or self._tracer.wants(typed[0]):
            self._handle(data)
        # else: most text deltas, once the recorded text is full: not worth parsing

    def _handle(self, data: bytes) -> None:
        """Trace one event the tracer may want (its type unknown, or wanted)."""
        tracer = self._tracer
        try:
            event = fast_json.loads(data)
        except ValueError:
            tracer.warn("an SSE data line is not JSON; passed through untraced: %.80r", data)
            return
        if not isinstance(event, dict):
            return
        try:
            if event.get("type") == "RUN_STARTED":
                opened = self.opened
                if opened and opened[0][0] == data:
                    tracer.start_run(opened.popleft()[1])
                    return
            tracer.on_event(event)
        except Exception as exc:
            tracer.warn("could not trace a %.40r event: %r", event.get("type"), exc)

    def _stop(self, exc: Exception) -> None:
        logger.warning("stopped tracing this response after an error: %r", exc)
        self.close(f"tracing error: {exc!r}")


def event_type(data: bytes) -> tuple[str, int] | None:
    """The ``type`` of an event written type-first (as the AG-UI encoders do), without parsing it,
    and the offset of its closing quote; None when it is not written so, or holds a JSON escape."""
    if data[:8] == b'{"type":':
        start = 9 if data[8:9] == b'"' else 10 if data[8:10] == b' "' else 0
        end = data.find(b'"', start) if start else -1
        if end > 0 and 92 not in data[start:end]:  # 92: a backslash (a JSON escape)
            return data[start:end].decode("latin-1"), end
    return None


def parse_event(data: bytes) -> dict[str, Any] | None:
    """The event as a dict; None for non-JSON and JSON that is not an object."""
    try:
        event = fast_json.loads(data)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None
