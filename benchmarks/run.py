"""Run the benchmarks of issue #4 and print their tables (Markdown).

    .venv/bin/python -m benchmarks.run            # full: about 15-25 minutes on 2 cores
    .venv/bin/python -m benchmarks.run --quick    # smaller counts: a few minutes
    .venv/bin/python -m benchmarks.run --only inprocess,memory

Everything talks to 127.0.0.1 only. Results also go to benchmarks/out/results.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import ROOT, child, fmt, table
from .receivers import closed_port_url, receiver

SECTIONS = ("inprocess", "spancost", "loopback", "concurrency", "memory", "blackhole")
OUT = Path(__file__).resolve().parent / "out"


class Report:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.data: dict[str, Any] = {}

    def add(self, title: str, text: str) -> None:
        block = f"### {title}\n\n{text}\n"
        print(block, flush=True)
        self.parts.append(block)


def machine() -> str:
    import ambient_tracing

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = (
        Path(ambient_tracing.__file__).is_relative_to(ROOT)
        and subprocess.run(
            ["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
    )
    versions = []
    for package in (
        "starlette",
        "uvicorn",
        "httpx",
        "mlflow",
        "langfuse",
        "opentelemetry-sdk",
        "opentelemetry-instrumentation-asgi",
    ):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:
            versions.append(f"{package} ?")
    import os

    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}; ambient_tracing from {Path(ambient_tracing.__file__).parent} "
        f"(git HEAD {commit}{', src modified' if dirty else ''}); " + ", ".join(versions)
    )


def run_inprocess(report: Report, quick: bool, tmp: Path, langfuse_url: str) -> None:
    from . import inprocess
    from .variants import ALL, Variants

    variants = Variants(mlflow_uri=f"sqlite:///{tmp / 'inprocess.db'}", langfuse_host=langfuse_url)
    loop = asyncio.new_event_loop()
    sizes = [(5_000, 5), (20_000, 3)] if quick else [(20_000, 7), (200_000, 3)]
    results = {}
    try:
        for events, reps in sizes:
            samples = inprocess.measure(variants, list(ALL), events, reps, loop)
            text, summary = inprocess.report(samples, events)
            results[str(events)] = summary
            report.add(
                f"In-process CPU per event, {events:,}-event run ({reps} interleaved repetitions)", text
            )
    finally:
        variants.close()
        loop.close()
    report.data["inprocess"] = results


def run_spancost(report: Report, quick: bool, tmp: Path, langfuse_url: str) -> None:
    from . import spancost
    from .variants import Variants

    variants = Variants(mlflow_uri=f"sqlite:///{tmp / 'spancost.db'}", langfuse_host=langfuse_url)
    try:
        costs = {
            "mlflow (sqlite)": spancost.span_costs(variants.mlflow()),
            "langfuse": spancost.span_costs(variants.langfuse()),
        }
        rows = [[op, *(fmt(costs[b][op], 1) for b in costs)] for op in spancost.OPERATIONS]
        per_tool = {
            b: sum(costs[b][op] for op in spancost.OPERATIONS if op.startswith("tool")) for b in costs
        }
        rows.append(["= one tool call", *(fmt(per_tool[b], 1) for b in costs)])
        rows.append(["= per event at 1 tool call / 50 events", *(fmt(per_tool[b] / 50, 2) for b in costs)])
        report.add(
            "Event-loop CPU per backend call (us, median; time.thread_time)",
            table(["operation", *costs], rows),
        )
        report.data["spancost"] = costs
        events = 5_000 if quick else 20_000
        in_stream = {
            "mlflow (sqlite)": spancost.in_stream_costs(variants.mlflow(), events),
            "langfuse": spancost.in_stream_costs(variants.langfuse(), events),
        }
        rows = [
            [backend, op, str(calls), fmt(med, 1), fmt(total, 1), fmt(total * 1e3 / events, 2)]
            for backend, ops in in_stream.items()
            for op, (calls, med, total) in ops.items()
        ]
        report.add(
            f"Backend calls inside real {events:,}-event streams (event-loop CPU, median of 3 runs' calls)",
            table(["backend", "operation", "calls/run", "median us", "total ms/run", "us per event"], rows),
        )
        report.data["in_stream"] = in_stream
        profiles = {}
        for name in ("mw-null", "mw-mlflow", "mw-langfuse"):
            result = spancost.profile_run(variants, name, events)
            profiles[name] = result
            rows = [
                [fn, calls, fmt(cum * 1e3, 1), fmt(per * 1e6, 1)] for fn, calls, cum, per in result["top"]
            ]
            report.add(
                f"cProfile of {name}, {events:,} events (cumulative; profiler overhead included; "
                f"full report {Path(result['file']).relative_to(ROOT)})",
                table(["function", "calls", "cum ms", "us/call"], rows),
            )
        report.data["profiles"] = profiles
    finally:
        variants.close()


def run_loopback(
    report: Report, quick: bool, tmp: Path, langfuse_url: str, concurrency: bool, throughput: bool
) -> None:
    from . import loopback
    from .variants import ALL

    with loopback.servers(list(ALL), tmp, langfuse_url) as urls:
        if throughput:
            events, reps, short = (2_000, 3, 10) if quick else (10_000, 7, 30)
            samples = asyncio.run(loopback.throughput(urls, events, reps, short))
            text, summary = loopback.throughput_report(samples, events)
            report.data["loopback"] = summary
            report.add(
                f"Over loopback (uvicorn + httpx, server and client in separate processes), "
                f"{reps} x {events:,}-event runs and {short} x 100-event runs per variant",
                text,
            )
        if concurrency:
            streams, events, interval, passes = (50, 60, 0.05, 1) if quick else (200, 150, 0.05, 2)
            latencies = asyncio.run(loopback.concurrency(urls, streams, events, interval, passes))
            text, summary = loopback.concurrency_report(latencies, streams)
            report.data["concurrency"] = summary
            report.add(
                f"{streams} concurrent streams, {events} events each at one per {interval * 1e3:.0f} ms "
                f"({streams / interval:,.0f} events/s in all): emit-to-receive latency per event",
                text,
            )


def run_memory(report: Report, quick: bool, tmp: Path, langfuse_url: str) -> None:
    events = 100_000 if quick else 1_000_000
    big = 5_000_000 if quick else 50_000_000
    cases = [
        ("raw", events, 0, 0, "1"),
        ("mw-null", events, 0, 0, "1"),
        ("mw-mlflow", events, 0, 0, "1"),
        ("mw-langfuse", events, 0, 0, "1"),
        ("mw-both", events, 0, 0, "1"),
        ("mw-both", events, 0, 0, "0"),
        ("raw", 1_000, big, 0, "1"),
        ("mw-both", 1_000, big, 0, "1"),
        ("raw", 1_000, big, 65_536, "1"),
        ("mw-both", 1_000, big, 65_536, "1"),
    ]
    rows = []
    results = []
    for index, (name, count, result_bytes, chunk, mask) in enumerate(cases):
        uri = f"sqlite:///{tmp / f'memory-{index}.db'}"
        args = ["benchmarks.memory", name, str(count), str(result_bytes), str(chunk), mask, uri, langfuse_url]
        with child(args, ready_timeout=900) as line:
            result = json.loads(line)
        result.update(tool_result_bytes=result_bytes, chunk_bytes=chunk, mask=mask == "1")
        results.append(result)
        what = f"{count:,} events" + (f", {result_bytes / 1e6:.0f} MB tool result" if result_bytes else "")
        what += f" in {chunk // 1024} KiB chunks" if chunk else (" in one chunk" if result_bytes else "")
        rows.append(
            [
                name + ("" if mask == "1" else " (mask off)"),
                what,
                fmt(result["rss_before_mb"], 0),
                fmt(result["peak_growth_stream_mb"], 1),
                fmt(result["rss_growth_after_stream_mb"], 1),
                fmt(result["peak_growth_with_export_mb"], 1)
                + ("" if result["export_done"] else " (export unfinished)"),
                fmt(result["stream_s"], 1),
            ]
        )
    report.data["memory"] = results
    headers = [
        "variant",
        "run",
        "RSS before MB",
        "peak growth MB (stream)",
        "RSS growth after stream MB",
        "peak growth MB (incl. export)",
        "stream s",
    ]
    report.add(
        "Memory: peak RSS growth, one child process per case (VmHWM reset after warm-up)",
        table(headers, rows),
    )


def run_blackhole(report: Report, quick: bool, langfuse_url: str) -> None:
    events, reps = (5_000, 3) if quick else (20_000, 5)
    results: dict[str, Any] = {}
    with (
        receiver("blackhole") as blackhole,
        child(
            [
                "benchmarks.blackhole",
                "langfuse",
                str(events),
                str(reps),
                langfuse_url,
                blackhole,
                closed_port_url(),
            ],
            ready_timeout=900,
        ) as line,
    ):
        results["langfuse"] = json.loads(line)
    with child(["benchmarks.blackhole", "mlflow-server", str(events), str(reps)], ready_timeout=900) as line:
        results["mlflow-server"] = json.loads(line)
    with child(
        ["benchmarks.blackhole", "mlflow-unreachable", str(events), str(reps)], ready_timeout=900
    ) as line:
        results["mlflow-unreachable"] = json.loads(line)
    report.data["blackhole"] = results
    lf = results["langfuse"]["wall_s"]
    ms = results["mlflow-server"]["wall_s"]
    mu = results["mlflow-unreachable"]["wall_s"]
    healthy_norm = ms["mlflow-healthy"] / ms["raw"]
    rows = [
        [
            "Langfuse host accepts, never answers",
            fmt(lf["langfuse-blackhole"], 3),
            fmt(lf["langfuse-healthy"], 3),
            fmt(lf["langfuse-blackhole"] / lf["langfuse-healthy"], 3),
            "same process",
        ],
        [
            "Langfuse host refuses (closed port)",
            fmt(lf["langfuse-refused"], 3),
            fmt(lf["langfuse-healthy"], 3),
            fmt(lf["langfuse-refused"] / lf["langfuse-healthy"], 3),
            "same process",
        ],
        [
            "MLflow server stopped after setup",
            fmt(ms["mlflow-gone"], 3),
            fmt(ms["mlflow-healthy"], 3),
            fmt(ms["mlflow-gone"] / ms["mlflow-healthy"], 3),
            f"same process; gone-phase raw {ms['raw (gone phase)']:.3f} s vs {ms['raw']:.3f} s",
        ],
        [
            "MLflow URI unreachable (closed port), setup never succeeds",
            fmt(mu["mlflow-unreachable"], 3),
            fmt(ms["mlflow-healthy"], 3),
            fmt((mu["mlflow-unreachable"] / mu["raw"]) / healthy_norm, 3),
            "other process: ratio of (time / raw) to healthy's (time / raw); "
            f"id frame sent: {results['mlflow-unreachable']['id_frame']['mlflow-unreachable']}",
        ],
    ]
    report.add(
        f"Blackholed backends: median stream wall time of a {events:,}-event in-process run, "
        f"{reps} repetitions",
        table(["backend state", "stream s", "healthy s", "ratio to healthy", "note"], rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller counts (minutes, not tens of minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("mlflow", "opentelemetry", "langfuse", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    report = Report()
    report.data["machine"] = machine()
    report.add("Machine", report.data["machine"])
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="ambient-bench-") as tmp_name,
        receiver("langfuse") as langfuse_url,
    ):
        tmp = Path(tmp_name)
        if "inprocess" in sections:
            run_inprocess(report, args.quick, tmp, langfuse_url)
        if "spancost" in sections:
            run_spancost(report, args.quick, tmp, langfuse_url)
        if "loopback" in sections or "concurrency" in sections:
            run_loopback(
                report, args.quick, tmp, langfuse_url, "concurrency" in sections, "loopback" in sections
            )
        if "memory" in sections:
            run_memory(report, args.quick, tmp, langfuse_url)
        if "blackhole" in sections:
            run_blackhole(report, args.quick, langfuse_url)
    report.data["seconds"] = time.monotonic() - started
    OUT.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (OUT / f"results{suffix}.md").write_text("\n".join(report.parts))
    (OUT / f"results{suffix}.json").write_text(json.dumps(report.data, indent=2, default=str))
    print(f"done in {report.data['seconds']:.0f} s; results in {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
