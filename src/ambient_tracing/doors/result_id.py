"""``RUN_FINISHED.result.traceId``: the run's trace id where AG-UI's Mastra integration puts it
(opt-in: ``Observability(result_trace_id=True)`` / ``AMBIENT_RESULT_TRACE_ID=true``).

The event is edited as bytes, not re-encoded: the key is spliced in and every other byte of the
event stays as the app wrote it (spacing, key order, number and string spellings).

- ``result`` is an object without ``traceId``: ``"traceId":"<id>"`` becomes its first member;
- ``result`` is absent: ``,"result":{"traceId":"<id>"}`` is added as the event's last member;
- ``result`` is anything else (a string, a list, ``null``; in the Python door ``None`` is absent),
  or already has a ``traceId``: the event is left untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

RESULT_TRACE_ID_KEY = "traceId"

_decoder = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def result_with_trace_id(result: Any, trace_id: str) -> tuple[bool, Any]:
    """For the Python door: (changed, the new result) by the same rules as :func:`with_result_trace_id`."""
    if result is None:
        return True, {RESULT_TRACE_ID_KEY: trace_id}
    if isinstance(result, Mapping) and RESULT_TRACE_ID_KEY not in result:
        return True, {RESULT_TRACE_ID_KEY: trace_id, **result}
    return False, result


def with_result_trace_id(data: bytes, trace_id: str) -> bytes | None:
    """The event's JSON (one SSE ``data`` payload) with ``result.traceId`` spliced in; None when it is
    left untouched (see the module's rules) or is not a JSON object."""
    try:
        text = data.decode("utf-8")
        members = _top_level_members(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if members is None:
        return None
    close, spans = members
    member = f'"{RESULT_TRACE_ID_KEY}":{json.dumps(trace_id)}'
    if "result" not in spans:
        separator = "," if spans else ""
        return (text[:close] + f'{separator}"result":{{{member}}}' + text[close:]).encode("utf-8")
    start, end = spans["result"]
    value = _decoder.raw_decode(text, start)[0]
    if not isinstance(value, dict) or RESULT_TRACE_ID_KEY in value:
        return None
    inside = start + 1
    empty = not text[inside : end - 1].strip(_WHITESPACE)
    return (text[:inside] + member + ("" if empty else ",") + text[inside:]).encode("utf-8")


def _top_level_members(text: str) -> tuple[int, dict[str, tuple[int, int]]] | None:
    """The offset of the object's closing brace and where each top-level member's value lies;
    None when ``text`` is not one JSON object (or has duplicate ``result`` keys)."""
    index = _skip(text, 0)
    if text[index : index + 1] != "{":
        return None
    spans: dict[str, tuple[int, int]] = {}
    index = _skip(text, index + 1)
    while text[index : index + 1] != "}":
        if spans:
            if text[index : index + 1] != ",":
                return None
            index = _skip(text, index + 1)
        if text[index : index + 1] != '"':
            return None
        key, index = json.decoder.scanstring(text, index + 1)  # type: ignore[attr-defined]
        index = _skip(text, index)
        if text[index : index + 1] != ":":
            return None
        start = _skip(text, index + 1)
        end = _decoder.raw_decode(text, start)[1]
        if key in spans and key == "result":
            return None
        spans[key] = (start, end)
        index = _skip(text, end)
    if text[index + 1 :].strip(_WHITESPACE):
        return None
    return index, spans


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index
