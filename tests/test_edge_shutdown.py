"""Shutdown when an SDK hangs: ``aclose`` returns and the process exits within ``flush_timeout``
plus a few seconds (uvicorn child processes; a tracking server that accepts and never answers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.fixtures_mlflow import MlflowServer
from tests.support.hanging import HangingServer
from tests.support.server import free_port

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
FLUSH_TIMEOUT = 2.0
#: Past flush_timeout: aclose's grace, uvicorn's own shutdown and interpreter exit, on a busy machine.
EXIT_SLACK = 6.0
#: A GET while the SDKs hang: no wait on them at all; the bound is the loaded machine's, not a hang's
#: (MLflow's own request timeout here is 120 s).
HEALTH_BOUND = 2.0


def child_env(**overrides: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",  # MLflow's own defaults: far longer than the test
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "7",
        **overrides,
    }


def exit_seconds(child: subprocess.Popen[str], limit: float) -> float:
    start = time.monotonic()
    try:
        child.wait(limit)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)
        pytest.fail(f"the process did not exit within {limit} s")
    return time.monotonic() - start


def test_a_flush_that_never_returns_does_not_keep_the_process_alive() -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.support.hung_flush_child", str(FLUSH_TIMEOUT)],
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    total = exit_seconds(child, 60)
    out, err = child.communicate()
    assert child.returncode == 0, err[-2000:]
    aclose = float(out.split()[-1])
    assert aclose <= FLUSH_TIMEOUT + 2
    assert total <= FLUSH_TIMEOUT + EXIT_SLACK
    assert "left behind" in err


def post_run(port: int, run_id: str) -> str:
    body = {"threadId": "t-shutdown", "runId": run_id, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"http://127.0.0.1:{port}/agent", json=body, timeout=30).text


def test_runs_stream_and_uvicorn_exits_in_time_when_both_tracking_servers_stop_answering(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    # MLflow is set up through a proxy to the real server, which then stops answering; the
    # Langfuse host never answers at all.
    with HangingServer(upstream=("127.0.0.1", mlflow_server.port)) as mlflow_proxy, HangingServer() as hung:
        port = free_port()
        env = child_env(
            OBSERVABILITY_BACKENDS="mlflow,langfuse",
            MLFLOW_TRACING_ENABLED="1",
            MLFLOW_TRACKING_URI=mlflow_proxy.url,
            MLFLOW_EXPERIMENT_NAME="shutdown-hang",
            LANGFUSE_ENABLED="1",
            LANGFUSE_PUBLIC_KEY="pk-lf-test",
            LANGFUSE_SECRET_KEY="sk-lf-test",
            LANGFUSE_HOST=hung.url,
            LANGFUSE_FLUSH_TIMEOUT=str(FLUSH_TIMEOUT),
            AMBIENT_FEEDBACK_SPOOL=str(tmp_path / "spool.jsonl"),
        )
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.support.child_app", str(port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            # Until MLflow is set up (through the proxy), a run is traced by Langfuse alone.
            while not _announced(port, "r-setup") or not _mlflow_ready(mlflow_server, "shutdown-hang"):
                assert child.poll() is None and time.monotonic() < deadline, "the child did not come up"
                time.sleep(0.5)
            mlflow_proxy.hang()
            # Both SDKs now hang in every call that reaches their server; runs still stream intact
            # with their ids, and another request waits for none of it.
            slowest = 0.0
            for index in range(5):
                text = post_run(port, f"r-hung-{index}")
                assert text.count("ambient:trace_id") == 1 and "RUN_FINISHED" in text
                started = time.monotonic()
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < HEALTH_BOUND, slowest
            child.send_signal(signal.SIGTERM)
            seconds = exit_seconds(child, 90)
        finally:
            if child.poll() is None:
                child.kill()
        _, err = child.communicate()
        # Within the bound whichever way each exporter gave up (the package's OTLP exporter stops
        # waiting for a destination that did not answer; an SDK's flush is left behind).
        assert seconds <= FLUSH_TIMEOUT + EXIT_SLACK, err[-3000:]


def _announced(port: int, run_id: str) -> bool:
    try:
        return "ambient:trace_id" in post_run(port, run_id)
    except httpx.TransportError:  # not listening yet
        return False


def _mlflow_ready(server: MlflowServer, experiment: str) -> bool:
    """Whether the child's MLflow backend has recorded a trace (so it is set up)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.url)
    found = client.get_experiment_by_name(experiment)
    return found is not None and bool(client.search_traces(locations=[found.experiment_id], max_results=1))
