"""CopilotKit's runtime (``@copilotkit/runtime`` 1.75, ``examples/copilotkit/runtime.mjs``) in front of
the traced pydantic-ai example: the runtime re-serialises every event, and the id event must still
reach its clients once per run, right after RUN_STARTED, naming the trace the run was recorded under;
a rating sent with that id lands on it (read back from the Langfuse receiver).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from examples.pydantic_ai_app import build_app

from ambient_tracing import Observability
from tests.support.langfuse_receiver import LangfuseReceiver
from tests.support.node_client import COPILOTKIT_DIR, ensure_installed, node_env, run_script
from tests.support.processes import stop_process
from tests.support.server import serve

pytestmark = pytest.mark.timeout(180)


@contextmanager
def copilotkit_runtime(upstream: str, timeout: float = 60.0) -> Iterator[str]:
    """``runtime.mjs`` proxying to ``upstream``; yields its base URL once it listens."""
    node = ensure_installed(COPILOTKIT_DIR)
    process = subprocess.Popen(
        [node, "runtime.mjs", upstream],
        cwd=COPILOTKIT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_env(),
    )
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    try:
        assert first_line and first_line[0], f"runtime did not start: {process.poll()}"
        yield str(json.loads(first_line[0])["url"])
    finally:
        stop_process(process, grace=10)


async def test_the_id_event_reaches_copilotkit_clients_once_per_run_and_ratings_land(
    tmp_path: Path, langfuse_backend: Any, langfuse_receiver: LangfuseReceiver
) -> None:
    obs = Observability([langfuse_backend()], mask_messages=False, feedback_spool=tmp_path / "spool.jsonl")
    thread = "thread-copilotkit"
    with (
        serve(build_app(obs, feedback_path="/feedback")) as url,
        copilotkit_runtime(f"{url}/agent") as runtime,
    ):
        report = await asyncio.to_thread(
            run_script, "trace-and-rate.mjs", url, thread, "2", AGENT_URL=f"{runtime}/agent/weather/run"
        )
    first, second = report["runs"]
    for run in (first, second):
        assert len(run["traceIds"]) == 1, run
        assert run["types"][:2] == ["RUN_STARTED", "CUSTOM"]
        assert run["types"].count("CUSTOM") == 1 and run["types"][-1] == "RUN_FINISHED"
        assert "tool" in run["newMessages"]
    [first_id], [second_id] = first["traceIds"], second["traceIds"]
    assert first_id != second_id
    assert obs.last_trace_id(thread) == second_id

    roots = langfuse_receiver.wait_for_spans(
        lambda spans: (
            sum(s.name == "llm_interaction" and s.attributes.get("session.id") == thread for s in spans) == 2
        )
    )
    recorded = [
        s.trace_id for s in roots if s.name == "llm_interaction" and s.attributes["session.id"] == thread
    ]
    assert sorted(recorded) == sorted([first_id, second_id])
    up, down = report["feedback"]
    assert up["body"]["event"]["traceId"] == first_id and down["body"]["event"]["traceId"] == second_id
    scores = langfuse_receiver.wait_for_scores(2)
    assert sorted((s["traceId"], s["value"]) for s in scores) == sorted([(first_id, 1), (second_id, 0)])
    await obs.aclose()
