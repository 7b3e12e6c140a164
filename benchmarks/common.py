"""Shared helpers: paths, statistics, tables, bounded child processes, RSS readings."""

from __future__ import annotations

import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.support.processes import stop_process

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # tests.support is reused; the package itself is installed (-e)
    sys.path.insert(0, str(ROOT))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (0 < fraction <= 1)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def rotated(items: Sequence[str], repetition: int) -> list[str]:
    """``items`` rotated by ``repetition``: each variant takes every position in turn."""
    shift = repetition % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable as plain text)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [
        max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN check without math


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


@contextmanager
def child(
    args: Sequence[str], *, ready_timeout: float = 120.0, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Run ``python -m <args>`` from the repo root; yields the first line it prints (e.g. its URL).

    The child stops when its stdin closes; it is terminated, then killed, if it does not.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None and process.stdin is not None
    try:
        readable, _, _ = select.select([process.stdout], [], [], ready_timeout)
        line = process.stdout.readline().decode().strip() if readable else ""
        if not line:
            raise RuntimeError(f"child {args} did not start within {ready_timeout}s")
        yield line
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            stop_process(process, grace=10)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(
    pids: Sequence[int], *, threshold: float = 0.02, window: float = 0.25, max_wait: float = 60.0
) -> float:
    """Wait until the processes together use < ``threshold`` of a core over ``window`` s (e.g. a
    backend still exporting earlier traces), at most ``max_wait`` s; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < max_wait:
        before = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(window)
        if sum(cpu_seconds(pid) for pid in pids) - before < threshold * window:
            break
    return time.monotonic() - start


def wait_for_stdin_eof(max_seconds: float = 3600.0) -> None:
    """In a child: block until the parent closes our stdin (or ``max_seconds`` pass)."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sys.stdin], [], [], 1.0)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            return
