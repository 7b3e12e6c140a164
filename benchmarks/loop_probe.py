"""Loop-latency probe: the longest gap between ticks of a 1 ms heartbeat task while adversarial
cases run on the same event loop, with and without the middleware.

    .venv/bin/python -m benchmarks.loop_probe             # every case, raw and mw, once
    .venv/bin/python -m benchmarks.loop_probe --repeat 3 --cases steps-20k,model-400k

Each case and variant runs in its own child process (no thread or SDK state carries over). ``mw``
is TracingMiddleware with both real backends, masking on (the default): the Langfuse SDK exporting
to the loopback receiver and MLflow to a real ``mlflow server`` (children of this process). The
app is driven in-process (ASGI calls, no sockets) and yields to the loop between chunks, as an
agent awaiting its model does. Every case ends with ``aclose()`` inside the measured window.

Cases: ``idle-600`` / ``idle-1000`` (that many threads run once and go idle together: their
Session Metrics), ``steps-20k`` (20,000 STEP_STARTED then 20,000 STEP_FINISHED matching none),
``model-400k`` (a 400,000-character model name in usage), ``hanging-sdk`` (both tracking servers
stop answering after setup: runs open turns and export into the void, then ``aclose`` with
``flush_timeout`` 2 s), ``masked-huge`` (a 4 MiB tool result, 1 MiB of tool arguments with 20,000
keys, 1 MiB of text, a 1 MiB error message, all masked).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from .common import child, fmt, median, percentile, table

CASES = ("idle-600", "idle-1000", "steps-20k", "model-400k", "hanging-sdk", "masked-huge")
VARIANTS = ("raw", "mw")
HEARTBEAT = 0.001
FLUSH_TIMEOUT = 2.0
IDLE_SECONDS = 1.0
SETTLE_SECONDS = 1.0
FRAMES_PER_CHUNK = 50  # frames sent between two yields to the loop


def frame(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def short_run(thread: str, run: str) -> list[dict[str, Any]]:
    return [
        {"type": "RUN_STARTED", "threadId": thread, "runId": run},
        {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "Read"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": '{"path": "a.txt"}'},
        {"type": "TOOL_CALL_END", "toolCallId": "c1"},
        {"type": "TOOL_CALL_RESULT", "toolCallId": "c1", "messageId": "m1", "content": "ok"},
        {"type": "TEXT_MESSAGE_START", "messageId": "m2", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "messageId": "m2", "delta": "done"},
        {"type": "TEXT_MESSAGE_END", "messageId": "m2"},
        {
            "type": "RUN_FINISHED",
            "threadId": thread,
            "runId": run,
            "usage": [{"model": "claude-sonnet-4-5", "inputTokens": 10, "outputTokens": 5}],
        },
    ]


def steps_run(count: int) -> Iterator[dict[str, Any]]:
    yield {"type": "RUN_STARTED", "threadId": "t-steps", "runId": "r-steps"}
    for index in range(count):
        yield {"type": "STEP_STARTED", "stepName": f"s{index}"}
    for index in range(count):
        yield {"type": "STEP_FINISHED", "stepName": f"never-started-{index}"}
    yield {"type": "RUN_FINISHED", "threadId": "t-steps", "runId": "r-steps"}


def model_run(length: int) -> list[dict[str, Any]]:
    usage = [{"model": "m" * length, "inputTokens": 1, "outputTokens": 1}]
    return [*short_run("t-model", "r-model")[:-1], {"type": "RUN_FINISHED", "usage": usage}]


def huge_run() -> list[dict[str, Any]]:
    mib = 1024 * 1024
    args = json.dumps({f"key-{index:05d}-" + "k" * 40: "v" * 40 for index in range(20_000)})
    return [
        {"type": "RUN_STARTED", "threadId": "t-huge", "runId": "r-huge"},
        {"type": "TOOL_CALL_START", "toolCallId": "c", "toolCallName": "Bash"},
        {"type": "TOOL_CALL_ARGS", "toolCallId": "c", "delta": args},
        {"type": "TOOL_CALL_END", "toolCallId": "c"},
        {"type": "TOOL_CALL_RESULT", "toolCallId": "c", "messageId": "m", "content": "r" * (4 * mib)},
        {"type": "TEXT_MESSAGE_START", "messageId": "t", "role": "assistant"},
        *[{"type": "TEXT_MESSAGE_CONTENT", "messageId": "t", "delta": "x" * 1024} for _ in range(1024)],
        {"type": "TEXT_MESSAGE_END", "messageId": "t"},
        {"type": "RUN_ERROR", "message": "e" * mib, "code": "E" * 1000},
    ]


# -- the child: one case, one variant -------------------------------------------------------------


class Heartbeat:
    """A task that sleeps 1 ms at a time and records how long each tick really took."""

    def __init__(self) -> None:
        self.gaps: list[float] = []  # the case's
        self.after: list[float] = []  # once the case is done: the backends' threads, then aclose
        self.phases: dict[str, list[float]] = {}  # parts of the case, by name
        self.cpu: list[float] = []  # the loop thread's CPU per tick, all along
        self._into = self.gaps
        self._phase: list[float] | None = None
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while True:
            await asyncio.sleep(HEARTBEAT)
            now, cpu = time.perf_counter(), time.thread_time()
            self._into.append(now - last)
            # The loop thread's own CPU in that gap: the work done on the loop, which waiting for
            # a core (a loaded machine) or for the GIL (another thread) does not add to.
            self.cpu.append(cpu - last_cpu)
            if self._phase is not None:
                self._phase.append(now - last)
            last, last_cpu = now, cpu

    def phase(self, name: str) -> None:
        self._phase = self.phases.setdefault(name, [])

    def case_done(self) -> None:
        self._into = self.after
        self._phase = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def streaming_app(runs: dict[str, Callable[[], Iterator[dict[str, Any]] | list[dict[str, Any]]]]) -> Any:
    """POST /<name>: that run's events as SSE, FRAMES_PER_CHUNK frames per chunk, yielding between."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        events = runs[scope["path"].strip("/")]()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        batch: list[bytes] = []
        for event in events:
            batch.append(frame(event))
            if len(batch) >= FRAMES_PER_CHUNK:
                await send({"type": "http.response.body", "body": b"".join(batch), "more_body": True})
                batch = []
                await asyncio.sleep(0)
        await send({"type": "http.response.body", "body": b"".join(batch), "more_body": False})

    return app


