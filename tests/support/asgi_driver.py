"""Drive an ASGI app in-process, the way a server would, without sockets: fast enough for property
tests. The request body is given in chunks; the response is collected; the client may disconnect
after a given number of body bytes (ASGI 2.4: ``send`` raises OSError; 2.3: ``send`` does nothing
and ``receive`` answers ``http.disconnect``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Driven:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    more_body: list[bool] = field(default_factory=list)
    disconnected: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


def http_scope(
    path: str = "/agent", *, spec_version: str = "2.4", headers: Sequence[tuple[bytes, bytes]] = ()
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def drive(
    app: ASGIApp,
    body: Sequence[bytes] = (b"{}",),
    *,
    cut_after: int | None = None,
    spec_version: str = "2.4",
    path: str = "/agent",
    headers: Sequence[tuple[bytes, bytes]] = (),
    timeout: float = 10.0,
) -> Driven:
    """Run one request through ``app``; exceptions from the app propagate (bounded by ``timeout``)."""
    driven = Driven()
    pending = list(body) or [b""]
    disconnect = asyncio.Event()
    sent = 0

    async def receive() -> Message:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await asyncio.wait_for(disconnect.wait(), timeout)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal sent
        if driven.disconnected:
            if spec_version >= "2.4":
                raise OSError("client disconnected")
            return
        if message["type"] == "http.response.start":
            driven.status = message["status"]
            driven.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if cut_after is not None and sent + len(chunk) >= cut_after:
                driven.chunks.append(chunk[: cut_after - sent])
                driven.disconnected = True
                disconnect.set()
                if spec_version >= "2.4":
                    raise OSError("client disconnected")
                return
            sent += len(chunk)
            driven.chunks.append(chunk)
            driven.more_body.append(bool(message.get("more_body", False)))
            if not message.get("more_body", False):
                disconnect.set()

    await asyncio.wait_for(
        app(http_scope(path, spec_version=spec_version, headers=headers), receive, send), timeout
    )
    return driven


def sse_app(
    chunks: Sequence[bytes] | Callable[[bytes], Sequence[bytes]],
    *,
    content_type: bytes = b"text/event-stream",
    pause: float = 0.0,
    seen: list[bytes] | None = None,
    end: str = "empty",
) -> ASGIApp:
    """A bare ASGI app: reads the whole request body (kept in ``seen``), then sends ``chunks`` (or
    ``chunks(body)``) as body messages, sleeping ``pause`` between them when given. ``end``: "empty"
    (a last empty message ends the body), "last" (the last chunk carries ``more_body`` False) or
    "none" (the app returns without ending the body)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        parts: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        request = b"".join(parts)
        if seen is not None:
            seen.append(request)
        out = chunks(request) if callable(chunks) else chunks
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}
        )
        for index, chunk in enumerate(out):
            last = end == "last" and index == len(out) - 1
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if pause:
                await asyncio.sleep(pause)
        if end == "empty" or (end == "last" and not out):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def aiter_chunks(chunks: Sequence[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def frame(event: dict[str, Any], eol: bytes = b"\n") -> bytes:
    """One SSE frame as the AG-UI encoder writes it (compact JSON), with the given line ending."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + eol + eol
