"""Pytest fixture: a real Arize Phoenix server (``phoenix serve``) on 127.0.0.1, temp working dir.

Phoenix is not in the dev extra (its dependencies move pins the producers' tests need): ``make
phoenix`` installs it into its own virtualenv, ``.venv-phoenix`` (or set ``AMBIENT_PHOENIX_PYTHON`` to
a Python that has ``arize-phoenix``). Without one, the tests that need it are skipped, saying so.
Every listener of the server is checked to be on loopback; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import stop_process

from .server import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("phoenix_launch.py")
_LISTENERS = (
    "import json, sys, psutil; p = psutil.Process(int(sys.argv[1])); "
    "print(json.dumps([c.laddr[0] for q in [p, *p.children(recursive=True)] "
    "for c in q.net_connections(kind='inet') if c.status == 'LISTEN']))"
)


def phoenix_python() -> str | None:
    """A Python that has arize-phoenix, or None."""
    candidates = [
        os.environ.get("AMBIENT_PHOENIX_PYTHON", ""),
        str(ROOT / ".venv-phoenix" / "bin" / "python"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            probe = subprocess.run(
                [candidate, "-c", "import phoenix.server.main"], capture_output=True, timeout=120
            )
            if probe.returncode == 0:
                return candidate
    return None


class PhoenixServer:
    def __init__(self, python: str, workdir: Path) -> None:
        self.python = python
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "phoenix.log"

    def start(self, timeout: float = 120.0) -> PhoenixServer:
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "PHOENIX_"))},
            "PHOENIX_WORKING_DIR": str(self.workdir),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(free_port()),
            "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [self.python, str(LAUNCHER)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"phoenix exited: {self.log.read_text()[-3000:]}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"phoenix did not start within {timeout} s: {self.log.read_text()[-3000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def listeners(self) -> list[str]:
        """The addresses the server's processes listen on."""
        assert self.process is not None
        out = subprocess.run(
            [self.python, "-c", _LISTENERS, str(self.process.pid)],
            capture_output=True,
            timeout=60,
            check=True,
        )
        return list(json.loads(out.stdout))

    def spans(self, project: str, trace_id: str) -> list[dict[str, Any]]:
        """The trace's spans as Phoenix's REST API returns them ([] while not there)."""
        url = f"{self.url}/v1/projects/{project}/spans?trace_id={trace_id}&limit=1000"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return list(json.loads(response.read())["data"])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # the project does not exist yet
                return []
            raise

    def wait_for_spans(
        self, project: str, trace_id: str, count: int, timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        spans: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans(project, trace_id)
            if len(spans) >= count:
                return spans
            time.sleep(0.2)
        raise AssertionError(f"{count} spans of {trace_id} not in Phoenix within {timeout} s: {spans}")

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)


@pytest.fixture(scope="session")
def phoenix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhoenixServer]:
    python = phoenix_python()
    if python is None:
        pytest.skip(
            "Arize Phoenix is not installed: `make phoenix` (its own venv, .venv-phoenix) "
            "or AMBIENT_PHOENIX_PYTHON=<a python with arize-phoenix>"
        )
    server = PhoenixServer(python, tmp_path_factory.mktemp("phoenix")).start()
    try:
        yield server
    finally:
        server.stop()


__all__ = ["PhoenixServer", "phoenix_server"]
