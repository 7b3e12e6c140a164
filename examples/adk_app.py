"""Google ADK behind TracingMiddleware: a weather agent (model -> tool -> model) served by ag-ui-adk.

The model is a scripted ``BaseLlm`` (no API key, no network): its first turn calls ``get_weather``
and its second answers from the tool result, streamed as partial responses, with token usage.
Use ``model="gemini-2.5-flash"`` instead and nothing else changes.

    python -m examples.adk_app                # serves http://127.0.0.1:8000/agent
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from ag_ui_adk import ADKAgent, add_adk_fastapi_endpoint
from fastapi import FastAPI
from google.adk.agents import LlmAgent
from google.adk.models import BaseLlm, LlmRequest, LlmResponse
from google.genai import types

from ambient_tracing import Observability, TracingMiddleware

MODEL_NAME = "scripted-adk-model"


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny and 21 C in {city}"


def tool_call_id_for(city: str) -> str:
    return f"call-weather-{city.lower()}"


def answer_text(report: str) -> str:
    return f"Here is the weather: {report}."


def _usage() -> types.GenerateContentResponseUsageMetadata:
    return types.GenerateContentResponseUsageMetadata(
        prompt_token_count=17, candidates_token_count=8, total_token_count=25
    )


class ScriptedLlm(BaseLlm):
    """Calls ``get_weather`` for the city in the user's message; answers once the result is in."""

    model: str = MODEL_NAME

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        last = llm_request.contents[-1].parts or []
        result = next((part.function_response for part in last if part.function_response), None)
        if result is None:
            text = "".join(part.text or "" for part in last)
            city = text.rstrip("?").split()[-1]
            call = types.FunctionCall(name="get_weather", args={"city": city}, id=tool_call_id_for(city))
            content = types.Content(role="model", parts=[types.Part(function_call=call)])
            yield LlmResponse(content=content, usage_metadata=_usage(), model_version=MODEL_NAME)
            return
        answer = answer_text(str((result.response or {}).get("result", "")))
        if stream:
            for word in answer.split(" "):
                piece = types.Content(role="model", parts=[types.Part(text=word + " ")])
                yield LlmResponse(content=piece, partial=True, model_version=MODEL_NAME)
        content = types.Content(role="model", parts=[types.Part(text=answer)])
        yield LlmResponse(content=content, usage_metadata=_usage(), model_version=MODEL_NAME)


def weather_agent() -> LlmAgent:
    return LlmAgent(
        name="weather",
        model=ScriptedLlm(),
        instruction="Answer questions about the weather.",
        tools=[get_weather],
    )


def build_app(
    observability: Observability | None = None, path: str = "/agent", **middleware_options: Any
) -> TracingMiddleware:
    """The ADK AG-UI endpoint at ``path``, traced (from the environment when no observability);
    ``middleware_options`` go to TracingMiddleware (e.g. ``feedback_path="/feedback"``)."""
    app = FastAPI()
    agent = ADKAgent(adk_agent=weather_agent(), app_name="weather", user_id="demo")
    add_adk_fastapi_endpoint(app, agent, path)
    return TracingMiddleware(app, observability=observability, **middleware_options)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_app(), host="127.0.0.1", port=8000)
