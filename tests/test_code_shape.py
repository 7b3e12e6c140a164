"""The shape the codebase keeps (issue 10): no function over 40 lines without saying why."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ambient_tracing"
MAX_LINES = 40


def test_no_long_function_without_a_reason_in_its_docstring() -> None:
    long = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "over 40 lines, no 'Long because' in the docstring:\n" + "\n".join(long)


def test_the_public_api_is_narrow_and_complete() -> None:
    import ambient_tracing
    import ambient_tracing.backends as backends

    assert len(ambient_tracing.__all__) <= 12
    for name in ambient_tracing.__all__:
        assert getattr(ambient_tracing, name) is not None
    # Everything a new backend needs is importable from ambient_tracing.backends.
    for name in ("TracingBackend", "Span", "RunStart", "RatingSink", "TraceFinder", "TraceOwner", "Rating"):
        assert name in backends.__all__ and getattr(backends, name) is not None
    for name in ("RatingRejected", "TraceNotStored", "SpanSink", "from_config"):
        assert getattr(backends, name) is not None
