"""What the request that started a run tells about it: thread, run, user and the user's message."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class RunRequest:
    """The parts of a RunAgentInput (plus the caller's identity) that a trace records."""

    thread_id: str | None = None
    run_id: str | None = None
    user_message: Any = None
    user_id: str | None = None
    user_name: str | None = None

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
