"""ambient-tracing: trace every AG-UI agent run to Langfuse and/or MLflow, and tell the browser
its trace id so feedback lands on the right trace.

The public API is the names below. Writing a backend: :mod:`ambient_tracing.backends`; testing an
app: :mod:`ambient_tracing.testing`. Backends are imported lazily, so the package works (as a
passthrough) without either vendor SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ambient_tracing.config import FeedbackLimits, TracingConfig
from ambient_tracing.doors.feedback_route import feedback_endpoint
from ambient_tracing.doors.middleware import TracingMiddleware
from ambient_tracing.doors.responder import TRACE_ID_EVENT_NAME
from ambient_tracing.doors.stream import trace_agui_stream, trace_id_event
from ambient_tracing.observability import Observability
from ambient_tracing.session_metrics.pricing import ModelPrice

if TYPE_CHECKING:
    from ambient_tracing.backends.langfuse import LangfuseBackend
    from ambient_tracing.backends.mlflow import MlflowBackend

__all__ = [
    "TRACE_ID_EVENT_NAME",
    "FeedbackLimits",
    "LangfuseBackend",
    "MlflowBackend",
    "ModelPrice",
    "Observability",
    "TracingConfig",
    "TracingMiddleware",
    "feedback_endpoint",
    "trace_agui_stream",
    "trace_id_event",
]


def __getattr__(name: str) -> Any:
    # The vendor backends import their SDKs; load them only when asked for.
    if name in ("LangfuseBackend", "MlflowBackend"):
        from ambient_tracing import backends

        return getattr(backends, name)
    raise AttributeError(f"module 'ambient_tracing' has no attribute {name!r}")
