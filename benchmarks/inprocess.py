"""In-process: the ASGI app driven directly (fake receive/send, no sockets), CPU per event.

Per repetition and variant: one run of N events through ``app(scope, receive, send)`` on one event
loop. Measured: CPU of the event-loop thread during the stream (``time.thread_time``: what delays
other requests) and CPU of the whole process from the request to the end of the backends' export
(``time.process_time`` across the stream plus a flush: what the machine pays). Variant order is
rotated each repetition; the figures are medians over repetitions; "added" is the median of the
per-repetition difference to ``raw`` of the same repetition.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

from .common import fmt, median, rotated, table
from .variants import Variants
from .workload import request_body

STREAM_TIMEOUT = 600.0


def http_scope(body_length: int) -> dict[str, object]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/agent",
        "raw_path": b"/agent",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(body_length).encode()),
            (b"x-current-user-id", b"bench-user"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


@dataclass
class Drive:
    """What one driven request produced."""

    body_bytes: int = 0
    chunks: int = 0
    status: int = 0
    first: bytes = b""


async def drive(app: ASGIApp, body: bytes, *, keep_first: int = 0) -> Drive:
    """One POST /agent through ``app``; the response is counted, not kept (beyond ``keep_first`` bytes)."""
    result = Drive()
    delivered = False
    never = asyncio.Event()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # spec 2.4: the app does not listen for a disconnect while streaming
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            result.body_bytes += len(chunk)
            result.chunks += 1
            if len(result.first) < keep_first:
                result.first += chunk[: keep_first - len(result.first)]
        elif message["type"] == "http.response.start":
            result.status = message["status"]

    await asyncio.wait_for(app(http_scope(len(body)), receive, send), STREAM_TIMEOUT)
    return result


@dataclass
class Sample:
    loop_cpu: list[float] = field(default_factory=list)
    process_cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


def measure(
    variants: Variants, names: list[str], events: int, repetitions: int, loop: asyncio.AbstractEventLoop
) -> dict[str, Sample]:
    apps = {name: variants.build(name) for name in names}
    flushers = {name: variants.flusher(name) for name in names}
    samples = {name: Sample() for name in names}
    for name in names:  # warm-up and check: the tracing variants add exactly one id frame
        check = loop.run_until_complete(
            drive(apps[name], json.dumps(request_body(200)).encode(), keep_first=400)
        )
        assert check.status == 200, (name, check)
        flushers[name]()
    for repetition in range(repetitions):
        for name in rotated(names, repetition):
            body = json.dumps(request_body(events, run_id=f"{name}-{repetition}")).encode()
            gc.collect()
            process0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
            result = loop.run_until_complete(drive(apps[name], body))
            thread1, wall1 = time.thread_time(), time.perf_counter()
            flushers[name]()
            process1 = time.process_time()
            assert result.chunks >= events, (name, result)
            sample = samples[name]
            sample.loop_cpu.append((thread1 - thread0) / events * 1e6)
            sample.process_cpu.append((process1 - process0) / events * 1e6)
            sample.wall.append(wall1 - wall0)
    return samples


def report(samples: dict[str, Sample], events: int) -> tuple[str, dict[str, dict[str, float]]]:
    raw = samples["raw"]
    rows = []
    summary: dict[str, dict[str, float]] = {}
    for name, sample in samples.items():
        loop_added = median([v - r for v, r in zip(sample.loop_cpu, raw.loop_cpu, strict=True)])
        process_added = median([v - r for v, r in zip(sample.process_cpu, raw.process_cpu, strict=True)])
        loop_ratio = median(sample.loop_cpu) / median(raw.loop_cpu)
        summary[name] = {
            "loop_us": median(sample.loop_cpu),
            "loop_added_us": loop_added,
            "loop_ratio": loop_ratio,
            "process_us": median(sample.process_cpu),
            "process_added_us": process_added,
            "wall_s": median(sample.wall),
        }
        rows.append(
            [
                name,
                f"{events:,}",
                fmt(median(sample.loop_cpu)),
                fmt(loop_ratio),
                fmt(loop_added),
                fmt(median(sample.process_cpu)),
                fmt(median(sample.process_cpu) / median(raw.process_cpu)),
                fmt(process_added),
                fmt(median(sample.wall), 3),
            ]
        )
    headers = [
        "variant",
        "events",
        "loop CPU us/ev",
        "ratio",
        "added us/ev",
        "process CPU us/ev (incl. export)",
        "ratio",
        "added us/ev",
        "wall s",
    ]
    return table(headers, rows), summary
