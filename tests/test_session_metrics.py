"""Session metrics: what a thread's conversation adds up to, and when its ``Session Metrics`` span goes out.

Unit tests use the in-memory RecordingBackend; the end-to-end test sends a conversation through the
middleware over HTTP to a real ``mlflow server`` and the Langfuse SDK (loopback receiver) at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from ambient_tracing import ModelPrice, Observability, TracingConfig, TracingMiddleware
from ambient_tracing.backends.base import TokenUsage
from ambient_tracing.privacy import REDACTED
from ambient_tracing.session_metrics.metrics import SessionMetrics
from ambient_tracing.session_metrics.pricing import Pricing, TokenCounts
from ambient_tracing.testing import RecordingBackend
from ambient_tracing.tool_signals import default_tool_category, tool_failure_reason
from ambient_tracing.tracer.handlers import StreamTracer
from ambient_tracing.tracer.request import RunRequest
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.fixtures_mlflow import wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.server import serve

pytestmark = pytest.mark.timeout(120)

SONNET = "claude-sonnet-4-5-20250929"


# -- a conversation: tools, failures, a clarification, an interrupt, a run error -------------------


def _tool(call_id: str, name: str, result: str | None = None) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"type": "TOOL_CALL_START", "toolCallId": call_id, "toolCallName": name},
        {"type": "TOOL_CALL_ARGS", "toolCallId": call_id, "delta": "{}"},
        {"type": "TOOL_CALL_END", "toolCallId": call_id},
    ]
    if result is not None:
        events.append(
            {
                "type": "TOOL_CALL_RESULT",
                "toolCallId": call_id,
                "messageId": f"{call_id}-r",
                "content": result,
            }
        )
    return events


def _text(message_id: str, text: str) -> list[dict[str, Any]]:
    return [
        {"type": "TEXT_MESSAGE_START", "messageId": message_id, "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": message_id, "delta": text},
        {"type": "TEXT_MESSAGE_END", "messageId": message_id},
    ]


def conversation(thread: str) -> list[list[dict[str, Any]]]:
    """Three runs of one thread, as three requests would stream them."""
    start = [{"type": "RUN_STARTED", "threadId": thread, "runId": f"r{n}"} for n in (1, 2, 3)]
    return [
        [
            start[0],
            *_tool("c1", "search", "42"),
            *_tool("c2", "mcp__github__create_issue", json.dumps({"error": "403 Forbidden: no scope\nmore"})),
            *_tool("c3", "Bash", "Error: command not found: foo\n  at line 1"),
            *_text("m1", "Done."),
            {
                "type": "RUN_FINISHED",
                "threadId": thread,
                "runId": "r1",
                "usage": [
                    {
                        "model": SONNET,
                        "inputTokens": 1000,
                        "outputTokens": 200,
                        "cachedInputTokens": 400,
                        "cacheWriteInputTokens": 100,
                        "reasoningTokens": 50,
                    }
                ],
            },
        ],
        [
            start[1],
            *_text("m2", "Which repository do you mean?"),
            *_tool("c4", "AskUserQuestion"),
            {
                "type": "RUN_FINISHED",
                "threadId": thread,
                "runId": "r2",
                "outcome": {
                    "type": "interrupt",
                    "interrupts": [{"id": "i1", "reason": "clarification", "toolCallId": "c4"}],
                },
                "usage": [{"model": "gpt-4o-mini", "inputTokens": 500, "outputTokens": 100}],
            },
        ],
        [
            start[2],
            *_tool("c5", "mcp__github__get_issue"),
            {"type": "RUN_ERROR", "message": "upstream timeout\nTraceback ..."},
        ],
    ]


# sonnet: (1000-400-100)*3 + 400*0.3 + 100*3.75 + 200*15; gpt-4o-mini: 500*0.15 + 100*0.6 (USD / 1M)
EXPECTED_COST = round((1500 + 120 + 375 + 3000 + 75 + 60) / 1_000_000, 6)
EXPECTED_COUNTS: dict[str, Any] = {
    "runs": 3,
    "tool_calls": {"search": 1, "github": 2, "Bash": 1, "AskUserQuestion": 1},
    "tool_calls_total": 5,
    "tool_failures": {"github": 2, "Bash": 1},
    "tool_failures_total": 3,
    "tool_failure_reasons": {
        "github": {"403 Forbidden: no scope": 1, "upstream timeout": 1},
        "Bash": {"Error: command not found: foo": 1},
    },
    "run_errors": 1,
    "clarifications": 1,
    "interrupts": 1,
    "cancellations": 0,
    "tokens": {
        "input": 1500,
        "output": 300,
        "cache_read": 400,
        "cache_write": 100,
        "reasoning": 50,
        "total": 1800,
    },
    "models": [SONNET, "gpt-4o-mini"],
    "estimated_cost_usd": EXPECTED_COST,
    "unpriced_models": [],
}


def feed(obs: Observability, runs: list[list[dict[str, Any]]], *, user: str = "alice") -> None:
    """Trace ``runs`` on the tracer worker, as the doors do (Session Metrics live there)."""

    def trace() -> None:
        for events in runs:
            tracer = StreamTracer(obs.runs, RunRequest(thread_id=events[0]["threadId"], user_id=user))
            for event in events:
                tracer.on_event(event)
            tracer.close()

    on_worker(obs, trace)


def on_worker(obs: Observability, call: Callable[[], Any]) -> Any:
    return obs.tracer_worker.call(call).result(5)


def assert_counts(report: dict[str, Any]) -> None:
    for key, value in EXPECTED_COUNTS.items():
        assert report[key] == value, key


def _json(value: Any) -> Any:
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- the accumulator and what is emitted ----------------------------------------------------------


async def test_a_conversation_adds_up_to_one_report_on_end_session() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], runner_type="pydantic-ai", session_idle_seconds=None)
    feed(obs, conversation("t1"))
    assert backend.records == []

    assert await obs.end_session("t1") is True
    [record] = backend.records
    assert record["name"] == "Session Metrics"
    assert (record["thread_id"], record["user_id"], record["runner_type"]) == ("t1", "alice", "pydantic-ai")
    assert record["metadata"]["source"] == "ambient-runner-metrics"
    assert record["metadata"]["runner_type"] == "pydantic-ai"
    assert_counts(record["output"])
    assert_counts(record["metadata"])
    assert record["output"]["tokens_by_model"]["gpt-4o-mini"]["input"] == 500
    assert record["output"]["period_start"] <= record["output"]["period_end"]

    assert await obs.end_session("t1") is False  # nothing new: nothing emitted
    await obs.aclose()
    assert len(backend.records) == 1


async def test_each_report_holds_only_what_happened_since_the_last() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], session_idle_seconds=None)
    feed(obs, conversation("t")[:1])
    await obs.end_session("t")
    feed(obs, conversation("t")[2:])
    await obs.aclose()
    first, second = (record["output"] for record in backend.records)
    assert first["tool_calls_total"] == 3 and first["run_errors"] == 0
    assert second["runs"] == 1 and second["tool_calls"] == {"github": 1}
    assert second["tool_failure_reasons"] == {"github": {"upstream timeout": 1}}
    assert second["tokens"]["total"] == 0 and second["estimated_cost_usd"] is None


async def test_aclose_reports_every_active_thread_before_flushing_and_only_those() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], session_idle_seconds=None)
    feed(obs, conversation("a")[:1])
    feed(obs, conversation("b")[1:2])
    feed(obs, conversation("c")[:1])
    await obs.end_session("c")  # already reported: nothing more at shutdown
    open_run = StreamTracer(obs.runs, RunRequest(thread_id="d"))
    on_worker(obs, lambda: open_run.on_event({"type": "RUN_STARTED", "threadId": "d", "runId": "r"}))
    on_worker(obs, lambda: open_run.on_event(_tool("x", "Read")[0]))

    await obs.aclose()
    by_thread = {record["thread_id"]: record for record in backend.records}
    assert sorted(by_thread) == ["a", "b", "c", "d"]
    assert len(backend.records) == 4
    assert all(record["flushed_before"] == 0 for record in backend.records[1:])  # before the flush
    assert backend.flushed == 1
    assert by_thread["d"]["output"]["tool_calls"] == {"Read": 1}  # the run ended by shutdown counts
    assert by_thread["b"]["output"]["interrupts"] == 1
    assert await obs.end_session("a") is False


async def test_an_idle_thread_is_reported_once_and_a_running_one_not_at_all() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], session_idle_seconds=0.2)
    feed(obs, conversation("idle")[:1])
    running = StreamTracer(obs.runs, RunRequest(thread_id="busy"))
    on_worker(obs, lambda: running.on_event({"type": "RUN_STARTED", "threadId": "busy", "runId": "r"}))

    await until(lambda: len(backend.records) == 1)
    assert backend.records[0]["thread_id"] == "idle"
    await asyncio.sleep(0.5)  # well past the idle time again: no second report, busy still open
    assert [record["thread_id"] for record in backend.records] == ["idle"]

    on_worker(obs, lambda: running.on_event({"type": "RUN_FINISHED", "threadId": "busy", "runId": "r"}))
    await until(lambda: len(backend.records) == 2)
    assert backend.records[1]["thread_id"] == "busy" and backend.records[1]["output"]["runs"] == 1
    assert await obs.end_session("idle") is False
    await obs.aclose()
    assert len(backend.records) == 2


async def test_idle_reports_survive_a_change_of_event_loop() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], session_idle_seconds=0.2)

    async def elsewhere() -> None:
        feed(obs, conversation("a")[:1])  # from a loop that then stops: the worker's tick reports it

    await asyncio.to_thread(asyncio.run, elsewhere())
    feed(obs, conversation("b")[:1])
    await until(lambda: len(backend.records) == 2)
    assert sorted(record["thread_id"] for record in backend.records) == ["a", "b"]
    await obs.aclose()


async def test_idle_reports_off_and_metrics_off() -> None:
    quiet, off = RecordingBackend(), RecordingBackend()
    obs_quiet = Observability([quiet], session_idle_seconds=0)
    obs_off = Observability([off], session_metrics=False)
    feed(obs_quiet, conversation("t")[:1])
    feed(obs_off, conversation("t")[:1])
    await asyncio.sleep(0.3)
    assert quiet.records == [] and off.records == []
    assert await obs_off.end_session("t") is False
    await obs_quiet.aclose()
    await obs_off.aclose()
    assert len(quiet.records) == 1 and off.records == []


async def test_a_backend_that_fails_to_record_does_not_stop_the_others() -> None:
    class Failing(RecordingBackend):
        name = "failing"

        def record_span(self, name: str, **kwargs: Any) -> None:
            raise RuntimeError("down")

    backend = RecordingBackend()
    obs = Observability([Failing(), backend], session_idle_seconds=None)
    feed(obs, conversation("t")[:1])
    assert await obs.end_session("t") is True
    assert len(backend.records) == 1
    await obs.aclose()


async def test_own_categoriser_clarification_names_and_pricing() -> None:
    def category(name: str) -> str:
        if name == "Bash":
            raise ValueError("a broken categoriser falls back to the default")
        return "files" if name in ("Read", "Write") else default_tool_category(name).lower()

    backend = RecordingBackend()
    obs = Observability(
        [backend],
        session_idle_seconds=None,
        tool_category=category,
        clarification_names=["pick_option"],
        pricing={"claude-sonnet-4-5": ModelPrice(input=1.0, output=1.0, cache_read=1.0, cache_write=1.0)},
    )
    start = {"type": "RUN_STARTED", "threadId": "t", "runId": "r"}
    finish = {
        "type": "RUN_FINISHED",
        "threadId": "t",
        "runId": "r",
        "usage": [{"model": SONNET, "inputTokens": 1_000_000, "outputTokens": 1_000_000}],
    }
    tools = [*_tool("1", "Read", "ok"), *_tool("2", "Write", "ok"), *_tool("3", "Bash", "ok")]
    feed(obs, [[start, *tools, *_tool("4", "mcp__ui__pick_option"), *_tool("5", "AskUserQuestion"), finish]])
    await obs.aclose()
    [record] = backend.records
    report = record["output"]
    assert report["tool_calls"] == {"files": 2, "Bash": 1, "ui": 1, "askuserquestion": 1}
    assert report["clarifications"] == 1  # only the configured name
    assert report["estimated_cost_usd"] == 2.0


async def test_masking_redacts_long_failure_reasons() -> None:
    backend = RecordingBackend()
    obs = Observability([backend], session_idle_seconds=None)  # mask_messages defaults to on
    reason = "Error: " + "x" * 80
    start = {"type": "RUN_STARTED", "threadId": "t", "runId": "r"}
    feed(obs, [[start, *_tool("1", "Bash", reason), {"type": "RUN_FINISHED", "threadId": "t", "runId": "r"}]])
    await obs.aclose()
    [(shown, count)] = backend.records[0]["output"]["tool_failure_reasons"]["Bash"].items()
    assert (shown, count) == (REDACTED, 1)


def test_accumulator_without_observability() -> None:
    metrics = SessionMetrics("t")
    metrics.run_started("u")
    metrics.tool_started("a", "mcp__db__query")
    metrics.tool_result("a", {"content": [{"type": "text", "text": "Error: relation missing"}]})
    metrics.run_finished({"type": "cancelled"})
    metrics.run_ended([TokenUsage(model="unknown-model-x", input_tokens=10, output_tokens=5)])
    assert metrics.active and metrics.open_runs == 0
    report = metrics.report(Pricing())
    assert report["tool_failure_reasons"] == {"db": {"Error: relation missing": 1}}
    assert report["cancellations"] == 1
    assert report["estimated_cost_usd"] is None and report["unpriced_models"] == ["unknown-model-x"]
    assert not metrics.active
    assert metrics.report(Pricing())["runs"] == 0


# -- recognising categories, failures and prices ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("mcp__github__create_issue", "github"),
        ("mcp__my-server__do", "my-server"),
        ("Read", "Read"),
        ("mcp__nodelimiter", "mcp__nodelimiter"),
        ("mcp____x", "mcp____x"),
    ],
)
def test_default_tool_category(name: str, category: str) -> None:
    assert default_tool_category(name) == category


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"content": "42"}, None),
        ({"content": "Errors found: 0"}, None),
        ({"content": "No error here"}, None),
        ({"content": '{"result": "error free"}'}, None),
        ({"content": "Error: boom\nstack"}, "Error: boom"),
        ({"content": "  error - lowercase"}, "error - lowercase"),
        ({"content": "<tool_use_error>File does not exist.</tool_use_error>"}, "File does not exist."),
        ({"content": '{"error": "rate limited"}'}, "rate limited"),
        ({"content": '{"error": {"message": "bad input", "code": 400}}'}, "bad input"),
        ({"content": '{"isError": true, "content": [{"type": "text", "text": "mcp failed"}]}'}, "mcp failed"),
        ({"content": "partial output", "isError": True}, "partial output"),
        ({"content": "", "error": "timeout after 30 s"}, "timeout after 30 s"),
        ({"content": [{"type": "text", "text": "Error: in a part"}]}, "Error: in a part"),
        ({"content": "Error: " + "y" * 300}, "Error: " + "y" * 113),
    ],
)
def test_tool_failure_reason(event: dict[str, Any], reason: str | None) -> None:
    assert tool_failure_reason({"type": "TOOL_CALL_RESULT", "toolCallId": "c", **event}) == reason


@pytest.mark.parametrize(
    ("model", "input_price"),
    [
        ("gpt-4o", 2.5),
        ("gpt-4o-mini-2024-07-18", 0.15),  # the longest prefix wins
        ("GPT-4.1-MINI", 0.4),
        ("openai:gpt-4o", 2.5),
        ("anthropic/claude-sonnet-4-5", 3.0),
        ("us.anthropic.claude-opus-4-1-20250805-v1:0", 15.0),
        ("claude-opus-4-5-20251101", 5.0),
        ("gemini-2.5-flash", 0.3),
        ("mistral-large-latest", 2.0),
        ("llama-3-70b", None),
        ("", None),
    ],
)
def test_default_prices_by_longest_prefix(model: str, input_price: float | None) -> None:
    price = Pricing().price(model)
    assert (price.input if price else None) == input_price


def test_pricing_override_and_cost() -> None:
    mine = Pricing({"gpt-4o": ModelPrice(1.0, 2.0), "my-model": ModelPrice(10.0, 20.0, cache_read=1.0)})
    assert mine.price("gpt-4o-2024-11-20") == ModelPrice(1.0, 2.0)
    assert mine.price("gpt-4o-mini") == Pricing().price("gpt-4o-mini")  # defaults kept
    only_mine = Pricing({"my-model": ModelPrice(10.0, 20.0)}, include_defaults=False)
    assert only_mine.price("gpt-4o") is None
    assert only_mine.cost("gpt-4o", TokenCounts(input=1)) is None

    # AG-UI accounting: cache counts are parts of input; a cache price left None is the input price.
    tokens = TokenCounts(input=1_000_000, output=500_000, cache_read=200_000, cache_write=300_000)
    assert mine.cost("my-model", tokens) == pytest.approx(
        (500_000 * 10 + 200_000 * 1 + 300_000 * 10 + 500_000 * 20) / 1e6
    )
    with pytest.raises(TypeError):
        Pricing({"x": (1.0, 2.0)})  # type: ignore[dict-item]


def test_idle_seconds_from_the_environment() -> None:
    assert TracingConfig.from_env({}).session_idle_seconds == 900.0
    assert TracingConfig.from_env({"SESSION_METRICS_IDLE_SECONDS": "60"}).session_idle_seconds == 60.0
    assert TracingConfig.from_env({"SESSION_METRICS_IDLE_SECONDS": "0"}).session_idle_seconds is None


# -- both real backends ---------------------------------------------------------------------------


async def test_the_conversation_reaches_langfuse_and_mlflow_as_session_metrics(
    mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    from mlflow import MlflowClient

    mlflow_side = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], runner_type="pydantic-ai")
    runs = {events[0]["runId"]: events for events in conversation("thread-sm")}

    def raw(body: dict[str, Any]) -> list[bytes]:
        return [f"data: {json.dumps(event)}\n\n".encode() for event in runs[body["runId"]]]

    with serve(TracingMiddleware(agui_app(raw=raw), observability=obs)) as url:
        for run_id in runs:
            await post_run(url, run_input("thread-sm", run_id), headers={"x-current-user-id": "alice"})
    assert await obs.end_session("thread-sm") is True
    await obs.aclose()

    # Langfuse: one observation named Session Metrics in the thread's session, counts in its metadata.
    spans = langfuse_receiver.wait_for_spans(lambda s: any(x.name == "Session Metrics" for x in s))
    [span] = [s for s in spans if s.name == "Session Metrics"]
    turn_traces = {s.trace_id for s in spans if s.name == "llm_interaction"}
    assert len(turn_traces) == 3 and span.trace_id not in turn_traces
    assert obs.last_trace_id("thread-sm") in turn_traces  # feedback still resolves to a run, not to this
    assert span.attributes["session.id"] == "thread-sm"
    assert span.attributes["user.id"] == "alice"
    assert span.attributes["langfuse.trace.name"] == "Session Metrics"
    assert span.metadata("source") == "ambient-runner-metrics"
    assert span.metadata("runner_type") == "pydantic-ai"
    assert_counts({key: _json(span.metadata(key)) for key in EXPECTED_COUNTS})  # the SDK sends "3" for 3
    assert_counts(json.loads(span.attributes["langfuse.observation.output"]))

    # MLflow: its own trace, root span Session Metrics, in the thread's session.
    client = MlflowClient(tracking_uri=mlflow_side.tracking_uri)
    deadline = time.monotonic() + 30
    while not (
        found := client.search_traces(
            locations=[mlflow_side.experiment_id],
            filter_string="tags.`ambient.source` = 'ambient-runner-metrics'",
        )
    ):
        assert time.monotonic() < deadline, "Session Metrics trace not in MLflow"
        await asyncio.sleep(0.1)
    [info] = [trace.info for trace in found]
    trace = wait_for_trace(mlflow_side.tracking_uri, info.trace_id, lambda t: len(t.data.spans) == 1)
    assert trace.info.tags["ambient.thread_id"] == "thread-sm"
    assert trace.info.trace_metadata["mlflow.trace.session"] == "thread-sm"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "alice"
    [root] = trace.data.spans
    assert root.name == "Session Metrics" and root.parent_id is None
    assert root.attributes["source"] == "ambient-runner-metrics"
    assert root.attributes["runner_type"] == "pydantic-ai"
    assert_counts(root.attributes)
    assert_counts(root.outputs)
