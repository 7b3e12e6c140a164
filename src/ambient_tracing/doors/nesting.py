"""Whether the response being served is already traced, so a second layer does not trace it again.

An app that wraps its events in :func:`~ambient_tracing.trace_agui_stream` and is also served behind
:class:`~ambient_tracing.TracingMiddleware` would otherwise record each run twice and send two id
events. The middleware marks the request (a ContextVar, as sentry-python's
``_asgi_middleware_applied`` does); an inner middleware passes the request through, and the stream
wrapper passes its events through once the middleware traces the response (an SSE response: the
middleware sends its start before the app's body is iterated). A response the middleware does not
trace (not SSE) is still traced by the wrapper.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol


class TracedRequest(Protocol):
    @property
    def traces_response(self) -> bool:
        """Whether the middleware traces this request's response."""
        ...


_request: ContextVar[TracedRequest | None] = ContextVar("ambient_tracing_request", default=None)


def inside_middleware() -> bool:
    """Whether an outer :class:`~ambient_tracing.TracingMiddleware` serves the current request."""
    return _request.get() is not None


def request_traced() -> bool:
    """Whether an outer middleware traces the current response."""
    request = _request.get()
    return request is not None and request.traces_response


@contextmanager
def tracing_request(request: TracedRequest) -> Iterator[None]:
    """Mark the current request for the code (and the tasks it starts) inside the block."""
    token = _request.set(request)
    try:
        yield
    finally:
        _request.reset(token)
