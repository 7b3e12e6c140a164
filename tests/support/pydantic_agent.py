"""A real AG-UI producer: a pydantic-ai agent served by pydantic-ai's own AG-UI adapter.

The model is a ``FunctionModel`` with a scripted stream function (no network, no API key): its
first response is one ``get_weather`` tool call, streamed as JSON argument fragments; once the
tool's result is in the history, it streams a short answer as text. FunctionModel estimates token
usage, and the adapter reports it on RUN_FINISHED when ``include_usage`` is set (AG-UI 1.0).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.ui.ag_ui import AGUIAdapter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

MODEL_NAME = "scripted-weather-model"
DEFAULT_CITY = "Paris"

ToolHook = Callable[[str], Awaitable[None]]


def weather_report(city: str) -> str:
    """What ``get_weather`` returns for ``city``."""
    return f"Sunny and 21 C in {city}"


def answer_text(city: str) -> str:
    """The full assistant text the model streams after the tool result for ``city``."""
    return f"The weather in {city}: {weather_report(city)}. Enjoy your day!"


def city_of(prompt: str) -> str:
    """The city a prompt asks about: the word after ``in``, else :data:`DEFAULT_CITY`."""
    words = prompt.rstrip("?!. ").split()
    for before, word in itertools.pairwise(words):
        if before.lower() == "in":
            return word
    return DEFAULT_CITY


def tool_call_id_for(city: str) -> str:
    """The tool call id the scripted model gives its ``get_weather`` call for ``city``."""
    return f"call-weather-{city}"


def _last_prompt(messages: list[ModelMessage]) -> str:
    for message in reversed(messages):
        if isinstance(message, ModelRequest):
            for part in reversed(message.parts):
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    return part.content
    return ""


def _tool_returned(messages: list[ModelMessage]) -> bool:
    last = messages[-1] if messages else None
    return isinstance(last, ModelRequest) and any(isinstance(part, ToolReturnPart) for part in last.parts)


def _chunks(text: str, size: int) -> list[str]:
    return [text[index : index + size] for index in range(0, len(text), size)]


def weather_agent(*, delay: float = 0.0, before_tool: ToolHook | None = None) -> Agent[None, str]:
    """The scripted agent. ``delay`` seconds are slept between streamed chunks (so concurrent runs
    interleave); ``before_tool(city)`` is awaited inside the tool, before it returns."""

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        city = city_of(_last_prompt(messages))
        if not _tool_returned(messages):
            arguments = json.dumps({"city": city})
            call_id = tool_call_id_for(city)
            for index, fragment in enumerate(_chunks(arguments, 7)):
                if delay:
                    await asyncio.sleep(delay)
                name = "get_weather" if index == 0 else None
                yield {0: DeltaToolCall(name=name, json_args=fragment, tool_call_id=call_id)}
        else:
            for index, word in enumerate(answer_text(city).split(" ")):
                if delay:
                    await asyncio.sleep(delay)
                yield word if index == 0 else " " + word

    agent: Agent[None, str] = Agent(FunctionModel(stream_function=stream, model_name=MODEL_NAME))

    @agent.tool_plain
    async def get_weather(city: str) -> str:
        """The current weather in a city."""
        if before_tool is not None:
            await before_tool(city)
        return weather_report(city)

    return agent


def weather_app(agent: Agent[None, str] | None = None, *, include_usage: bool = True) -> Starlette:
    """POST /agent runs ``agent`` (default :func:`weather_agent`) through pydantic-ai's AG-UI adapter."""
    served = agent if agent is not None else weather_agent()

    async def run(request: Request) -> Response:
        return await AGUIAdapter.dispatch_request(request, agent=served, include_usage=include_usage)

    return Starlette(routes=[Route("/agent", run, methods=["POST"])])
