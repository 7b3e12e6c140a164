"""The feedback endpoint against real backends: a Langfuse receiver on loopback and a real MLflow server."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
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
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.fixtures_mlflow import MlflowServer, wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.recording_backend import RecordingBackend
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


async def post_feedback(url: str, body: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post(f"{url}/feedback", content=content)


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
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "spool.jsonl")
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
    assert feedback.rationale == "great\n\nReason: accurate"
    assert feedback.metadata["messageId"] == "m-1" and feedback.metadata["project"] == "proj"

    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["traceId"] == trace_id and score["name"] == "user-feedback"
    assert score["dataType"] == "BOOLEAN" and score["value"] == 1
    assert score["comment"] == "great\n\nReason: accurate"
    assert score["metadata"]["feedbackType"] == "thumbs_up" and score["metadata"]["session"] == "s"
    await obs.aclose()
    assert not (tmp_path / "spool.jsonl").exists()
    print(f"rating -> visible in MLflow: {delay:.2f} s")


@pytest.mark.parametrize("form", ["hex", "tr-"])
async def test_a_trace_id_in_either_form_is_used_as_given(
    form: str, tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "spool.jsonl")
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
    tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "spool.jsonl")
    with serve(app_with_feedback(obs)) as url:
        [trace_id] = (await post_run(url, run_input("thread-d", "run-d"))).trace_ids
        await asyncio.to_thread(wait_for_trace, mlflow_side.tracking_uri, trace_id)
        for kind in ("thumbs_up", "thumbs_up"):
            assert (await post_feedback(url, rating(kind, thread_id="thread-d"))).status_code == 200
        wait_until(lambda: obs.ratings.pending == 0)
        trace = wait_for_trace(mlflow_side.tracking_uri, trace_id, lambda t: bool(assessments(t)))
        assert [a.value for a in assessments(trace)] == [True]

        await post_feedback(url, rating("thumbs_down", thread_id="thread-d"))
        wait_until(lambda: obs.ratings.pending == 0)
    trace = wait_for_trace(mlflow_side.tracking_uri, trace_id, lambda t: assessments(t)[0].value is False)
    assert [a.value for a in assessments(trace)] == [False]  # the earlier one is overridden

    scores = langfuse_receiver.wait_for_scores(3)
    assert len({score["id"] for score in scores}) == 1  # one score id: Langfuse upserts it
    assert [score["value"] for score in scores] == [1, 1, 0]
    await obs.aclose()


async def test_a_correction_is_an_expectation_in_mlflow_and_a_correction_score_in_langfuse(
    tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    obs = Observability([langfuse_backend(), mlflow_side], feedback_spool=tmp_path / "spool.jsonl")
    with serve(app_with_feedback(obs)) as url:
        [trace_id] = (await post_run(url, run_input("thread-c", "run-c"))).trace_ids
        body = rating("correction", thread_id="thread-c", correction="The answer is 43.")
        assert (await post_feedback(url, body)).status_code == 200
    trace = await asyncio.to_thread(
        wait_for_trace,
        mlflow_side.tracking_uri,
        trace_id,
        lambda t: bool(assessments(t, "user-correction")),
    )
    assert assessments(trace, "user-correction")[0].value == "The answer is 43."
    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["dataType"] == "CORRECTION" and score["value"] == "The answer is 43."
    await obs.aclose()


async def test_without_any_trace_langfuse_gets_a_session_score_and_mlflow_is_skipped(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "spool.jsonl")
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
    producer = Observability([mlflow_side], feedback_spool=tmp_path / "a.jsonl")
    with serve(TracingMiddleware(agui_app(), observability=producer)) as url:
        [trace_id] = (await post_run(url, run_input("thread-r", "run-r"))).trace_ids
    await producer.aclose()
    await asyncio.to_thread(wait_for_trace, mlflow_side.tracking_uri, trace_id)

    other_replica = Observability([mlflow_side], feedback_spool=tmp_path / "b.jsonl")
    with serve(app_with_feedback(other_replica)) as url:
        event = (await post_feedback(url, rating(thread_id="thread-r"))).json()["event"]
    assert event["traceId"] is None and event["backends"] == ["mlflow"]  # resolved in the background
    trace = await asyncio.to_thread(
        wait_for_trace, mlflow_side.tracking_uri, trace_id, lambda t: bool(assessments(t))
    )
    assert assessments(trace)[0].value is True
    await other_replica.aclose()


async def test_a_rating_pending_while_mlflow_is_down_is_delivered_when_it_is_back(tmp_path: Path) -> None:
    server = MlflowServer(tmp_path).start()
    try:
        backend = MlflowBackend(tracking_uri=server.url, experiment_name="outage")
        await asyncio.to_thread(backend.setup)
        obs = Observability([backend], feedback_spool=tmp_path / "spool.jsonl")
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


_FIRST_PROCESS = """
import asyncio, sys
from pathlib import Path
from ambient_tracing import Observability, parse_feedback
from ambient_tracing.backends.langfuse import LangfuseBackend

