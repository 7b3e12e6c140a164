"""The request body, read for a run's input only when it can be one, and never held beyond need.

A RunAgentInput is a JSON object, sent as JSON (or untyped, or as a browser's ``text/plain``
default), with one of its keys near the start. Any other body (an upload, a form, a JSON document
of another shape, anything over 4 MiB) is let go at the first sign, so an in-flight request that
is not an AG-UI run holds at most the first 64 KiB of its body, and usually nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from ambient_tracing.tracer.request import RunRequest

#: Request bodies larger than this are not kept for tracing (the app still reads all of them).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: A RunAgentInput names one of its keys within this many bytes, or the body is not one.
PREFIX_BYTES = 64 * 1024
#: Content types a RunAgentInput may come with (besides none): JSON, and a browser's ``fetch``
#: default for a string body.
_INPUT_TYPES = (b"application/json", b"text/plain")
#: RunAgentInput's keys (camelCase as the encoders write them, snake_case as Python may).
_INPUT_KEYS = tuple(
    f'"{key}"'.encode()
    for key in (
        "threadId",
        "runId",
        "parentRunId",
        "messages",
        "state",
        "tools",
        "context",
        "forwardedProps",
        "thread_id",
        "run_id",
        "parent_run_id",
        "forwarded_props",
    )
)
_OVERLAP = max(len(key) for key in _INPUT_KEYS) - 1
_JSON_SPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"


def may_carry_run_input(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a body with these request headers may be a RunAgentInput: typed as JSON (or not
    typed) and not declared larger than :data:`MAX_REQUEST_BYTES`."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            if media not in _INPUT_TYPES and not media.endswith(b"+json"):
                return False
        elif lowered == b"content-length" and (not value.isdigit() or int(value) > MAX_REQUEST_BYTES):
            return False
    return True


class RequestBody:
    """Fed the request body's chunks as the app reads them; :attr:`request` is the run's input."""

    __slots__ = ("_chunks", "_keyed", "_size", "_tail", "request")

    def __init__(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        # None once the body cannot be a RunAgentInput, or once it was parsed.
        self._chunks: list[bytes] | None = [] if may_carry_run_input(headers) else None
        self._size = 0
        self._keyed = False  # one of RunAgentInput's keys was seen near the start
        self._tail = b""  # the last bytes looked at for a key (a key may straddle chunks)
        self.request = RunRequest()

    def feed(self, chunk: bytes, more_body: bool) -> None:
        chunks = self._chunks
        if chunks is None:
            return
        if not self._size:
            # A JSON object (after an optional BOM and blanks), or not a RunAgentInput.
            head = chunk.removeprefix(_BOM).lstrip(_JSON_SPACE)
            if head and not head.startswith(b"{"):
                self.drop()
                return
        if not self._keyed:
            window = self._tail + chunk[:PREFIX_BYTES]
            self._keyed = any(key in window for key in _INPUT_KEYS)
            self._tail = window[-_OVERLAP:]
        self._size += len(chunk)
        if self._size > MAX_REQUEST_BYTES or (not self._keyed and self._size > PREFIX_BYTES):
            self.drop()
            return
        chunks.append(chunk)
        if not more_body:
            self.finish()

    def finish(self) -> RunRequest:
        """Parse what was kept (all of it, or what came before the app answered) and let it go."""
        chunks = self._chunks
        if chunks:
            self._chunks = None
            if self._keyed:
                self.request = RunRequest.from_body(b"".join(chunks))
        return self.request

    def drop(self) -> None:
        """Not a run's input (or no longer needed): hold nothing."""
        self._chunks = None
