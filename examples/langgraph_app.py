"""LangGraph behind TracingMiddleware: a weather agent (model -> tool -> model) served by ag-ui-langgraph.

The chat model is scripted (no API key, no network): its first turn calls ``get_weather`` and its
second answers from the tool result; it streams like a provider does and reports token usage.
Swap ``ScriptedChatModel`` for ``ChatOpenAI`` / ``ChatAnthropic`` and nothing else changes.

    python -m examples.langgraph_app          # serves http://127.0.0.1:8000/agent
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from ag_ui_langgraph import LangGraphAgent, add_langgraph_fastapi_endpoint
from fastapi import FastAPI
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from ambient_tracing import Observability, TracingMiddleware

MODEL_NAME = "scripted-langgraph-model"
USAGE = UsageMetadata(input_tokens=21, output_tokens=9, total_tokens=30)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny and 21 C in {city}"


def tool_call_id_for(city: str) -> str:
    return f"call-weather-{city.lower()}"


def answer_text(report: str) -> str:
    return f"Here is the weather: {report}."


class ScriptedChatModel(BaseChatModel):
    """A chat model that calls ``get_weather`` for the city in the last user message, then answers."""

    model_name: str = MODEL_NAME

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        return self  # the script knows its one tool

    def _reply(self, messages: list[BaseMessage]) -> AIMessage:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            return AIMessage(content=answer_text(str(last.content)), usage_metadata=USAGE)
        city = str(last.content).rstrip("?").split()[-1]
        call = {"name": "get_weather", "args": {"city": city}, "id": tool_call_id_for(city)}
        return AIMessage(content="", tool_calls=[call], usage_metadata=USAGE)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Word by word for text; a tool call as providers stream it (name and id first, then argument
        fragments); usage on the last chunk."""
        reply = self._reply(messages)
        if reply.tool_calls:
            call = reply.tool_calls[0]
            arguments = json.dumps(call["args"])
            fragments = ["", arguments[:9], arguments[9:]]
            for index, fragment in enumerate(fragments):
                chunk = {"name": call["name"] if index == 0 else None, "args": fragment, "index": 0}
                chunk["id"] = call["id"] if index == 0 else None
                yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))
        else:
            for word in str(reply.content).split(" "):
                yield ChatGenerationChunk(message=AIMessageChunk(content=word + " "))
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content="", usage_metadata=USAGE, response_metadata={"finish_reason": "stop"}
            )
        )


def weather_graph() -> Any:
    """model -> (tool call?) tools -> model -> END, with a checkpointer (ag-ui-langgraph needs one)."""
    model = ScriptedChatModel()

    def agent(state: MessagesState) -> dict[str, list[BaseMessage]]:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode([get_weather]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    graph.add_edge("agent", END)
    return graph.compile(checkpointer=InMemorySaver())


def build_app(
    observability: Observability | None = None, path: str = "/agent", **middleware_options: Any
) -> TracingMiddleware:
    """The LangGraph AG-UI endpoint at ``path``, traced (from the environment when no observability);
    ``middleware_options`` go to TracingMiddleware (e.g. ``feedback_path="/feedback"``)."""
    app = FastAPI()
    agent = LangGraphAgent(name="weather", graph=weather_graph(), emit_raw_events=False)
    add_langgraph_fastapi_endpoint(app, agent, path)
    return TracingMiddleware(app, observability=observability, **middleware_options)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(build_app(), host="127.0.0.1", port=8000)
