"""The feedback endpoint against real backends: a Langfuse receiver on loopback and a real MLflow server."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from ambient_tracing import Observability, TracingMiddleware, feedback_endpoint
from ambient_tracing.backends.mlflow import MlflowBackend
from ambient_tracing.testing import RecordingBackend
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.fixtures_mlflow import MlflowServer, wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.server import serve


def app_with_feedback(obs: Observability, **options: Any) -> TracingMiddleware:
    """The scripted agent at /agent and the feedback endpoint at /feedback, behind the middleware."""
    routes = [*agui_app().routes, Route("/feedback", feedback_endpoint(obs, **options), methods=["POST"])]
    return TracingMiddleware(Starlette(routes=routes), observability=obs)


def rating(kind: str = "thumbs_up", thread_id: str | None = None, **payload: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "META",
        "metaType": kind,
        "payload": {"userId": "alice", "messageId": "m-1", "projectName": "proj", **payload},
    }
    if thread_id is not None:
        body["threadId"] = thread_id
    return body


async def post_feedback(url: str, body: Any, user: str | None = "alice") -> httpx.Response:
    """POST a rating as ``user`` (the user header the app identifies callers by; None: anonymous)."""
    headers = {"x-current-user-id": user} if user else {}
    async with httpx.AsyncClient(timeout=30) as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post(f"{url}/feedback", content=content, headers=headers)


def assessments(trace: Any, name: str = "user-feedback") -> list[Any]:
    return [a for a in trace.info.assessments if a.name == name and getattr(a, "valid", True) is not False]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


async def test_thumbs_up_after_a_run_lands_on_its_trace_in_both_backends(
    tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "feedback.db")
    with serve(app_with_feedback(obs)) as url:
        [trace_id] = (await post_run(url, run_input("thread-f", "run-f"))).trace_ids
        sent = time.monotonic()
        response = await post_feedback(
            url, rating(thread_id="thread-f", comment="great", reason="accurate", sessionName="s")
        )
    assert response.status_code == 200
    event = response.json()["event"]
    assert response.json()["type"] == "RAW"
    assert event["name"] == "ambient:feedback" and event["metaType"] == "thumbs_up"
    assert event["recorded"] is True and event["traceId"] == trace_id
    assert event["backends"] == ["langfuse", "mlflow"]
    assert event["payload"]["comment"] == "great"

    trace = await asyncio.to_thread(
        wait_for_trace, mlflow_side.tracking_uri, trace_id, lambda t: bool(assessments(t))
    )
    delay = time.monotonic() - sent
    [feedback] = assessments(trace)
    assert feedback.value is True
    assert feedback.source.source_type == "HUMAN" and feedback.source.source_id == "alice"
    assert feedback.rationale == "great\nReason: accurate"
    assert feedback.metadata["messageId"] == "m-1" and feedback.metadata["project"] == "proj"

    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["traceId"] == trace_id and score["name"] == "user-feedback"
    assert score["dataType"] == "BOOLEAN" and score["value"] == 1
    assert score["comment"] == "great\nReason: accurate"  # the origin runner's format
    assert score["metadata"]["feedbackType"] == "thumbs_up" and score["metadata"]["session"] == "s"
    await obs.aclose()
    assert obs.ratings.counts() == {"waiting": 0, "set_aside": 0, "deliveries": 0}
    print(f"rating -> visible in MLflow: {delay:.2f} s")


@pytest.mark.parametrize("form", ["hex", "tr-"])
async def test_a_trace_id_in_either_form_is_used_as_given(
    form: str, tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "feedback.db")
    with serve(app_with_feedback(obs)) as url:
        [first] = (await post_run(url, run_input("thread-x", "run-1"))).trace_ids
        [_second] = (await post_run(url, run_input("thread-x", "run-2"))).trace_ids
        given = first.upper() if form == "hex" else f"tr-{first}"
        response = await post_feedback(url, rating("thumbs_down", traceId=given))  # the earlier run
    assert response.json()["event"]["traceId"] == first
    trace = await asyncio.to_thread(
        wait_for_trace, mlflow_side.tracking_uri, first, lambda t: bool(assessments(t))
    )
    assert assessments(trace)[0].value is False
    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["traceId"] == first and score["value"] == 0
    await obs.aclose()


async def test_twice_is_one_rating_and_a_changed_mind_replaces_it(
    tmp_path: Path,
    mlflow_server: MlflowServer,
    mlflow_backend: Any,
    langfuse_backend: Any,
    langfuse_receiver: LangfuseReceiver,
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "feedback.db")
    with serve(app_with_feedback(obs)) as url:
        [trace_id] = (await post_run(url, run_input("thread-d", "run-d"))).trace_ids
        await asyncio.to_thread(wait_for_trace, mlflow_side.tracking_uri, trace_id)
        for kind in ("thumbs_up", "thumbs_up"):
            assert (await post_feedback(url, rating(kind, thread_id="thread-d"))).status_code == 200
            wait_until(lambda: obs.ratings.pending == 0)
        trace = wait_for_trace(mlflow_side.tracking_uri, trace_id, lambda t: bool(assessments(t)))
        assert [a.value for a in assessments(trace)] == [True]

        for _ in range(20):  # a changed mind, again and again: 40 flips
            for kind in ("thumbs_down", "thumbs_up"):
                await post_feedback(url, rating(kind, thread_id="thread-d", comment=f"now {kind}"))
                wait_until(lambda: obs.ratings.pending == 0)
        await post_feedback(url, rating("thumbs_down", thread_id="thread-d", comment="final"))
        wait_until(lambda: obs.ratings.pending == 0)
    trace = wait_for_trace(mlflow_side.tracking_uri, trace_id, lambda t: assessments(t)[0].value is False)
    assert [a.value for a in assessments(trace)] == [False]
    # One assessment in the store, updated in place: no row per flip, the comment kept.
    [only] = trace.info.assessments
    assert only.rationale == "final" and only.source.source_id == "alice"
    store = sqlite3.connect(mlflow_server.store_uri.removeprefix("sqlite:///"))
    (rows,) = store.execute(
        "SELECT count(*) FROM assessments WHERE trace_id = ?", (f"tr-{trace_id}",)
    ).fetchone()
    store.close()
    assert rows == 1  # the server's own table: 40 flips, one row

    scores = langfuse_receiver.wait_for_scores(43)
    assert len({score["id"] for score in scores}) == 1  # one score id: Langfuse upserts it
    assert [score["value"] for score in scores][:2] == [1, 1] and scores[-1]["value"] == 0
    await obs.aclose()


async def test_a_correction_is_an_expectation_in_mlflow_and_a_correction_score_in_langfuse(
    tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "feedback.db")
    with serve(app_with_feedback(obs)) as url:
        [trace_id] = (await post_run(url, run_input("thread-c", "run-c"))).trace_ids
        body = rating(
            "correction", thread_id="thread-c", correction="The answer is 43.", comment="off by one"
        )
        assert (await post_feedback(url, body)).status_code == 200
    trace = await asyncio.to_thread(
        wait_for_trace,
        mlflow_side.tracking_uri,
        trace_id,
        lambda t: bool(assessments(t, "user-correction")),
    )
    [correction] = assessments(trace, "user-correction")
    assert correction.value == "The answer is 43." and correction.metadata["comment"] == "off by one"
    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["dataType"] == "CORRECTION" and score["value"] == "The answer is 43."
    assert score["comment"] == "off by one"
    await obs.aclose()


async def test_without_any_trace_langfuse_gets_a_session_score_and_mlflow_is_skipped(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    with serve(app_with_feedback(obs)) as url:
        response = await post_feedback(url, rating(thread_id="never-ran"))
    event = response.json()["event"]
    assert event["traceId"] is None and event["backends"] == ["langfuse"] and event["recorded"]
    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["sessionId"] == "never-ran" and "traceId" not in score
    await obs.aclose()


async def test_a_rating_sent_to_another_replica_finds_the_trace_in_mlflow(
    tmp_path: Path, mlflow_backend: Any
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    producer = Observability([mlflow_side], feedback_spool=tmp_path / "a.db")
    with serve(TracingMiddleware(agui_app(), observability=producer)) as url:
        [trace_id] = (await post_run(url, run_input("thread-r", "run-r"))).trace_ids
    await producer.aclose()
    await asyncio.to_thread(wait_for_trace, mlflow_side.tracking_uri, trace_id)

    other_replica = Observability([mlflow_side], feedback_spool=tmp_path / "b.db")
    with serve(app_with_feedback(other_replica)) as url:
        event = (await post_feedback(url, rating(thread_id="thread-r"))).json()["event"]
    assert event["traceId"] is None and event["backends"] == ["mlflow"]  # resolved in the background
    trace = await asyncio.to_thread(
        wait_for_trace, mlflow_side.tracking_uri, trace_id, lambda t: bool(assessments(t))
    )
    assert assessments(trace)[0].value is True
    await other_replica.aclose()


@pytest.mark.timeout(420)  # starts its own mlflow server twice: slow on a loaded machine
async def test_a_rating_pending_while_mlflow_is_down_is_delivered_when_it_is_back(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path).start()
    try:
        backend = MlflowBackend(tracking_uri=server.url, experiment_name="outage")
        await asyncio.to_thread(backend.setup)
        obs = Observability([backend], feedback_spool=tmp_path / "feedback.db")
        with serve(app_with_feedback(obs)) as url:
            [trace_id] = (await post_run(url, run_input("thread-o", "run-o"))).trace_ids
            await asyncio.to_thread(wait_for_trace, server.url, trace_id)
            await asyncio.to_thread(server.stop)
            response = await post_feedback(url, rating(thread_id="thread-o"))
            assert response.json()["event"]["backends"] == ["mlflow"]
            await asyncio.sleep(2)  # a few failed attempts while the server is down
            assert obs.ratings.pending == 1
            await asyncio.to_thread(server.start)
            trace = await asyncio.to_thread(
                wait_for_trace, server.url, trace_id, lambda t: bool(assessments(t)), 60
            )
        assert assessments(trace)[0].value is True
        await obs.aclose()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"type": "RAW", "metaType": "thumbs_up", "payload": {}}, 400, "META"),
        ({"type": "META", "metaType": "love", "payload": {}}, 400, "metaType"),
        ({"type": "META", "metaType": "thumbs_up", "payload": "x"}, 400, "payload"),
        ({"type": "META", "metaType": "thumbs_up", "payload": {"traceId": "123"}}, 400, "traceId"),
        ({"type": "META", "metaType": "thumbs_up", "payload": {"traceId": 7}}, 400, "traceId"),
        ({"type": "META", "metaType": "correction", "payload": {}}, 400, "correction"),
        (b"{" + b'"x": "' + b"a" * 300_000 + b'"}', 413, "KiB"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
        (
            b'{"type": "META", "metaType": "thumbs_up", "payload": {"x": '
            + b"[" * 5000
            + b"]" * 5000
            + b"}}",
            400,
            "nested",
        ),
        (b'{"type": "META", "metaType": "thumbs_up", "payload": {"x": NaN}}', 400, "NaN"),
        (b'{"type": "META", "metaType": "thumbs_up", "payload": {"x": -Infinity}}', 400, "-Infinity"),
        (b'{"type": "META", "metaType": "thumbs_up", "payload": {"comment": "\\ud800"}}', 400, "surrogate"),
        (b'{"type": "META", "metaType": "thumbs_up", "threadId": "\\udfff"}', 400, "surrogate"),
        (b'{"type": "META", "metaType": "thumbs_up", "payload": {"comment": "\xff\xfe"}}', 400, "UTF-8"),
        ({"type": "META", "metaType": "thumbs_up", "threadId": "t" * 1001, "payload": {}}, 400, "threadId"),
        ({"type": "META", "metaType": "thumbs_up", "threadId": ["t"], "payload": {}}, 400, "threadId"),
        (
            b'{"type": "META", "metaType": "thumbs_up", "payload": {"x": 1' + b"0" * 5000 + b"}}",
            400,
            "not JSON",
        ),
    ],
)
async def test_bad_feedback_gets_a_clear_client_error(body: Any, status: int, message: str) -> None:
    backend = RecordingBackend()
    obs = Observability([backend])
    with serve(app_with_feedback(obs)) as url:
        response = await post_feedback(url, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


async def test_unknown_fields_are_ignored_and_long_strings_cut(langfuse_backend: Any, tmp_path: Path) -> None:
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    body = rating(thread_id="t", comment="x" * 10_000, surprise={"deep": [1, 2]})
    body["unexpected"] = True
    with serve(app_with_feedback(obs)) as url:
        response = await post_feedback(url, body)
    assert response.status_code == 200
    queued = obs.ratings
    await obs.aclose()
    assert queued.pending == 0


async def test_authorize_hook_and_cross_thread_trace_ids_are_refused(tmp_path: Path) -> None:
    backend = RecordingBackend()
    obs = Observability([backend], feedback_spool=tmp_path / "feedback.db")

    def authorize(request: Request, thread_id: str | None) -> bool:
        return request.headers.get("x-user") == "owner" or thread_id == "open-thread"

    app = Starlette(
        routes=[
            *agui_app().routes,
            Route("/feedback", feedback_endpoint(obs, authorize=authorize), methods=["POST"]),
        ]
    )
    with serve(TracingMiddleware(app, observability=obs)) as url:
        [mine] = (await post_run(url, run_input("thread-mine", "r1"))).trace_ids
        await post_run(url, run_input("thread-other", "r2"))
        cross = await post_feedback(url, rating(thread_id="thread-other", traceId=mine))
        denied = await post_feedback(url, rating(thread_id="thread-mine"))
        allowed = await post_feedback(url, rating(thread_id="open-thread"))
    assert cross.status_code == 403 and "another thread" in cross.json()["error"]
    assert denied.status_code == 403
    assert allowed.status_code == 200
    await obs.aclose()


async def test_the_middleware_serves_the_endpoint_at_feedback_path(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    app = TracingMiddleware(agui_app(), observability=obs, feedback_path="/feedback")
    with serve(app) as url:
        [trace_id] = (await post_run(url, run_input("thread-p", "run-p"))).trace_ids
        response = await post_feedback(url, rating(thread_id="thread-p"))
        async with httpx.AsyncClient() as client:
            other_method = await client.get(f"{url}/feedback")
    assert response.status_code == 200 and response.json()["event"]["traceId"] == trace_id
    assert other_method.status_code == 404  # not ours: the app answers it
    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["traceId"] == trace_id
    await obs.aclose()


async def test_no_secret_or_host_credential_in_answers_or_logs(
    tmp_path: Path, langfuse_receiver: LangfuseReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    from ambient_tracing.backends.langfuse import LangfuseBackend

    langfuse_receiver.mode = "503"
    host = langfuse_receiver.base_url.replace("http://", "http://admin:hunter2@")
    backend = LangfuseBackend(public_key="pk-lf-x", secret_key="sk-lf-very-secret", host=host, timeout=2)
    obs = Observability([backend], feedback_spool=tmp_path / "feedback.db", flush_timeout=2)
    caplog.set_level(logging.DEBUG, logger="ambient_tracing")
    with serve(app_with_feedback(obs)) as url:
        response = await post_feedback(url, rating(thread_id="t", traceId="cd" * 16))
        await asyncio.sleep(1.5)  # a few failed deliveries, each logged
    await obs.aclose()
    text = response.text + caplog.text
    for secret in ("sk-lf-very-secret", "hunter2"):
        assert secret not in text
