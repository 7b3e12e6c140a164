"""A feedback app as its own process (uvicorn on 127.0.0.1): for replicas and for kill/restart tests.

    python -m tests.support.feedback_app PORT SPOOL LANGFUSE_URL [MLFLOW_URL EXPERIMENT]

The scripted agent at ``/agent`` and the feedback endpoint at ``/feedback`` (served by the middleware,
callers identified by the ``x-current-user-id`` header), Langfuse (the real SDK) and optionally MLflow.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_USE_BATCH_SPAN_PROCESSOR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import uvicorn

from ambient_tracing import Observability, TracingMiddleware
from ambient_tracing.backends.base import TracingBackend
from ambient_tracing.backends.langfuse import LangfuseBackend
from tests.support.agui_app import agui_app


def build(
    spool: Path, langfuse_url: str, mlflow_url: str | None, experiment: str | None
) -> TracingMiddleware:
    backends: list[TracingBackend] = [
        LangfuseBackend(
            public_key="pk-lf-child",
            secret_key="sk-lf-child",
            host=langfuse_url,
            flush_at=1,
            flush_interval=0.05,
        )
    ]
    if mlflow_url:
        from ambient_tracing.backends.mlflow import MlflowBackend

        backends.append(MlflowBackend(tracking_uri=mlflow_url, experiment_name=experiment or "replicas"))
    obs = Observability(backends, feedback_spool=spool, flush_timeout=5)
    return TracingMiddleware(agui_app(), observability=obs, feedback_path="/feedback", startup_timeout=60)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    port, spool, langfuse_url = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    mlflow_url = sys.argv[4] if len(sys.argv) > 4 else None
    experiment = sys.argv[5] if len(sys.argv) > 5 else None
    app = build(spool, langfuse_url, mlflow_url, experiment)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
