"""Feedback from the browser: the origin runner's ``META`` body parsed into a :class:`Rating`.

Pure data and validation, no HTTP and no vendor: the endpoint turns :class:`FeedbackError` into a
status code, the delivery queue stores ratings as JSON, the backends record them.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

from ambient_tracing.backends.rating import KINDS, Rating
from ambient_tracing.privacy import mask, mask_id

MAX_BODY_BYTES = 256 * 1024
#: The most one rating takes once stored (its JSON, the caller's identity included): 413 beyond.
MAX_STORED_BYTES = MAX_BODY_BYTES
MAX_FIELD_CHARS = 4_000
#: A thread id longer than this is refused (400), never cut: a cut id would name another thread.
MAX_THREAD_ID_CHARS = 1_000
MAX_TRANSCRIPT_CHARS = 64_000
_TRACE_ID = re.compile(r"^(?:tr-)?([0-9a-fA-F]{32})$")


class FeedbackError(ValueError):
    """A client mistake: ``status`` is the HTTP status to answer with (400, 403, 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_size(rating: Rating) -> None:
    """FeedbackError(413) when the stored rating would be over ``MAX_STORED_BYTES``."""
    if len(rating.to_json().encode("utf-8")) > MAX_STORED_BYTES:
        raise FeedbackError(413, f"the rating is over {MAX_STORED_BYTES // 1024} KiB once stored")


def normalize_trace_id(value: Any) -> str | None:
    """32 hex (either backend's form, ``tr-`` prefix allowed) -> bare lower-case hex; None if absent."""
    if value is None or value == "":
        return None
    match = _TRACE_ID.match(value) if isinstance(value, str) else None
    if match is None:
        raise FeedbackError(400, "payload.traceId must be 32 hex characters, optionally prefixed 'tr-'")
    return match.group(1).lower()


def parse_feedback(body: bytes) -> Rating:
    """Validate an origin-compatible feedback body; raises :class:`FeedbackError` on client mistakes."""
    return rating_from(decode_body(body))


def rating_from(data: dict[str, Any]) -> Rating:
    """The rating of a decoded feedback body (see :func:`decode_body`)."""
    if data.get("type") != "META":
        raise FeedbackError(400, "type must be 'META'")
    kind = data.get("metaType")
    if kind not in KINDS:
        raise FeedbackError(400, "metaType must be one of " + ", ".join(KINDS))
    payload = data.get("payload") or {}
    if not isinstance(payload, dict):
        raise FeedbackError(400, "payload must be a JSON object")
    correction = _text(payload.get("correction"))
    if kind == "correction" and not correction:
        raise FeedbackError(400, "a correction needs payload.correction")
    user_id = _text(payload.get("userId"), 200)
    metadata = {
        "project": _text(payload.get("projectName"), 200),
        "session": _text(payload.get("sessionName"), 200),
        "user": user_id,
        "feedbackType": kind,
        "workflow": _text(payload.get("workflow"), 200),
        "messageId": _text(payload.get("messageId"), 200),
    }
    return Rating(
        kind=kind,
        thread_id=_thread_id(data.get("threadId")),
        trace_id=normalize_trace_id(payload.get("traceId")),
        user_id=user_id,
        message_id=metadata["messageId"],
        comment=_comment(payload),
        correction=correction,
        metadata={key: value for key, value in metadata.items() if value},
    )


def decode_body(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; every way it can be malformed is a 400 (413: too big) saying which."""
    if len(body) > MAX_BODY_BYTES:
        raise FeedbackError(413, f"feedback body is over {MAX_BODY_BYTES // 1024} KiB")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FeedbackError(400, f"feedback body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise FeedbackError(400, "feedback body is nested too deeply") from None
    except FeedbackError:
        raise
    except ValueError as exc:
        raise FeedbackError(400, f"feedback body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise FeedbackError(400, "feedback body must be a JSON object")
    try:
        # Lone surrogates ("\\ud800") are valid JSON escapes but no text: they cannot be stored or echoed.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise FeedbackError(400, "feedback body holds a lone surrogate escape (\\ud800-\\udfff)") from None
    except RecursionError:
        raise FeedbackError(400, "feedback body is nested too deeply") from None
    return data


def _refuse_constant(name: str) -> Any:
    raise FeedbackError(400, f"feedback body holds {name}, which JSON does not allow")


def _thread_id(value: Any) -> str | None:
    """The thread id exactly as sent: never stripped or cut (a changed id would be another thread)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise FeedbackError(400, "threadId must be a string")
    if len(value) > MAX_THREAD_ID_CHARS:
        raise FeedbackError(400, f"threadId is over {MAX_THREAD_ID_CHARS} characters")
    return value


def _text(value: Any, limit: int = MAX_FIELD_CHARS) -> str | None:
    """A string field, cut to ``limit`` characters; numbers are accepted as text, anything else ignored."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    text = str(value).strip()
    return text[:limit] if text else None


def _comment(payload: dict[str, Any]) -> str | None:
    """The comment exactly as the origin runner built it: the parts joined by a newline."""
    parts: list[str] = []
    if comment := _text(payload.get("comment")):
        parts.append(comment)
    if reason := _text(payload.get("reason")):
        parts.append(f"Reason: {reason}")
    if context := _text(payload.get("context")):
        parts.append(f"\nMessage:\n{context}")
    transcript = payload.get("transcript")
    if payload.get("includeTranscript") and isinstance(transcript, list) and transcript:
        lines = "\n".join(
            f"[{_text(entry.get('role'), 40) or 'unknown'}]: {_text(entry.get('content')) or ''}"
            for entry in transcript
            if isinstance(entry, dict)
        )
        parts.append(f"\nFull Transcript:\n{lines}"[:MAX_TRANSCRIPT_CHARS])
    return "\n".join(parts) if parts else None


def masked_rating(rating: Rating) -> Rating:
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
