"""Stopping a child process, bounded: terminate, wait, then kill."""

from __future__ import annotations

import subprocess


def stop_process(
    process: subprocess.Popen[bytes] | subprocess.Popen[str] | None, grace: float = 15.0
) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL (and wait for that too)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace)
