"""Property tests (hypothesis), in-process through a fake ASGI server (tests/support/asgi_driver.py):

* any chunking of a valid AG-UI SSE stream (any line endings, comments, event/id/retry fields, JSON
  written type-first or not) gives the same traced events as the whole stream in one chunk, and a
  byte-identical output but for one id frame right after each RUN_STARTED frame;
* arbitrary bytes in the response stream, or in the request body (and user header), never raise, and
  pass through untouched; nothing is left open.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.privacy import JsonText, decoded, mask, mask_json, outgoing_payload
from ambient_tracing.testing import RecordedSpan, RecordingBackend
from tests.support.asgi_driver import drive, sse_app
from tests.support.pair import ends_of, strip_ids

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- valid AG-UI streams ----------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
ids = st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=6)


@st.composite
def run_events(draw: st.DrawFn, index: int) -> list[dict[str, Any]]:
    thread, run = draw(ids), f"run{index}-{draw(ids)}"
    events: list[dict[str, Any]] = [{"type": "RUN_STARTED", "threadId": thread, "runId": run}]
    for block in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["text", "tool", "step", "reasoning", "other"]))
        key = f"{index}-{block}"
        if kind == "text":
            events.append({"type": "TEXT_MESSAGE_START", "messageId": key, "role": "assistant"})
            events += [
                {"type": "TEXT_MESSAGE_CONTENT", "messageId": key, "delta": delta}
                for delta in draw(st.lists(texts.filter(bool), max_size=4))
            ]
            events.append({"type": "TEXT_MESSAGE_END", "messageId": key})
        elif kind == "tool":
            name = draw(st.sampled_from(["search", "get_weather", "x"]))
            events.append({"type": "TOOL_CALL_START", "toolCallId": key, "toolCallName": name})
            events += [
                {"type": "TOOL_CALL_ARGS", "toolCallId": key, "delta": delta}
                for delta in draw(st.lists(texts.filter(bool), max_size=3))
            ]
            events.append({"type": "TOOL_CALL_END", "toolCallId": key})
            if draw(st.booleans()):
                events.append(
                    {
                        "type": "TOOL_CALL_RESULT",
                        "toolCallId": key,
                        "messageId": f"r{key}",
                        "content": draw(texts),
                    }
                )
        elif kind == "step":
            events += [
                {"type": "STEP_STARTED", "stepName": f"s{key}"},
                {"type": "STEP_FINISHED", "stepName": f"s{key}"},
            ]
        elif kind == "reasoning":
            events += [
                {"type": "REASONING_START", "messageId": f"z{key}"},
                {"type": "REASONING_MESSAGE_START", "messageId": f"z{key}", "role": "reasoning"},
                {
                    "type": "REASONING_MESSAGE_CONTENT",
                    "messageId": f"z{key}",
                    "delta": draw(texts.filter(bool)),
                },
                {"type": "REASONING_MESSAGE_END", "messageId": f"z{key}"},
                {"type": "REASONING_END", "messageId": f"z{key}"},
            ]
        else:
            events.append(
                draw(
                    st.sampled_from(
                        [
                            {"type": "CUSTOM", "name": "n", "value": {"a": [1, 2]}},
                            {"type": "STATE_SNAPSHOT", "snapshot": {"k": "v"}},
                            {"type": "RAW", "event": {"x": 1}},
                        ]
                    )
                )
            )
    ending = draw(st.sampled_from(["finished", "error", "none"]))
    if ending == "finished":
        usage = [{"model": "m", "inputTokens": draw(st.integers(0, 99)), "outputTokens": 1}]
        events.append({"type": "RUN_FINISHED", "threadId": thread, "runId": run, "usage": usage})
    elif ending == "error":
        events.append({"type": "RUN_ERROR", "message": draw(texts)})
    return events


@st.composite
def encoded_frame(draw: st.DrawFn, event: dict[str, Any]) -> bytes:
    """One valid SSE frame of ``event``, written one of the ways a producer may write it."""
    eol = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    style = draw(st.sampled_from(["compact", "spaced", "type-last", "ascii"]))
    if style == "compact":
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    elif style == "spaced":
        data = json.dumps(event, ensure_ascii=False)
    elif style == "type-last":
        data = json.dumps({**{k: v for k, v in event.items() if k != "type"}, "type": event["type"]})
    else:
        data = json.dumps(event, separators=(",", ":"))
    lines = []
    if draw(st.booleans()):
        lines.append(b": a comment")
    if draw(st.booleans()):
        lines.append(b"event: " + event["type"].encode())
    lines.append(b"data: " + data.encode() if draw(st.booleans()) else b"data:" + data.encode())
    if draw(st.booleans()):
        lines.append(b"id: " + str(draw(st.integers(0, 9))).encode())
    if draw(st.booleans()):
        lines.append(b"retry: 1000")
    prefix = draw(st.sampled_from([b"", b": keep-alive" + eol + eol]))
    return prefix + eol.join(lines) + eol + eol


@st.composite
def valid_stream(draw: st.DrawFn) -> bytes:
    events = [event for index in range(draw(st.integers(1, 2))) for event in draw(run_events(index))]
    return b"".join(draw(encoded_frame(event)) for event in events)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=40))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def request(thread: str = "t", run: str = "r") -> bytes:
    return json.dumps(
        {"threadId": thread, "runId": run, "messages": [{"id": "u", "role": "user", "content": "hello"}]}
    ).encode()


def summary(span: RecordedSpan) -> tuple[Any, ...]:
    """What a span records, without its (random) trace id."""
    turn = span.run
    about = (turn.thread_id, turn.run_id, turn.user_id, turn.turn_number, turn.input) if turn else None
    return (
        span.name,
        span.kind,
        about,
        repr(span.input),
        repr(span.output),
        span.error,
        span.model,
        repr(span.usage),
        repr(sorted(span.attributes.items(), key=repr)),
        span.ended,
        tuple(summary(child) for child in span.children),
    )


def traced(chunks: list[bytes], end: str = "empty") -> tuple[bytes, Any, Any]:
    """Stream ``chunks`` through a fresh middleware; (output, the turns' summaries, the backend)."""
    backend = RecordingBackend()
    app = TracingMiddleware(
        sse_app(chunks, end=end), observability=Observability([backend], mask_messages=False)
    )
    driven = asyncio.run(drive(app, [request()]))
    assert driven.status == 200
    return driven.body, [summary(turn) for turn in backend.runs], backend


@SETTINGS
@given(st.data())
def test_any_chunking_traces_the_same_and_changes_no_byte(data: st.DataObject) -> None:
    stream = data.draw(valid_stream())
    chunks = data.draw(chunked(stream))
    end = data.draw(st.sampled_from(["empty", "last"]))  # how the app ends its body
    whole_output, whole_trace, _ = traced([stream])
    output, trace, backend = traced(chunks, end)

    assert trace == whole_trace
    stripped, found = strip_ids(output)
    assert stripped == stream
    assert strip_ids(whole_output)[0] == stream
    run_starts = ends_of(stream, "RUN_STARTED")
    assert [position for position, _ in found] == run_starts
    assert [trace_id for _, trace_id in found] == [turn.trace_id for turn in backend.runs]
    assert len(backend.runs) == len(run_starts)
    assert backend.open_spans() == []


# -- arbitrary bytes --------------------------------------------------------------------------------

FRAGMENTS = [
    b"data: ",
    b"data:",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b'{"type":"RUN_STARTED","threadId":"t","runId":"r"}\n\n',
    b'data: {"type":"RUN_STARTED","threadId":"t","runId":"r"}\n\n',
    b'data: {"type":"TOOL_CALL_START","toolCallId":"c","toolCallName":"x"}\n\n',
    b'data: {"type":"TEXT_MESSAGE_CONTENT","messageId":"m","delta":"\xff\xfe"}\n\n',
    b'data: {"type":"RUN_FINISHED"}\r\n\r\n',
    b'data: {"type":',
    b"data: [1, 2]\n\n",
    b"data: null\n\n",
    b'data: {"type": 5}\n\n',
    b"\x00\xff\xfe",
]
ID_FRAME = re.compile(rb'data: \{"type":"CUSTOM","name":"ambient:trace_id"')
byte_chunks = st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(FRAGMENTS)), max_size=30)


