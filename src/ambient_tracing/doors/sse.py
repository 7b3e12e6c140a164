"""Finding the events in a Server-Sent Events byte stream without changing a byte of it.

The scanner only looks: it reports where each event's frame ends (so a frame can be inserted
right after it) and the event's ``data`` bytes. Frames may be split across chunks at any byte;
lines may end in LF, CRLF or CR; comments and ``event:``/``id:``/``retry:`` fields are allowed.
"""

from __future__ import annotations

import re

#: An event whose frame grows past this many bytes is not parsed (its bytes still pass through).
MAX_EVENT_BYTES = 8 * 1024 * 1024

_CR = 13
# SSE: a UTF-8 byte order mark at the very start of the stream is ignored.
_BOM = b"\xef\xbb\xbf"
# A blank line: one line ending right after another. Atomic groups keep "\r\n" from being read as
# two endings ("\r" then "\n"), which would make every CRLF line look like a blank line.
_BLANK_LINE = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# The longest blank line is 4 bytes, so 3 bytes of the old buffer can start one.
_OVERLAP = 3

Frame = tuple[int, bytes | None]


def event_data(frame: bytes | bytearray) -> bytes | None:
    """The ``data`` of one frame (its data lines joined by LF), or None when it has none."""
    if frame.startswith(b"data:") and b"\n" not in frame and b"\r" not in frame:
        data = frame[5:]
        return bytes(data[1:] if data[:1] == b" " else data)
    lines = [line for line in _LINE_END.split(frame) if line == b"data" or line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(bytes(line[6:] if line[5:6] == b" " else line[5:]) for line in lines)


class SseScanner:
    """Incremental: :meth:`feed` each body chunk as it passes, :meth:`finish` at the end.

    Both return ``(offset, data)`` for every frame that ended: ``offset`` is the position in the
    chunk just after the frame's blank line, ``data`` its data bytes (None for a frame without
    data or too large to keep).
    """

    __slots__ = ("_bom", "_buffer", "_held", "_max_event_bytes", "_oversized", "_seen_cr")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._max_event_bytes = max_event_bytes
        self._oversized = False
        self._seen_cr = False
        # A frame whose blank line ended in CR at the end of a chunk: the next chunk may begin with
        # the LF of that CRLF, so the frame's true end is known only then.
        self._held: list[bytes | None] = []
        # The bytes of a BOM seen so far at the start of the stream; None once past the start.
        self._bom: bytes | None = b""

    @property
    def at_boundary(self) -> bool:
        """Whether everything fed so far ended at a frame boundary (past the start of the stream):
        then a chunk that ends in a blank line holds whole frames only, and this scanner's state
        after it would be the same as now (what lets a caller skip feeding such chunks)."""
        return self._bom is None and not self._buffer and not self._held and not self._oversized

    def whole_frame(self, chunk: bytes) -> bytes | None:
        """The ``data`` of a chunk that is exactly one ``data: ...\\n\\n`` frame while nothing is
        pending (the common case: one encoder frame per chunk), else None. It changes nothing: a
        chunk whose data is used this way is not :meth:`feed`. The hot path, so a few C calls."""
        if (
            self._bom is None  # past the start of the stream (a leading BOM is handled by feed)
            and not self._buffer
            and not self._held
            and not self._oversized
            and chunk[:6] == b"data: "
            and chunk[-2:] == b"\n\n"  # the chunk ends in a blank line...
            and 10 not in chunk[:-2]  # ...right after its first line
            and 13 not in chunk  # and no CR makes another line end
            and len(chunk) - 2 <= self._max_event_bytes
        ):
            return chunk[6:-2]
        return None

    def feed(self, chunk: bytes) -> list[Frame]:
        """The frames that ended in ``chunk``. Long because it is the hot path, kept flat: the
        common case first (one LF-framed frame per chunk), then the general scan over the buffer."""
        if not chunk:
            return []
        if self._bom is not None:
            return self._feed_first(chunk)
        if (
            # The common case, one whole LF-framed event per chunk, without copying into the buffer.
            not self._buffer
            and not self._held
            and chunk.endswith(b"\n\n")
            and chunk.find(b"\n\n") == len(chunk) - 2
            and 13 not in chunk
        ):
            return [(len(chunk), None if len(chunk) - 2 > self._max_event_bytes else event_data(chunk[:-2]))]
        frames: list[Frame] = []
        skip = 0
        if self._held:
            skip = 1 if chunk[:1] == b"\n" else 0
            frames.append((skip, self._held.pop()))
        if not self._seen_cr and 13 in chunk:
            self._seen_cr = True
        buffer = self._buffer
        old_length = len(buffer)
        shift = old_length - skip  # chunk offset = buffer position - shift
        buffer += chunk[skip:] if skip else chunk
        start = 0
        search = max(0, old_length - _OVERLAP)
        while True:
            if self._seen_cr:
                match = _BLANK_LINE.search(buffer, search)
                if match is None:
                    break
                frame_end, end = match.span()
            else:
                frame_end = buffer.find(b"\n\n", search)
                if frame_end < 0:
                    break
                end = frame_end + 2
            too_large = self._oversized or frame_end - start > self._max_event_bytes
            data = None if too_large else event_data(buffer[start:frame_end])
            self._oversized = False
            start = search = end
            if end == len(buffer) and buffer[-1] == _CR:
                self._held.append(data)
                break
            frames.append((end - shift, data))
        if start:
            del buffer[:start]
        # The buffer ends with at most two bytes of the frame's blank line, so past the limit plus
        # those the frame itself is too large, however the stream is chunked.
        if len(buffer) > self._max_event_bytes + _OVERLAP:
            self._oversized = True
            del buffer[:-_OVERLAP]
        return frames

    def _feed_first(self, chunk: bytes) -> list[Frame]:
        """A chunk at the start of the stream: a leading BOM (even split across chunks) is skipped."""
        seen = self._bom or b""
        wanted = _BOM[len(seen) :]
        size = min(len(wanted), len(chunk))
        if chunk[:size] != wanted[:size]:
            self._bom = None
            self._buffer += seen  # not a BOM after all: those bytes are the stream's
            return self.feed(chunk)
        if size < len(wanted):
            self._bom = seen + chunk
            return []
        self._bom = None
        return [(offset + size, data) for offset, data in self.feed(chunk[size:])]

    def finish(self) -> list[Frame]:
        """At the end of the stream: the frame still held back, at offset 0 of nothing."""
        return [(0, self._held.pop())] if self._held else []
