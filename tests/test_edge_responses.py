"""Responses at the edges of SSE over real HTTP: a body of declared length, a leading BOM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.responses import Response

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.testing import RecordingBackend
from tests.support.pair import Pair, ends_of, fetch, run_events, serve_pair, sse, strip_ids
from tests.support.server import serve

pytestmark = pytest.mark.timeout(30)

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with serve_pair() as served:
        yield served


def whole_body(thread: str) -> bytes:
    events = run_events(
        thread,
        "r-1",
        {"type": "TEXT_MESSAGE_START", "messageId": "m", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m", "delta": "Forty-two."},
        {"type": "TEXT_MESSAGE_END", "messageId": "m"},
    )
    return b"".join(sse(event) for event in events)


async def test_a_body_with_content_length_passes_byte_identical_and_its_run_is_traced(pair: Pair) -> None:
    body = whole_body("t-length")
    path = pair.app.add(lambda _: Response(body, media_type="text/event-stream"))
    traced = await fetch(pair.traced, path, body={"threadId": "t-length"})
    plain = await fetch(pair.plain, path, body={"threadId": "t-length"})
    assert traced.status == plain.status == 200
    assert traced.comparable_headers() == plain.comparable_headers()
    assert (b"content-length", str(len(body)).encode()) in traced.comparable_headers()
    assert traced.raw == plain.raw == body  # not one byte more than declared
    turn = await pair.ended_turn("t-length")
    assert turn.ended == 1 and turn.error is None and turn.output == "Forty-two."
    # The id is still reachable for feedback.
    assert pair.obs.last_trace_id("t-length") == turn.trace_id


async def test_a_streamed_body_with_a_declared_length_is_not_lengthened(pair: Pair) -> None:
    body = whole_body("t-length-streamed")
    name = "length-streamed"
    chunks = [body[:40], 0.01, body[40:]]
    path = pair.app.add(
        lambda _: pair.app.stream(name, chunks, headers={"content-length": str(len(body))}), name
    )
    traced = await fetch(pair.traced, path, body={})
    assert traced.status == 200 and traced.raw == body
    turn = await pair.ended_turn("t-length-streamed")
    assert turn.ended == 1 and pair.obs.last_trace_id("t-length-streamed") == turn.trace_id


@pytest.mark.parametrize("split", [None, 1, 2, 3, 10])
async def test_a_stream_starting_with_a_bom_is_traced_and_announced(pair: Pair, split: int | None) -> None:
    thread = f"t-bom-{split}"
    stream = BOM + whole_body(thread)
    chunks = [stream] if split is None else [stream[:split], 0.01, stream[split:]]
    path = pair.app.add_stream(chunks)
    traced = await fetch(pair.traced, path, body={})
    plain = await fetch(pair.plain, path, body={})
    stripped, ids = strip_ids(traced.raw)
    assert stripped == plain.raw == stream
    turn = await pair.ended_turn(thread)
    # The id frame follows RUN_STARTED; the BOM stays the stream's first bytes.
    assert ids == [(len(BOM) + ends_of(stream[len(BOM) :], "RUN_STARTED")[0], turn.trace_id)]
    assert traced.raw.startswith(BOM)
    assert turn.output == "Forty-two."


async def test_a_bom_later_in_the_stream_is_not_skipped(pair: Pair) -> None:
    stream = b": comment\n\n" + BOM + whole_body("t-late-bom")
    path = pair.app.add_stream([stream])
    traced = await fetch(pair.traced, path, body={})
    assert traced.raw == stream  # the first data line is not "data:": no run is seen
    assert not pair.runs("t-late-bom")


async def test_content_length_without_an_app_of_ours() -> None:
    """Behind a plain ASGI app (no Starlette response class) the declared length is kept too."""
    body = whole_body("t-raw")

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"Content-Type", b"text/event-stream"), (b"Content-Length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})

    backend = RecordingBackend()
    obs = Observability([backend])
    with serve(TracingMiddleware(app, observability=obs), lifespan="off") as url:
        fetched = await fetch(url, "/", body={})
    assert fetched.raw == body
    assert obs.last_trace_id("t-raw") == backend.runs[0].trace_id
    await obs.aclose()
