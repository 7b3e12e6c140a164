"""``ambient-tracing demo --web``: the demo agent, its feedback route and one page, in a browser.

The page (``demo_static/index.html``, vanilla JS, no CDN) chats with :func:`~.demo.demo_app`'s agent
over AG-UI, shows each answer's trace id, posts thumbs up/down and corrections to ``/feedback``, and
reads the stored trace back through ``GET /api/traces/{id}``: its span tree and its ratings.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from ambient_tracing.demo import EXPERIMENT, demo_app, demo_observability
from ambient_tracing.doors.middleware import TracingMiddleware
from ambient_tracing.observability import Observability

DEFAULT_PORT = 8765
_TRACE_ID = re.compile(r"^(?:tr-)?([0-9a-f]{32})$")
_PREVIEW_CHARS = 200


def read_trace(tracking_uri: str, trace_id: str, mlflow_ui: str | None = None) -> dict[str, Any] | None:
    """The stored trace as JSON-ready data (span tree, valid assessments); None while not stored.

    Blocking (MLflow's client): call it from a worker thread."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        trace = MlflowClient(tracking_uri=tracking_uri).get_trace(f"tr-{trace_id}")
    except MlflowException:
        return None
    info = trace.info
    ratings = [
        {
            "name": assessment.name,
            "value": assessment.value,
            "user": assessment.source.source_id if assessment.source else None,
            "sourceType": assessment.source.source_type if assessment.source else None,
            "rationale": assessment.rationale,
        }
        for assessment in info.assessments or []
        if getattr(assessment, "valid", True) is not False
    ]
    link = None
    if mlflow_ui:
        link = (
            f"{mlflow_ui.rstrip('/')}/#/experiments/{info.experiment_id}/traces"
            f"?selectedEvaluationId=tr-{trace_id}"
        )
    return {
        "traceId": trace_id,
        "state": str(info.state),
        # MLflow stores the spans as they end (the state too), then the trace's info with its tags.
        "complete": str(info.state) != "IN_PROGRESS" and "ambient.thread_id" in info.tags,
        "thread": info.tags.get("ambient.thread_id"),
        "spans": _tree(trace.data.spans),
        "ratings": ratings,
        "mlflowUrl": link,
    }


def _tree(spans: list[Any]) -> list[dict[str, Any]]:
    children: dict[str | None, list[Any]] = {}
    for span in sorted(spans, key=lambda span: span.start_time_ns):
        children.setdefault(span.parent_id, []).append(span)

    def node(span: Any) -> dict[str, Any]:
        return {
            "name": span.name,
            "type": span.span_type,
            "ms": round((span.end_time_ns - span.start_time_ns) / 1e6, 1) if span.end_time_ns else None,
            "inputs": _preview(span.inputs),
            "outputs": _preview(span.outputs),
            "children": [node(child) for child in children.get(span.span_id, [])],
        }

    return [node(root) for root in children.get(None, [])]


def _preview(value: Any) -> str | None:
    if value is None:
        return None
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 1] + "…"


def web_app(observability: Observability, tracking_uri: str, mlflow_ui: str | None = None) -> ASGIApp:
    """The demo agent (``POST /agent``) and ``/feedback`` behind the middleware, plus the page and its API.

    Ratings come from callers identified by the ``x-current-user-id`` header (the page sends it)."""
    page = resources.files("ambient_tracing").joinpath("demo_static/index.html").read_text("utf-8")

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"store": tracking_uri, "experiment": EXPERIMENT, "mlflowUi": mlflow_ui})

    async def trace(request: Request) -> JSONResponse:
        match = _TRACE_ID.match(request.path_params["trace_id"].lower())
        if match is None:
            return JSONResponse({"error": "a trace id is 32 hex characters"}, status_code=400)
        found = await asyncio.to_thread(read_trace, tracking_uri, match.group(1), mlflow_ui)
        if found is None:
            return JSONResponse({"traceId": match.group(1), "found": False}, status_code=404)
        return JSONResponse({**found, "found": True})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield  # the middleware starts the backends once this app has started
        await observability.aclose()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/info", info),
            Route("/api/traces/{trace_id}", trace),
            *demo_app().routes,
        ],
        lifespan=lifespan,
    )
    return TracingMiddleware(app, observability=observability, feedback_path="/feedback")


def run_web(store: Path, port: int = DEFAULT_PORT, mlflow_ui: str | None = None, say: Any = print) -> None:
    """Serve the page on 127.0.0.1:``port`` until interrupted."""
    import uvicorn

    observability, tracking_uri = demo_observability(store)
    say(f"Tracing to MLflow store {store} (experiment {EXPERIMENT!r}); preparing it...")
    asyncio.run(observability.start())  # once: the middleware's start at lifespan finds it done
    if mlflow_ui:
        say(f"Trace links open the MLflow UI at {mlflow_ui}")
    else:
        say(
            f"Links to the MLflow UI: run `mlflow ui --backend-store-uri {tracking_uri}` (full `mlflow`), "
            "and pass --mlflow-ui http://127.0.0.1:5000"
        )
    say(f"Open http://127.0.0.1:{port}/ (Ctrl-C stops)")
    uvicorn.run(
        web_app(observability, tracking_uri, mlflow_ui), host="127.0.0.1", port=port, log_level="warning"
    )
