"""The runner's privacy mask (``LANGFUSE_MASK_MESSAGES``), for every backend, and what else is done
to a span's values as they leave the process.

With the mask on, no string longer than 50 characters that came from the user, the model, a tool
or an error reaches a backend: not in inputs, outputs, status messages, attributes, metadata, tags,
span names, dict keys, nor the Session Metrics. :func:`mask_turn` masks what a turn opens with and
marks it (:attr:`TurnStart.masked`); everything the core later hands the turn's spans is masked
where each span is built or encoded, off the event loop: by :class:`OutgoingSpan` on the span worker
(SDK backends) and by :func:`outgoing_record` on each exporter's thread, so a field the core adds
later is masked too. Ids longer than the limit become a digest (``masked-<16 hex>``), the same for
the same id, so sessions and users still group; shorter strings (ids, names, labels, "ok") stay.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .backends.base import Span, SpanKind, TokenUsage, TurnStart
from .ratings import Rating
from .records import SpanRecord

REDACTED = "[REDACTED FOR PRIVACY]"
# Strings up to this length (ids, short labels, "ok") stay readable; longer ones are content.
MAX_VISIBLE_CHARS = 50
# Deeper than this, a value is redacted whole (JSON from the wire may nest thousands deep).
_MAX_DEPTH = 64
_SCALARS = (int, float, bool, type(None))


class JsonText(str):
    """Tool arguments or a tool result as the wire gave them. Whether it is JSON is found out, and
    the JSON decoded, only where the span is built or encoded, off the event loop (:func:`decoded`)."""

    __slots__ = ()


def decoded(value: Any) -> Any:
    """A :class:`JsonText` as its JSON value when it is JSON, else as plain text; anything else as is."""
    if type(value) is not JsonText:
        return value
    text = str(value)
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


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
    """What a turn opens with, masked (ids as digests), and marked so its spans are masked too."""
    return replace(
        turn,
        masked=True,
        thread_id=mask_id(turn.thread_id),
        run_id=mask_id(turn.run_id),
        user_id=mask_id(turn.user_id),
        user_name=mask(turn.user_name),
        input=mask(turn.input),
        attributes=None if turn.attributes is None else _mask_attributes(turn.attributes),
    )


def outgoing_record(record: SpanRecord) -> SpanRecord:
    """An ended span record as it leaves the process: its :class:`JsonText` decoded and, when its
    turn is masked, everything the core passed masked (the turn itself already is). A copy when
    anything changes; run on an exporter's thread."""
    if not record.turn.masked:
        if type(record.input) is not JsonText and type(record.output) is not JsonText:
            return record
        plain = copy.copy(record)
        plain.input, plain.output = decoded(record.input), decoded(record.output)
        return plain
    masked = copy.copy(record)
    masked.name = mask_name(record.name)
    masked.input = mask(decoded(record.input))
    masked.attributes = _mask_attributes(record.attributes)
    masked.output = mask(decoded(record.output))
    masked.error = mask_text(record.error)
    masked.model = mask(record.model)
    masked.usage = mask_usage(record.usage)
    masked.end_attributes = _mask_attributes(record.end_attributes)
    return masked


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
        return mask(decoded(value)) if self._masked else decoded(value)

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
            attributes=_mask_attributes(attributes) if masked else attributes,
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
            output=mask(decoded(output)),
            error=mask_text(error),
            model=mask(model),
            usage=mask_usage(usage),
            attributes=_mask_attributes(attributes),
            end_time_ns=end_time_ns,
        )
