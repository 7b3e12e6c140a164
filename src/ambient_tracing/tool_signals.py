"""What a tool call says about the session: its category, whether it failed and why, and whether
the agent is asking the user a question. Pure functions of names and AG-UI events.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

MAX_REASON_CHARS = 120

ToolCategoriser = Callable[[str], str]


def default_tool_category(tool_name: str) -> str:
    """``mcp__<server>__<tool>`` -> ``<server>`` (the Claude Agent SDK's MCP naming); else the name."""
    if tool_name.startswith("mcp__"):
        server, separator, _ = tool_name[5:].partition("__")
        if separator and server:
            return server
    return tool_name


#: Tool names and interrupt reasons that mean "the agent asks the user", normalised (see _normal).
DEFAULT_CLARIFICATION_NAMES = frozenset(
    {
        "askuserquestion",  # Claude Code / Claude Agent SDK
        "askuser",
        "askhuman",
        "askfollowupquestion",  # Cline
        "askclarifyingquestion",
        "clarify",
        "clarification",
        "requestuserinput",
        "userinput",
        "humaninput",
        "inputrequired",
        "question",
    }
)


@functools.lru_cache(maxsize=1024)  # an app has few tool names; asked once per tool call
def normal_name(name: str) -> str:
    """The last ``__`` part, lower-cased, letters and digits only (``mcp__x__Ask_User``: askuser)."""
    return _NOT_ALNUM.sub("", name.rsplit("__", 1)[-1].lower())


_NOT_ALNUM = re.compile(r"[^a-z0-9]")


_ERROR_TEXT = re.compile(r"\s*(?:error\b|<tool_use_error>)", re.IGNORECASE)


def tool_failure_reason(event: Mapping[str, Any]) -> str | None:
    """The first line of why a ``TOOL_CALL_RESULT`` failed, or None when it did not.

    Failed means: an ``error`` field (any truthy value) or ``isError``/``is_error`` true on the event
    (extra fields producers add); content that is a JSON object with a truthy ``"error"`` or
    ``"isError": true`` (MCP's CallToolResult); or content text starting with ``Error`` (any case,
    a whole word) or ``<tool_use_error>`` (Claude Code).
    """
    text = _content_text(event.get("content"))
    error = event.get("error")
    if error:
        return failure_reason(error) if error is not True else failure_reason(text)
    if event.get("isError") is True or event.get("is_error") is True:
        return failure_reason(text)
    stripped = text.lstrip()
    if stripped.startswith("{") and ('"error"' in stripped or '"isError"' in stripped):
        try:
            value = json.loads(stripped)
        except ValueError:
            value = None
        if isinstance(value, dict):
            error = value.get("error")
            if error and error is not True:
                return failure_reason(error)
            if error is True or value.get("isError") is True:
                return failure_reason(value.get("message") or _content_text(value.get("content")) or text)
    if _ERROR_TEXT.match(text):
        return failure_reason(text)
    return None


def _content_text(content: Any) -> str:
    """TOOL_CALL_RESULT content as text: the string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (part.get("text") for part in content if isinstance(part, Mapping))
        return "\n".join(part for part in parts if isinstance(part, str))
    return ""


def failure_reason(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("message") or value.get("error") or json.dumps(value, default=str)
    text = str(value).replace("<tool_use_error>", "").replace("</tool_use_error>", "")
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line[:MAX_REASON_CHARS] or "error"
