"""Blackholed backends: stream time while a backend never answers, as a ratio to a healthy one.

Child cases (``python -m benchmarks.blackhole CASE EVENTS REPS [URLS...]``, one JSON line each):

- ``langfuse HEALTHY BLACKHOLE REFUSED``: three LangfuseBackends (receiver that answers; a host that
  accepts TCP connections and never reads or answers; a closed port) plus ``raw``, interleaved.
- ``mlflow-server``: a real ``mlflow server`` (sqlite) as a child; MlflowBackend set up against it;
  streams while it is healthy, then after it is stopped (export queue failing in the background).
- ``mlflow-unreachable``: an MlflowBackend on a closed port, never set up beforehand: the first run
  starts its setup in a worker thread (which retries for minutes), and the stream must not wait.

Stream time is the wall time of an in-process ASGI run (no sockets on the app side).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.base import TracingBackend

from .common import median, rotated
from .inprocess import drive
from .receivers import closed_port_url
from .variants import langfuse_backend, mlflow_backend
from .workload import make_app, request_body


def _traced(backend: TracingBackend) -> ASGIApp:
    return TracingMiddleware(make_app(), observability=Observability([backend]))


def _timed(
    apps: dict[str, ASGIApp], events: int, reps: int, loop: asyncio.AbstractEventLoop
) -> dict[str, Any]:
    walls: dict[str, list[float]] = {name: [] for name in apps}
    trace_frames: dict[str, int] = {}
    for name, app in apps.items():
        first = loop.run_until_complete(drive(app, json.dumps(request_body(200)).encode(), keep_first=300))
        trace_frames[name] = first.first.count(b"ambient:trace_id")
    for repetition in range(reps):
        for name in rotated(list(apps), repetition):
            body = json.dumps(request_body(events, run_id=f"bh-{name}-{repetition}")).encode()
            start = time.perf_counter()
            loop.run_until_complete(drive(apps[name], body))
            walls[name].append(time.perf_counter() - start)
    return {"wall_s": {name: median(values) for name, values in walls.items()}, "id_frame": trace_frames}


def main(case: str, events: int, reps: int, urls: list[str]) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    if case == "langfuse":
        healthy_url, blackhole_url, refused_url = urls
        apps: dict[str, ASGIApp] = {
            "raw": make_app(),
            "langfuse-healthy": _traced(langfuse_backend(healthy_url, flush_timeout=2.0)),
            "langfuse-blackhole": _traced(langfuse_backend(blackhole_url, flush_timeout=2.0)),
            "langfuse-refused": _traced(langfuse_backend(refused_url, flush_timeout=2.0)),
        }
        return _timed(apps, events, reps, loop)
    if case == "mlflow-server":
        before = dict(os.environ)
        from tests.support.fixtures_mlflow import MlflowServer

        for key in set(os.environ) - set(before):  # keep MLflow's own export defaults
            del os.environ[key]
        with tempfile.TemporaryDirectory() as tmp:
            server = MlflowServer(Path(tmp)).start()
            try:
                backend = mlflow_backend(server.url)
                healthy_apps: dict[str, ASGIApp] = {"raw": make_app(), "mlflow-healthy": _traced(backend)}
                healthy = _timed(healthy_apps, events, reps, loop)
            finally:
                server.stop()
            gone_apps: dict[str, ASGIApp] = {"raw": make_app(), "mlflow-gone": _traced(backend)}
            gone = _timed(gone_apps, events, reps, loop)
        return {
            "wall_s": {
                **healthy["wall_s"],
                "raw (gone phase)": gone["wall_s"]["raw"],
                "mlflow-gone": gone["wall_s"]["mlflow-gone"],
            },
            "id_frame": {**healthy["id_frame"], **gone["id_frame"]},
        }
    if case == "mlflow-unreachable":
        backend = mlflow_backend(closed_port_url(), setup=False)
        unreachable_apps: dict[str, ASGIApp] = {"raw": make_app(), "mlflow-unreachable": _traced(backend)}
        return _timed(unreachable_apps, events, reps, loop)
    raise SystemExit(f"unknown case {case!r}")


if __name__ == "__main__":
    result = main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    print(json.dumps(result), flush=True)
    os._exit(0)  # never wait for a blackholed exporter's exit hook