async def main() -> None:
    backend = LangfuseBackend(public_key="pk-lf-a", secret_key="sk-lf-a", host=sys.argv[1], timeout=2)
    obs = Observability([backend], feedback_spool=Path(sys.argv[2]), flush_timeout=2)
    await obs.start()
    print(obs.submit_rating(parse_feedback(sys.argv[3].encode())))
    await obs.aclose()  # Langfuse answers 503: the rating goes to the spool

asyncio.run(main())
"""


async def test_a_spooled_rating_is_delivered_by_the_next_process(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    spool = tmp_path / "spool.jsonl"
    langfuse_receiver.mode = "503"
    body = json.dumps(rating(thread_id="thread-s", traceId="ab" * 16))
    first = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FIRST_PROCESS,
        langfuse_receiver.base_url,
        str(spool),
        body,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(first.communicate(), timeout=60)
    assert first.returncode == 0 and b"['langfuse']" in output
    [line] = spool.read_text().splitlines()
    assert json.loads(line)["trace_id"] == "ab" * 16
    assert langfuse_receiver.scores == []

    langfuse_receiver.mode = "ok"
    second = Observability([langfuse_backend()], feedback_spool=spool)
    await second.start()  # claims the spool and delivers it
    [score] = langfuse_receiver.wait_for_scores(1)
    assert score["traceId"] == "ab" * 16 and score["value"] == 1
    await second.aclose()
    assert not spool.exists() and not list(tmp_path.glob("spool.jsonl.*"))


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
    ],
)
async def test_bad_feedback_gets_a_clear_client_error(body: Any, status: int, message: str) -> None:
    backend = RecordingBackend()
    obs = Observability([backend])
    with serve(app_with_feedback(obs)) as url:
        response = await post_feedback(url, body)
    assert response.status_code == status
    assert message in response.json()["error"]


async def test_unknown_fields_are_ignored_and_long_strings_cut(langfuse_backend: Any, tmp_path: Path) -> None:
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "spool.jsonl")
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
    obs = Observability([backend], feedback_spool=tmp_path / "spool.jsonl")

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
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "spool.jsonl")
    app = TracingMiddleware(agui_app(), observability=obs, feedback_path="/feedback")
    with serve(app) as url:
        [trace_id] = (await post_run(url, run_input("thread-p", "run-p"))).trace_ids
        response = await post_feedback(url, rating(thread_id="thread-p"))
        async with httpx.AsyncClient() as client:
            wrong_method = await client.get(f"{url}/feedback")
    assert response.status_code == 200 and response.json()["event"]["traceId"] == trace_id
    assert wrong_method.status_code == 405
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
    obs = Observability([backend], feedback_spool=tmp_path / "spool.jsonl", flush_timeout=2)
    caplog.set_level(logging.DEBUG, logger="ambient_tracing")
    with serve(app_with_feedback(obs)) as url:
        response = await post_feedback(url, rating(thread_id="t", traceId="cd" * 16))
        await asyncio.sleep(1.5)  # a few failed deliveries, each logged
    await obs.aclose()
    text = response.text + caplog.text
    for secret in ("sk-lf-very-secret", "hunter2"):
        assert secret not in text
