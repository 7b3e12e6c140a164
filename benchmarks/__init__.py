"""Benchmarks of ambient-tracing (issue #4): run ``python -m benchmarks.run`` from the repo root."""