@settings(SETTINGS, max_examples=200)
@given(byte_chunks, st.sampled_from(["empty", "last", "none"]))
def test_arbitrary_stream_bytes_pass_through_untouched(chunks: list[bytes], end: str) -> None:
    output, _, backend = traced(chunks, end)
    stripped, found = strip_ids(output)
    assert stripped == b"".join(chunks)
    assert len(found) == len(ID_FRAME.findall(output)) <= b"".join(chunks).count(b"RUN_STARTED")
    assert backend.open_spans() == []


@settings(SETTINGS, max_examples=200)
@given(
    st.lists(
        st.one_of(st.binary(max_size=64), st.sampled_from([request(), b"{", b'"threadId"', b"\xff"])),
        max_size=8,
    ),
    st.binary(max_size=20),
)
def test_arbitrary_request_bytes_pass_through_untouched(body: list[bytes], user: bytes) -> None:
    run = [
        b'data: {"type":"RUN_STARTED","threadId":"t","runId":"r"}\n\n',
        b'data: {"type":"TEXT_MESSAGE_CONTENT","messageId":"m","delta":"hi"}\n\n',
        b'data: {"type":"RUN_FINISHED","threadId":"t","runId":"r"}\n\n',
    ]
    seen: list[bytes] = []
    backend = RecordingBackend()
    app = TracingMiddleware(
        sse_app(run, seen=seen), observability=Observability([backend], mask_messages=False)
    )
    driven = asyncio.run(drive(app, body, headers=[(b"x-current-user-id", user)]))
    assert seen == [b"".join(body)]  # the app read the body as it was sent
    stripped, found = strip_ids(driven.body)
    assert stripped == b"".join(run)
    assert [position for position, _ in found] == ends_of(stripped, "RUN_STARTED")
    [turn] = backend.runs
    assert turn.run is not None and (turn.run.thread_id, turn.run.run_id) == ("t", "r")
    assert turn.output == "hi" and turn.error is None
    assert backend.open_spans() == []


