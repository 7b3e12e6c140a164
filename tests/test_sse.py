"""The SSE scanner: where each frame ends and what its data is, however the stream is chunked."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from ambient_tracing.doors.sse import SseScanner, event_data

Found = list[tuple[int, bytes | None]]


def scan(chunks: Sequence[bytes], *, max_event_bytes: int | None = None) -> Found:
    """Every frame the scanner reports, with its offset made absolute (from the stream's start)."""
    scanner = SseScanner() if max_event_bytes is None else SseScanner(max_event_bytes)
    found: Found = []
    base = 0
    for chunk in chunks:
        found += [(base + offset, data) for offset, data in scanner.feed(chunk)]
        base += len(chunk)
    found += [(base + offset, data) for offset, data in scanner.finish()]
    return found


def marked(chunks: Sequence[bytes]) -> bytes:
    """The stream with ``<n>`` inserted where the scanner says frame n ends, chunk by chunk, the way
    the middleware inserts its id frame (a held frame goes at the end of the stream)."""
    scanner = SseScanner()
    out: list[bytes] = []
    count = 0
    for chunk in chunks:
        start = 0
        for offset, _ in scanner.feed(chunk):
            out += (chunk[start:offset], b"<%d>" % count)
            count += 1
            start = offset
        out.append(chunk[start:])
    for _ in scanner.finish():
        out.append(b"<%d>" % count)
        count += 1
    return b"".join(out)


def splits(stream: bytes, parts: int) -> list[list[bytes]]:
    """``stream`` cut into ``parts`` chunks (some may be empty) at every combination of positions."""
    cuts = itertools.combinations_with_replacement(range(len(stream) + 1), parts - 1)
    return [[stream[a:b] for a, b in itertools.pairwise((0, *cut, len(stream)))] for cut in cuts]


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def assert_every_chunking(stream: bytes, expected: Found, expected_marks: bytes) -> None:
    assert scan([stream]) == expected
    assert marked([stream]) == expected_marks
    for chunks in [bytewise(stream), *splits(stream, 2), *splits(stream, 3)]:
        assert scan(chunks) == expected, chunks
        assert marked(chunks) == expected_marks, chunks


# -- event_data -----------------------------------------------------------------------------------


def test_event_data_of_one_line() -> None:
    assert event_data(b'data: {"a":1}') == b'{"a":1}'
    assert event_data(b"data:x") == b"x"  # the space after the colon is optional
    assert event_data(b"data:  x") == b" x"  # and only one is removed
    assert event_data(b"data") == b""  # a field name without a colon has an empty value
    assert event_data(b"data:") == b""


def test_event_data_of_several_lines_with_any_line_ending() -> None:
    for eol in (b"\n", b"\r\n", b"\r"):
        frame = eol.join([b": ping", b"event: message", b"id: 7", b"retry: 1000", b"data: {", b"data:1}"])
        assert event_data(frame) == b"{\n1}"
    assert event_data(b"data: a\ndata\ndata: b") == b"a\n\nb"


def test_event_data_is_none_without_a_data_line() -> None:
    assert event_data(b": ping") is None
    assert event_data(b"event: message\nid: 1") is None
    assert event_data(b"") is None
    # A field merely starting with "data" is another field; a comment mentioning data is a comment.
    assert event_data(b"datax: 1\n: data: 2") is None


# -- where frames end, however the stream is split ------------------------------------------------


def test_lf_frames_at_every_split() -> None:
    stream = b'data: {"a":1}\n\n: ping\n\nevent: m\nid: 7\nretry: 9\ndata: x\ndata:y\n\ndata\n\n'
    expected = [(15, b'{"a":1}'), (23, None), (63, b"x\ny"), (69, b"")]
    assert_every_chunking(
        stream,
        expected,
        b'data: {"a":1}\n\n<0>: ping\n\n<1>event: m\nid: 7\nretry: 9\ndata: x\ndata:y\n\n<2>data\n\n<3>',
    )


def test_crlf_frames_at_every_split_including_between_cr_and_lf() -> None:
    stream = b"data: 1\r\n\r\n: ping\r\n\r\nid: 2\r\ndata: 2\r\n\r\n"
    expected = [(11, b"1"), (21, None), (39, b"2")]
    assert_every_chunking(stream, expected, b"data: 1\r\n\r\n<0>: ping\r\n\r\n<1>id: 2\r\ndata: 2\r\n\r\n<2>")


def test_a_crlf_blank_line_split_between_cr_and_lf_inserts_after_the_lf() -> None:
    scanner = SseScanner()
    assert scanner.feed(b"data: 1\r\n\r") == []  # the frame's end is not known yet
    assert scanner.feed(b"\ndata: 2\r\n\r\n") == [(1, b"1"), (12, b"2")]
    assert scanner.finish() == []
    assert marked([b"data: 1\r\n\r", b"\ndata: 2\r\n\r\n"]) == b"data: 1\r\n\r\n<0>data: 2\r\n\r\n<1>"


def test_cr_frames_at_every_split() -> None:
    stream = b"data: 1\r\rdata: 2\r: c\r\rdata: 3\r\r"
    expected = [(9, b"1"), (22, b"2"), (31, b"3")]
    assert_every_chunking(stream, expected, b"data: 1\r\r<0>data: 2\r: c\r\r<1>data: 3\r\r<2>")


def test_a_cr_blank_line_at_the_end_of_a_chunk_waits_for_the_next_byte() -> None:
    scanner = SseScanner()
    assert scanner.feed(b"data: 1\r\r") == []
    # The next chunk does not start with LF, so the frame ended at the CR: offset 0 of this chunk.
    assert scanner.feed(b"data: 2\r\r") == [(0, b"1")]
    assert scanner.finish() == [(0, b"2")]


def test_mixed_line_endings_at_every_split() -> None:
    stream = b"data: 1\n\ndata: 2\r\n\r\nid: 3\rdata: 3\r\r: x\n\r\nevent: e\r\ndata: 4\n\r\n"
    expected = [(9, b"1"), (20, b"2"), (35, b"3"), (41, None), (61, b"4")]
    assert_every_chunking(
        stream,
        expected,
        b"data: 1\n\n<0>data: 2\r\n\r\n<1>id: 3\rdata: 3\r\r<2>: x\n\r\n<3>event: e\r\ndata: 4\n\r\n<4>",
    )


def test_utf8_split_inside_a_character() -> None:
    text = "héllo 中文 😀"
    stream = b"data: " + text.encode() + b"\n\ndata: \xc3\xa9\r\n\r\n"
    expected = [(len(stream) - 12, text.encode()), (len(stream), "é".encode())]
    for chunks in [bytewise(stream), *splits(stream, 2)]:
        found = scan(chunks)
        assert found == expected
        assert [data.decode() for _, data in found if data is not None] == [text, "é"]


def test_one_whole_lf_frame_per_chunk() -> None:
    """The hot path (a whole frame per chunk) and the buffered path agree."""
    scanner = SseScanner()
    assert scanner.feed(b"data: 1\n\n") == [(9, b"1")]
    assert scanner.feed(b"data: 2\n\n") == [(9, b"2")]
    assert scanner.feed(b"data: 3\n") == []
    assert scanner.feed(b"\n") == [(1, b"3")]
    assert scanner.feed(b"\n\n") == [(2, None)]  # an empty frame: two more line endings
    assert scanner.feed(b"") == []
    assert scanner.finish() == []


def test_a_stream_ending_mid_frame_reports_nothing_more() -> None:
    scanner = SseScanner()
    assert scanner.feed(b"data: 1\n\ndata: 2\n") == [(9, b"1")]
    assert scanner.finish() == []


# -- oversized frames -----------------------------------------------------------------------------


def test_an_oversized_frame_has_no_data_and_the_next_frame_is_read() -> None:
    big = b"data: " + b"x" * 100 + b"\n\n"
    stream = b"data: 1\n\n" + big + b"data: 2\n\n"
    expected = [(9, b"1"), (9 + len(big), None), (len(stream), b"2")]
    for chunks in [[stream], bytewise(stream), *splits(stream, 2)]:
        assert scan(chunks, max_event_bytes=50) == expected, chunks


def test_an_oversized_crlf_frame_keeps_its_blank_line_boundary() -> None:
    big = b"data: " + b"x" * 100 + b"\r\n\r\n"
    stream = big + b"data: 2\r\n\r\n"
    expected = [(len(big), None), (len(stream), b"2")]
    for chunks in [[stream], bytewise(stream), *splits(stream, 2)]:
        assert scan(chunks, max_event_bytes=50) == expected, chunks


def test_a_frame_of_exactly_the_limit_is_kept() -> None:
    frame = b"data: " + b"x" * 44  # 50 bytes
    for eol in (b"\n", b"\r\n", b"\r"):
        stream = frame + eol * 2 + b"data: 2" + eol * 2
        for chunks in [[stream], bytewise(stream), *splits(stream, 2)]:
            assert [data for _, data in scan(chunks, max_event_bytes=50)] == [b"x" * 44, b"2"], chunks
            assert [data for _, data in scan(chunks, max_event_bytes=49)] == [None, b"2"], chunks


# -- properties -----------------------------------------------------------------------------------

_LINE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=12
)
_EOL = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def _frames(draw: st.DrawFn) -> tuple[bytes, Found]:
    """A valid stream of frames (each with at least one line, ended by one blank line) and, by
    construction, the (end offset, data) of each frame."""
    stream = b""
    expected: Found = []
    for _ in range(draw(st.integers(1, 5))):
        data_lines: list[bytes] = []
        lines: list[bytes] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["data", "data:", "bare", "comment", "event", "id", "retry"]))
            text = draw(_LINE_TEXT).encode()
            if kind == "data":
                lines.append(b"data: " + text)
                data_lines.append(text)
            elif kind == "data:":
                lines.append(b"data:" + text)
                data_lines.append(text.removeprefix(b" "))  # one space after the colon is not data
            elif kind == "bare":
                lines.append(b"data")
                data_lines.append(b"")
            elif kind == "comment":
                lines.append(b":" + text)
            else:
                lines.append(kind.encode() + b": " + text)
        endings = [draw(_EOL) for _ in lines]
        blank = draw(_EOL)
        if endings[-1] == b"\r" and blank == b"\n":
            blank = b"\r\n"  # "\r" then "\n" would be one CRLF line ending, not a blank line
        stream += b"".join(line + eol for line, eol in zip(lines, endings, strict=True)) + blank
        expected.append((len(stream), b"\n".join(data_lines) if data_lines else None))
    return stream, expected


