"""How long a thumbs up takes to show on its trace in MLflow, with MLflow's default (batched) export.

    .venv/bin/python -m benchmarks.feedback_delay [--runs 5]

Each round: one AG-UI run through the middleware (sqlite store), then at once a rating without a
trace id to the feedback endpoint, then ``get_trace`` every 50 ms until the assessment is there.
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

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import httpx
from mlflow import MlflowClient
from starlette.applications import Starlette
from starlette.routing import Route
from tests.support.agui_app import agui_app, run_input
from tests.support.client import post_run
from tests.support.server import serve

from ambient_tracing import Observability, TracingMiddleware, feedback_endpoint
from ambient_tracing.backends.mlflow import MlflowBackend

from . import common  # noqa: F401 - puts the repository on sys.path for tests.support


async def measure(runs: int, root: Path) -> list[float]:
    backend = MlflowBackend(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment_name="delay")
    obs = Observability([backend], feedback_spool=root / "spool.jsonl")
    routes = [*agui_app().routes, Route("/feedback", feedback_endpoint(obs), methods=["POST"])]
    client = MlflowClient(tracking_uri=backend.tracking_uri)
    delays: list[float] = []
    with serve(TracingMiddleware(Starlette(routes=routes), observability=obs), startup_timeout=120) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            for number in range(runs):
                thread = f"thread-{number}"
                [trace_id] = (await post_run(url, run_input(thread, f"run-{number}"), client=http)).trace_ids
                sent = time.monotonic()
                body = {"type": "META", "metaType": "thumbs_up", "threadId": thread, "payload": {}}
                await http.post(f"{url}/feedback", content=json.dumps(body))
                deadline = sent + 120
                while time.monotonic() < deadline:
                    try:
                        trace = await asyncio.to_thread(client.get_trace, f"tr-{trace_id}")
                        if trace.info.assessments:
                            break
                    except Exception:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise RuntimeError("the rating did not arrive within 120 s")
                delays.append(time.monotonic() - sent)
                print(f"run {number}: rating visible in MLflow after {delays[-1]:.2f} s", flush=True)
    await obs.aclose()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        delays = asyncio.run(measure(args.runs, Path(root)))
    print(
        f"\n| runs | median | min | max |\n|---|---|---|---|\n"
        f"| {len(delays)} | {statistics.median(delays):.2f} s | {min(delays):.2f} s | {max(delays):.2f} s |"
    )


if __name__ == "__main__":
    main()
