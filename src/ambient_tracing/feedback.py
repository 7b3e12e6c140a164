"""The feedback endpoint: thumbs up/down and corrections from the browser, onto the right trace.

The handler validates, resolves the trace id, queues the rating and answers at once; delivery to the
backends runs in :class:`~ambient_tracing.delivery.RatingDelivery`'s thread, with retries and a spool.
Bodies and answers are the origin runner's, so existing frontends work unchanged.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .observability import Observability
from .ratings import MAX_BODY_BYTES, FeedbackError, Rating, parse_feedback

logger = logging.getLogger("ambient_tracing")

#: ``authorize(request, thread_id) -> bool`` (or an awaitable bool): may this caller rate this thread?
Authorize = Callable[[Request, str | None], bool | Awaitable[bool]]
FEEDBACK_EVENT_NAME = "ambient:feedback"


def feedback_endpoint(
    observability: Observability, *, authorize: Authorize | None = None
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette handler: ``Route("/feedback", feedback_endpoint(obs), methods=["POST"])``."""

    async def endpoint(request: Request) -> Response:
        try:
            body = await _read_body(request)
            rating = await _resolve(observability, request, parse_feedback(body), authorize)
        except FeedbackError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ClientDisconnect:
            return Response(status_code=400)
        return JSONResponse(_answer(observability, rating, json.loads(body).get("payload")))

    return endpoint


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise FeedbackError(413, f"feedback body is over {MAX_BODY_BYTES // 1024} KiB")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise FeedbackError(413, f"feedback body is over {MAX_BODY_BYTES // 1024} KiB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _resolve(
    observability: Observability, request: Request, rating: Rating, authorize: Authorize | None
) -> Rating:
    """The rating with its trace id; FeedbackError(403) when the caller may not rate that trace."""
    owner = observability.thread_of(rating.trace_id) if rating.trace_id else None
    if rating.thread_id and owner and owner != rating.thread_id:
        raise FeedbackError(403, "payload.traceId belongs to another thread")
    thread_id = rating.thread_id or owner
    if authorize is not None:
        allowed = authorize(request, thread_id)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed:
            raise FeedbackError(403, "not allowed to rate this thread")
    if rating.trace_id is None and rating.thread_id:
        return rating.with_trace(observability.last_trace_id(rating.thread_id))
    return rating


def _answer(observability: Observability, rating: Rating, payload: Any) -> dict[str, Any]:
    accepted: list[str] = []
    if observability.enabled:
        try:
            accepted = observability.submit_rating(rating)
        except (OverflowError, RuntimeError) as exc:
            logger.warning("ambient-tracing: rating not accepted: %s", exc)
    skipped = {
        name: "no trace id"
        for name in observability.ratings.sinks
        if name not in accepted and rating.trace_id is None
    }
    event: dict[str, Any] = {
        "name": FEEDBACK_EVENT_NAME,
        "metaType": rating.kind,
        "payload": payload,
        "recorded": bool(accepted),
        "traceId": rating.trace_id,
        "backends": accepted,
    }
    if skipped:
        event["skipped"] = skipped
    if rating.trace_id is None and accepted:
        event["note"] = "no trace known for this thread here: session-level where possible, looked up later"
    return {"type": "RAW", "event": event}
