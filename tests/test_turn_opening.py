"""The package chooses each run's trace id and opens vendor turns off the event loop.

A vendor SDK that hangs while a turn opens must not delay the stream or other requests (issue 8):
tested over real HTTP (uvicorn on 127.0.0.1) with a backend whose ``start_run`` blocks, and with
the real MLflow SDK (sqlite store) adopting the package's id.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.base import RunStart
from ambient_tracing.ids import new_trace_id, parse_trace_id, sampled, trace_id_from_seed
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import agui_app, run_input, scripted_run
from tests.support.client import post_run
from tests.support.fixtures_langfuse import sdk_langfuse_backend
from tests.support.fixtures_mlflow import MlflowServer, wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.server import serve

HANG_SECONDS = 10.0


class HangingBackend(RecordingBackend):
    """A vendor-like backend (deferred) whose SDK hangs in ``start_run`` until released."""

    name = "hanging"
    defer_spans = True

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.opened_on: set[str] = set()

    def start_run(self, turn: RunStart) -> Any:
        self.opened_on.add(threading.current_thread().name)
        self.entered.set()
        self.release.wait(HANG_SECONDS)
        return super().start_run(turn)


def _turn(trace_id: str | None) -> RunStart:
    return RunStart(
        thread_id="t-id",
        run_id="r-id",
        user_id="u",
        user_name=None,
        runner_type="test",
        turn_number=1,
        input="hi",
        trace_id=trace_id,
    )


def test_trace_ids_are_random_valid_and_parse_caller_choices() -> None:
    ids = {new_trace_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(parse_trace_id(i) == i for i in ids)
    chosen = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parse_trace_id(chosen.upper()) == chosen
    assert parse_trace_id(f"00-{chosen}-00f067aa0ba902b7-01") == chosen  # W3C traceparent
    for bad in (
        "",
        "0" * 32,
        "xyz",
        chosen[:-1],
        chosen + "0",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "a" * 10_000,
    ):
        assert parse_trace_id(bad) is None
    assert trace_id_from_seed("run-1") == trace_id_from_seed("run-1") != trace_id_from_seed("run-2")


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_sampling_on_the_loop_agrees_with_opentelemetry(rate: float) -> None:
    sampler = TraceIdRatioBased(rate)
    for _ in range(500):
        trace_id = new_trace_id()
        decision = sampler.should_sample(None, int(trace_id, 16), "x").decision.is_sampled()
        assert sampled(trace_id, rate) is decision


async def test_a_hanging_sdk_at_turn_opening_delays_neither_the_stream_nor_other_requests() -> None:
    backend = HangingBackend()
    obs = Observability([backend])
    try:
        with serve(TracingMiddleware(agui_app(), observability=obs)) as url:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30)) as client:
                started = time.monotonic()
                first = await post_run(url, run_input("t-hang", "r-1"), client=client)
                assert backend.entered.wait(5)  # the SDK is now stuck in start_run
                second = await post_run(url, run_input("t-hang", "r-2"), client=client)
                health = await client.get(f"{url}/health")
                elapsed = time.monotonic() - started
        assert elapsed < HANG_SECONDS / 2  # nobody waited for the hanging SDK
        assert health.status_code == 200
        for streamed, run in ((first, "r-1"), (second, "r-2")):
            [trace_id] = streamed.trace_ids  # announced before the SDK answered
            expected = [e.type.value for e in scripted_run("t-hang", run)]
            assert [t for t in streamed.types if t != "CUSTOM"] == expected  # the run streamed intact
            assert parse_trace_id(trace_id) == trace_id
        backend.release.set()
        assert await asyncio.to_thread(obs.spans.worker.drain, 15)
        assert [turn.trace_id for turn in backend.runs] == [first.trace_ids[0], second.trace_ids[0]]
        assert backend.opened_on == {"ambient-tracing-spans"}
        assert all(turn.ended == 1 for turn in backend.runs)
    finally:
        backend.release.set()
        await obs.aclose()


async def test_a_caller_chosen_trace_id_is_used_and_an_invalid_one_replaced() -> None:
    backend = RecordingBackend()
    obs = Observability([backend])
    chosen = "4bf92f3577b34da6a3ce929d0e0e4736"
    turn = obs.runs.open(
        thread_id="t",
        run_id="r",
        user_id=None,
        user_name=None,
        input="x",
        trace_id=f"00-{chosen}-00f067aa0ba902b7-01",
    )
    assert turn is not None and turn.trace_id == chosen == backend.runs[0].trace_id
    other = obs.runs.open(
        thread_id="t", run_id="r2", user_id=None, user_name=None, input="x", trace_id="not-an-id"
    )
    assert other is not None and other.trace_id != chosen and parse_trace_id(other.trace_id) == other.trace_id
    await obs.aclose()


def test_mlflow_with_a_sqlite_store_adopts_the_package_id(
    tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    from ambient_tracing.backends.mlflow import MlflowBackend

    backend = MlflowBackend(tracking_uri=f"sqlite:///{tmp_path / 'ids.db'}", experiment_name="ids")
    try:
        backend.setup()
        chosen = new_trace_id()
        root = backend.start_run(_turn(chosen))
        assert root is not None and root.trace_id == chosen
        root.start_child("tool_x", kind="tool").end(output="ok")  # type: ignore[arg-type]
        root.end(output="done")
        other = backend.start_run(_turn(None))  # without an id (called directly): MLflow's own
        assert other is not None and other.trace_id != chosen
        other.end()
        trace = wait_for_trace(backend.tracking_uri, chosen, lambda t: len(t.data.spans) == 2)
        assert trace.info.trace_id == f"tr-{chosen}"
        assert {span.trace_id for span in trace.data.spans} == {f"tr-{chosen}"}
    finally:
        mlflow.set_tracking_uri(mlflow_server.url)  # MLflow's tracking URI is process-wide


async def test_a_root_opened_late_on_the_span_worker_still_starts_before_its_children(
    tmp_path: Path, mlflow_server: MlflowServer, langfuse_receiver: LangfuseReceiver
) -> None:
    """The SDK paths (a sqlite store, an app's own Langfuse client) open the root on the span worker.
    The worker is busy when RUN_STARTED comes, so the roots open after the tool call already started
    (its loop time): both backends must still show the root starting first."""

    from ambient_tracing.backends.mlflow import MlflowBackend

    langfuse_side = sdk_langfuse_backend(langfuse_receiver)
    mlflow_side = MlflowBackend(tracking_uri=f"sqlite:///{tmp_path / 'late.db'}", experiment_name="late")
    assert langfuse_side.span_sink is None and mlflow_side.span_sink is None  # the deferred SDK paths
    await asyncio.to_thread(mlflow_side.setup)
    obs = Observability([langfuse_side, mlflow_side])
    busy = threading.Event()
    obs.spans.worker.submit(lambda: busy.wait(5))
    try:
        turn = obs.runs.open(thread_id="t-late", run_id="r", user_id=None, user_name=None, input="hi")
        assert turn is not None
        tool = turn.span.start_child("tool_x", "tool")
        await asyncio.sleep(0.05)  # the worker opens the roots at least this much after the tool began
        busy.set()
        tool.end(output="ok")
        turn.span.end(output="done")
        assert await asyncio.to_thread(obs.spans.worker.drain, 15)
        trace = await asyncio.to_thread(
            wait_for_trace, mlflow_side.tracking_uri, turn.trace_id, lambda t: len(t.data.spans) == 2
        )
        root, child = sorted(trace.data.spans, key=lambda span: span.parent_id is not None)
        assert root.start_time_ns <= child.start_time_ns <= child.end_time_ns <= root.end_time_ns
        received = langfuse_receiver.wait_for_spans(
            lambda got: sum(s.trace_id == turn.trace_id for s in got) >= 2
        )
        lf_root, lf_child = sorted(
            (s for s in received if s.trace_id == turn.trace_id), key=lambda s: s.name != "llm_interaction"
        )
        assert lf_child.parent_span_id == lf_root.span_id
        assert lf_root.start_ns <= lf_child.start_ns <= lf_child.end_ns <= lf_root.end_ns
    finally:
        busy.set()
        await obs.aclose()
        mlflow.set_tracking_uri(mlflow_server.url)  # MLflow's tracking URI is process-wide
