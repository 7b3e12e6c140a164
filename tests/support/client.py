"""Reading an AG-UI stream over real HTTP the way a browser would."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from ambient_tracing import TRACE_ID_EVENT_NAME


@dataclass
class Streamed:
    raw: bytes
    events: list[dict[str, Any]]

    @property
    def trace_ids(self) -> list[str]:
        return [
            e["value"]["traceId"]
            for e in self.events
            if e.get("type") == "CUSTOM" and e.get("name") == TRACE_ID_EVENT_NAME
        ]

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


def parse_events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for frame in raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in frame.split(b"\n") if line.startswith(b"data:")]
        if data:
            events.append(json.loads(b"\n".join(data)))
    return events


async def post_run(
    base_url: str,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    client: httpx.AsyncClient | None = None,
) -> Streamed:
    """POST ``body`` to /agent and read the whole SSE response as raw bytes (bounded by a timeout)."""
    own = client is None
    client = client or httpx.AsyncClient(timeout=httpx.Timeout(30))
    try:
        chunks = []
        async with client.stream("POST", f"{base_url}/agent", json=body, headers=headers) as response:
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
        raw = b"".join(chunks)
        return Streamed(raw, parse_events(raw))
    finally:
        if own:
            await client.aclose()
