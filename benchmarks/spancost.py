"""Per-call cost of the backend operations the core makes on the event loop, and profiles.

``span_costs`` times each operation alone (``time.thread_time_ns``: CPU of the calling thread, i.e.
of the event loop), as the core calls it for a tool call: ``start_child`` of a tool span,
``set_input`` with the parsed arguments, ``end`` with the parsed result; and a turn's root
(``start_run``, ``end`` with usage). ``profile_run`` runs one in-process stream under cProfile
(and pyinstrument when installed) and writes the reports under ``benchmarks/out/``.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any

from ambient_tracing.backends.base import RunStart, SpanKind, TokenUsage, TracingBackend

from .common import median
from .inprocess import drive
from .variants import Variants
from .workload import request_body

OUT = Path(__file__).resolve().parent / "out"
ARGUMENTS = {"query": "weather in Paris tomorrow", "limit": 3}
RESULT = {"results": [{"title": f"Forecast {i}", "url": f"https://example.com/{i}"} for i in range(4)]}
OPERATIONS = (
    "root start_run",
    "root end (usage)",
    "tool start_child",
    "tool set_input",
    "tool end (output)",
)


def _turn(index: int, trace_id: str | None) -> RunStart:
    return RunStart(
        thread_id=f"thread-{index}",
        run_id=f"run-{index}",
        user_id="bench-user",
        user_name=None,
        runner_type="bench",
        turn_number=1,
        input="What will the weather be in Paris?",
        trace_id=trace_id,
        attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": f"thread-{index}"},
    )


def span_costs(backend: TracingBackend, *, turns: int = 20, tools_per_turn: int = 20) -> dict[str, float]:
    """Median CPU microseconds of each operation (``turns`` roots with ``tools_per_turn`` tools each)."""
    samples: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    clock = time.thread_time_ns
    usage = (TokenUsage(model="gpt-bench", input_tokens=1200, output_tokens=300, total_tokens=1500),)
    for index in range(turns):
        t0 = clock()
        root = backend.start_run(_turn(index, None))
        samples["root start_run"].append((clock() - t0) / 1e3)
        assert root is not None, "the backend did not record the turn"
        for call in range(tools_per_turn):
            t0 = clock()
            tool = root.start_child(
                "tool_search",
                SpanKind.TOOL,
                attributes={
                    "gen_ai.operation.name": "execute_tool",
                    "gen_ai.tool.name": "search",
                    "gen_ai.tool.call.id": f"call-{call}",
                },
            )
            t1 = clock()
            tool.set_input(ARGUMENTS)
            t2 = clock()
            tool.end(output=RESULT)
            t3 = clock()
            samples["tool start_child"].append((t1 - t0) / 1e3)
            samples["tool set_input"].append((t2 - t1) / 1e3)
            samples["tool end (output)"].append((t3 - t2) / 1e3)
        t0 = clock()
        root.end(output="[REDACTED FOR PRIVACY]", model="gpt-bench", usage=usage)
        samples["root end (usage)"].append((clock() - t0) / 1e3)
    return {op: median(values) for op, values in samples.items()}


def profile_run(variants: Variants, name: str, events: int) -> dict[str, Any]:
    """cProfile (and pyinstrument) of one ``events``-event run of variant ``name``; writes reports."""
    OUT.mkdir(exist_ok=True)
    loop = asyncio.new_event_loop()
    try:
        app = variants.build(name)
        loop.run_until_complete(drive(app, json.dumps(request_body(500)).encode()))
        body = json.dumps(request_body(events, run_id=f"profile-{name}")).encode()
        profiler = cProfile.Profile()
        profiler.enable()
        loop.run_until_complete(drive(app, body))
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(60)
        (OUT / f"cprofile-{name}.txt").write_text(text.getvalue())
        try:
            from pyinstrument import Profiler

            sampler = Profiler(interval=0.0005, async_mode="disabled")
            body = json.dumps(request_body(events, run_id=f"pyinstrument-{name}")).encode()
            sampler.start()
            loop.run_until_complete(drive(app, body))
            sampler.stop()
            (OUT / f"pyinstrument-{name}.txt").write_text(sampler.output_text(unicode=False, color=False))
        except ImportError:
            pass
        variants.flusher(name)()
        return {"file": str(OUT / f"cprofile-{name}.txt"), "top": _top(stats)}
    finally:
        loop.close()


def _top(stats: pstats.Stats, limit: int = 12) -> list[tuple[str, int, float, float]]:
    """(function, calls, cumulative s, s per call) of the heaviest functions outside asyncio/starlette."""
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, line, function), (_, calls, _, cumulative, _) in raw.items():
        if any(part in filename for part in ("asyncio", "starlette", "benchmarks", "<")):
            continue
        short = filename.split("site-packages/")[-1].split("src/")[-1]
        rows.append((f"{short}:{line}({function})", calls, cumulative, cumulative / max(calls, 1)))
    rows.sort(key=lambda row: row[2], reverse=True)
    return rows[:limit]


class _TimedSpan:
    """Wraps a backend span and adds the event-loop CPU of each call to ``samples``."""

    def __init__(self, span: Any, kind: str, samples: dict[str, list[float]]) -> None:
        self._span = span
        self._kind = kind
        self._samples = samples
        self.trace_id = span.trace_id

    def _timed(self, op: str, call: Any) -> Any:
        t0 = time.thread_time_ns()
        result = call()
        self._samples.setdefault(f"{self._kind} {op}", []).append((time.thread_time_ns() - t0) / 1e3)
        return result

    def start_child(
        self, name: str, kind: SpanKind, *, input: Any = None, attributes: Any = None
    ) -> _TimedSpan:
        child = self._timed(
            "start_child", lambda: self._span.start_child(name, kind, input=input, attributes=attributes)
        )
        return _TimedSpan(child, str(kind), self._samples)

    def set_input(self, input: Any) -> None:
        self._timed("set_input", lambda: self._span.set_input(input))

    def end(self, **kwargs: Any) -> None:
        self._timed("end", lambda: self._span.end(**kwargs))


class TimedBackend:
    """Wraps a backend: every span call the core makes in a real stream is timed (thread CPU)."""

    def __init__(self, backend: TracingBackend) -> None:
        self._backend = backend
        self.name = backend.name
        self.samples: dict[str, list[float]] = {}
        self.span_sink = None  # every call through the span worker, timed there

    def accepts(self, trace_id: str) -> bool:
        return self._backend.accepts(trace_id)

    def setup(self) -> None:
        self._backend.setup()

    def start_run(self, turn: RunStart) -> _TimedSpan | None:
        t0 = time.thread_time_ns()
        span = self._backend.start_run(turn)
        self.samples.setdefault("turn start_run", []).append((time.thread_time_ns() - t0) / 1e3)
        return None if span is None else _TimedSpan(span, "turn", self.samples)

    def flush(self, timeout: float) -> None:
        self._backend.flush(timeout)

    def shutdown(self) -> None:
        self._backend.shutdown()


def in_stream_costs(
    backend: TracingBackend, events: int, runs: int = 3
) -> dict[str, tuple[int, float, float]]:
    """Per span operation in real streams: (calls per run, median us, total ms per run)."""
    from ambient_tracing import Observability, TracingMiddleware

    from .workload import make_app

    timed = TimedBackend(backend)
    app = TracingMiddleware(make_app(), observability=Observability([timed]))  # type: ignore[list-item]
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(drive(app, json.dumps(request_body(500)).encode()))
        timed.samples.clear()
        for run in range(runs):
            body = json.dumps(request_body(events, run_id=f"timed-{run}")).encode()
            loop.run_until_complete(drive(app, body))
            backend.flush(30.0)
    finally:
        loop.close()
    return {
        op: (len(values) // runs, median(values), sum(values) / runs / 1e3)
        for op, values in sorted(timed.samples.items())
    }
