"""Feedback: ratings accepted per second, and time from POST to visible in each backend.

    .venv/bin/python -m benchmarks.feedback_delay [--runs 5] [--ratings 400] [--concurrency 16]

One app served by uvicorn: MLflow (sqlite store, MLflow's default batched export) and Langfuse (the
real SDK exporting to the loopback receiver), the feedback endpoint mounted as a route.

* throughput: ``--ratings`` thumbs (distinct messages, so distinct ratings) on the known traces of
  8 threads from 40 callers, ``--concurrency`` at a time over HTTP; ratings answered
  ``recorded: true`` per second.
* delay: ``--runs`` rounds of one AG-UI run, then at once a rating without a trace id, then polling
  (every 20 ms) until the rating is on the run's trace in MLflow (an assessment) and in Langfuse (a
  score with that trace id).

Run it with ``PYTHONPATH=<checkout>/src`` to measure another checkout's code, or let
:mod:`benchmarks.feedback_compare` run two checkouts in turn and print them side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from . import common  # noqa: F401, I001 - puts the repository on sys.path for tests.support

import httpx
from mlflow import MlflowClient
from starlette.applications import Starlette
from starlette.routing import Route
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.server import serve

import ambient_tracing
from ambient_tracing import Observability, TracingMiddleware, feedback_endpoint
from ambient_tracing.backends.langfuse import LangfuseBackend
from ambient_tracing.backends.mlflow import MlflowBackend

USER = {"x-current-user-id": "bench-user"}
#: Throughput ratings are spread over this many threads (one run each) and callers, as many users
#: rating many runs would be (one thread and one caller would meet the per-thread/caller limits).
THREADS = 8
USERS = 40


def _body(thread: str, trace_id: str | None, message: str) -> str:
    payload: dict[str, Any] = {"messageId": message, "userId": "bench-user"}
    if trace_id:
        payload["traceId"] = trace_id
    return json.dumps({"type": "META", "metaType": "thumbs_up", "threadId": thread, "payload": payload})


async def _throughput(http: httpx.AsyncClient, url: str, ratings: int, concurrency: int) -> tuple[float, int]:
    traces = [
        (await post_run(url, run_input(f"tp-thread-{n}", f"tp-run-{n}"), client=http)).trace_ids[0]
        for n in range(THREADS)
    ]
    gate = asyncio.Semaphore(concurrency)
    recorded = 0

    async def one(number: int) -> None:
        nonlocal recorded
        async with gate:
            thread = number % THREADS
            body = _body(f"tp-thread-{thread}", traces[thread], f"tp-message-{number}")
            headers = {"x-current-user-id": f"bench-user-{number % USERS}"}
            response = await http.post(f"{url}/feedback", content=body, headers=headers)
            if response.status_code == 200 and response.json()["event"]["recorded"]:
                recorded += 1

    started = time.monotonic()
    await asyncio.gather(*(one(number) for number in range(ratings)))
    return recorded / (time.monotonic() - started), recorded


async def _until(check: Any, deadline: float) -> float | None:
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic()
        await asyncio.sleep(0.02)
    return None


async def measure(args: argparse.Namespace, root: Path, receiver: LangfuseReceiver) -> dict[str, Any]:
    mlflow_side = MlflowBackend(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment_name="delay")
    langfuse_side = LangfuseBackend(
        public_key="pk-lf-bench", secret_key="sk-lf-bench", host=receiver.base_url, flush_interval=0.5
    )
    obs = Observability([mlflow_side, langfuse_side], feedback_spool=root / "spool" / "feedback.db")
    routes = [*agui_app().routes, Route("/feedback", feedback_endpoint(obs), methods=["POST"])]
    client = MlflowClient(tracking_uri=mlflow_side.tracking_uri)
    mlflow_delays: list[float] = []
    langfuse_delays: list[float] = []
    app = TracingMiddleware(Starlette(routes=routes), observability=obs)
    with serve(app, startup_timeout=120) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            rate, recorded = await _throughput(http, url, args.ratings, args.concurrency)
            print(f"throughput: {recorded}/{args.ratings} recorded, {rate:.0f} ratings/s", flush=True)
            for number in range(args.runs):
                thread = f"thread-{number}"
                [trace_id] = (await post_run(url, run_input(thread, f"run-{number}"), client=http)).trace_ids
                sent = time.monotonic()
                await http.post(f"{url}/feedback", content=_body(thread, None, "m"), headers=USER)

                async def in_mlflow(trace_id: str = trace_id) -> bool:
                    try:
                        trace = await asyncio.to_thread(client.get_trace, f"tr-{trace_id}")
                    except Exception:
                        return False
                    return bool(trace.info.assessments)

                async def in_langfuse(trace_id: str = trace_id) -> bool:
                    return any(score.get("traceId") == trace_id for score in receiver.scores)

                deadline = sent + 120
                seen_langfuse, seen_mlflow = await asyncio.gather(
                    _until(in_langfuse, deadline), _until(in_mlflow, deadline)
                )
                if seen_langfuse is None or seen_mlflow is None:
                    raise RuntimeError("the rating did not arrive in both backends within 120 s")
                langfuse_delays.append(seen_langfuse - sent)
                mlflow_delays.append(seen_mlflow - sent)
                print(
                    f"run {number}: visible in Langfuse after {langfuse_delays[-1]:.2f} s, "
                    f"in MLflow after {mlflow_delays[-1]:.2f} s",
                    flush=True,
                )
    await obs.aclose()
    return {"rate": rate, "recorded": recorded, "mlflow": mlflow_delays, "langfuse": langfuse_delays}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ratings", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here (for feedback_compare)")
    args = parser.parse_args()
    print(f"code under test: {ambient_tracing.__file__}")
    with tempfile.TemporaryDirectory() as root, LangfuseReceiver() as receiver:
        result = asyncio.run(measure(args, Path(root), receiver))
    if args.json:
        args.json.write_text(json.dumps(result))
    rows = [
        ("accepted ratings/s", f"{result['rate']:.0f} ({result['recorded']}/{args.ratings} recorded)"),
        ("POST -> Langfuse, median", f"{statistics.median(result['langfuse']):.2f} s"),
        ("POST -> MLflow, median", f"{statistics.median(result['mlflow']):.2f} s"),
        ("POST -> MLflow, min / max", f"{min(result['mlflow']):.2f} / {max(result['mlflow']):.2f} s"),
    ]
    print("\n| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
