"""The backends: one module per vendor behind the small protocol in :mod:`.base`, built from the
configuration by :func:`from_config` (vendor modules import their SDKs, so they load only then).

Everything needed to write another backend is here: the span side (:class:`TracingBackend`,
:class:`Span`, :class:`RunStart`, ...) and the feedback side (:class:`RatingSink`,
:class:`TraceFinder`, :class:`TraceOwner`, :class:`Rating`, :class:`RatingRejected`,
:class:`TraceNotStored`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ambient_tracing.backends.base import (
    NULL_SPAN,
    RUN_SPAN_NAME,
    RatingRejected,
    RatingSink,
    RunStart,
    Span,
    SpanKind,
    SpanSink,
    TokenUsage,
    TraceFinder,
    TraceNotStored,
    TraceOwner,
    TracingBackend,
)
from ambient_tracing.backends.rating import Rating
from ambient_tracing.config import OtelSettings, TracingConfig

if TYPE_CHECKING:
    from ambient_tracing.backends.langfuse import LangfuseBackend
    from ambient_tracing.backends.mlflow import MlflowBackend
    from ambient_tracing.backends.otel import OtelBackend

logger = logging.getLogger(__name__)

__all__ = [
    "NULL_SPAN",
    "RUN_SPAN_NAME",
    "LangfuseBackend",
    "MlflowBackend",
    "OtelBackend",
    "Rating",
    "RatingRejected",
    "RatingSink",
    "RunStart",
    "Span",
    "SpanKind",
    "SpanSink",
    "TokenUsage",
    "TraceFinder",
    "TraceNotStored",
    "TraceOwner",
    "TracingBackend",
    "from_config",
]


def from_config(config: TracingConfig) -> list[TracingBackend]:
    """The backends ``config`` turns on. One that cannot be built (SDK missing, bad settings) is left
    out with a warning, as the origin runner ran without it."""
    backends: list[TracingBackend] = []
    if config.langfuse is not None:
        settings = config.langfuse
        with _building("Langfuse", "LANGFUSE_ENABLED", "langfuse"):
            from ambient_tracing.backends.langfuse import LangfuseBackend

            backends.append(
                LangfuseBackend(
                    public_key=settings.public_key,
                    secret_key=settings.secret_key,
                    host=settings.host,
                    sample_rate=settings.sample_rate,
                    flush_timeout=settings.flush_timeout,
                )
            )
    if config.mlflow is not None:
        with _building("MLflow", "MLFLOW_TRACING_ENABLED", "mlflow"):
            from ambient_tracing.backends.mlflow import MlflowBackend

            backends.append(
                MlflowBackend(
                    tracking_uri=config.mlflow.tracking_uri, experiment_name=config.mlflow.experiment_name
                )
            )
    if config.otel is not None:
        with _building("OpenTelemetry", "OBSERVABILITY_BACKENDS=otel", "otel"):
            backends.append(_otel_backend(config.otel))
    return backends


def _otel_backend(settings: OtelSettings) -> TracingBackend:
    from ambient_tracing.backends.otel import OtelBackend

    return OtelBackend(
        endpoint=settings.endpoint,
        headers=settings.headers,
        service_name=settings.service_name,
        resource_attributes=settings.resource_attributes,
        sample_rate=settings.sample_rate,
        timeout=settings.timeout,
        compress=settings.compress,
    )


@contextmanager
def _building(vendor: str, switch: str, extra: str) -> Iterator[None]:
    """Builds one backend: a missing SDK or a failing constructor turns that backend off, logged.
    Only the exception's type is logged: its text may carry keys or the host's credentials."""
    try:
        yield
    except ImportError:
        logger.warning(
            "%s tracing is off: %s is set but the %s package is not installed "
            "(pip install 'ambient-tracing[%s]')",
            vendor,
            switch,
            extra,
            extra,
        )
    except Exception as exc:
        logger.warning(
            "%s tracing is off: its client could not be created (%s; check the %s settings)",
            vendor,
            type(exc).__name__,
            vendor,
        )


def __getattr__(name: str) -> Any:
    # The vendor backends import their SDKs; load them only when asked for.
    if name == "LangfuseBackend":
        from ambient_tracing.backends.langfuse import LangfuseBackend

        return LangfuseBackend
    if name == "MlflowBackend":
        from ambient_tracing.backends.mlflow import MlflowBackend

        return MlflowBackend
    if name == "OtelBackend":
        from ambient_tracing.backends.otel import OtelBackend

        return OtelBackend
    raise AttributeError(f"module 'ambient_tracing.backends' has no attribute {name!r}")
