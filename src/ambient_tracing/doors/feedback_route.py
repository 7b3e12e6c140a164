"""The feedback endpoint: thumbs up/down and corrections from the browser, onto the right trace.

The handler validates, takes the rater from the request (never from the body when the app identifies
the caller), checks that the trace belongs to the thread the rating names (asking the backends when
this process does not know the trace), and answers ``recorded: true`` once the rating is committed to
the durable queue (:mod:`.delivery`). Bodies and answers are the origin runner's, so existing
frontends work unchanged. Nothing here blocks the event loop: file and backend I/O run in the
package's own threads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from ambient_tracing.backends.rating import Rating
from ambient_tracing.feedback.ratings import (
    MAX_BODY_BYTES,
    FeedbackError,
    check_size,
    decode_body,
    rating_from,
)
from ambient_tracing.feedback.spool import StoreFull, TooManyPending
from ambient_tracing.observability import Observability

logger = logging.getLogger(__name__)

#: ``authorize(request, thread_id) -> bool`` (or an awaitable bool): may this caller rate this thread?
Authorize = Callable[[Request, str | None], bool | Awaitable[bool]]
#: ``user_resolver(scope) -> (user_id, user_name)``: the caller the app identified (None: nobody).
UserResolver = Callable[[Scope], "tuple[str | None, str | None]"]
FEEDBACK_EVENT_NAME = "ambient:feedback"
USER_ID_HEADER = "x-current-user-id"
USER_NAME_HEADER = "x-current-user-name"
#: How long the handler waits for the rating to be committed before answering 503.
STORE_TIMEOUT = 10.0
UNVERIFIED_PREFIX = "unverified:"


def feedback_endpoint(
    observability: Observability,
    *,
    authorize: Authorize | None = None,
    user_resolver: UserResolver | None = None,
    allow_anonymous: bool = True,
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette handler: ``Route("/feedback", feedback_endpoint(obs), methods=["POST"])``.

    The rater is ``user_resolver(scope)`` (default: the ``x-current-user-id`` header, else an
    authenticated ``request.user``). ``payload.userId`` counts only when nobody is identified, and
    then as ``unverified:<userId>``, so it can never replace an identified user's rating; with
    ``allow_anonymous=False`` such ratings are refused (401).
    """
    resolve_user = user_resolver or default_user

    async def endpoint(request: Request) -> Response:
        try:
            return await _handle(observability, request, authorize, resolve_user, allow_anonymous)
        except FeedbackError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ClientDisconnect:
            return Response(status_code=400)
        except Exception:
            logger.exception("feedback not recorded")
            return JSONResponse({"error": "the rating could not be recorded; try again"}, status_code=503)

    return endpoint


def default_user(scope: Scope) -> tuple[str | None, str | None]:
    """The user headers the middleware reads for runs, else Starlette's authenticated ``scope["user"]``."""
    found: dict[bytes, str] = {}
    for name, value in scope.get("headers", ()):
        if name in (USER_ID_HEADER.encode(), USER_NAME_HEADER.encode()) and value:
            found[name] = value.decode("latin-1")
    user_id = found.get(USER_ID_HEADER.encode())
    if user_id is None:
        user = scope.get("user")
        if user is not None and getattr(user, "is_authenticated", False):
            user_id = str(getattr(user, "identity", "") or getattr(user, "display_name", "")) or None
    return user_id, found.get(USER_NAME_HEADER.encode())


async def _handle(
    observability: Observability,
    request: Request,
    authorize: Authorize | None,
    resolve_user: UserResolver,
    allow_anonymous: bool,
) -> Response:
    data = decode_body(await _read_body(request))
    rating = _as_caller(rating_from(data), resolve_user(request.scope)[0], allow_anonymous)
    rating, checked = await _resolve(observability, request, rating, authorize)
    check_size(rating)
    accepted: list[str] = []
    if observability.enabled:
        future = observability.submit_rating(rating, caller=rating.user_id, check_owner=not checked)
        try:
            accepted = await asyncio.wait_for(asyncio.wrap_future(future), STORE_TIMEOUT)
        except StoreFull as exc:
            raise FeedbackError(503, str(exc)) from None
        except TooManyPending as exc:
            raise FeedbackError(429, str(exc)) from None
        except TimeoutError:
            raise FeedbackError(503, "the feedback queue is busy; try again") from None
    return JSONResponse(_answer(observability, rating, data.get("payload"), accepted, checked))


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


def _as_caller(rating: Rating, caller: str | None, allow_anonymous: bool) -> Rating:
    """The rating under the identified caller; unidentified: refused, or marked unverified."""
    if caller:
        return replace(rating, user_id=caller, metadata={**rating.metadata, "user": caller})
    if not allow_anonymous:
        raise FeedbackError(401, "ratings are taken from identified callers only")
    if not rating.user_id:
        return rating
    unverified = f"{UNVERIFIED_PREFIX}{rating.user_id}"
    return replace(rating, user_id=unverified, metadata={**rating.metadata, "user": unverified})


async def _resolve(
    observability: Observability, request: Request, rating: Rating, authorize: Authorize | None
) -> tuple[Rating, bool]:
    """The rating with its thread and trace, and whether the trace's owner was checked here.

    FeedbackError(403) when the trace belongs to another thread or ``authorize`` says no."""
    checked = True
    thread_id = rating.thread_id
    if rating.trace_id:
        owner = observability.thread_of(rating.trace_id)
        if owner is not None:
            if thread_id and owner != thread_id:
                raise FeedbackError(403, "payload.traceId belongs to another thread")
            thread_id = thread_id or owner
        else:
            stored = await observability.owners.find(rating.trace_id)
            if stored == "unknown" or stored is None:
                checked = False  # not stored anywhere yet (or no answer): checked at delivery
            elif stored.verdict(observability.stored_thread_id(thread_id)) == "other":
                raise FeedbackError(403, "payload.traceId belongs to another thread")
            else:
                thread_id = thread_id or stored.thread_id
    if authorize is not None:
        allowed = authorize(request, thread_id)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        if not allowed:
            raise FeedbackError(403, "not allowed to rate this thread")
    if thread_id != rating.thread_id:
        rating = replace(rating, thread_id=thread_id)
    if rating.trace_id is None and rating.thread_id:
        rating = rating.with_trace(observability.last_trace_id(rating.thread_id))
    return rating, checked


def _answer(
    observability: Observability, rating: Rating, payload: Any, accepted: list[str], checked: bool
) -> dict[str, Any]:
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
    if rating.trace_id:
        event["ownership"] = "checked" if checked else "checked at delivery"
    if skipped:
        event["skipped"] = skipped
    if rating.trace_id is None and accepted:
        event["note"] = "no trace known for this thread here: session-level where possible, looked up later"
    return {"type": "RAW", "event": event}
