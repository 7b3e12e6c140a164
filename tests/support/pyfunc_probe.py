"""Run as a child process: how often MLflow tries to import ``mlflow.pyfunc`` while turns are
traced, with numpy missing as under mlflow-skinny. Prints the count."""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import tempfile
from collections.abc import Sequence
from types import ModuleType
from typing import Any


class CountingFinder(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.attempts = 0

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name.startswith("mlflow.pyfunc"):
            self.attempts += 1
        return None


def main() -> None:
    sys.modules["numpy"] = None  # type: ignore[assignment]  # as with mlflow-skinny
    finder = CountingFinder()
    sys.meta_path.insert(0, finder)
    base = importlib.import_module("ambient_tracing.backends.base")
    mlflow_backend = importlib.import_module("ambient_tracing.backends.mlflow")
    backend = mlflow_backend.MlflowBackend(tracking_uri=f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    backend.setup()
    before = finder.attempts
    for number in range(1, 4):
        turn = backend.start_run(base.RunStart("t", f"r{number}", None, None, "probe", number, "hi"))
        turn.start_child("tool_x", base.SpanKind.TOOL).end(output="ok")
        turn.end(output="done")
    backend.flush(10)
    print(finder.attempts - before, flush=True)


if __name__ == "__main__":
    main()
