"""``ambient-tracing demo`` end to end: a fresh sqlite store, three runs over HTTP, trees read back."""

from __future__ import annotations

import re
from pathlib import Path

from ambient_tracing.cli import main
from ambient_tracing.demo import CONVERSATION, run_demo


def test_the_demo_traces_a_conversation_and_prints_each_span_tree(tmp_path: Path) -> None:
    store = tmp_path / "demo" / "mlflow.db"
    lines: list[str] = []
    trace_ids = run_demo(store, say=lines.append)
    output = "\n".join(lines)

    assert store.exists()
    assert len(trace_ids) == len(CONVERSATION) == len(set(trace_ids))
    assert all(re.fullmatch(r"[0-9a-f]{32}", trace_id) for trace_id in trace_ids)
    for trace_id in trace_ids:
        assert f"CUSTOM ambient:trace_id   traceId={trace_id}" in output
        assert f"trace tr-{trace_id}  status=OK" in output
    assert output.count("tool_get_weather") == 2  # Lisbon and Oslo; the third answer needs no tool
    assert 'in={"city": "lisbon"} out="21°C and sunny"' in output
    assert "'total_tokens': 76" in output
    assert "agent> It is 21°C and sunny in Lisbon." in output
    assert f"mlflow ui --backend-store-uri sqlite:///{store.resolve()}" in output
    assert "LANGFUSE_PUBLIC_KEY" in output


def test_the_cli_rejects_an_unknown_command(capsys: object) -> None:
    try:
        main(["nope"])
    except SystemExit as exit:
        assert exit.code == 2
    else:
        raise AssertionError("an unknown command must fail")
