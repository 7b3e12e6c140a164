"""LangfuseBackend driven through the backend protocol, exported by the real SDK to a local receiver."""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from typing import Any

import pytest

pytest.importorskip("langfuse")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import use_span

from ambient_tracing.backends.base import RunStart, Span, SpanKind, TokenUsage, TracingBackend
from ambient_tracing.backends.langfuse import LangfuseBackend
from tests.support.fixtures_langfuse import sdk_langfuse_backend
from tests.support.langfuse_receiver import LangfuseReceiver, ReceivedSpan

# Also registered by tests/conftest.py; listing it here lets this file run on its own.
pytest_plugins = ["tests.support.fixtures_langfuse"]
pytestmark = pytest.mark.timeout(60)


def make_turn(**overrides: Any) -> RunStart:
    values: dict[str, Any] = {
        "thread_id": "thread-1",
        "run_id": "run-1",
        "user_id": "user-1",
        "user_name": "Ada Lovelace",
        "runner_type": "claude-agent-sdk",
        "turn_number": 3,
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "attributes": {"gen_ai.request.model": "claude-sonnet-4", "ambient.namespace": "team-a"},
    }
    values.update(overrides)
    return RunStart(**values)


def json_attr(span: ReceivedSpan, key: str) -> Any:
    return json.loads(span.attributes[key])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_turns(backend: LangfuseBackend, count: int) -> None:
    for number in range(count):
        root = backend.start_run(make_turn(turn_number=number))
        assert root is not None
        child = root.start_child("tool_Read", SpanKind.TOOL, input={"path": "/tmp/x"})
        child.end(output="text")
        root.end(output="done", usage=[TokenUsage(model="m", input_tokens=1, output_tokens=2)])


def test_backend_satisfies_protocol(langfuse_backend: Any) -> None:
    backend = langfuse_backend()
    assert isinstance(backend, TracingBackend)
    assert backend.name == "langfuse"
    backend.setup()
    root = backend.start_run(make_turn())
    assert isinstance(root, Span)
    assert len(root.trace_id) == 32 and root.trace_id == root.trace_id.lower()
    int(root.trace_id, 16)
    root.end()


def test_turn_with_tool_child(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn())
    assert root is not None
    tool = root.start_child(
        "tool_Read",
        SpanKind.TOOL,
        input={"file_path": "/etc/hosts"},
        attributes={"gen_ai.tool.call.id": "call-1"},
    )
    tool.end(output="127.0.0.1 localhost")
    root.end(
        output={"text": "the answer"},
        model="claude-sonnet-4",
        usage=[
            TokenUsage(
                model="claude-sonnet-4",
                input_tokens=10,
                output_tokens=5,
                total_tokens=15,
                cache_read_tokens=3,
                cache_write_tokens=4,
            )
        ],
    )
    backend.flush(5)
    spans = langfuse_receiver.wait_for_spans(2)

    by_name = {span.name: span for span in spans}
    turn, tool_span = by_name["llm_interaction"], by_name["tool_Read"]
    assert turn.trace_id == tool_span.trace_id == root.trace_id
    assert tool_span.parent_span_id == turn.span_id
    assert turn.attributes["langfuse.observation.type"] == "generation"
    assert tool_span.attributes["langfuse.observation.type"] == "span"  # the origin runner's type
    assert json_attr(turn, "langfuse.observation.input") == make_turn().input
    assert json_attr(turn, "langfuse.observation.output") == {"text": "the answer"}
    assert json_attr(tool_span, "langfuse.observation.input") == {"file_path": "/etc/hosts"}
    assert tool_span.attributes["langfuse.observation.output"] == "127.0.0.1 localhost"
    assert turn.attributes["langfuse.observation.model.name"] == "claude-sonnet-4"
    assert json_attr(turn, "langfuse.observation.usage_details") == {
        "input": 10,
        "output": 5,
        "total": 15,
        "cache_read_input_tokens": 3,
        "cache_creation_input_tokens": 4,
    }
    assert "langfuse.observation.usage_details" not in tool_span.attributes
    # turn attributes are root observation metadata, child attributes the child's
    assert turn.metadata("gen_ai.request.model") == "claude-sonnet-4"
    assert tool_span.metadata("gen_ai.tool.call.id") == "call-1"
    assert tool_span.start_ns >= turn.start_ns and tool_span.end_ns <= turn.end_ns


