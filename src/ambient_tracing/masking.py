"""The runner's privacy mask (``LANGFUSE_MASK_MESSAGES``), for every backend.

With the mask on, no string longer than 50 characters that came from the user, the model, a tool
or an error reaches a backend: not in inputs, outputs, status messages, attributes, metadata, tags,
span names, dict keys, nor the Session Metrics. :class:`MaskingSpan` applies it to everything the
core hands a span, and :func:`mask_turn` to what a turn opens with, so a field the core adds later
is masked too. Ids longer than the limit become a digest (``masked-<16 hex>``), the same for the
same id, so sessions and users still group; shorter strings (ids, names, labels, "ok") stay.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .backends.base import Span, SpanKind, TokenUsage, TurnStart
from .ratings import Rating

REDACTED = "[REDACTED FOR PRIVACY]"
# Strings up to this length (ids, short labels, "ok") stay readable; longer ones are content.
MAX_VISIBLE_CHARS = 50
# Deeper than this, a value is redacted whole (JSON from the wire may nest thousands deep).
_MAX_DEPTH = 64
_SCALARS = (int, float, bool, type(None))


def mask(value: Any, _depth: int = 0) -> Any:
    """Every string longer than 50 characters, at any depth and in dict keys, as ``[REDACTED FOR
    PRIVACY]``; numbers, booleans and None kept; anything else (or nested too deep) redacted."""
    if isinstance(value, str):
        return REDACTED if len(value) > MAX_VISIBLE_CHARS else value
    if isinstance(value, _SCALARS):
        return value
    if _depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        masked: dict[Any, Any] = {}
        for key, item in value.items():
            masked[_free_key(masked, mask(key, _depth + 1))] = mask(item, _depth + 1)
        return masked
    if isinstance(value, (list, tuple)):
        return [mask(item, _depth + 1) for item in value]
    return REDACTED


def _free_key(masked: Mapping[Any, Any], key: Any) -> Any:
    """``key``, numbered when two long keys were both redacted (neither value is lost)."""
    if key != REDACTED or key not in masked:
        return key
    number = 2
    while f"{REDACTED} {number}" in masked:
        number += 1
    return f"{REDACTED} {number}"


def mask_text(text: str | None) -> str | None:
    """A status or error message: a long one keeps a short ``head: `` (an exception type, an error
    code, "run ended") and loses the rest."""
    if text is None or len(text) <= MAX_VISIBLE_CHARS:
        return text
    head, separator, _ = text.partition(": ")
    return f"{head}: {REDACTED}" if separator and len(head) <= MAX_VISIBLE_CHARS - 2 else REDACTED


def mask_id(value: str | None) -> str | None:
    """An id: kept up to the limit, else a digest that is the same for the same id."""
    if value is None or len(value) <= MAX_VISIBLE_CHARS:
        return value
    return "masked-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def mask_name(name: str) -> str:
    """A span name built from a wire string (``tool_<name>``): its prefix kept, the rest redacted."""
    if len(name) <= MAX_VISIBLE_CHARS:
        return name
    prefix, separator, _ = name.partition("_")
    return f"{prefix}_{REDACTED}" if separator and len(prefix) <= 16 else REDACTED


def mask_usage(usage: Sequence[TokenUsage]) -> Sequence[TokenUsage]:
    if all(_short(entry.model) and _short(entry.provider) for entry in usage):
        return usage
    return tuple(replace(entry, model=mask(entry.model), provider=mask(entry.provider)) for entry in usage)


def _short(text: str | None) -> bool:
    return text is None or len(text) <= MAX_VISIBLE_CHARS


def mask_turn(turn: TurnStart) -> TurnStart:
    """What a turn opens with, masked (ids as digests)."""
    return replace(
        turn,
        thread_id=mask_id(turn.thread_id),
        run_id=mask_id(turn.run_id),
        user_id=mask_id(turn.user_id),
        user_name=mask(turn.user_name),
        input=mask(turn.input),
        attributes=None if turn.attributes is None else _mask_attributes(turn.attributes),
    )


def mask_rating(rating: Rating) -> Rating:
    """A rating as the backends get it: its ids as on the traces (digests past the limit, so the
    thread's trace is still found), its labels masked; its texts (comment, correction) are the
    user's words to the operators, kept as written."""
    return replace(
        rating,
        thread_id=mask_id(rating.thread_id),
        user_id=mask_id(rating.user_id),
        message_id=mask_id(rating.message_id),
        metadata={
            key: (mask_id(value) or "") if key in ("user", "messageId") else mask(value)
            for key, value in rating.metadata.items()
        },
    )


def _mask_attributes(attributes: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if not attributes:
        return attributes
    masked: dict[str, Any] = mask(attributes)
    conversation = attributes.get("gen_ai.conversation.id")
    if isinstance(conversation, str):
        masked["gen_ai.conversation.id"] = mask_id(conversation)  # the session's id, as a digest
    return masked


class MaskingSpan:
    """A span that masks everything passed to it before the backends' span sees it."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    @property
    def trace_id(self) -> str:
        return self._span.trace_id

    def start_child(
        self,
        name: str,
        kind: SpanKind,
        *,
        input: Any = None,
        attributes: Mapping[str, Any] | None = None,
        start_time_ns: int | None = None,
    ) -> Span:
        return MaskingSpan(
            self._span.start_child(
                mask_name(name),
                kind,
                input=mask(input),
                attributes=_mask_attributes(attributes),
                start_time_ns=start_time_ns,
            )
        )

    def set_input(self, input: Any) -> None:
        self._span.set_input(mask(input))

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
        self._span.end(
            output=mask(output),
            error=mask_text(error),
            model=mask(model),
            usage=mask_usage(usage),
            attributes=_mask_attributes(attributes),
            end_time_ns=end_time_ns,
        )
