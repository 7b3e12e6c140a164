"""What the request that started a run tells about it: thread, run, user and the user's message."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class CallerTrace:
    """A trace id settled before the run opened (by the middleware, at response start, so it can go
    in the ``traceresponse`` header), already admitted by :meth:`Runs.admit
    <ambient_tracing.tracer.runs.Runs.admit>`: from a trusted ``traceparent`` (then with the
    caller's span as the root's parent) or derived from the request's runId."""

    trace_id: str
    #: The caller's span (16 hex), from ``traceparent``; None for a runId-derived id.
    parent_span_id: str | None = None
    #: The root span's id, announced in ``traceresponse``.
    root_span_id: int | None = None
    #: The runId the id was derived from: it applies only to the run with that runId.
    run_id: str | None = None

    def applies_to(self, run_id: str | None) -> bool:
        return self.run_id is None or run_id in (None, self.run_id)


@dataclass(frozen=True, slots=True)
class RunRequest:
    """The parts of a RunAgentInput (plus the caller's identity) that a trace records."""

    thread_id: str | None = None
    run_id: str | None = None
    user_message: Any = None
    user_id: str | None = None
    user_name: str | None = None
    #: The trace id settled before the stream (the first run of the stream that it applies to uses it).
    caller: CallerTrace | None = None

    @classmethod
    def from_input(cls, run_input: Any) -> RunRequest:
        """From a RunAgentInput model or its JSON dict; anything else gives an empty request."""
        if hasattr(run_input, "model_dump"):
            run_input = run_input.model_dump(by_alias=True, exclude_none=True)
        if not isinstance(run_input, Mapping):
            return cls()
        return cls(
            thread_id=_str_or_none(run_input.get("threadId", run_input.get("thread_id"))),
            run_id=_str_or_none(run_input.get("runId", run_input.get("run_id"))),
            user_message=last_user_message(run_input.get("messages")),
        )

    @classmethod
    def from_body(cls, body: bytes) -> RunRequest:
        """From raw request bytes; a body that is not a JSON object gives an empty request."""
        try:
            return cls.from_input(json.loads(body))
        except (ValueError, RecursionError):
            return cls()

    def with_user(self, user_id: str | None, user_name: str | None) -> RunRequest:
        return replace(self, user_id=user_id, user_name=user_name)

    def with_caller(self, caller: CallerTrace | None) -> RunRequest:
        return replace(self, caller=caller)


def last_user_message(messages: Any) -> Any:
    """The content of the last ``role: user`` message, or None."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return message.get("content")
    return None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
