"""Middleware + real Langfuse SDK over real HTTP: what Langfuse receives for an AG-UI run."""

from __future__ import annotations

import json
from typing import Any

from ambient_tracing import Observability, TracingMiddleware
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.server import serve


async def test_a_run_becomes_a_langfuse_trace_under_the_id_the_stream_announces(
    langfuse_receiver: LangfuseReceiver, langfuse_backend: Any
) -> None:
    obs = Observability([langfuse_backend()], runner_type="pydantic-ai", mask_messages=False)
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        streamed = await post_run(
            url,
            run_input("thread-1", "run-1"),
            headers={"x-current-user-id": "alice", "x-current-user-name": "Alice"},
        )
    [trace_id] = streamed.trace_ids
    assert streamed.types[:2] == ["RUN_STARTED", "CUSTOM"]

    spans = langfuse_receiver.wait_for_spans(
        lambda s: {"llm_interaction", "tool_search"} <= {x.name for x in s}
    )
    by_name = {span.name: span for span in spans if span.trace_id == trace_id}
    root, tool = by_name["llm_interaction"], by_name["tool_search"]
    assert tool.parent_span_id == root.span_id
    for span in (root, tool):
        attributes = span.attributes
        assert attributes["session.id"] == "thread-1"
        assert attributes["user.id"] == "alice"
        assert list(attributes["langfuse.trace.tags"]) == ["runner:pydantic-ai"]
        assert attributes["langfuse.trace.name"] == "llm_interaction"
        assert span.metadata("runner_type", trace=True) == "pydantic-ai"
    assert root.attributes["langfuse.observation.input"] == "What is the meaning of life?"
    assert root.attributes["langfuse.observation.output"] == "The answer is 42. "
    assert json.loads(root.attributes["langfuse.observation.usage_details"]) == {
        "input": 12,
        "output": 7,
        "total": 19,
    }
    assert root.attributes["langfuse.observation.model.name"] == "scripted-model"
    assert root.attributes.get("langfuse.observation.level", "DEFAULT") == "DEFAULT"
    assert root.metadata("gen_ai.conversation.id") == "thread-1"
    assert json.loads(tool.attributes["langfuse.observation.input"]) == {"query": "life"}
    assert tool.attributes["langfuse.observation.output"] == "42"
    assert tool.attributes["langfuse.observation.type"] == "span"  # the origin runner's type
    assert tool.metadata("tool_name") == "search" and tool.metadata("is_error") in (False, "false")
    assert obs.last_trace_id("thread-1") == trace_id
    await obs.aclose()


async def test_run_error_sets_error_level_with_the_message(
    langfuse_receiver: LangfuseReceiver, langfuse_backend: Any
) -> None:
    def failing(body: dict[str, Any]) -> list[bytes]:
        return [
            b'data: {"type":"RUN_STARTED","threadId":"t","runId":"r"}\n\n',
            b'data: {"type":"RUN_ERROR","message":"rate limited","code":"429"}\n\n',
        ]

    obs = Observability([langfuse_backend()])
    with serve(TracingMiddleware(agui_app(raw=failing), observability=obs)) as url:
        streamed = await post_run(url, run_input("t", "r"))
    [trace_id] = streamed.trace_ids
    [root] = langfuse_receiver.wait_for_spans(lambda s: any(x.trace_id == trace_id for x in s))
    assert root.attributes["langfuse.observation.level"] == "ERROR"
    assert root.attributes["langfuse.observation.status_message"] == "429: rate limited"
    await obs.aclose()


async def test_masking_is_on_by_default(langfuse_receiver: LangfuseReceiver, langfuse_backend: Any) -> None:
    obs = Observability([langfuse_backend()])
    long_question = "Please tell me, in great detail, what the meaning of life is?"
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        streamed = await post_run(url, run_input("t", "r", long_question))
    [trace_id] = streamed.trace_ids
    spans = langfuse_receiver.wait_for_spans(lambda s: sum(x.trace_id == trace_id for x in s) >= 2)
    root = next(span for span in spans if span.name == "llm_interaction")
    assert root.attributes["langfuse.observation.input"] == "[REDACTED FOR PRIVACY]"
    assert root.attributes["langfuse.observation.output"] == "The answer is 42. "
    await obs.aclose()


async def test_sampled_out_runs_get_no_id_event(langfuse_backend: Any) -> None:
    obs = Observability([langfuse_backend(sample_rate=0.0)])
    with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
        streamed = await post_run(url, run_input("t", "r"))
    assert streamed.trace_ids == []
    assert "CUSTOM" not in streamed.types
    await obs.aclose()


async def test_a_json_tool_payload_reaches_langfuse_as_written_unless_masking_changes_it(
    langfuse_receiver: LangfuseReceiver, langfuse_backend: Any
) -> None:
    # Compact JSON, as no json.dumps default writes it: what arrives is the producer's own text.
    clean = json.dumps(
        {"results": [{"title": f"Forecast {i}", "summary": "rain"} for i in range(6)]}, separators=(",", ":")
    )
    leaky = json.dumps({"note": "a secret longer than the fifty characters that masking keeps"})

    def frames(body: dict[str, Any]) -> list[bytes]:
        def event(**fields: Any) -> bytes:
            return b"data: " + json.dumps(fields, separators=(",", ":")).encode() + b"\n\n"

        return [
            event(type="RUN_STARTED", threadId="t", runId="r"),
            event(type="TOOL_CALL_START", toolCallId="c1", toolCallName="clean"),
            event(type="TOOL_CALL_ARGS", toolCallId="c1", delta='{"city":"Paris"}'),
            event(type="TOOL_CALL_END", toolCallId="c1"),
            event(type="TOOL_CALL_RESULT", messageId="m1", toolCallId="c1", content=clean),
            event(type="TOOL_CALL_START", toolCallId="c2", toolCallName="leaky"),
            event(type="TOOL_CALL_END", toolCallId="c2"),
            event(type="TOOL_CALL_RESULT", messageId="m2", toolCallId="c2", content=leaky),
            event(type="RUN_FINISHED", threadId="t", runId="r"),
        ]

    obs = Observability([langfuse_backend()])  # masking on, the default
    with serve(TracingMiddleware(agui_app(raw=frames), observability=obs)) as url:
        streamed = await post_run(url, run_input("t", "r"))
    [trace_id] = streamed.trace_ids
    spans = langfuse_receiver.wait_for_spans(lambda s: sum(x.trace_id == trace_id for x in s) >= 3)
    tools = {span.name: span.attributes for span in spans if span.trace_id == trace_id}
    assert tools["tool_clean"]["langfuse.observation.output"] == clean
    assert tools["tool_clean"]["langfuse.observation.input"] == '{"city":"Paris"}'
    assert json.loads(tools["tool_leaky"]["langfuse.observation.output"]) == {
        "note": "[REDACTED FOR PRIVACY]"
    }
    await obs.aclose()
