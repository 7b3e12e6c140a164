"""With the ``[mlflow]`` extra (mlflow-skinny, no numpy) a turn must not retry a failing import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def test_no_pyfunc_import_is_attempted_per_turn_without_numpy() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.pyfunc_probe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    assert done.stdout.strip().splitlines()[-1] == "0", done.stderr[-2000:]
