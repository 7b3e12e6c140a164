"""ambient-tracing: trace every AG-UI agent run to Langfuse and/or MLflow, and tell the browser
its trace id so feedback lands on the right trace.

Backends are imported lazily, so the package works (as a passthrough) without either vendor SDK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.base import Span, SpanKind, TokenUsage, TracingBackend, TurnStart
from .config import LangfuseSettings, MlflowSettings, TracingConfig, Workflow, active_workflow
from .core import StreamTracer
from .feedback import feedback_endpoint
from .metrics import SessionMetrics
from .middleware import TracingMiddleware
from .observability import Observability
from .pricing import DEFAULT_PRICES, ModelPrice, Pricing
from .ratings import FeedbackError, Rating, parse_feedback
from .responder import TRACE_ID_EVENT_NAME
from .spool import Limits as FeedbackLimits
from .stream import trace_agui_stream, trace_id_event
from .tool_signals import default_tool_category, tool_failure_reason

if TYPE_CHECKING:
    from .backends.langfuse import LangfuseBackend
    from .backends.mlflow import MlflowBackend

__all__ = [
    "DEFAULT_PRICES",
    "TRACE_ID_EVENT_NAME",
    "FeedbackError",
    "FeedbackLimits",
    "LangfuseBackend",
    "LangfuseSettings",
    "MlflowBackend",
    "MlflowSettings",
    "ModelPrice",
    "Observability",
    "Pricing",
    "Rating",
    "SessionMetrics",
    "Span",
    "SpanKind",
    "StreamTracer",
    "TokenUsage",
    "TracingBackend",
    "TracingConfig",
    "TracingMiddleware",
    "TurnStart",
    "Workflow",
    "active_workflow",
    "default_tool_category",
    "feedback_endpoint",
    "parse_feedback",
    "tool_failure_reason",
    "trace_agui_stream",
    "trace_id_event",
]


def __getattr__(name: str) -> Any:
    # The vendor backends import their SDKs; load them only when asked for.
    if name == "LangfuseBackend":
        from .backends.langfuse import LangfuseBackend

        return LangfuseBackend
    if name == "MlflowBackend":
        from .backends.mlflow import MlflowBackend

        return MlflowBackend
    raise AttributeError(f"module 'ambient_tracing' has no attribute {name!r}")
