"""The real AG-UI producers of ``examples/``, described once for the tests that run them.

Each example serves a weather agent (model -> ``get_weather`` tool -> model) on a scripted model;
a spec says what its run must record: the tool span, the answer, the steps and the usage it reports.
"""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass
from typing import Any

import pytest

from ambient_tracing import Observability, TracingMiddleware

CITY = "Paris"
PROMPT = f"What is the weather in {CITY}?"
REPORT = f"Sunny and 21 C in {CITY}"
ANSWER = f"Here is the weather: {REPORT}."
TOOL_CALL_ID = f"call-weather-{CITY.lower()}"


@dataclass(frozen=True)
class Producer:
    name: str
    module: str
    #: What the tool span's output is (the producer's TOOL_CALL_RESULT content, parsed when JSON).
    tool_output: Any
    #: Names of all spans of one run, in MLflow (root, steps and the tool).
    span_names: tuple[str, ...]
    #: (model, input, output, total) of RUN_FINISHED.usage, or None when the producer reports none.
    usage: tuple[str, int, int, int] | None
    #: The step a tool call is made in (``ambient.step`` on the tool span), for producers with steps.
    tool_step: str | None = None

    def build_app(self, observability: Observability) -> TracingMiddleware:
        """The example's app, traced by ``observability``; skipped when the producer is not installed."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ADK's "experimental" notices
                module = importlib.import_module(self.module)
        except ImportError as error:  # pragma: no cover - the dev install has them all
            pytest.skip(f"{self.name} not installed: {error}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            app: TracingMiddleware = module.build_app(observability)
        return app


PYDANTIC_AI = Producer(
    name="pydantic-ai",
    module="examples.pydantic_ai_app",
    tool_output=REPORT,
    span_names=("llm_interaction", "tool_get_weather"),
    usage=("scripted-pydantic-ai-model", 100, 18, 118),  # FunctionModel's estimate
)
LANGGRAPH = Producer(
    name="langgraph",
    module="examples.langgraph_app",
    tool_output=REPORT,
    span_names=("llm_interaction", "step_agent", "step_agent", "step_tools", "tool_get_weather"),
    # Two model calls of 21 + 9 tokens, summed by ag-ui-langgraph.
    usage=("scripted-langgraph-model", 42, 18, 60),
    # The call is made in the `agent` step, which ends before the `tools` step brings its result.
    tool_step="agent",
)
ADK = Producer(
    name="adk",
    module="examples.adk_app",
    tool_output={"result": REPORT},  # ADK wraps a plain return value
    span_names=("llm_interaction", "tool_get_weather"),
    usage=None,  # ag-ui-adk 0.11 puts no usage on RUN_FINISHED
)
STRANDS = Producer(
    name="strands",
    module="examples.strands_app",
    tool_output=json.dumps(REPORT),  # ag-ui-strands sends the tool's return value JSON-encoded
    span_names=("llm_interaction", "tool_get_weather"),
    usage=("scripted-strands-model", 38, 14, 52),  # two model calls of 19 + 7, summed
)
PRODUCERS = (PYDANTIC_AI, LANGGRAPH, ADK, STRANDS)
