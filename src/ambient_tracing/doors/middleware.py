"""The ASGI door: trace every AG-UI run an app streams, and tell the browser its trace id.

A pure ASGI middleware in the manner of Starlette's GZipMiddleware: per request, a responder
wraps ``receive`` (to copy the RunAgentInput the app reads) and ``send`` (to watch the SSE body).
Body chunks are forwarded as they come, in order and unchanged; the only addition is one
``CUSTOM ambient:trace_id`` frame right after each run's RUN_STARTED frame.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ambient_tracing.doors.feedback_route import Authorize, feedback_endpoint
from ambient_tracing.doors.nesting import inside_middleware, tracing_request
from ambient_tracing.doors.responder import RunResponder
from ambient_tracing.observability import Observability

logger = logging.getLogger(__name__)

UserResolver = Callable[[Scope], "tuple[str | None, str | None]"]


@dataclass
class TracingMiddleware:
    """Wrap an ASGI app so every AG-UI run it streams becomes a trace.

    ``app.add_middleware(TracingMiddleware)`` configures itself from the environment and owns
    that :class:`Observability` (started and closed with the app's lifespan). Pass
    ``observability=`` to share one you own. The user comes from ``user_id_header`` /
    ``user_name_header``, or from ``user_resolver(scope) -> (user_id, user_name)``.
    ``feedback_path="/feedback"`` also serves :func:`~ambient_tracing.feedback_endpoint` there
    (POST), with ``feedback_authorize`` as its ``authorize`` hook and this middleware's user as the
    rater. Served here, it answers before any middleware added earlier (the app's authentication),
    so it refuses callers it cannot identify (401) unless ``feedback_allow_anonymous=True``; other
    methods (a CORS preflight) go to the app. To run it inside the app's stack, mount the endpoint
    as a route instead.
    """

    app: ASGIApp
    observability: Observability | None = None
    user_id_header: str = "x-current-user-id"
    user_name_header: str = "x-current-user-name"
    user_resolver: UserResolver | None = None
    #: How long lifespan startup waits for backend preparation before serving anyway.
    startup_timeout: float = 10.0
    feedback_path: str | None = None
    feedback_authorize: Authorize | None = None
    feedback_allow_anonymous: bool = False
    _owns_observability: bool = field(init=False, default=False)
    _feedback_endpoint: Callable[[Request], Awaitable[Response]] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.observability is None:
            self.observability = Observability.from_env()
            self._owns_observability = True
        if self.feedback_path:
            self._feedback_endpoint = feedback_endpoint(
                self.observability,
                authorize=self.feedback_authorize,
                user_resolver=self._user,
                allow_anonymous=self.feedback_allow_anonymous,
            )
            logger.info(
                "serving feedback at %s ahead of the app's middleware; %s",
                self.feedback_path,
                "anonymous ratings ARE accepted (feedback_allow_anonymous=True)"
                if self.feedback_allow_anonymous
                else "ratings from callers not identified by user headers/user_resolver are refused",
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        observability = self.observability
        assert observability is not None
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
        elif (
            scope["type"] == "http"
            and self._feedback_endpoint
            and scope["path"] == self.feedback_path
            and scope["method"] == "POST"
        ):
            await self._feedback(scope, receive, send)
        elif (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not observability.enabled
            or inside_middleware()  # an outer TracingMiddleware traces it already
        ):
            await self.app(scope, receive, send)
        else:
            responder = RunResponder(self.app, observability, self._user, scope, receive, send)
            with tracing_request(responder):
                await responder.run()

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._feedback_endpoint is not None
        response = await self._feedback_endpoint(Request(scope, receive))
        await response(scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        observability = self.observability
        assert observability is not None

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and observability.enabled:
                try:
                    await asyncio.wait_for(asyncio.shield(observability.start()), self.startup_timeout)
                except TimeoutError:
                    logger.warning(
                        "backends not ready after %ss; serving, and tracing once ready",
                        self.startup_timeout,
                    )
            elif message["type"] == "lifespan.shutdown.complete" and self._owns_observability:
                await observability.aclose()
            await send(message)

        return lifespan_send

    def _user(self, scope: Scope) -> tuple[str | None, str | None]:
        if self.user_resolver is not None:
            return self.user_resolver(scope)
        wanted = {self.user_id_header.lower().encode(): 0, self.user_name_header.lower().encode(): 1}
        found: list[str | None] = [None, None]
        for name, value in scope.get("headers", ()):
            index = wanted.get(name)
            if index is not None and value:
                found[index] = value.decode("latin-1")
        return found[0], found[1]