def test_trace_attributes_on_every_span(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn(run_id=None))
    assert root is not None
    step = root.start_child("step", SpanKind.STEP)
    thinking = step.start_child("thinking", SpanKind.REASONING)
    thinking.end(output="hmm")
    step.end()
    sub = root.start_child("subagent", SpanKind.SUBAGENT)
    gen = sub.start_child("gen", SpanKind.GENERATION)
    gen.end(model="m1", usage=[TokenUsage(model="m1", input_tokens=1)])
    sub.end()
    root.end()
    backend.flush(5)
    spans = langfuse_receiver.wait_for_spans(5)

    types = {span.name: span.attributes["langfuse.observation.type"] for span in spans}
    assert types == {
        "llm_interaction": "generation",
        "step": "span",
        "thinking": "span",
        "subagent": "agent",
        "gen": "generation",
    }
    for span in spans:
        attrs = span.attributes
        assert span.trace_id == root.trace_id
        assert attrs["session.id"] == "thread-1"
        assert attrs["user.id"] == "user-1"
        assert attrs["langfuse.trace.name"] == "llm_interaction"
        assert list(attrs["langfuse.trace.tags"]) == [
            "runner:claude-agent-sdk",
            "namespace:team-a",
            "model:claude-sonnet-4",
        ]
        assert span.metadata("runner_type", trace=True) == "claude-agent-sdk"
        assert span.metadata("turn", trace=True) == "3"
        assert span.metadata("thread_id", trace=True) == "thread-1"
        assert span.metadata("user_name", trace=True) == "Ada Lovelace"
        assert "langfuse.trace.metadata.run_id" not in attrs  # None values are dropped


def test_long_values_are_cut_to_fit(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn(user_name='"q"' * 150, thread_id="t" * 300))
    assert root is not None
    root.end()
    backend.flush(5)
    (span,) = langfuse_receiver.wait_for_spans(1)
    assert span.attributes["session.id"] == "t" * 198
    assert len(span.attributes["langfuse.trace.metadata.user_name"]) <= 200
    assert span.metadata("user_name", trace=True).startswith('"q"')


