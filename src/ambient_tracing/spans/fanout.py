"""One span that stands for the same span in every active backend.

Each backend call is guarded: a backend that raises is logged once and never reaches the caller,
and the other backends still record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ambient_tracing.backends.base import Span, SpanKind, TokenUsage
from ambient_tracing.failures import warn_once

logger = logging.getLogger(__name__)


def _guarded(span: Span, operation: Callable[[Span], Any]) -> Any:
    # capture_internal_exceptions, written out: this runs for every span operation.
    try:
        return operation(span)
    except Exception as exc:
        warn_once(logger, type(span).__module__, "%s failed and was skipped: %r", type(span).__module__, exc)
        return None


class FanoutSpan:
    """Implements :class:`Span` over one span per backend, all in the same trace."""

    __slots__ = ("_spans", "trace_id")

    def __init__(self, spans: Sequence[Span], trace_id: str) -> None:
        self._spans = tuple(spans)
        self.trace_id = trace_id

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> FanoutSpan:
        def start(span: Span) -> Span:
            return span.start_child(
                name, kind, input=input, attributes=attributes, start_time_ns=start_time_ns
            )

        children = [child for span in self._spans if (child := _guarded(span, start)) is not None]
        return FanoutSpan(children, self.trace_id)

    def set_input(self, input: Any) -> None:
        for span in self._spans:
            _guarded(span, lambda s: s.set_input(input))

    def end(
        self,
        *,
        output: Any = None,
        error: str | None = None,
        model: str | None = None,
        usage: Sequence[TokenUsage] = (),
        attributes: Mapping[str, Any] | None = None,
        end_time_ns: int | None = None,
    ) -> None:
        for span in self._spans:
            _guarded(
                span,
                lambda s: s.end(
                    output=output,
                    error=error,
                    model=model,
                    usage=usage,
                    attributes=attributes,
                    end_time_ns=end_time_ns,
                ),
            )
