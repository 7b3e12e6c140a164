"""The feedback route attacked as a hostile client would, with real parts: the Langfuse SDK and the
loopback receiver, the real MLflow server, uvicorn child processes killed and restarted, replicas
sharing one queue file, corrupt rows, a flood."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from ambient_tracing import Observability, TracingMiddleware, feedback_endpoint
from ambient_tracing.backends.mlflow import MlflowBackend
from ambient_tracing.config import FeedbackLimits as Limits
from ambient_tracing.feedback.ratings import parse_feedback
from ambient_tracing.feedback.spool import RatingStore
from ambient_tracing.ids import new_trace_id
from ambient_tracing.privacy import mask_id
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.fixtures_mlflow import MlflowServer, wait_for_trace
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.server import free_port, serve

ROOT = Path(__file__).resolve().parent.parent


def rating(kind: str = "thumbs_up", thread_id: str | None = None, **payload: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "META", "metaType": kind, "payload": {"messageId": "m-1", **payload}}
    if thread_id is not None:
        body["threadId"] = thread_id
    return body


async def post(url: str, body: Any, user: str | None = "alice", **headers: str) -> httpx.Response:
    if user:
        headers["x-current-user-id"] = user
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(f"{url}/feedback", content=json.dumps(body).encode(), headers=headers)


def routed(obs: Observability, **options: Any) -> TracingMiddleware:
    """The app with the endpoint mounted as its own route (inside the app's stack)."""
    routes = [*agui_app().routes, Route("/feedback", feedback_endpoint(obs, **options), methods=["POST"])]
    return TracingMiddleware(Starlette(routes=routes), observability=obs)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- identity --------------------------------------------------------------------------------------


async def test_the_rater_is_the_caller_the_app_identified_not_the_body(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    with serve(routed(obs)) as url:
        [trace] = (await post_run(url, run_input("t", "r"))).trace_ids
        alice = await post(url, rating(traceId=trace, userId="alice"), user="alice")
        spoof = await post(url, rating("thumbs_down", traceId=trace, userId="alice"), user="mallory")
        anonymous = await post(url, rating("thumbs_down", traceId=trace, userId="alice"), user=None)
    assert [r.status_code for r in (alice, spoof, anonymous)] == [200, 200, 200]
    scores = langfuse_receiver.wait_for_scores(3)
    by_user = {score["metadata"]["user"]: score for score in scores}
    assert by_user["alice"]["value"] == 1 and by_user["mallory"]["value"] == 0
    assert by_user["unverified:alice"]["value"] == 0  # the body's userId only when nobody is identified
    assert len({score["id"] for score in scores}) == 3  # nobody replaced alice's rating
    await obs.aclose()


async def test_the_middleware_route_refuses_anonymous_callers_unless_the_app_opts_in(
    tmp_path: Path, langfuse_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ambient_tracing")
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    strict = TracingMiddleware(agui_app(), observability=obs, feedback_path="/feedback")
    assert "are refused" in caplog.text
    with serve(strict) as url:
        anonymous = await post(url, rating(thread_id="t", userId="alice"), user=None)
        identified = await post(url, rating(thread_id="t"), user="alice")
    assert anonymous.status_code == 401 and "identified" in anonymous.json()["error"]
    assert identified.status_code == 200
    caplog.clear()
    lenient = TracingMiddleware(
        agui_app(), observability=obs, feedback_path="/feedback", feedback_allow_anonymous=True
    )
    assert "anonymous ratings ARE accepted" in caplog.text
    with serve(lenient) as url:
        assert (await post(url, rating(thread_id="t"), user=None)).status_code == 200
    await obs.aclose()


@pytest.mark.parametrize("cors_outermost", [True, False])
async def test_a_cors_preflight_works_in_either_middleware_order(
    cors_outermost: bool, tmp_path: Path, langfuse_backend: Any
) -> None:
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    app = agui_app()
    cors = {
        "allow_origins": ["https://ui.example"],
        "allow_methods": ["POST"],
        "allow_headers": ["content-type", "x-current-user-id"],
    }
    tracing = {"observability": obs, "feedback_path": "/feedback"}
    if cors_outermost:  # add_middleware puts the last one added outermost
        app.add_middleware(TracingMiddleware, **tracing)
        app.add_middleware(CORSMiddleware, **cors)
    else:
        app.add_middleware(CORSMiddleware, **cors)
        app.add_middleware(TracingMiddleware, **tracing)
    preflight_headers = {
        "origin": "https://ui.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, x-current-user-id",
    }
    with serve(app) as url:
        async with httpx.AsyncClient(timeout=30) as client:
            preflight = await client.options(f"{url}/feedback", headers=preflight_headers)
        rated = await post(url, rating(thread_id="t"), origin="https://ui.example")
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
    assert rated.status_code == 200
    await obs.aclose()


# -- ownership -------------------------------------------------------------------------------------


async def test_another_replica_checks_ownership_in_mlflow(tmp_path: Path, mlflow_backend: Any) -> None:
    mlflow_side: MlflowBackend = mlflow_backend()
    producer = Observability([mlflow_side], feedback_spool=tmp_path / "a.db")
    with serve(TracingMiddleware(agui_app(), observability=producer)) as url:
        [mine] = (await post_run(url, run_input("thread-mine", "r1"))).trace_ids
        [theirs] = (await post_run(url, run_input("thread-theirs", "r2"))).trace_ids
    await producer.aclose()
    for trace_id in (mine, theirs):
        await asyncio.to_thread(wait_for_trace, mlflow_side.tracking_uri, trace_id)

    replica = Observability([mlflow_side], feedback_spool=tmp_path / "b.db")  # knows no trace
    with serve(routed(replica)) as url:
        crossed = await post(url, rating(thread_id="thread-mine", traceId=theirs))
        own = await post(url, rating(thread_id="thread-mine", traceId=mine))
        unknown = await post(url, rating(thread_id="thread-mine", traceId="12" * 16))
    assert crossed.status_code == 403 and "another thread" in crossed.json()["error"]
    assert own.status_code == 200 and own.json()["event"]["ownership"] == "checked"
    assert unknown.status_code == 200 and unknown.json()["event"]["ownership"] == "checked at delivery"
    await replica.aclose()


async def test_another_replica_checks_ownership_and_finds_the_last_trace_in_langfuse(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    producer = Observability([langfuse_backend()], feedback_spool=tmp_path / "a.db")
    with serve(TracingMiddleware(agui_app(), observability=producer)) as url:
        [mine] = (await post_run(url, run_input("thread-mine", "r1"))).trace_ids
        [theirs] = (await post_run(url, run_input("thread-theirs", "r2"))).trace_ids
    await producer.aclose()
    langfuse_receiver.wait_for_spans(lambda spans: {mine, theirs} <= {span.trace_id for span in spans})

    replica = Observability([langfuse_backend()], feedback_spool=tmp_path / "b.db")
    with serve(routed(replica)) as url:
        crossed = await post(url, rating(thread_id="thread-mine", traceId=theirs))
        own = await post(url, rating(thread_id="thread-mine", traceId=mine, messageId="m-own"))
        latest = await post(url, rating(thread_id="thread-theirs", messageId="m-latest"))
    assert crossed.status_code == 403
    assert own.json()["event"]["ownership"] == "checked"
    assert latest.json()["event"]["traceId"] is None  # resolved at delivery, through the public API
    scores = langfuse_receiver.wait_for_scores(2)
    by_message = {score["metadata"]["messageId"]: score for score in scores}
    assert by_message["m-own"]["traceId"] == mine
    assert by_message["m-latest"]["traceId"] == theirs
    await replica.aclose()


async def test_a_rating_for_a_trace_that_never_appears_is_set_aside_not_sent(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability(
        [langfuse_backend()], feedback_spool=tmp_path / "feedback.db", feedback_retry_seconds=1.0
    )
    with serve(routed(obs)) as url:
        response = await post(url, rating(thread_id="t", traceId="fe" * 16))
        assert response.json()["event"]["ownership"] == "checked at delivery"
        await asyncio.to_thread(wait_until, lambda: obs.ratings.counts()["set_aside"] == 1)
    assert langfuse_receiver.scores == []  # never posted on a trace nobody stored
    await obs.aclose()


async def test_a_rating_checked_at_delivery_is_set_aside_when_its_trace_is_another_threads(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    chosen = new_trace_id()
    replica = Observability([langfuse_backend()], feedback_spool=tmp_path / "b.db")
    with serve(routed(replica)) as url:
        early = await post(url, rating(thread_id="thread-mine", traceId=chosen))  # stored nowhere yet
        assert early.status_code == 200 and early.json()["event"]["ownership"] == "checked at delivery"
        producer = Observability([langfuse_backend()], feedback_spool=tmp_path / "a.db")
        turn = producer.runs.open(
            thread_id="thread-theirs", run_id="r", user_id=None, user_name=None, input="x", trace_id=chosen
        )
        assert turn is not None and turn.trace_id == chosen
        turn.span.end(output="done")
        await producer.aclose()
        await asyncio.to_thread(
            langfuse_receiver.wait_for_spans, lambda spans: any(s.trace_id == chosen for s in spans)
        )
        await asyncio.to_thread(wait_until, lambda: replica.ratings.counts()["set_aside"] == 1)
    assert langfuse_receiver.scores == []  # never posted on the other thread's trace
    await replica.aclose()


async def test_thread_ids_are_compared_exactly_as_sent_on_another_replica(
    tmp_path: Path, mlflow_backend: Any, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    """Padded and long (past Langfuse's 200-character session id, and the mask's 50) thread ids:
    their owners rate their own traces on a replica that asks the backends; the stripped id is
    another thread."""
    mlflow_side: MlflowBackend = mlflow_backend()
    padded, long = "  padded thread  ", "long-" + "x" * 600
    producer = Observability([mlflow_side, langfuse_backend()], feedback_spool=tmp_path / "a.db")
    with serve(TracingMiddleware(agui_app(), observability=producer)) as url:
        [padded_trace] = (await post_run(url, run_input(padded, "r1"))).trace_ids
        [long_trace] = (await post_run(url, run_input(long, "r2"))).trace_ids
    await producer.aclose()
    for trace_id in (padded_trace, long_trace):
        await asyncio.to_thread(wait_for_trace, mlflow_side.tracking_uri, trace_id)
    # Masking is on (the default): the long id is stored as its digest, and ownership is compared
    # with the digest of the id the rating names.
    stored = await asyncio.to_thread(wait_for_trace, mlflow_side.tracking_uri, long_trace)
    assert stored.info.tags["ambient.thread_id"] == mask_id(long) != long
    await asyncio.to_thread(
        langfuse_receiver.wait_for_spans,
        lambda spans: {padded_trace, long_trace} <= {span.trace_id for span in spans},
    )

    replica = Observability([mlflow_side, langfuse_backend()], feedback_spool=tmp_path / "b.db")
    with serve(routed(replica)) as url:
        own_padded = await post(url, rating(thread_id=padded, traceId=padded_trace, messageId="p"))
        own_long = await post(url, rating(thread_id=long, traceId=long_trace, messageId="l"))
        stripped = await post(url, rating(thread_id=padded.strip(), traceId=padded_trace))
    assert [r.status_code for r in (own_padded, own_long, stripped)] == [200, 200, 403]
    assert {own_padded.json()["event"]["ownership"], own_long.json()["event"]["ownership"]} == {"checked"}
    scores = await asyncio.to_thread(langfuse_receiver.wait_for_scores, 2, 30)
    assert {(score["metadata"]["messageId"], score["traceId"]) for score in scores} == {
        ("p", padded_trace),
        ("l", long_trace),
    }
    await replica.aclose()


# -- the durable queue -----------------------------------------------------------------------------


async def test_the_queue_file_is_private_and_a_full_queue_answers_503_and_drops_nothing(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    spool = tmp_path / "state" / "feedback.db"
    langfuse_receiver.score_status = 503  # nothing is delivered for now
    obs = Observability([langfuse_backend()], feedback_spool=spool, feedback_limits=Limits(max_rows=3))
    with serve(routed(obs)) as url:
        [trace] = (await post_run(url, run_input("t", "r"))).trace_ids
        accepted = [
            await post(url, rating(thread_id="t", traceId=trace, messageId=f"m{n}"), user=f"u{n}")
            for n in range(3)
        ]
        full = await post(url, rating(thread_id="t", traceId=trace, messageId="m9"), user="u9")
        assert [r.status_code for r in accepted] == [200, 200, 200]
        assert full.status_code == 503 and "full" in full.json()["error"]
        assert stat.S_IMODE(spool.stat().st_mode) == 0o600
        assert stat.S_IMODE(spool.parent.stat().st_mode) == 0o700
        for sidecar in spool.parent.glob("feedback.db-*"):
            assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600
        langfuse_receiver.score_status = None
        scores = await asyncio.to_thread(langfuse_receiver.wait_for_scores, 3)
    assert sorted(score["metadata"]["messageId"] for score in scores) == ["m0", "m1", "m2"]
    await obs.aclose()


async def test_the_byte_limit_answers_503_and_an_oversized_rating_413(
    tmp_path: Path, langfuse_backend: Any
) -> None:
    obs = Observability(
        [langfuse_backend(host=f"http://127.0.0.1:{free_port()}")],  # nothing listens: all stay queued
        feedback_spool=tmp_path / "feedback.db",
        feedback_limits=Limits(max_bytes=8_000),
    )
    with serve(routed(obs)) as url:
        answers = [
            await post(url, rating(thread_id="t", comment="c" * 2_000, messageId=f"m{n}"), user=f"u{n}")
            for n in range(6)
        ]
        statuses = [answer.status_code for answer in answers]
        assert statuses[:3] == [200, 200, 200] and 503 in statuses, statuses
        assert obs.ratings.counts()["waiting"] == statuses.count(200)  # nothing accepted was dropped
    await obs.aclose()


async def test_a_rating_over_256_kib_once_stored_is_refused_413(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    """A body under the limit can grow past it once stored (the caller's id, transcript framing):
    the stored size is checked too, so one pending rating never holds more than 256 KiB."""
    text = "\x01" * 4_000  # 6 bytes each, sent and stored (\u0001)
    transcript = [{"role": "u", "content": text}] * 7 + [{"role": "u", "content": text[:3_000]}]
    body = rating(
        thread_id="t", comment=text, reason=text, context=text, includeTranscript=True, transcript=transcript
    )
    assert 250_000 < len(json.dumps(body)) < 256 * 1024
    obs = Observability([langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    with serve(routed(obs)) as url:
        fits = await post(url, body, user="alice")
        too_big = await post(url, body, user="a" * 7_000)  # the rater is stored with the rating
    assert fits.status_code == 200, fits.text
    assert too_big.status_code == 413 and "once stored" in too_big.json()["error"]
    [score] = await asyncio.to_thread(langfuse_receiver.wait_for_scores, 1, 30)
    assert score["metadata"]["user"] == "alice" and len(score["comment"]) > 40_000
    await obs.aclose()


def test_set_aside_rows_are_kept_within_the_row_and_byte_limits(tmp_path: Path) -> None:
    store = RatingStore(tmp_path / "feedback.db", Limits(max_bytes=5_000, max_set_aside=100))
    for number in range(10):
        body = rating(thread_id="t", traceId="ab" * 16, comment="c" * 1_000, messageId=f"m{number}")
        [error] = store.add_many([(parse_feedback(json.dumps(body).encode()), ["langfuse"], False, None)])
        assert error is None
        [claimed] = store.claim("langfuse", "test", 1)
        store.set_aside(claimed.rating_id, None, "refused")
    kept = store.counts()["set_aside"]
    assert 1 <= kept < 5  # the newest that fit in 5,000 bytes
    rows = sqlite3.connect(store.path).execute("SELECT total(size), max(id) FROM ratings").fetchone()
    assert rows[0] <= 5_000 and rows[1] == 10  # the newest is kept
    store.close()


async def test_per_thread_and_per_caller_limits_answer_429(tmp_path: Path, langfuse_backend: Any) -> None:
    obs = Observability(
        [langfuse_backend(host="http://127.0.0.1:9")],  # nothing listens: ratings stay queued
        feedback_spool=tmp_path / "feedback.db",
        feedback_limits=Limits(max_per_thread=2, max_per_caller=3),
    )
    with serve(routed(obs)) as url:
        same_thread = [
            await post(url, rating(thread_id="hot", messageId=f"m{n}"), user=f"u{n}") for n in range(3)
        ]
        same_caller = [
            await post(url, rating(thread_id=f"t{n}", messageId="m"), user="busy") for n in range(4)
        ]
    assert [r.status_code for r in same_thread] == [200, 200, 429]
    assert [r.status_code for r in same_caller] == [200, 200, 200, 429]
    assert "waiting" in same_caller[-1].json()["error"]
    await obs.aclose()


async def test_corrupt_rows_are_set_aside_by_id_and_never_block_the_others(
    tmp_path: Path,
    langfuse_backend: Any,
    langfuse_receiver: LangfuseReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spool = tmp_path / "feedback.db"
    store = RatingStore(spool)
    good = [
        parse_feedback(json.dumps(rating(thread_id="t", traceId="ab" * 16, messageId=f"g{n}")).encode())
        for n in range(3)
    ]
    store.add_many([(r, ["langfuse"], False, None) for r in good[:1]])
    secret = "SECRET-COMMENT-TEXT"
    bad_bodies = [
        b"\xff\xfe" + secret.encode(),
        b"[1, 2]",
        b"not json " + secret.encode(),
        json.dumps({"kind": "thumbs_up", "thread_id": 7, "comment": secret}).encode(),
        b"[" * 50_000,
    ]
    db = sqlite3.connect(spool)
    for body in bad_bodies:
        cursor = db.execute(
            "INSERT INTO ratings (rating_key, body, size, created) VALUES (?, ?, ?, ?)",
            (uuid.uuid4().hex, body, len(body), time.time() - 1),
        )
        db.execute(
            "INSERT INTO deliveries (rating_id, sink, due) VALUES (?, 'langfuse', 0)", (cursor.lastrowid,)
        )
    db.commit()
    db.close()
    store.add_many([(r, ["langfuse"], False, None) for r in good[1:]])
    store.close()

    caplog.set_level(logging.DEBUG, logger="ambient_tracing")
    obs = Observability([langfuse_backend()], feedback_spool=spool)
    await obs.start()
    scores = await asyncio.to_thread(langfuse_receiver.wait_for_scores, 3)
    await asyncio.to_thread(wait_until, lambda: obs.ratings.counts()["set_aside"] == len(bad_bodies))
    assert sorted(score["metadata"]["messageId"] for score in scores) == ["g0", "g1", "g2"]
    # A delivery's row is deleted just after the receiver has its score: wait for that too.
    await asyncio.to_thread(wait_until, lambda: obs.ratings.pending == 0)
    assert "set aside" in caplog.text and secret not in caplog.text
    await obs.aclose()


# -- a flood ---------------------------------------------------------------------------------------


async def test_a_real_rating_is_recorded_during_a_flood_of_10000_bogus_ones(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability(
        [langfuse_backend()], feedback_spool=tmp_path / "feedback.db", feedback_retry_seconds=3.0
    )
    app = routed(obs)
    with serve(app) as url:  # one real run, over HTTP, so its trace is known here
        [real_trace] = (await post_run(url, run_input("real-thread", "real-run"))).trace_ids
    statuses: Counter[int] = Counter()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app", timeout=60) as client:
        gate = asyncio.Semaphore(64)

        async def bogus(number: int) -> None:
            body = rating(thread_id=f"flood-{number}", traceId=uuid.uuid4().hex, messageId=str(number))
            async with gate:
                response = await client.post(
                    "/feedback",
                    content=json.dumps(body),
                    headers={"x-current-user-id": f"bot-{number % 500}"},
                )
            statuses[response.status_code] += 1

        flood = [asyncio.ensure_future(bogus(number)) for number in range(10_000)]
        await asyncio.sleep(0.5)  # well into the flood
        real = await client.post(
            "/feedback",
            content=json.dumps(rating(thread_id="real-thread", traceId=real_trace, messageId="real")),
            headers={"x-current-user-id": "alice"},
        )
        await asyncio.gather(*flood)
        assert real.status_code == 200 and real.json()["event"]["recorded"] is True
        scores = await asyncio.to_thread(langfuse_receiver.wait_for_scores, 1, 30)
    assert any(score["traceId"] == real_trace for score in scores)
    assert sum(statuses.values()) == 10_000 and set(statuses) <= {200, 429, 503}, statuses
    counts = obs.ratings.counts()
    assert counts["waiting"] <= Limits().max_unchecked + 1  # bounded: the rest got a clear 503
    # The bogus ones stop being retried soon after their traces should have been stored.
    await asyncio.to_thread(wait_until, lambda: obs.ratings.counts()["waiting"] == 0, 60)
    assert all(score["traceId"] == real_trace for score in langfuse_receiver.scores)
    await obs.aclose()


# -- processes: killed, restarted, replicas ---------------------------------------------------------


@contextmanager
def child_app(spool: Path, langfuse: str, *extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    log = open(spool.parent / f"child-{port}.log", "wb")  # noqa: SIM115 - the child writes it
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.feedback_app", str(port), str(spool), langfuse, *extra],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (spool.parent / f"child-{port}.log").read_text()
            try:
                httpx.get(f"{url}/feedback", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the child app did not start"
                time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
async def test_acknowledged_ratings_survive_a_killed_process_and_are_delivered_after_restart(
    sig: signal.Signals, tmp_path: Path, langfuse_receiver: LangfuseReceiver
) -> None:
    spool = tmp_path / "feedback.db"
    langfuse_receiver.score_status = 503  # scores cannot be delivered before the kill
    with child_app(spool, langfuse_receiver.base_url) as (url, process):
        [trace_id] = (await post_run(url, run_input("thread-k", "run-k"))).trace_ids
        langfuse_receiver.wait_for_spans(lambda spans: any(s.trace_id == trace_id for s in spans))
        answers = [
            await post(url, rating(thread_id="thread-k", traceId=trace_id, messageId=f"m{n}"))
            for n in range(20)
        ]
        assert all(a.status_code == 200 and a.json()["event"]["recorded"] for a in answers)
        process.send_signal(sig)
        process.wait(timeout=30)
    assert langfuse_receiver.scores == []
    langfuse_receiver.score_status = None
    with child_app(spool, langfuse_receiver.base_url):
        scores = await asyncio.to_thread(langfuse_receiver.wait_for_scores, 20, 60)
    assert sorted(score["metadata"]["messageId"] for score in scores) == sorted(f"m{n}" for n in range(20))


async def test_two_replicas_share_one_queue_and_one_store_and_deliver_each_rating_once(
    tmp_path: Path, langfuse_receiver: LangfuseReceiver, mlflow_server: MlflowServer
) -> None:
    spool = tmp_path / "feedback.db"
    experiment = f"replicas-{uuid.uuid4().hex[:8]}"
    extra = (mlflow_server.url, experiment)
    with (
        child_app(spool, langfuse_receiver.base_url, *extra) as (a, _),
        child_app(spool, langfuse_receiver.base_url, *extra) as (b, _),
    ):
        [trace_a] = (await post_run(a, run_input("thread-a", "run-a"))).trace_ids
        [trace_b] = (await post_run(b, run_input("thread-b", "run-b"))).trace_ids
        await asyncio.to_thread(wait_for_trace, mlflow_server.url, trace_a)
        await asyncio.to_thread(wait_for_trace, mlflow_server.url, trace_b)
        crossed = await post(b, rating(thread_id="thread-b", traceId=trace_a))  # A ran it, B is asked
        assert crossed.status_code == 403
        answers = [
            await post(
                a if n % 2 else b,
                rating(thread_id="thread-a", traceId=trace_a, messageId=f"m{n}"),
                user=f"u{n}",
            )
            for n in range(30)
        ]
        assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
        scores = await asyncio.to_thread(langfuse_receiver.wait_for_scores, 30, 60)
        trace = await asyncio.to_thread(
            wait_for_trace, mlflow_server.url, trace_a, lambda t: len(t.info.assessments) >= 30, 60
        )
        await asyncio.sleep(2)  # any duplicate delivery would arrive by now
    per_id = Counter(score["id"] for score in langfuse_receiver.scores)
    assert len(per_id) == 30 and set(per_id.values()) == {1}, per_id  # each delivered once
    assert len(trace.info.assessments) == 30
    assert {score["traceId"] for score in scores} == {trace_a}


async def test_delivery_to_langfuse_does_not_wait_for_an_unreachable_mlflow(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    dead_mlflow = MlflowBackend(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment_name="down")
    obs = Observability([dead_mlflow, langfuse_backend()], feedback_spool=tmp_path / "feedback.db")
    with serve(routed(obs), startup_timeout=60) as url:
        [trace_id] = (await post_run(url, run_input("t", "r"))).trace_ids  # traced in Langfuse only
        sent = time.monotonic()
        response = await post(url, rating(thread_id="t", traceId=trace_id))
        assert response.json()["event"]["backends"] == ["langfuse", "mlflow"]
        await asyncio.to_thread(langfuse_receiver.wait_for_scores, 1, 20)
    assert time.monotonic() - sent < 15
    await obs.aclose()


def test_the_comment_is_formatted_as_the_origin_runner_did() -> None:
    body = rating(
        comment="Nice",
        reason="accurate",
        context="The answer is 42.",
        includeTranscript=True,
        transcript=[{"role": "user", "content": "q?"}, {"content": "a"}],
    )
    parsed = parse_feedback(json.dumps(body).encode())
    assert parsed.comment == (
        "Nice\nReason: accurate\n\nMessage:\nThe answer is 42.\n\nFull Transcript:\n[user]: q?\n[unknown]: a"
    )
