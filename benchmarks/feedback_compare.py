"""Feedback before and after, side by side in one run: :mod:`benchmarks.feedback_delay` on two
checkouts, in turns (before/after, then after/before, ...), each in its own process.

    .venv/bin/python -m benchmarks.feedback_compare --before /tmp/before/src [--after src] [--rounds 3]

Prints one table: accepted ratings per second (median of the rounds) and the time from POST to
visible in each backend (median over every run of every round), with after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import ROOT, fmt, median, rotated, table

CHILD_TIMEOUT = 900.0


def run_once(src: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One ``feedback_delay`` run on the code in ``src``; its figures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src.resolve()), str(ROOT)])}
    command = [sys.executable, "-m", "benchmarks.feedback_delay", "--json", str(out)]
    command += [
        "--runs",
        str(args.runs),
        "--ratings",
        str(args.ratings),
        "--concurrency",
        str(args.concurrency),
    ]
    subprocess.run(command, cwd=ROOT, env=env, check=True, timeout=CHILD_TIMEOUT)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def summary(results: dict[str, list[dict[str, Any]]]) -> str:
    """The side-by-side table of the rounds' figures."""

    def pooled(label: str, key: str) -> float:
        return median([value for result in results[label] for value in result[key]])

    measures = [
        (
            "accepted ratings/s (median of rounds)",
            [median([r["rate"] for r in results[x]]) for x in LABELS],
            0,
        ),
        ("POST -> visible in Langfuse, median s", [pooled(x, "langfuse") for x in LABELS], 2),
        ("POST -> visible in MLflow, median s", [pooled(x, "mlflow") for x in LABELS], 2),
    ]
    rows = [
        [name, fmt(before, digits), fmt(after, digits), fmt(after / before if before else float("nan"))]
        for name, (before, after), digits in measures
    ]
    recorded = [sum(r["recorded"] for r in results[x]) for x in LABELS]
    rows.append(["ratings recorded (all rounds)", str(recorded[0]), str(recorded[1]), ""])
    return table(["measure", "before", "after", "after/before"], rows)


LABELS = ("before", "after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="the src folder of the old code")
    parser.add_argument("--after", type=Path, default=ROOT / "src")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ratings", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    sources = {"before": args.before, "after": args.after}
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in LABELS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            for label in rotated(LABELS, round_number):
                print(f"\n== round {round_number + 1}: {label} ({sources[label]})", flush=True)
                out = Path(scratch) / f"{label}-{round_number}.json"
                results[label].append(run_once(sources[label], args, out))
    print(f"\n{args.rounds} rounds, {args.runs} delay runs and {args.ratings} ratings each\n")
    print(summary(results))


if __name__ == "__main__":
    main()
