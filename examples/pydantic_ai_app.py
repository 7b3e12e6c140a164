"""pydantic-ai behind TracingMiddleware: a weather agent served by pydantic-ai's own AG-UI adapter.

The model is a scripted ``FunctionModel`` (no API key, no network): its first response calls
``get_weather``, its second answers from the tool result. ``include_usage=True`` makes the adapter
report token usage on RUN_FINISHED, which becomes the trace's usage and cost.
Use ``Agent("openai:gpt-4.1")`` instead and nothing else changes.

    python -m examples.pydantic_ai_app        # serves http://127.0.0.1:8000/agent
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.ui.ag_ui import AGUIAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ambient_tracing import Observability, TracingMiddleware

MODEL_NAME = "scripted-pydantic-ai-model"


def tool_call_id_for(city: str) -> str:
    return f"call-weather-{city.lower()}"


def answer_text(report: str) -> str:
    return f"Here is the weather: {report}."


async def _scripted(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    """First turn: a ``get_weather`` call for the last word of the prompt; then the answer."""
    last = messages[-1]
    assert isinstance(last, ModelRequest)
    returned = [part for part in last.parts if isinstance(part, ToolReturnPart)]
    if returned:
        for word in answer_text(str(returned[0].content)).split(" "):
            yield word + " "
        return
    prompt = next(part.content for part in last.parts if isinstance(part, UserPromptPart))
    city = str(prompt).rstrip("?").split()[-1]
    arguments = json.dumps({"city": city})
    for index, fragment in enumerate([arguments[:9], arguments[9:]]):
        name = "get_weather" if index == 0 else None
        yield {0: DeltaToolCall(name=name, json_args=fragment, tool_call_id=tool_call_id_for(city))}


def weather_agent() -> Agent[None, str]:
    agent: Agent[None, str] = Agent(FunctionModel(stream_function=_scripted, model_name=MODEL_NAME))

    @agent.tool_plain
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"Sunny and 21 C in {city}"

    return agent


def build_app(
    observability: Observability | None = None, path: str = "/agent", **middleware_options: Any
) -> TracingMiddleware:
    """The pydantic-ai AG-UI endpoint at ``path``, traced (from the environment when no observability);
    ``middleware_options`` go to TracingMiddleware (e.g. ``feedback_path="/feedback"``)."""
    agent = weather_agent()

    async def run(request: Request) -> Response:
        return await AGUIAdapter.dispatch_request(request, agent=agent, include_usage=True)

    app = Starlette(routes=[Route(path, run, methods=["POST"])])
    return TracingMiddleware(app, observability=observability, **middleware_options)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_app(), host="127.0.0.1", port=8000)
