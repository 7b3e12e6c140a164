"""Over loopback: each variant served by uvicorn in its own child process, read by an httpx client.

``python -m benchmarks.loopback serve VARIANT MLFLOW_URI LANGFUSE_URL`` serves one variant (uvicorn
defaults: asyncio loop, h11; ASGI lifespan on, so the middleware prepares its backends at startup)
and prints its URL. The parent is the client (another process, so server and client each have a
core of the two).

Throughput and time to first event (TTFE): 10k-event runs, variants interleaved and rotated; TTFE
is from just before the request is sent to the first body byte (the RUN_STARTED frame; with tracing
the id frame comes in the same chunk), also sampled on short runs.

Concurrency: 200 streams at once, each paced at one event per ``interval`` (an LLM's token rate) and
started evenly out of phase (no synchronized bursts),
every frame stamped by the app with its emit time (CLOCK_MONOTONIC, common to all processes). The
latency of a frame is the client's receive time minus that stamp: the middleware, uvicorn, the
kernel and the client's own scheduling. The client's share is the same for every variant, so the
difference to ``raw`` at p50 and p99 is what the variant adds.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .common import child, fmt, median, percentile, rotated, table, wait_for_stdin_eof, wait_idle
from .workload import request_body

PIDS: list[int] = []
_STAMP = re.compile(rb'"benchT":(\d+)')
TIMEOUT = httpx.Timeout(120.0)


def serve_main(name: str, mlflow_uri: str, langfuse_url: str) -> None:
    from tests.support.server import serve

    from .variants import Variants

    variants = Variants(mlflow_uri=mlflow_uri, langfuse_host=langfuse_url)
    app = variants.build(name)
    with serve(app) as url:
        print(url, os.getpid(), flush=True)
        wait_for_stdin_eof()
    variants.close()


@contextmanager
def servers(names: list[str], tmp: Path, langfuse_url: str) -> Iterator[dict[str, str]]:
    """One server child per variant (each with its own sqlite store); yields name -> URL.

    ``PIDS`` gets their process ids: before each measured run every server must be idle (no backend
    still exporting an earlier run's trace), so one variant's export never slows another's stream.
    """
    with ExitStack() as stack:
        urls = {}
        PIDS.clear()
        for name in names:
            uri = f"sqlite:///{tmp / f'loopback-{name}.db'}"
            line = stack.enter_context(
                child(["benchmarks.loopback", "serve", name, uri, langfuse_url], ready_timeout=180)
            )
            url, pid = line.split()
            urls[name] = url
            PIDS.append(int(pid))
        yield urls


@dataclass
class Streamed:
    ttfe: float
    seconds: float
    frames: int


async def stream_once(client: httpx.AsyncClient, url: str, events: int, run_id: str) -> Streamed:
    frames = 0
    tail = b""
    first = 0.0
    start = time.perf_counter()
    async with client.stream("POST", f"{url}/agent", json=request_body(events, run_id=run_id)) as response:
        async for chunk in response.aiter_raw():
            if not first:
                first = time.perf_counter()
            frames += (tail + chunk[:1]).count(b"\n\n") + chunk.count(b"\n\n")
            tail = chunk[-1:]
    end = time.perf_counter()
    return Streamed(first - start, end - start, frames)


@dataclass
class LoopbackSample:
    ttfe_ms: list[float] = field(default_factory=list)
    short_ttfe_ms: list[float] = field(default_factory=list)
    events_per_s: list[float] = field(default_factory=list)


async def throughput(
    urls: dict[str, str], events: int, repetitions: int, short_runs: int
) -> dict[str, LoopbackSample]:
    names = list(urls)
    samples = {name: LoopbackSample() for name in names}
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for name in names:  # warm-up: connection, first trace, first export
            for warm in range(3):
                await stream_once(client, urls[name], 200, f"warm-{name}-{warm}")
        for repetition in range(max(repetitions, short_runs)):
            for name in rotated(names, repetition):
                wait_idle(PIDS)
                if repetition < short_runs:
                    short = await stream_once(client, urls[name], 100, f"short-{name}-{repetition}")
                    samples[name].short_ttfe_ms.append(short.ttfe * 1e3)
                if repetition < repetitions:
                    result = await stream_once(client, urls[name], events, f"tp-{name}-{repetition}")
                    assert result.frames >= events, (name, result)
                    samples[name].ttfe_ms.append(result.ttfe * 1e3)
                    samples[name].events_per_s.append(events / result.seconds)
    return samples


def throughput_report(
    samples: dict[str, LoopbackSample], events: int
) -> tuple[str, dict[str, dict[str, float]]]:
    raw = samples["raw"]
    rows = []
    summary = {}
    for name, sample in samples.items():
        eps = median(sample.events_per_s)
        ttfe = median(sample.ttfe_ms)
        short = median(sample.short_ttfe_ms)
        summary[name] = {
            "events_per_s": eps,
            "ttfe_ms": ttfe,
            "ttfe_added_ms": ttfe - median(raw.ttfe_ms),
            "short_ttfe_ms": short,
            "short_ttfe_added_ms": short - median(raw.short_ttfe_ms),
        }
        rows.append(
            [
                name,
                f"{events:,}",
                f"{eps:,.0f}",
                fmt(eps / median(raw.events_per_s)),
                fmt(ttfe, 3),
                fmt(ttfe - median(raw.ttfe_ms), 3),
                fmt(short, 3),
                fmt(short - median(raw.short_ttfe_ms), 3),
            ]
        )
    headers = [
        "variant",
        "events",
        "events/s",
        "vs raw",
        f"TTFE ms ({events // 1000}k runs)",
        "added ms",
        "TTFE ms (100-ev runs)",
        "added ms",
    ]
    return table(headers, rows), summary


async def _paced_stream(
    client: httpx.AsyncClient,
    url: str,
    events: int,
    interval: float,
    run_id: str,
    latencies: list[float],
    phase: float,
) -> None:
    body = request_body(events, run_id=run_id, interval=interval, stamp=True)
    await asyncio.sleep(phase)  # streams evenly out of phase: no synchronized bursts of emits
    pending = b""
    async with client.stream("POST", f"{url}/agent", json=body) as response:
        async for chunk in response.aiter_raw():
            now = time.monotonic_ns()
            pending += chunk
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            complete, pending = pending[: cut + 2], pending[cut + 2 :]
            latencies.extend((now - int(stamp)) / 1e3 for stamp in _STAMP.findall(complete))


async def concurrency(
    urls: dict[str, str], streams: int, events: int, interval: float, passes: int
) -> dict[str, list[float]]:
    """Per-event latencies (us) of ``streams`` paced streams at once, per variant."""
    names = list(urls)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        for repetition in range(passes):
            for name in rotated(names, repetition):
                wait_idle(PIDS)
                await asyncio.gather(
                    *[
                        _paced_stream(
                            client,
                            urls[name],
                            events,
                            interval,
                            f"c-{name}-{repetition}-{i}",
                            latencies[name],
                            i * interval / streams,
                        )
                        for i in range(streams)
                    ]
                )
    return latencies


def concurrency_report(
    latencies: dict[str, list[float]], streams: int
) -> tuple[str, dict[str, dict[str, float]]]:
    raw = latencies["raw"]
    raw50, raw99 = percentile(raw, 0.5), percentile(raw, 0.99)
    rows = []
    summary = {}
    for name, values in latencies.items():
        p50, p99, p999 = percentile(values, 0.5), percentile(values, 0.99), percentile(values, 0.999)
        summary[name] = {
            "p50_us": p50,
            "p99_us": p99,
            "p50_added_us": p50 - raw50,
            "p99_added_us": p99 - raw99,
        }
        rows.append(
            [
                name,
                streams,
                f"{len(values):,}",
                fmt(p50, 0),
                fmt(p50 - raw50, 0),
                fmt(p99, 0),
                fmt(p99 - raw99, 0),
                fmt(p999, 0),
            ]
        )
    headers = ["variant", "streams", "events", "p50 us", "added", "p99 us", "added", "p99.9 us"]
    return table(headers, rows), summary


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "serve":
        serve_main(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit("usage: python -m benchmarks.loopback serve VARIANT MLFLOW_URI LANGFUSE_URL")
