"""Pytest fixtures: a real ``mlflow server`` on 127.0.0.1 (sqlite store in tmp) and MlflowBackends.

MLflow tracing is process-wide (one tracking URI), so every MLflow test in the session talks to the
one server; each test gets its own experiment. Span batching is turned off for the test process so a
trace is readable ~0.1 s after its run ends instead of ~5 s (export stays asynchronous).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import stop_process

from .server import free_port

os.environ.setdefault("MLFLOW_USE_BATCH_SPAN_PROCESSOR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network beyond 127.0.0.1
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class MlflowServer:
    """``mlflow server`` as a child process; :meth:`stop` and :meth:`start` again on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store_uri = f"sqlite:///{root / 'mlflow.db'}"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> MlflowServer:
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child process owns it
        self._process = subprocess.Popen(
            [
                str(mlflow_cli),
                "server",
                "--backend-store-uri",
                self.store_uri,
                "--default-artifact-root",
                (self.root / "artifacts").as_uri(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            # No job runner and consumers (four extra processes per server): tracing does not use them.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")
            time.sleep(0.2)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        process, self._process = self._process, None
        stop_process(process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_backend(mlflow_server: MlflowServer) -> Callable[..., Any]:
    """Factory: ``mlflow_backend()`` -> a set-up MlflowBackend on the server, in a fresh experiment."""
    from ambient_tracing.backends.mlflow import MlflowBackend

    def make(experiment_name: str | None = None) -> MlflowBackend:
        backend = MlflowBackend(
            tracking_uri=mlflow_server.url,
            experiment_name=experiment_name or f"test-{uuid.uuid4().hex[:10]}",
        )
        backend.setup()
        return backend

    return make


def wait_for_trace(
    tracking_uri: str,
    trace_id: str,
    ready: Callable[[Any], bool] = lambda trace: True,
    timeout: float = 30.0,
) -> Any:
    """``get_trace`` until the trace (bare hex or ``tr-`` id) is stored and ``ready(trace)``; bounded.

    Over OTLP the trace's metadata (previews, ``user_name``, ``workflow_*``) follows its spans in a
    second call: a ready trace is also awaited (up to 5 s more) to have ``mlflow.traceInputs``."""
    from mlflow import MlflowClient

    from ambient_tracing.backends.mlflow import to_mlflow_trace_id

    client = MlflowClient(tracking_uri=tracking_uri)
    deadline = time.monotonic() + timeout
    metadata_deadline: float | None = None
    while True:
        try:
            trace = client.get_trace(to_mlflow_trace_id(trace_id))
        except Exception:
            trace = None
        if trace is not None and ready(trace):
            if metadata_deadline is None:
                metadata_deadline = time.monotonic() + 5.0
            if "mlflow.traceInputs" in trace.info.trace_metadata or time.monotonic() > metadata_deadline:
                return trace
        elif time.monotonic() > deadline:
            raise AssertionError(f"trace {trace_id} not in {tracking_uri} within {timeout} s")
        time.sleep(0.1)
