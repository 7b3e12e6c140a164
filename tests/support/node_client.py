"""Running the Node examples (``examples/js``: ``@ag-ui/client``; ``examples/copilotkit``: its runtime).

``make test`` installs their pinned packages with ``npm ci``; a bare ``pytest`` does it once when they
are missing, under a file lock so parallel workers do not race.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
JS_DIR = EXAMPLES / "js"
COPILOTKIT_DIR = EXAMPLES / "copilotkit"


def ensure_installed(directory: Path = JS_DIR, timeout: float = 400.0) -> str:
    """The path of ``node``, after ``npm ci`` in ``directory`` if its node_modules are missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("node and npm are needed (apt-get install nodejs npm)")
    with open(directory / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "node_modules" / ".package-lock.json").exists():
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=directory,
                check=True,
                timeout=timeout,
                capture_output=True,
            )
    return node


def node_env(**extra: str) -> dict[str, str]:
    """A small environment for Node: PATH, no telemetry, no warnings on stderr."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "NODE_NO_WARNINGS": "1",
        "COPILOTKIT_TELEMETRY_DISABLED": "true",
        **extra,
    }


def run_script(script: str, *args: str, timeout: float = 60.0, **env: str) -> dict[str, Any]:
    """Run ``examples/js/<script>`` with ``args``; its one JSON line of output, parsed."""
    node = ensure_installed()
    result = subprocess.run(
        [node, script, *args],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=node_env(**env),
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report
