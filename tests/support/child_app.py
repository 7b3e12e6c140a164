"""Run as a child process: the scripted AG-UI app behind TracingMiddleware configured from the
environment, served by uvicorn on the given port until SIGINT/SIGTERM."""

from __future__ import annotations

import sys

import uvicorn

from ambient_tracing import TracingMiddleware
from tests.support.agui_app import agui_app


def main(port: int) -> None:
    app = TracingMiddleware(agui_app(delay=0.001), startup_timeout=2.0)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main(int(sys.argv[1]))