async def drive(app: Any, path: str, thread: str, run: str) -> int:
    """One POST through ``app``; returns the response bytes."""
    body = json.dumps(
        {"threadId": thread, "runId": run, "messages": [{"id": "u", "role": "user", "content": "go"}]}
    ).encode()
    pending = [body]
    received = 0

    async def receive() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(), "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal received
        received += len(message.get("body", b""))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-current-user-id", b"probe-user")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return received


def observability(langfuse_host: str, mlflow_uri: str, **options: Any) -> Any:
    from ambient_tracing import Observability

    from .variants import langfuse_backend, mlflow_backend

    return Observability(
        [
            langfuse_backend(langfuse_host, flush_timeout=FLUSH_TIMEOUT),
            mlflow_backend(mlflow_uri, setup=False),
        ],
        flush_timeout=FLUSH_TIMEOUT,
        **options,
    )


async def run_case(case: str, variant: str, langfuse_host: str, mlflow_uri: str) -> dict[str, Any]:
    from ambient_tracing import TracingMiddleware

    runs: dict[str, Callable[[], Any]] = {
        "short": lambda: short_run("t", "r"),
        "steps": lambda: steps_run(20_000),
        "model": lambda: model_run(400_000),
        "huge": huge_run,
    }
    threads = {"idle-600": 600, "idle-1000": 1000}.get(case, 0)
    proxies: list[Any] = []
    if case == "hanging-sdk":
        from tests.support.hanging import HangingServer

        def proxy(url: str) -> str:
            host, port = url.removeprefix("http://").split(":")
            proxies.append(HangingServer(upstream=(host, int(port))))
            return str(proxies[-1].url)

        langfuse_host, mlflow_uri = proxy(langfuse_host), proxy(mlflow_uri)
    obs = None
    app = streaming_app(runs)
    if variant == "mw":
        obs = observability(langfuse_host, mlflow_uri, session_idle_seconds=IDLE_SECONDS if threads else None)
        await asyncio.wait_for(obs.start(), 120)
        app = TracingMiddleware(app, observability=obs)
        await drive(app, "/short", "t-warm", "r-warm")  # imports and first spans before the window
        await asyncio.to_thread(obs.tracer_worker.drain, 30)
        await asyncio.to_thread(obs.spans.worker.drain, 30)
    if os.environ.get("PROBE_GC_FREEZE") == "1":
        gc.freeze()  # what an app may do after startup: imports out of the collector's way
    heartbeat = Heartbeat()
    heartbeat.start()
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if threads:
        heartbeat.phase("runs")
        for index in range(threads):
            await drive(app, "/short", f"t-{index}", f"r-{index}")
            await asyncio.sleep(0)
        # Every thread goes idle together; wait (bounded) until all were reported.
        heartbeat.phase("idle")
        deadline = time.monotonic() + IDLE_SECONDS + 60
        await asyncio.sleep(IDLE_SECONDS)
        while obs is not None and len(obs._sessions) > 1 and time.monotonic() < deadline:  # t-warm's may stay
            await asyncio.sleep(0.05)
        if obs is not None:
            extra["unreported_threads"] = len(obs._sessions)
        else:
            await asyncio.sleep(2.0)
    elif case == "steps-20k":
        await drive(app, "/steps", "t-steps", "r-steps")
    elif case == "model-400k":
        await drive(app, "/model", "t-model", "r-model")
    elif case == "masked-huge":
        await drive(app, "/huge", "t-huge", "r-huge")
    elif case == "hanging-sdk":
        for proxy_server in proxies:
            proxy_server.hang()
        for index in range(20):
            await drive(app, "/short", "t-hang", f"r-hang-{index}")
            await asyncio.sleep(0.01)
    case_seconds = time.perf_counter() - started
    heartbeat.case_done()
    await asyncio.sleep(SETTLE_SECONDS)  # the backends' threads at work after the case, still probed
    closing = time.perf_counter()
    if obs is not None:
        await obs.aclose()
    extra["aclose_s"] = time.perf_counter() - closing
    await heartbeat.stop()
    gaps = heartbeat.gaps + heartbeat.after
    return {
        "case": case,
        "variant": variant,
        "max_gap_ms": max(gaps) * 1000,
        "case_max_gap_ms": max(heartbeat.gaps, default=0.0) * 1000,
        "after_max_gap_ms": max(heartbeat.after) * 1000,
        **{f"{name}_max_gap_ms": max(found, default=0.0) * 1000 for name, found in heartbeat.phases.items()},
        "p99_gap_ms": percentile(gaps, 0.99) * 1000,
        "max_tick_cpu_ms": max(heartbeat.cpu) * 1000,
        "ticks": len(gaps),
        "case_s": case_seconds,
        **extra,
    }


