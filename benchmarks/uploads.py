"""Memory per in-flight request: concurrent uploads to a route that is not an AG-UI run.

    .venv/bin/python -m benchmarks.uploads                 # 200 uploads of 4 MiB, 3 repetitions
    .venv/bin/python -m benchmarks.uploads --uploads 50 --repeat 1

Each case is a uvicorn child process (``raw``: the app alone; ``mw``: the app behind
TracingMiddleware with a backend whose spans cost nothing, so tracing is on). The app's upload
route reads the body chunk by chunk, drops it, and waits until released; with every upload in
flight (all bodies read), the child's RSS is read from /proc, with its growth over the RSS after
two warm-up uploads and its peak (VmHWM, reset before the uploads). Medians over the repetitions,
the variants alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import httpx

from .common import child, fmt, median, reset_peak_rss, status_kb, table, wait_for_stdin_eof

VARIANTS = ("raw", "mw")
BOUNDARY = "ambientbenchboundary"
CONTENT_TYPES = {
    "multipart": f"multipart/form-data; boundary={BOUNDARY}",
    "json": "application/json",  # a JSON object with no key of a RunAgentInput
}


def upload_body(kind: str, size: int) -> bytes:
    if kind == "multipart":
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="f.bin"\r\n\r\n'
        tail = f"\r\n--{BOUNDARY}--\r\n"
        return head.encode() + b"\0" * (size - len(head) - len(tail)) + tail.encode()
    return b'{"blob": "' + b"x" * (size - 12) + b'"}'


# -- the child: one uvicorn server ----------------------------------------------------------------


def serve(variant: str) -> None:
    import socket

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    state: dict[str, Any] = {"read": 0, "release": None}

    async def upload(request: Request) -> Response:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        state["read"] += 1
        if state["release"] is None:
            state["release"] = asyncio.Event()
        await state["release"].wait()
        return JSONResponse({"size": size})

    async def control(request: Request) -> Response:
        action = request.path_params["action"]
        if action == "release":
            if state["release"] is not None:
                state["release"].set()
            state["release"] = None
            state["read"] = 0
        elif action == "reset-peak":
            reset_peak_rss()
        return JSONResponse(
            {"read": state["read"], "rss_kb": status_kb("VmRSS"), "hwm_kb": status_kb("VmHWM")}
        )

    app: Any = Starlette(
        routes=[
            Route("/upload", upload, methods=["POST"]),
            Route("/control/{action}", control, methods=["POST"]),
        ]
    )
    if variant == "mw":
        from ambient_tracing import Observability, TracingMiddleware

        from .variants import NullBackend

        app = TracingMiddleware(app, observability=Observability([NullBackend()]))  # type: ignore[list-item]
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", limit_concurrency=None, backlog=1024)
    server = uvicorn.Server(config)

    def stop_on_eof() -> None:
        wait_for_stdin_eof()
        server.should_exit = True

    threading.Thread(target=stop_on_eof, daemon=True).start()
    import ambient_tracing

    print(f"http://127.0.0.1:{sock.getsockname()[1]} {ambient_tracing.__file__}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))


# -- the parent: uploads and readings -------------------------------------------------------------


async def one_case(url: str, uploads: int, body: bytes, content_type: str) -> dict[str, float]:
    limits = httpx.Limits(max_connections=uploads + 10, max_keepalive_connections=uploads + 10)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def control(action: str) -> dict[str, Any]:
            response = await client.post(f"{url}/control/{action}")
            result: dict[str, Any] = response.json()
            return result

        async def post() -> int:
            response = await client.post(
                f"{url}/upload", content=body, headers={"content-type": content_type}
            )
            size: int = response.json()["size"]
            return size

        # Warm-up: two uploads (imports, first-request paths), then growth is measured from there.
        warm = [asyncio.create_task(post()) for _ in range(2)]
        await wait_read(control, len(warm))
        await control("release")
        await asyncio.gather(*warm)
        await asyncio.sleep(0.5)
        before = await control("reset-peak")
        tasks = [asyncio.create_task(post()) for _ in range(uploads)]
        started = time.monotonic()
        in_flight = await wait_read(control, uploads)
        seconds = time.monotonic() - started
        await control("release")
        sizes = await asyncio.gather(*tasks)
        assert all(size == len(body) for size in sizes)
    return {
        "rss_mb": in_flight["rss_kb"] / 1024,
        "growth_mb": (in_flight["rss_kb"] - before["rss_kb"]) / 1024,
        "peak_growth_mb": (in_flight["hwm_kb"] - before["rss_kb"]) / 1024,
        "upload_s": seconds,
    }


async def wait_read(control: Any, count: int, limit: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        state: dict[str, Any] = await control("state")
        if state["read"] >= count:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {state['read']} of {count} uploads read")
        await asyncio.sleep(0.05)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "serve":
        serve(argv[1])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--mib", type=float, default=4.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    size = int(args.mib * 1024 * 1024)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    source = ""
    for repetition in range(args.repeat):
        for kind, content_type in CONTENT_TYPES.items():
            body = upload_body(kind, size)
            for variant in VARIANTS if repetition % 2 == 0 else reversed(VARIANTS):
                with child(["benchmarks.uploads", "serve", variant], ready_timeout=60) as line:
                    url, used = line.split(" ", 1)
                    source = used if variant == "mw" else source
                    result = asyncio.run(one_case(url, args.uploads, body, content_type))
                results.setdefault((kind, variant), []).append(result)
                print(f"# {kind} {variant} #{repetition}: {json.dumps(result)}", file=sys.stderr, flush=True)
    rows = []
    for kind in CONTENT_TYPES:
        raw = median([r["rss_mb"] for r in results[(kind, "raw")]])
        for variant in VARIANTS:
            found = results[(kind, variant)]
            rss = median([r["rss_mb"] for r in found])
            rows.append(
                [
                    kind,
                    variant,
                    fmt(rss, 1),
                    fmt(rss / raw, 3),
                    fmt(median([r["growth_mb"] for r in found]), 1),
                    fmt(median([r["peak_growth_mb"] for r in found]), 1),
                    fmt(median([r["upload_s"] for r in found]), 2),
                ]
            )
    print(
        f"{args.uploads} in-flight uploads of {args.mib:g} MiB, uvicorn child per case, median of "
        f"{args.repeat}; ambient_tracing from {os.path.dirname(source)}\n"
    )
    print(
        table(
            [
                "body",
                "variant",
                "RSS in flight (MB)",
                "RSS / raw",
                "growth in flight (MB)",
                "peak growth (MB)",
                "upload (s)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
