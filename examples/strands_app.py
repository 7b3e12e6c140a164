"""AWS Strands behind TracingMiddleware: a weather agent (model -> tool -> model) served by ag-ui-strands.

The model is a scripted ``strands.models.Model`` (no AWS account, no network): its first turn streams
a ``get_weather`` tool use, its second answers from the tool result; both report token usage in the
stream's metadata, as Bedrock does. Use ``BedrockModel(...)`` instead and nothing else changes.

    python -m examples.strands_app            # serves http://127.0.0.1:8000/agent
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any

from ag_ui_strands import StrandsAgent, add_strands_fastapi_endpoint
from fastapi import FastAPI
from strands import Agent, tool
from strands.models import Model

from ambient_tracing import Observability, TracingMiddleware

MODEL_NAME = "scripted-strands-model"


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny and 21 C in {city}"


def tool_call_id_for(city: str) -> str:
    return f"call-weather-{city.lower()}"


def answer_text(report: str) -> str:
    return f"Here is the weather: {report}."


def _metadata() -> dict[str, Any]:
    usage = {"inputTokens": 19, "outputTokens": 7, "totalTokens": 26}
    return {"metadata": {"usage": usage, "metrics": {"latencyMs": 1}}}


class ScriptedModel(Model):
    """Streams Bedrock-style events: a tool use for the city in the prompt, then the answer."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {"model_id": MODEL_NAME}

    def update_config(self, **model_config: Any) -> None:
        self.config.update(model_config)

    def get_config(self) -> Any:
        return self.config

    def structured_output(self, *args: Any, **kwargs: Any) -> AsyncGenerator[dict[str, Any], None]:
        raise NotImplementedError("the weather agent has no structured output")

    async def stream(self, messages: Any, *args: Any, **kwargs: Any) -> AsyncIterable[Any]:  # type: ignore[override]
        last = messages[-1]["content"]
        results = [block["toolResult"] for block in last if "toolResult" in block]
        yield {"messageStart": {"role": "assistant"}}
        if results:
            report = "".join(part.get("text", "") for part in results[0]["content"])
            for word in answer_text(report).split(" "):
                yield {"contentBlockDelta": {"delta": {"text": word + " "}}}
            yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "end_turn"}}
        else:
            prompt = "".join(block.get("text", "") for block in last)
            city = prompt.rstrip("?").split()[-1]
            start = {"toolUse": {"name": "get_weather", "toolUseId": tool_call_id_for(city)}}
            yield {"contentBlockStart": {"start": start}}
            arguments = json.dumps({"city": city})
            for fragment in (arguments[:9], arguments[9:]):
                yield {"contentBlockDelta": {"delta": {"toolUse": {"input": fragment}}}}
            yield {"contentBlockStop": {}}
            yield {"messageStop": {"stopReason": "tool_use"}}
        yield _metadata()


def build_app(
    observability: Observability | None = None, path: str = "/agent", **middleware_options: Any
) -> TracingMiddleware:
    """The Strands AG-UI endpoint at ``path``, traced (from the environment when no observability);
    ``middleware_options`` go to TracingMiddleware (e.g. ``feedback_path="/feedback"``)."""
    agent = Agent(
        model=ScriptedModel(),
        tools=[get_weather],
        system_prompt="Answer weather questions.",
        callback_handler=None,  # Strands prints the answer to stdout by default
    )
    app = FastAPI()
    add_strands_fastapi_endpoint(app, StrandsAgent(agent, name="weather"), path)
    return TracingMiddleware(app, observability=observability, **middleware_options)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_app(), host="127.0.0.1", port=8000)