@st.composite
def _chunked(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    return [stream[a:b] for a, b in itertools.pairwise((0, *cuts, len(stream)))]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_chunking_of_a_valid_stream_gives_its_frames(data: st.DataObject) -> None:
    stream, expected = data.draw(_frames())
    chunks = data.draw(_chunked(stream))
    assert scan(chunks) == expected
    assert b"".join(chunks) == stream
    assert marked(chunks) == marked([stream])


_SOUP = st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b"data: ", b"data:", b"x", b":", b"\xc3\xa9", b"d"]),
    max_size=40,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(st.data(), st.sampled_from([None, 4, 8, 16]))
def test_any_chunking_of_any_bytes_matches_reading_them_whole(
    data: st.DataObject, max_event_bytes: int | None
) -> None:
    stream = data.draw(_SOUP)
    chunks = data.draw(_chunked(stream))
    assert scan(chunks, max_event_bytes=max_event_bytes) == scan([stream], max_event_bytes=max_event_bytes)


BOM = b"\xef\xbb\xbf"


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_a_leading_bom_is_ignored_however_the_stream_is_split(data: st.DataObject) -> None:
    body = b'data: {"type":"RUN_STARTED"}\n\ndata: {"type":"RUN_FINISHED"}\n\n'
    stream = BOM + body
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
    chunks = [stream[a:b] for a, b in itertools.pairwise([0, *cuts, len(stream)])]
    found = scan(chunks)
    assert [data for _, data in found] == [b'{"type":"RUN_STARTED"}', b'{"type":"RUN_FINISHED"}']
    # Offsets are the stream's own: the id frame goes right after the first frame, BOM included.
    assert [offset for offset, _ in found] == [len(BOM) + 30, len(stream)]


def test_bom_only_at_the_start_and_not_a_bom_prefix() -> None:
    # A BOM later in the stream is data (SSE ignores only the first character of the stream).
    assert scan([b"data: a\n\n" + BOM + b"data: b\n\n"]) == [(9, b"a"), (21, None)]
    # Bytes that begin like a BOM but are not one stay in the stream.
    assert scan([b"\xef", b"\xbbX\n\ndata: c\n\n"]) == [(5, None), (14, b"c")]
    assert scan([BOM, BOM + b"data: d\n\n"]) == [(15, None)]
