"""The middleware over real HTTP (uvicorn on loopback, httpx as the browser): streaming, bytes,
passthrough, the request, and streams that end badly."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from ag_ui.encoder import EventEncoder
from starlette.responses import JSONResponse, Response
from starlette.testclient import TestClient
from starlette.types import Scope

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.doors.request_body import MAX_REQUEST_BYTES
from ambient_tracing.testing import RecordedSpan, RecordingBackend
from tests.support.agui_app import run_input, scripted_run
from tests.support.pair import (
    Pair,
    ScenarioApp,
    ends_of,
    fetch,
    frames,
    serve_pair,
    sse,
    strip_ids,
)
from tests.support.server import serve

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with serve_pair() as served:
        yield served


def encoded(*runs: list[Any]) -> list[bytes]:
    encoder = EventEncoder()
    return [encoder.encode(event).encode() for run in runs for event in run]


async def settled(backend: RecordingBackend, turns: list[RecordedSpan], timeout: float = 3.0) -> None:
    """Wait (bounded) until every span of ``turns`` has ended."""
    async with asyncio.timeout(timeout):
        while any(span.ended != 1 for turn in turns for span in turn.walk()):
            await asyncio.sleep(0.01)


async def still_serves(pair: Pair) -> None:
    path = pair.app.add_stream(encoded(scripted_run("t-next", "r-next")))
    response = await fetch(pair.traced, path, body=run_input("t-next", "r-next"))
    assert response.status == 200
    assert len(strip_ids(response.raw)[1]) == 1


# -- streaming ------------------------------------------------------------------------------------


async def test_first_events_reach_the_client_while_the_app_waits_for_it(pair: Pair) -> None:
    """The app produces the rest only after the client has seen RUN_STARTED and the id frame: any
    buffering in the middleware would deadlock, and the bounded wait would fail the test."""
    gate = threading.Event()
    produced_rest: list[float] = []
    first, *rest = encoded(scripted_run("t-gate", "r-gate"))

    async def chunks() -> AsyncIterator[bytes]:
        yield first
        await asyncio.to_thread(gate.wait, 5)
        produced_rest.append(time.monotonic())
        for chunk in rest:
            yield chunk

    path = pair.app.add(lambda body: pair.app.stream("gate", chunks), "gate")
    received = b""
    async with (
        httpx.AsyncClient(timeout=5) as client,
        asyncio.timeout(5),
        client.stream("POST", pair.traced + path, json=run_input("t-gate", "r-gate")) as response,
    ):
        stream = response.aiter_raw()
        async with asyncio.timeout(2):
            while len(strip_ids(received)[1]) < 1:
                received += await anext(stream)
        assert not produced_rest and not gate.is_set()
        assert strip_ids(received)[0] == first  # RUN_STARTED, then only the id frame
        gate.set()
        async for chunk in stream:
            received += chunk
    assert strip_ids(received)[0] == b"".join([first, *rest])
    assert produced_rest


async def test_each_event_arrives_before_the_app_produces_the_next(pair: Pair) -> None:
    produced: list[float] = []
    chunks = encoded(scripted_run("t-slow", "r-slow", text="one two"))[:5]

    async def slowly() -> AsyncIterator[bytes]:
        for chunk in chunks:
            produced.append(time.monotonic())
            yield chunk
            await asyncio.sleep(0.15)

    path = pair.app.add(lambda body: pair.app.stream("slow", slowly), "slow")
    arrived: list[tuple[float, bytes]] = []
    async with (
        httpx.AsyncClient(timeout=5) as client,
        asyncio.timeout(5),
        client.stream("POST", pair.traced + path, json=run_input("t-slow", "r-slow")) as response,
    ):
        async for chunk in response.aiter_raw():
            arrived.append((time.monotonic(), chunk))
    received = b""
    for index in range(len(chunks)):
        # When the app produced event n+1, the client already had events 0..n (and the id frame).
        deadline = produced[index + 1] if index + 1 < len(chunks) else float("inf")
        received = b"".join(data for at, data in arrived if at < deadline)
        assert strip_ids(received)[0] == b"".join(chunks[: index + 1])
    assert len(strip_ids(received)[1]) == 1


# -- bytes ----------------------------------------------------------------------------------------


async def test_the_stream_is_the_apps_bytes_plus_one_id_frame_after_run_started(pair: Pair) -> None:
    path = pair.app.add_stream(encoded(scripted_run("t-bytes", "r-bytes")))
    body = run_input("t-bytes", "r-bytes")
    traced = await fetch(pair.traced, path, body=body)
    plain = await fetch(pair.plain, path, body=body)
    assert traced.status == plain.status == 200
    assert traced.comparable_headers() == plain.comparable_headers()
    stripped, ids = strip_ids(traced.raw)
    assert stripped == plain.raw
    [turn] = pair.runs("t-bytes")
    assert ids == [(ends_of(plain.raw, "RUN_STARTED")[0], turn.trace_id)]
    assert pair.obs.last_trace_id("t-bytes") == turn.trace_id
    # The id frame is a well-formed AG-UI CUSTOM event.
    [(_, event)] = [frame for frame in frames(traced.raw) if frame[1].get("type") == "CUSTOM"]
    assert event["name"] == "ambient:trace_id" and event["value"] == {"traceId": turn.trace_id}
    assert abs(event["timestamp"] / 1000 - time.time()) < 60
    # ...and what it traced:
    assert not pair.backend.open_spans()
    assert turn.error is None and turn.output == "The answer is 42. "
    assert turn.input == "What is the meaning of life?"
    assert turn.model == "scripted-model" and turn.usage[0].total_tokens == 19
    tool = turn.find("tool_search")
    assert tool.input == {"query": "life"} and tool.output == "42"


async def test_several_runs_in_one_stream_each_get_a_trace_and_an_id(pair: Pair) -> None:
    path = pair.app.add_stream(
        encoded(scripted_run("t-multi", "r1"), scripted_run("t-multi", "r2"), scripted_run("t-multi", "r3"))
    )
    body = run_input("t-multi", "r1")
    traced = await fetch(pair.traced, path, body=body)
    plain = await fetch(pair.plain, path, body=body)
    stripped, ids = strip_ids(traced.raw)
    assert stripped == plain.raw
    turns = pair.runs("t-multi")
    assert [turn.run.run_id for turn in turns if turn.run] == ["r1", "r2", "r3"]
    assert [turn.run.turn_number for turn in turns if turn.run] == [1, 2, 3]
    assert [trace_id for _, trace_id in ids] == [turn.trace_id for turn in turns]
    assert len({turn.trace_id for turn in turns}) == 3
    started, finished = ends_of(plain.raw, "RUN_STARTED"), ends_of(plain.raw, "RUN_FINISHED")
    assert [position for position, _ in ids] == started
    assert all(s < f for s, f in zip(started, finished, strict=True))
    assert all(f < s for f, s in zip(finished, started[1:], strict=False))
    assert not pair.backend.open_spans()
    assert all(turn.error is None for turn in turns)
    assert pair.obs.last_trace_id("t-multi") == turns[-1].trace_id


# -- passthrough ----------------------------------------------------------------------------------

RUN_BYTES = b"".join(sse(event) for event in [{"type": "RUN_STARTED", "threadId": "t-pass", "runId": "r"}])


async def assert_untouched(pair: Pair, path: str, **request: Any) -> None:
    traced = await fetch(pair.traced, path, **request)
    plain = await fetch(pair.plain, path, **request)
    assert (traced.status, traced.comparable_headers(), traced.raw) == (
        plain.status,
        plain.comparable_headers(),
        plain.raw,
    )
    assert b"ambient:trace_id" not in traced.raw
    assert not pair.runs("t-pass")


async def test_get_passes_through(pair: Pair) -> None:
    await assert_untouched(pair, "/health", method="GET")
    path = pair.app.add_stream([RUN_BYTES])  # an SSE stream, but answering a GET
    await assert_untouched(pair, path, method="GET")


async def test_a_json_post_passes_through(pair: Pair) -> None:
    path = pair.app.add(lambda body: JSONResponse({"type": "RUN_STARTED", "threadId": "t-pass"}))
    await assert_untouched(pair, path, body=run_input("t-pass", "r"))


async def test_an_ag_ui_protobuf_stream_passes_through(pair: Pair) -> None:
    path = pair.app.add_stream(
        [RUN_BYTES, b"\x0a\x02\x08\x01\n\n"], media_type="application/vnd.ag-ui.event+proto"
    )
    await assert_untouched(pair, path, body=run_input("t-pass", "r"))


@pytest.mark.parametrize("status", [500, 422, 404])
async def test_an_sse_error_response_passes_through(pair: Pair, status: int) -> None:
    path = pair.app.add_stream([RUN_BYTES], status=status)
    await assert_untouched(pair, path, body=run_input("t-pass", "r"))


async def test_a_compressed_sse_stream_passes_through(pair: Pair) -> None:
    """An already-encoded body cannot be scanned or extended without breaking it."""
    path = pair.app.add_stream([RUN_BYTES], headers={"content-encoding": "br"})
    await assert_untouched(pair, path, body=run_input("t-pass", "r"))


def test_a_websocket_passes_through() -> None:
    """The websockets package is not installed, so uvicorn serves no websockets: Starlette's
    TestClient drives the ASGI websocket scope through the middleware instead."""
    for wrap in (True, False):
        scenarios = ScenarioApp()
        backend = RecordingBackend()
        app = (
            TracingMiddleware(scenarios.app, observability=Observability([backend]))
            if wrap
            else scenarios.app
        )
        with TestClient(app) as client, client.websocket_connect("/ws") as websocket:
            websocket.send_text("hello")
            assert websocket.receive_text() == "echo: hello"
        assert scenarios.lifespan == ["startup", "shutdown"]
        assert not backend.runs


async def test_lifespan_of_the_app_still_runs() -> None:
    scenarios = ScenarioApp()
    backend = RecordingBackend()
    obs = Observability([backend], mask_messages=False)
    path = scenarios.add_stream(encoded(scripted_run("t-life", "r")))
    with serve(TracingMiddleware(scenarios.app, observability=obs)) as url:
        assert scenarios.lifespan == ["startup"]
        response = await fetch(url, path, body=run_input("t-life", "r"))
        assert len(strip_ids(response.raw)[1]) == 1
    assert scenarios.lifespan == ["startup", "shutdown"]
    # The app's Observability is the caller's: the middleware does not close it at shutdown.
    assert obs.enabled and backend.closed == 0


# -- the request ----------------------------------------------------------------------------------


async def test_user_comes_from_headers(pair: Pair) -> None:
    path = pair.app.add_stream(encoded(scripted_run("t-user", "r")))
    await fetch(
        pair.traced,
        path,
        body=run_input("t-user", "r"),
        headers={"X-Current-User-Id": "u-42", "x-current-user-name": "Ada Lovelace"},
    )
    [turn] = pair.runs("t-user")
    assert turn.run is not None
    assert (turn.run.user_id, turn.run.user_name) == ("u-42", "Ada Lovelace")


async def test_no_user_headers_means_no_user(pair: Pair) -> None:
    path = pair.app.add_stream(encoded(scripted_run("t-nouser", "r")))
    await fetch(pair.traced, path, body=run_input("t-nouser", "r"))
    [turn] = pair.runs("t-nouser")
    assert turn.run is not None
    assert (turn.run.user_id, turn.run.user_name) == (None, None)


async def test_user_comes_from_a_resolver() -> None:
    seen: list[Scope] = []

    def resolver(scope: Scope) -> tuple[str | None, str | None]:
        seen.append(scope)
        token = dict(scope["headers"]).get(b"authorization", b"").decode()
        return token.removeprefix("Bearer "), "Resolved Name"

    with serve_pair(user_resolver=resolver) as served:
        path = served.app.add_stream(encoded(scripted_run("t-resolved", "r")))
        await fetch(
            served.traced,
            path,
            body=run_input("t-resolved", "r"),
            headers={"authorization": "Bearer u-7", "x-current-user-id": "ignored"},
        )
        [turn] = served.runs("t-resolved")
        assert turn.run is not None
        assert (turn.run.user_id, turn.run.user_name) == ("u-7", "Resolved Name")
        assert len(seen) == 1 and seen[0]["path"] == path


async def test_thread_run_and_message_come_from_the_body_and_the_app_gets_all_of_it(pair: Pair) -> None:
    # RUN_STARTED without ids: the trace takes the thread and run from the request body.
    path = pair.app.add_stream([sse({"type": "RUN_STARTED"}), sse({"type": "RUN_FINISHED"})])
    body = run_input("t-body", "r-body", message="x" * 300_000 + " the end")
    body["messages"].insert(0, {"id": "old", "role": "user", "content": "an earlier question"})
    body["messages"].append({"id": "a", "role": "assistant", "content": "an answer"})
    sent = json.dumps(body).encode()
    response = await fetch(pair.traced, path, body=sent)
    assert response.status == 200 and len(strip_ids(response.raw)[1]) == 1
    assert pair.app.bodies[path.rsplit("/", 1)[1]] == [sent]
    [turn] = pair.runs("t-body")
    assert turn.run is not None
    assert (turn.run.thread_id, turn.run.run_id) == ("t-body", "r-body")
    assert turn.input == "x" * 300_000 + " the end"  # the last user message


async def test_run_started_input_overrides_the_body(pair: Pair) -> None:
    event = {
        "type": "RUN_STARTED",
        "threadId": "t-event",
        "runId": "r-event",
        "input": run_input("t-event", "r-event", message="from the event"),
    }
    path = pair.app.add_stream([sse(event), sse({"type": "RUN_FINISHED"})])
    await fetch(pair.traced, path, body=run_input("t-other", "r-other", message="from the body"))
    [turn] = pair.runs("t-event")
    assert turn.run is not None
    assert turn.run.run_id == "r-event" and turn.input == "from the event"


async def test_a_request_body_past_the_copy_limit_reaches_the_app_whole(pair: Pair) -> None:
    body = run_input("t-bigbody", "r", message="y" * (MAX_REQUEST_BYTES + 1024))
    sent = json.dumps(body).encode()
    path = pair.app.add_stream(encoded(scripted_run("t-bigbody", "r")))
    response = await fetch(pair.traced, path, body=sent)
    assert pair.app.bodies[path.rsplit("/", 1)[1]] == [sent]
    [turn] = pair.runs("t-bigbody")
    assert len(strip_ids(response.raw)[1]) == 1
    assert turn.input is None and turn.error is None  # too large to keep: traced without the message


async def test_a_raising_user_resolver_leaves_the_stream_untouched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def resolver(scope: Scope) -> tuple[str | None, str | None]:
        raise LookupError("no session")

    caplog.set_level(logging.WARNING, logger="ambient_tracing")
    with serve_pair(user_resolver=resolver) as served:
        path = served.app.add_stream(encoded(scripted_run("t-badresolver", "r")))
        traced = await fetch(served.traced, path, body=run_input("t-badresolver", "r"))
        plain = await fetch(served.plain, path, body=run_input("t-badresolver", "r"))
        assert traced.raw == plain.raw and not served.backend.runs
        [warning] = [r for r in caplog.records if r.name.startswith("ambient_tracing")]
        assert "no session" in warning.getMessage()


# -- streams that end badly -----------------------------------------------------------------------


async def test_client_disconnect_ends_every_span_and_the_server_keeps_serving(pair: Pair) -> None:
    produced: list[int] = []
    opening = [
        sse({"type": "RUN_STARTED", "threadId": "t-gone", "runId": "r"}),
        sse({"type": "STEP_STARTED", "stepName": "plan"}),
        sse({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search"}),
        sse({"type": "REASONING_START", "messageId": "m0"}),
        sse({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}),
    ]

    async def forever() -> AsyncIterator[bytes]:
        for chunk in opening:
            yield chunk
        for index in range(200):
            await asyncio.sleep(0.02)
            produced.append(index)
            yield sse({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": f"{index} "})

    path = pair.app.add(lambda body: pair.app.stream("gone", forever), "gone")
    received = b""
    async with (
        httpx.AsyncClient(timeout=5) as client,
        asyncio.timeout(5),
        client.stream("POST", pair.traced + path, json=run_input("t-gone", "r")) as response,
    ):
        async for chunk in response.aiter_raw():
            received += chunk
            if b"TEXT_MESSAGE_CONTENT" in received:
                break
    assert len(strip_ids(received)[1]) == 1
    [turn] = pair.runs("t-gone")
    await settled(pair.backend, [turn])
    assert turn.error is not None and "cancelled" in turn.error and "disconnect" in turn.error
    children = turn.walk()[1:]
    assert {span.name for span in children} == {"step_plan", "tool_search", "reasoning"}
    assert all(span.error and span.error.startswith("run ended: cancelled") for span in children)
    assert pair.app.completed["gone"] == 0 and len(produced) < 200  # the app was stopped too
    assert pair.obs.current_trace_id("t-gone") is None
    await still_serves(pair)


async def test_app_raising_mid_stream_ends_spans_with_error_and_the_server_keeps_serving(
    pair: Pair,
) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield sse({"type": "RUN_STARTED", "threadId": "t-boom", "runId": "r"})
        yield sse({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search"})
        await asyncio.sleep(0.05)
        raise RuntimeError("the model went away")

    path = pair.app.add(lambda body: pair.app.stream("boom", failing), "boom")
    received = b""
    with pytest.raises(httpx.HTTPError):  # the response is cut short: an incomplete chunked body
        async with (
            httpx.AsyncClient(timeout=5) as client,
            asyncio.timeout(5),
            client.stream("POST", pair.traced + path, json=run_input("t-boom", "r")) as response,
        ):
            async for chunk in response.aiter_raw():
                received += chunk
    assert len(strip_ids(received)[1]) == 1
    [turn] = pair.runs("t-boom")
    await settled(pair.backend, [turn])
    assert turn.error == "RuntimeError: the model went away"
    tool = turn.find("tool_search")
    assert tool.error == "run ended: RuntimeError: the model went away"
    await still_serves(pair)


async def test_app_raising_before_responding_is_untraced_and_the_error_reaches_the_server(
    pair: Pair,
) -> None:
    def broken(body: bytes) -> Response:
        raise ValueError("no response at all")

    path = pair.app.add(broken)
    traced = await fetch(pair.traced, path, body=run_input("t-noresp", "r"))
    plain = await fetch(pair.plain, path, body=run_input("t-noresp", "r"))
    assert traced.status == plain.status == 500 and traced.raw == plain.raw
    assert not pair.runs("t-noresp")
    await still_serves(pair)


async def test_run_started_goes_out_before_the_turn_opens_and_text_before_it_is_traced() -> None:
    """Tracing never delays the app's bytes: each chunk is forwarded before its events are traced,
    and a RUN_STARTED frame before the (costly) turn opening, its id frame right after."""
    from ambient_tracing import Observability, TracingMiddleware
    from ambient_tracing.testing import RecordingBackend
    from tests.support.asgi_driver import Driven, drive, frame, sse_app

    sent: list[bytes] = []

    class Watching(RecordingBackend):
        def start_run(self, turn):  # type: ignore[no-untyped-def]
            self.seen_at_open = b"".join(sent)
            return super().start_run(turn)

    backend = Watching()
    started = frame({"type": "RUN_STARTED", "threadId": "t", "runId": "r"})
    prefix = b": ping\n\n"
    rest = frame({"type": "RUN_FINISHED", "threadId": "t", "runId": "r"})
    app = TracingMiddleware(sse_app([prefix + started + rest]), observability=Observability([backend]))

    async def recording_app(scope, receive, send):  # type: ignore[no-untyped-def]
        async def spy(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.body":
                sent.append(message.get("body", b""))
            await send(message)

        await app(scope, receive, spy)

    driven: Driven = await drive(recording_app, [b"{}"])
    [turn] = backend.runs
    # The bytes up to RUN_STARTED were already out when the run opened (on the span worker).
    assert backend.seen_at_open.startswith(prefix + started)
    id_frame = driven.chunks[1]
    assert driven.chunks == [prefix + started, id_frame, rest, b""]
    assert turn.trace_id.encode() in id_frame


async def test_frames_skipped_on_the_hot_path_are_traced_again_in_the_next_run() -> None:
    from ambient_tracing import Observability, TracingMiddleware
    from ambient_tracing.testing import RecordingBackend
    from tests.support.asgi_driver import drive, frame, sse_app

    def text_run(run_id: str, words: list[str]) -> list[bytes]:
        return [
            frame({"type": "RUN_STARTED", "threadId": "t", "runId": run_id}),
            frame({"type": "TEXT_MESSAGE_START", "messageId": run_id, "role": "assistant"}),
            *[frame({"type": "TEXT_MESSAGE_CONTENT", "messageId": run_id, "delta": w}) for w in words],
            frame({"type": "TEXT_MESSAGE_END", "messageId": run_id}),
            frame({"type": "RUN_FINISHED", "threadId": "t", "runId": run_id}),
        ]

    backend = RecordingBackend()
    chunks = text_run("r1", ["long words " * 3] * 50) + text_run("r2", ["short"])
    app = TracingMiddleware(sse_app(chunks), observability=Observability([backend]))  # masking on
    driven = await drive(app, [b"{}"])
    first, second = backend.runs
    assert first.output == "[REDACTED FOR PRIVACY]"  # its text went past the mask's limit
    assert second.output == "short"
    assert driven.body.replace(driven.chunks[1], b"").count(b"ambient:trace_id") == 1
