"""Before/after in one run: the in-process CPU benchmark for two checkouts of the package, interleaved.

    PYTHONPATH=$PWD/src .venv/bin/python -m benchmarks.compare --before /path/to/other-checkout/src

Each round runs, for each source tree in turn (order alternating by round), one child process per
group of variants (``python -m benchmarks.compare --child``, PYTHONPATH = that tree's ``src``), on
the same workload, with the same Langfuse receiver and ``mlflow server`` (child processes on
127.0.0.1, whose CPU is not counted). MLflow's tracking URI is process-wide, so the sqlite and the
server variants run in separate children, each with its own ``raw`` and ``mw-null``. "Added" is the
median over all repetitions of (variant - ``raw`` of the same repetition in the same child);
"tracing" is the same against ``mw-null`` (the middleware with a do-nothing backend): what building
and exporting the spans costs, without the middleware's own parsing, which a loaded machine inflates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import ROOT, fmt, median, table
from .receivers import receiver

GROUPS = (
    ("raw", "mw-null", "mw-langfuse", "mw-mlflow", "mw-both"),
    ("raw", "mw-null", "mw-mlflow-server", "mw-both-server"),
    ("raw", "mw-null", "mw-otel", "otel", "otel-otlp"),
    # The production setups only (no sqlite store, whose SDK path takes most of group 1's time).
    ("raw", "mw-null", "mw-langfuse", "mw-mlflow-server", "mw-both-server"),
)
CHILD_TIMEOUT = 1800.0


def child_main(
    names: list[str], events: int, reps: int, sqlite_uri: str, server_uri: str, langfuse: str
) -> None:
    from . import inprocess
    from .variants import Variants

    variants = Variants(mlflow_uri=sqlite_uri, langfuse_host=langfuse, mlflow_server_uri=server_uri)
    loop = asyncio.new_event_loop()
    try:
        samples = inprocess.measure(variants, names, events, reps, loop)
    finally:
        variants.close()
        loop.close()
    print(json.dumps({name: {"loop": s.loop_cpu, "process": s.process_cpu} for name, s in samples.items()}))


def run_child(
    src: str, names: tuple[str, ...], events: int, reps: int, tmp: Path, server_uri: str, langfuse: str
) -> dict[str, dict[str, list[float]]]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_USE_BATCH_SPAN_PROCESSOR"}
    env["PYTHONPATH"] = os.pathsep.join([src, str(ROOT)])
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    sqlite_uri = f"sqlite:///{tmp / f'compare-{abs(hash((src, names)))}.db'}"
    args = [sys.executable, "-m", "benchmarks.compare", "--child", ",".join(names), "--events", str(events)]
    args += ["--reps", str(reps), "--sqlite", sqlite_uri, "--server", server_uri, "--langfuse", langfuse]
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({src}, {names}):\n{done.stderr[-3000:]}")
    result: dict[str, dict[str, list[float]]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", help="the src/ directory of the other checkout")
    parser.add_argument("--after", default=str(ROOT / "src"))
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per child")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--groups",
        default="",
        help="which groups to run, e.g. 1,2 (a tree before the otel backend has no group 3); "
        "4: Langfuse and an MLflow server only",
    )
    parser.add_argument("--child")
    parser.add_argument("--sqlite", default="")
    parser.add_argument("--server", default="")
    parser.add_argument("--langfuse", default="")
    args = parser.parse_args()
    if args.child:
        child_main(args.child.split(","), args.events, args.reps, args.sqlite, args.server, args.langfuse)
        return
    if not args.before:
        parser.error("--before is required")
    from tests.support.fixtures_mlflow import MlflowServer

    trees = {"before": args.before, "after": args.after}
    groups = [GROUPS[int(n) - 1] for n in args.groups.split(",")] if args.groups else list(GROUPS)
    added: dict[tuple[str, str, str], list[float]] = {}
    tracing: dict[tuple[str, str, str], list[float]] = {}
    raws: dict[tuple[str, str], list[float]] = {}  # raw's own CPU per event: the machine's speed
    # Process CPU added as a multiple of raw's in the same repetition: what the machine's phase,
    # which scales both, leaves out.
    relative: dict[tuple[str, str], list[float]] = {}
    per_child: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp_name, receiver("langfuse") as langfuse:
        tmp = Path(tmp_name)
        server = MlflowServer(tmp).start(timeout=600)
        try:
            for round_index in range(args.rounds):
                order = list(trees.items()) if round_index % 2 == 0 else list(reversed(trees.items()))
                for label, src in order:
                    for group in groups:
                        result = run_child(src, group, args.events, args.reps, tmp, server.url, langfuse)
                        raw, null = result["raw"], result["mw-null"]
                        for clock in ("loop", "process"):
                            raws.setdefault((label, clock), []).extend(raw[clock])
                        per_child.append(
                            [
                                str(round_index + 1),
                                label,
                                fmt(median(raw["process"])),
                                ", ".join(
                                    f"{name} {fmt(median(result[name]['process']) - median(raw['process']))}"
                                    for name in group[1:]
                                ),
                            ]
                        )
                        for name in group[1:]:
                            for clock in ("loop", "process"):
                                values = result[name][clock]
                                diffs = [v - r for v, r in zip(values, raw[clock], strict=True)]
                                added.setdefault((label, name, clock), []).extend(diffs)
                                diffs = [v - n for v, n in zip(values, null[clock], strict=True)]
                                tracing.setdefault((label, name, clock), []).extend(diffs)
                            pairs = zip(result[name]["process"], raw["process"], strict=True)
                            relative.setdefault((label, name), []).extend((v - r) / r for v, r in pairs)
                        print(f"round {round_index + 1}: {label} {','.join(group)} done", file=sys.stderr)
        finally:
            server.stop()
    names = list(dict.fromkeys(name for group in groups for name in group[1:]))
    rows = [
        [
            "raw itself (absolute: the machine's speed)",
            *(
                fmt(median(raws.get((label, clock), []))) if figures is added else ""
                for clock in ("loop", "process")
                for figures in (added, tracing)
                for label in trees
            ),
        ]
    ]
    rows += [
        [
            name,
            *(
                fmt(median(figures.get((label, name, clock), [])))
                for clock in ("loop", "process")
                for figures in (added, tracing)
                for label in trees
            ),
        ]
        for name in names
    ]
    headers = [
        "variant",
        "loop CPU added us/ev, before",
        "after",
        "loop, tracing share (vs mw-null), before",
        "after",
        "process CPU added us/ev (incl. export), before",
        "after",
        "process, tracing share (vs mw-null), before",
        "after",
    ]
    reps = args.rounds * args.reps
    print(f"### Before/after, {args.events:,}-event runs, {reps} repetitions per variant and tree\n")
    print(f"before = {args.before}\nafter = {args.after}\n")
    print(table(headers, rows))
    print("\nProcess CPU added as a multiple of `raw`'s own in the same repetition (median; the")
    print("machine's phase scales both, so this compares across runs):\n")
    rows = [[name, *(f"{median(relative.get((label, name), [])):.2f}" for label in trees)] for name in names]
    print(table(["variant", "process added / raw, before", "after"], rows))
    print("\nPer child process (the spread behind the medians):\n")
    headers = ["round", "tree", "raw process us/ev", "process CPU added us/ev (median of the child)"]
    print(table(headers, per_child))


if __name__ == "__main__":
    main()