def test_chosen_trace_id_is_honoured(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    trace_id = uuid.uuid4().hex
    root = backend.start_run(make_turn(trace_id=trace_id.upper()))
    assert root is not None and root.trace_id == trace_id
    root.start_child("tool_Bash", SpanKind.TOOL).end()
    root.end()
    backend.flush(5)
    spans = langfuse_receiver.wait_for_spans(2)
    assert {span.trace_id for span in spans} == {trace_id}


def test_invalid_trace_id_is_replaced(langfuse_backend: Any, caplog: pytest.LogCaptureFixture) -> None:
    backend = langfuse_backend()
    with caplog.at_level(logging.WARNING, logger="ambient_tracing"):
        root = backend.start_run(make_turn(trace_id="not-a-trace-id"))
    assert root is not None and len(root.trace_id) == 32
    assert "invalid trace id" in caplog.text
    root.end()


def test_error_sets_level_and_status(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn())
    assert root is not None
    tool = root.start_child("tool_Bash", SpanKind.TOOL, input={"command": "false"})
    tool.end(error="exit code 1")
    root.end(error="run failed: RuntimeError")
    backend.flush(5)
    spans = {span.name: span for span in langfuse_receiver.wait_for_spans(2)}
    for name, message in (("tool_Bash", "exit code 1"), ("llm_interaction", "run failed: RuntimeError")):
        span = spans[name]
        assert span.attributes["langfuse.observation.level"] == "ERROR"
        assert span.attributes["langfuse.observation.status_message"] == message
        assert span.status_code == 2 and span.status_message == message  # OTel STATUS_CODE_ERROR


def test_set_input_and_end_attributes(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn())
    assert root is not None
    tool = root.start_child("tool_Write", SpanKind.TOOL)
    tool.set_input({"file_path": "a.txt"})
    tool.end(output="ok", attributes={"ambient.tool.category": "file"})
    root.end()
    backend.flush(5)
    spans = {span.name: span for span in langfuse_receiver.wait_for_spans(2)}
    assert json_attr(spans["tool_Write"], "langfuse.observation.input") == {"file_path": "a.txt"}
    assert spans["tool_Write"].metadata("ambient.tool.category") == "file"


def test_usage_of_one_model_is_summed(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn())
    assert root is not None
    root.end(
        usage=[
            TokenUsage(model="m", input_tokens=1, output_tokens=2, reasoning_tokens=1),
            TokenUsage(model="m", input_tokens=10, output_tokens=20),
        ]
    )
    backend.flush(5)
    (span,) = langfuse_receiver.wait_for_spans(1)
    usage = json_attr(span, "langfuse.observation.usage_details")
    assert usage == {"input": 11, "output": 22, "reasoning": 1}
    assert span.attributes["langfuse.observation.model.name"] == "m"


def test_usage_of_several_models(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn())
    assert root is not None
    root.end(
        usage=[
            TokenUsage(model="a", input_tokens=1, output_tokens=2),
            TokenUsage(model="b", provider="p", input_tokens=3),
        ]
    )
    backend.flush(5)
    (span,) = langfuse_receiver.wait_for_spans(1)
    assert json_attr(span, "langfuse.observation.usage_details") == {"input": 1, "output": 2}
    assert span.attributes["langfuse.observation.model.name"] == "a"
    assert span.metadata("usage_by_model") == [{"model": "b", "provider": "p", "input": 3}]


def test_end_is_idempotent(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend()
    root = backend.start_run(make_turn())
    assert root is not None
    tool = root.start_child("tool_Read", SpanKind.TOOL)
    tool.end(output="x")
    tool.end(output="y")
    tool.set_input({"late": True})  # after the end: ignored
    root.end()
    root.end(error="second end is ignored")
    backend.flush(5)
    spans = langfuse_receiver.wait_for_spans(2)
    time.sleep(0.2)
    assert len(langfuse_receiver.spans) == 2
    turn = next(span for span in spans if span.name == "llm_interaction")
    assert "langfuse.observation.level" not in turn.attributes
    tool_span = next(span for span in spans if span.name == "tool_Read")
    assert tool_span.attributes["langfuse.observation.output"] == "x"
    assert "langfuse.observation.input" not in tool_span.attributes


def test_with_an_sdk_client_end_is_idempotent_and_never_raises(
    langfuse_receiver: LangfuseReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    backend = sdk_langfuse_backend(langfuse_receiver)
    root = backend.start_run(make_turn())
    assert root is not None
    tool = root.start_child("tool_Read", SpanKind.TOOL)

    def broken(**_: Any) -> None:
        raise RuntimeError("sdk broke")

    tool._obs.update = broken  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="ambient_tracing"):
        tool.set_input({"a": 1})
        tool.end(output="x")
        tool.end(output="y")
    assert len([r for r in caplog.records if "tool_Read" in r.getMessage()]) == 1
    root.end()
    root.end(error="second end is ignored")
    backend.flush(5)
    spans = langfuse_receiver.wait_for_spans(2)
    time.sleep(0.2)
    assert len(langfuse_receiver.spans) == 2
    turn = next(span for span in spans if span.name == "llm_interaction")
    assert "langfuse.observation.level" not in turn.attributes
    backend.shutdown()


def test_sampled_out_turn_returns_none(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    sampled_out = langfuse_backend(sample_rate=0.0)
    assert sampled_out.start_run(make_turn()) is None
    assert sampled_out.start_run(make_turn(trace_id=uuid.uuid4().hex)) is None
    sampled_out.flush(5)
    # the same receiver still gets a sampled backend's spans: nothing was lost on the way
    sampled = langfuse_backend(sample_rate=1.0)
    root = sampled.start_run(make_turn())
    assert root is not None
    root.end()
    sampled.flush(5)
    spans = langfuse_receiver.wait_for_spans(1)
    assert [span.trace_id for span in spans] == [root.trace_id]


def test_backends_with_one_key_export_to_their_own_hosts(langfuse_receiver: LangfuseReceiver) -> None:
    key = uuid.uuid4().hex[:8]
    with LangfuseReceiver() as other:
        backends = [
            LangfuseBackend(
                public_key=f"pk-{key}",
                secret_key=f"sk-{key}",
                host=receiver.base_url,
                flush_at=1,
                flush_interval=0.05,
                flush_timeout=5,
            )
            for receiver in (langfuse_receiver, other)
        ]
        try:
            ids = []
            for backend in backends:
                root = backend.start_run(make_turn())
                assert root is not None
                root.end()
                ids.append(root.trace_id)
                backend.flush(5)
            assert [s.trace_id for s in langfuse_receiver.wait_for_spans(1)] == [ids[0]]
            assert [s.trace_id for s in other.wait_for_spans(1)] == [ids[1]]
        finally:
            for backend in backends:
                backend.shutdown()


def test_given_client_is_used(langfuse_receiver: LangfuseReceiver) -> None:
    backend = sdk_langfuse_backend(langfuse_receiver)
    root = backend.start_run(make_turn())
    assert root is not None
    root.end()
    backend.flush(5)
    assert [s.trace_id for s in langfuse_receiver.wait_for_spans(1)] == [root.trace_id]
    backend.shutdown()


def test_foreign_current_span_is_left_alone(
    langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    foreign = TracerProvider().get_tracer("app").start_span("http request")
    backend = langfuse_backend()
    with use_span(foreign, end_on_exit=True):
        root = backend.start_run(make_turn())
        assert root is not None
        root.start_child("tool_Read", SpanKind.TOOL).end()
        root.end()
    backend.flush(5)
    spans = {span.name: span for span in langfuse_receiver.wait_for_spans(2)}
    assert root.trace_id != format(foreign.get_span_context().trace_id, "032x")
    assert spans["llm_interaction"].parent_span_id is None
    assert "session.id" not in (foreign.attributes or {})  # type: ignore[attr-defined]


def test_refusing_host_never_blocks(langfuse_backend: Any) -> None:
    backend = langfuse_backend(host=f"http://127.0.0.1:{closed_port()}", timeout=1, flush_at=512)
    started = time.perf_counter()
    run_turns(backend, 50)
    assert time.perf_counter() - started < 0.5
    started = time.perf_counter()
    backend.flush(0.5)
    assert time.perf_counter() - started < 1.5


def test_hanging_host_never_blocks(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    langfuse_receiver.mode = "hang"
    backend = langfuse_backend(timeout=1, flush_at=512)
    started = time.perf_counter()
    run_turns(backend, 50)
    assert time.perf_counter() - started < 0.5
    started = time.perf_counter()
    backend.flush(0.5)
    assert time.perf_counter() - started < 1.5
    assert langfuse_receiver.spans == []


def test_unavailable_host_never_raises(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    langfuse_receiver.mode = "503"
    backend = langfuse_backend(timeout=1, flush_at=512)
    run_turns(backend, 5)
    backend.flush(3)
    assert ("POST", "/api/public/otel/v1/traces") in langfuse_receiver.requests
    assert langfuse_receiver.spans == []


def test_environment_and_scores(langfuse_backend: Any, langfuse_receiver: LangfuseReceiver) -> None:
    backend = langfuse_backend(environment="staging")
    root = backend.start_run(make_turn())
    assert root is not None
    root.end()
    backend.client.create_score(
        name="user-feedback", value=1, data_type="BOOLEAN", trace_id=root.trace_id, comment="great"
    )
    backend.flush(5)
    (span,) = langfuse_receiver.wait_for_spans(1)
    assert span.attributes["langfuse.environment"] == "staging"
    (score,) = langfuse_receiver.wait_for_scores(1)
    assert (score["name"], score["traceId"], score["comment"]) == ("user-feedback", root.trace_id, "great")
    assert score["value"] == 1 and score["dataType"] == "BOOLEAN"


def test_receiver_answers_unknown_routes_with_404(langfuse_receiver: LangfuseReceiver) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{langfuse_receiver.base_url}/api/public/projects", timeout=5)
    assert raised.value.code == 404
    assert json.loads(raised.value.read())["message"].startswith("no route")
