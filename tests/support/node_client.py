"""Running ``examples/js`` (the official ``@ag-ui/client`` in Node) from tests.

``make test`` installs the pinned packages with ``npm ci``; a bare ``pytest`` does it once when they are
missing, under a file lock so parallel workers do not race.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

JS_DIR = Path(__file__).resolve().parents[2] / "examples" / "js"


def ensure_installed(timeout: float = 300.0) -> str:
    """The path of ``node``, after ``npm ci`` in examples/js if its node_modules are missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        raise RuntimeError("node and npm are needed (apt-get install nodejs npm)")
    with open(JS_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (JS_DIR / "node_modules" / "@ag-ui" / "client" / "package.json").exists():
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=JS_DIR,
                check=True,
                timeout=timeout,
                capture_output=True,
            )
    return node


def run_script(script: str, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``examples/js/<script>`` with ``args``; its one JSON line of output, parsed."""
    node = ensure_installed()
    result = subprocess.run(
        [node, script, *args],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={"PATH": str(Path(node).parent), "NODE_NO_WARNINGS": "1"},
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report