# Strings around the mask's limit, with the characters JSON escapes or spells in several ways.
_mask_text = st.text(alphabet='ab"\\\u00e9\U0001f600 {}[],:\n\ud83d', max_size=70)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _mask_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_mask_text, children, max_size=4),
    max_leaves=30,
)


def _nested(depth: int) -> Any:
    value: Any = "x"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@settings(SETTINGS, max_examples=400)
@given(
    json_values | st.integers(min_value=60, max_value=70).map(_nested),
    st.sampled_from([{}, {"ensure_ascii": False}, {"separators": (",", ":")}]),
)
def test_masking_json_text_skips_the_walk_only_when_it_changes_nothing(value: Any, options: Any) -> None:
    text = JsonText(json.dumps(value, **options))
    assert mask_json(text) == mask(decoded(text))
    assert json.dumps(mask_json(text)) == json.dumps(mask(decoded(text)))


@settings(SETTINGS, max_examples=400)
@given(
    json_values | st.integers(min_value=60, max_value=70).map(_nested) | _mask_text,
    st.sampled_from([{}, {"ensure_ascii": False}, {"separators": (",", ":")}]),
    st.booleans(),
    st.booleans(),
)
def test_a_payload_kept_as_json_text_shows_what_masking_would_send(
    value: Any, options: Any, as_json: bool, masked: bool
) -> None:
    # For Langfuse (payloads written as JSON text), a tool payload that came as JSON text is sent
    # as that text when it shows the same as the decoded (and masked) value would.
    text = JsonText(json.dumps(value, **options) if as_json else value if isinstance(value, str) else "x")
    expected = mask_json(text) if masked else decoded(text)
    sent = outgoing_payload(text, masked=masked, as_text=True)
    if sent is text:
        assert decoded(text) == expected or text == expected  # JSON showing the value, or the text
        text.encode("utf-8")  # protobuf can carry it as it is
    else:
        assert json.dumps(sent) == json.dumps(expected)
    assert outgoing_payload(text, masked=masked) == expected  # other destinations: decoded


def test_a_long_json_text_payload_is_kept_only_when_nothing_in_it_is_masked() -> None:
    clean = JsonText(
        json.dumps({"results": [{"title": f"Forecast {i}", "summary": "rain"} for i in range(9)]})
    )
    assert outgoing_payload(clean, masked=True, as_text=True) is clean
    leaky = JsonText(json.dumps({"note": "s" * 51}))
    assert outgoing_payload(leaky, masked=True, as_text=True) == {"note": "[REDACTED FOR PRIVACY]"}
    plain = JsonText("not JSON, and longer than the fifty characters the mask keeps")
    assert outgoing_payload(plain, masked=True, as_text=True) == "[REDACTED FOR PRIVACY]"
    assert outgoing_payload(plain, masked=False, as_text=True) is plain
    surrogate = JsonText('{"k": "\ud83d"}')  # a lone surrogate: protobuf cannot carry the text
    assert outgoing_payload(surrogate, masked=False, as_text=True) == {"k": "\ud83d"}


def test_json_text_with_a_lone_surrogate_is_decoded() -> None:
    # A tool result whose JSON text came from an escaped lone surrogate on the wire.
    assert decoded(JsonText('{"k": "\ud83d"}')) == {"k": "\ud83d"}
