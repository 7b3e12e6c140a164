"""Whether the request being served is already traced, so a second layer does not trace it again.

An app that wraps its events in :func:`~ambient_tracing.trace_agui_stream` and is also served behind
:class:`~ambient_tracing.TracingMiddleware` would otherwise record each run twice and send two id
events. The outer layer marks the request (a ContextVar, as sentry-python's
``_asgi_middleware_applied`` does); the inner one sees the mark and passes everything through.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_traced: ContextVar[bool] = ContextVar("ambient_tracing_request_traced", default=False)


def request_traced() -> bool:
    """Whether an outer layer of this package is tracing the current request."""
    return _traced.get()


@contextmanager
def tracing_request() -> Iterator[None]:
    """Mark the current request as traced for the code (and the tasks it starts) inside the block."""
    token = _traced.set(True)
    try:
        yield
    finally:
        _traced.reset(token)
