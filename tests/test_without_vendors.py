"""With neither vendor SDK importable, the package imports and the middleware is a passthrough."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = r"""
import asyncio, importlib.abc, logging, sys

class NoVendors(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("langfuse", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoVendors())
logging.basicConfig(level=logging.WARNING, format="%(message)s")

import ambient_tracing
from ambient_tracing import Observability, TracingMiddleware

env = {
    "OBSERVABILITY_BACKENDS": "langfuse,mlflow",
    "LANGFUSE_ENABLED": "true", "LANGFUSE_PUBLIC_KEY": "pk", "LANGFUSE_SECRET_KEY": "sk",
    "LANGFUSE_HOST": "http://127.0.0.1:9",
    "MLFLOW_TRACING_ENABLED": "true", "MLFLOW_TRACKING_URI": "sqlite:///x.db",
}
obs = Observability.from_env(env)
assert not obs.enabled, obs.backends

body = b'data: {"type":"RUN_STARTED","threadId":"t","runId":"r"}\n\n'

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})

async def main():
    sent = []
    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "POST", "path": "/agent", "headers": []}
    await TracingMiddleware(app, observability=obs)(scope, receive, send)
    assert sent[1]["body"] == body, sent
    print("passthrough ok")

asyncio.run(main())
try:
    ambient_tracing.MlflowBackend
except ImportError as exc:
    print("MlflowBackend:", exc)
"""


def test_no_vendor_sdk_means_a_warning_per_backend_and_a_passthrough() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "passthrough ok" in result.stdout
    assert "pip install 'ambient-tracing[mlflow]'" in result.stdout
    warnings = result.stderr.splitlines()
    assert any("LANGFUSE_ENABLED is set but the langfuse package is not installed" in w for w in warnings)
    assert any("MLFLOW_TRACING_ENABLED is set but the mlflow package is not installed" in w for w in warnings)
