"""What the core hands a run's spans, as it leaves the process: tool payloads decoded and, with the
privacy mask on, everything masked (see :mod:`ambient_tracing.privacy`). Applied where a span is
built (the span worker, for SDK backends); package-built records get the same in their exporter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from ambient_tracing.backends.base import RunStart, Span, SpanKind, TokenUsage
from ambient_tracing.backends.records import mask_usage
from ambient_tracing.privacy import (
    decoded,
    mask,
    mask_attributes,
    mask_id,
    mask_json,
    mask_name,
    mask_text,
)


def mask_run(run: RunStart) -> RunStart:
    """What a run opens with, masked (ids as digests), and marked so its spans are masked too."""
    return replace(
        run,
        masked=True,
        thread_id=mask_id(run.thread_id),
        run_id=mask_id(run.run_id),
        user_id=mask_id(run.user_id),
        user_name=mask(run.user_name),
        input=mask(run.input),
        attributes=None if run.attributes is None else mask_attributes(run.attributes),
    )


class OutgoingSpan:
    """A span that prepares everything passed to it as it leaves the process (:class:`JsonText`
    decoded; all of it masked when ``masked``) before the backend's span sees it. Wrapped around a
    backend's span where that span is built: on the span worker, or on the loop for an in-process one."""

    __slots__ = ("_masked", "_span")

    def __init__(self, span: Span, masked: bool) -> None:
        self._span = span
        self._masked = masked

    @property
    def trace_id(self) -> str:
        return self._span.trace_id

    def _value(self, value: Any) -> Any:
        return mask_json(value) if self._masked else decoded(value)

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> Span:
        masked = self._masked
        child = self._span.start_child(
            mask_name(name) if masked else name,
            kind,
            input=self._value(input),
            attributes=mask_attributes(attributes) if masked else attributes,
            start_time_ns=start_time_ns,
        )
        return OutgoingSpan(child, masked)

    def set_input(self, input: Any) -> None:
        self._span.set_input(self._value(input))

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
        if not self._masked:
            self._span.end(
                output=decoded(output),
                error=error,
                model=model,
                usage=usage,
                attributes=attributes,
                end_time_ns=end_time_ns,
            )
            return
        self._span.end(
            output=mask_json(output),
            error=mask_text(error),
            model=mask(model),
            usage=mask_usage(usage),
            attributes=mask_attributes(attributes),
            end_time_ns=end_time_ns,
        )
