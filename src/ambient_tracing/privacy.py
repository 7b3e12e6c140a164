"""The runner's privacy mask (``LANGFUSE_MASK_MESSAGES``): pure functions on values.

With the mask on, no string longer than 50 characters that came from the user, the model, a tool
or an error reaches a backend: not in inputs, outputs, status messages, attributes, metadata, tags,
span names, dict keys, nor the Session Metrics. Ids longer than the limit become a digest
(``masked-<16 hex>``), the same for the same id, so sessions and users still group; shorter strings
(ids, names, labels, "ok") stay. Where it is applied, off the event loop: a run's spans by
:class:`~ambient_tracing.spans.outgoing.OutgoingSpan` (span worker) and
:func:`~ambient_tracing.backends.records.outgoing_record` (exporter threads); ratings by
:func:`~ambient_tracing.feedback.ratings.masked_rating`; Session Metrics on their reporter's thread.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from ambient_tracing import fast_json

REDACTED = "[REDACTED FOR PRIVACY]"
# Strings up to this length (ids, short labels, "ok") stay readable; longer ones are content.
MAX_VISIBLE_CHARS = 50
# Deeper than this, a value is redacted whole (JSON from the wire may nest thousands deep).
_MAX_DEPTH = 64
_SCALARS = (int, float, bool, type(None))
_PLAIN_SCALARS = frozenset(_SCALARS)
# In JSON text without an escaped quote, a string over the limit is its opening quote followed by
# more than the limit of characters that are not quotes.
_LONG_STRING = re.compile(f'"[^"]{{{MAX_VISIBLE_CHARS + 1}}}')


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
            return fast_json.loads(text)
        except ValueError:
            pass
    return text


def mask(value: Any, _depth: int = 0) -> Any:
    """Every string longer than 50 characters, at any depth and in dict keys, as ``[REDACTED FOR
    PRIVACY]``; numbers, booleans and None kept; anything else (or nested too deep) redacted.
    (Short strings and numbers inside a container are kept without a call: most of a decoded
    tool payload, masked on the exporter's thread for every span.)"""
    if isinstance(value, str):
        return REDACTED if len(value) > MAX_VISIBLE_CHARS else value
    if isinstance(value, _SCALARS):
        return value
    if _depth >= _MAX_DEPTH:
        return REDACTED
    depth = _depth + 1
    if isinstance(value, Mapping):
        masked: dict[Any, Any] = {}
        for key, item in value.items():
            if type(key) is not str or len(key) > MAX_VISIBLE_CHARS or key == REDACTED:
                key = _free_key(masked, mask(key, depth))
            masked[key] = item if _kept(item) else mask(item, depth)
        return masked
    if isinstance(value, (list, tuple)):
        return [item if _kept(item) else mask(item, depth) for item in value]
    return REDACTED


def mask_json(value: Any) -> Any:
    """``mask(decoded(value))``, without walking a :class:`JsonText`'s value when its text shows
    there is nothing to mask: no escaped quote, no quote followed by more than the limit of other
    characters (so no string, key or value, over it), fewer brackets than the depth limit. Tool
    payloads are masked so for every span on the exporters' threads; most hold only short strings."""
    plain = decoded(value)
    return plain if _shows_nothing_to_mask(value, plain) else mask(plain)


def outgoing_payload(value: Any, *, masked: bool, as_text: bool = False) -> Any:
    """A tool payload (arguments, result) as it leaves the process: :func:`mask_json` when
    ``masked``, else :func:`decoded`. For a destination that stores a payload's JSON text as its
    value (``as_text``: Langfuse, an MLflow server 3.7+), a :class:`JsonText` stays the wire's text
    where that shows the same (mask off, or nothing in it to mask): neither decoded nor encoded again."""
    if not (as_text and type(value) is JsonText and _utf8(value)):
        return mask_json(value) if masked else decoded(value)
    if not masked or len(value) <= MAX_VISIBLE_CHARS:
        return value
    plain = decoded(value)  # parsed once: whether it is JSON, and what to mask when it is needed
    return value if _shows_nothing_to_mask(value, plain) else mask(plain)


def _shows_nothing_to_mask(value: Any, plain: Any) -> bool:
    """Whether ``value``, a :class:`JsonText` whose JSON value is ``plain``, has nothing to mask."""
    return type(value) is JsonText and type(plain) in (dict, list) and _nothing_to_mask(value)


def _utf8(text: str) -> bool:
    """Whether ``text`` can be UTF-8 (no lone surrogate: JSON escapes them, protobuf cannot)."""
    if text.isascii():  # O(1) in CPython
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _nothing_to_mask(text: str) -> bool:
    return (
        text.count("{") + text.count("[") < _MAX_DEPTH
        and text.find('\\"') < 0
        and _LONG_STRING.search(text) is None
    )


def _kept(value: Any) -> bool:
    """Whether ``value`` is kept as it is: a short plain string, a plain number, a bool or None."""
    kind = type(value)
    return kind in _PLAIN_SCALARS or (kind is str and len(value) <= MAX_VISIBLE_CHARS)


def _free_key(masked: Mapping[Any, Any], key: Any) -> Any:
    """``key``, numbered when two long keys were both redacted (neither value is lost)."""
    if key != REDACTED or key not in masked:
        return key
    number = 2
    while f"{REDACTED} {number}" in masked:
        number += 1
    return f"{REDACTED} {number}"


def _anything_to_mask(attributes: Mapping[str, Any]) -> bool:
    for key, value in attributes.items():
        if type(key) is not str or len(key) > MAX_VISIBLE_CHARS or key == REDACTED or not _kept(value):
            return True
    return False


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


def mask_attributes(attributes: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """:func:`mask` for span attributes (the same mapping when nothing in it is long), the
    conversation id as :func:`mask_id` makes it."""
    if not attributes or not _anything_to_mask(attributes):
        return attributes
    masked: dict[str, Any] = mask(attributes)
    conversation = attributes.get("gen_ai.conversation.id")
    if isinstance(conversation, str):
        masked["gen_ai.conversation.id"] = mask_id(conversation)  # the session's id, as a digest
    return masked