def child_main(case: str, variant: str, langfuse_host: str, mlflow_uri: str) -> None:
    import logging

    logging.disable(logging.WARNING)  # the hanging case warns by design; not part of the figure
    result = asyncio.run(run_case(case, variant, langfuse_host, mlflow_uri))
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # SDK exit hooks (a flush at exit against a hung server) are not measured


# -- the parent -----------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    if argv and argv[0] == "case":
        child_main(*argv[1:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after setup, in both variants")
    args = parser.parse_args(argv)
    if args.gc_freeze:
        os.environ["PROBE_GC_FREEZE"] = "1"
    cases = [case for case in args.cases.split(",") if case]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from tests.support.fixtures_mlflow import MlflowServer

    from .receivers import receiver

    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp, receiver("langfuse") as langfuse_url:
        server = MlflowServer(Path(tmp)).start()
        try:
            for repetition in range(args.repeat):
                for case in cases:
                    for variant in VARIANTS if repetition % 2 == 0 else reversed(VARIANTS):
                        result = one(case, variant, langfuse_url, server.url)
                        print(f"# {json.dumps(result)}", file=sys.stderr, flush=True)
                        results.setdefault((case, variant), []).append(result)
        finally:
            server.stop()
    rows = []
    for case in cases:
        raw, mw = results[(case, "raw")], results[(case, "mw")]
        rows.append(
            [
                case,
                fmt(median([r["max_gap_ms"] for r in raw]), 1),
                fmt(median([r["max_gap_ms"] for r in mw]), 1),
                fmt(median([r["case_max_gap_ms"] for r in mw]), 1),
                fmt(median([r["after_max_gap_ms"] for r in mw]), 1),
                fmt(median([r["max_tick_cpu_ms"] for r in raw]), 1),
                fmt(median([r["max_tick_cpu_ms"] for r in mw]), 1),
                fmt(median([r["p99_gap_ms"] for r in raw]), 2),
                fmt(median([r["p99_gap_ms"] for r in mw]), 2),
                fmt(median([r["case_s"] for r in raw]), 2),
                fmt(median([r["case_s"] for r in mw]), 2),
                fmt(median([r["aclose_s"] for r in mw]), 2),
            ]
        )
    print(
        f"Heartbeat {HEARTBEAT * 1000:g} ms; median of {args.repeat} per cell; "
        f"mw = Langfuse + MLflow server, masking on{'; gc.freeze() after setup' if args.gc_freeze else ''}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end\n"
    )
    print(
        table(
            [
                "case",
                "raw max gap (ms)",
                "mw max gap (ms)",
                "mw: in case",
                "mw: after, aclose",
                "raw max loop CPU in a tick (ms)",
                "mw max loop CPU in a tick (ms)",
                "raw p99 (ms)",
                "mw p99 (ms)",
                "raw case (s)",
                "mw case (s)",
                "mw aclose (s)",
            ],
            rows,
        )
    )


def one(case: str, variant: str, langfuse_url: str, mlflow_url: str) -> dict[str, Any]:
    with child(
        ["benchmarks.loop_probe", "case", case, variant, langfuse_url, mlflow_url], ready_timeout=600
    ) as line:
        result: dict[str, Any] = json.loads(line)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
