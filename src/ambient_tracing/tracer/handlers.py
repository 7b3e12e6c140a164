"""Where each AG-UI event becomes span operations: AG-UI events in, trace operations out.

One :class:`StreamTracer` follows one event stream (an HTTP response or a Python generator), which
may carry several runs. Events are the raw JSON dicts (camelCase keys), so unknown, legacy and
malformed events never raise: they are skipped. Nothing here knows HTTP or a vendor SDK: a run's
root span comes from :class:`~ambient_tracing.tracer.runs.Runs`, every other span is opened here
and named here (``tool_<name>``, ``step_<name>``, ``reasoning``, ``subagent_<name>``).

Each event kind has one ``_on_<kind>`` method; :data:`_HANDLERS` maps the wire ``type`` to it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ambient_tracing.backends.base import NULL_SPAN, Span, SpanKind, TokenUsage
from ambient_tracing.privacy import MAX_VISIBLE_CHARS, JsonText
from ambient_tracing.tool_signals import failure_reason, tool_failure_reason
from ambient_tracing.tracer.request import RunRequest, last_user_message
from ambient_tracing.tracer.runs import OpenRun, Runs

if TYPE_CHECKING:
    from ambient_tracing.session_metrics.metrics import SessionMetrics

logger = logging.getLogger(__name__)

#: Most child spans (tools, steps, reasoning, subagents) recorded per run; the rest are counted in the
#: run's ``ambient.spans_not_recorded`` (a vendor SDK keeps every span of an open trace in memory).
MAX_SPANS_PER_RUN = 1_000
#: Most characters of assistant text, tool arguments, tool results and reasoning kept per span.
MAX_TEXT_CHARS = 32_768
TRUNCATED = "... [truncated]"
# Events that only feed the recorded text: not wanted once it is full (a message's role only
# decides whether its text is recorded).
_TEXT_EVENTS = frozenset({"TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CHUNK"})

Event = Mapping[str, Any]


class _Text:
    """Appends text up to a character budget; past it, the text is marked as truncated."""

    __slots__ = ("_parts", "_room", "truncated")

    def __init__(self, limit: int) -> None:
        self._parts: list[str] = []
        self._room = limit
        self.truncated = False

    def add(self, text: Any) -> None:
        if not isinstance(text, str) or self.truncated:
            return
        room = self._room
        if len(text) <= room:
            self._parts.append(text)
            self._room = room - len(text)
        else:
            self._parts.append(text[:room])
            self.truncated = True

    def value(self) -> str | None:
        if not self._parts:
            return None
        text = "".join(self._parts)
        return text + TRUNCATED if self.truncated else text


class EventClock:
    """When the event being traced passed its door (``time.time_ns()``; None: now). The tracer
    worker handles events a batch (or a backlog) later; the spans they open and end carry this."""

    __slots__ = ("now_ns",)

    def __init__(self) -> None:
        self.now_ns: int | None = None


class _Node:
    """A child span that ends only after its own children, so no span outlives its parent whatever
    the order of events (a producer may close a step or subagent before something opened inside it
    has ended): the parent's end waits for its last open child and happens then. Its start and end
    times are the :class:`EventClock`'s at the event that started and ended it."""

    __slots__ = ("_clock", "_ending", "_open", "_parent", "_span")

    def __init__(self, span: Span, parent: _Node | None, clock: EventClock) -> None:
        self._span = span
        self._parent = parent
        self._clock = clock
        self._open = 0
        self._ending: dict[str, Any] | None = None  # the end waiting for open children
        if parent is not None:
            parent._open += 1

    @property
    def trace_id(self) -> str:
        return self._span.trace_id

    def start_child(self, name: str, kind: SpanKind, **options: Any) -> _Node:
        options.setdefault("start_time_ns", self._clock.now_ns)
        return _Node(self._span.start_child(name, kind, **options), self, self._clock)

    def set_input(self, input: Any) -> None:
        self._span.set_input(input)

    def end(self, **options: Any) -> None:
        if self._open:
            self._ending = options  # ends with the last open child, at that child's time
        else:
            self._finish(options)

    def _finish(self, options: dict[str, Any]) -> None:
        options.setdefault("end_time_ns", self._clock.now_ns)
        self._span.end(**options)
        parent, self._parent = self._parent, None  # ended once: a second end does not count twice
        if parent is not None:
            parent._child_ended()

    def _child_ended(self) -> None:
        self._open -= 1
        if not self._open and self._ending is not None:
            options, self._ending = self._ending, None
            self._finish(options)


@dataclass(slots=True)
class _ToolCall:
    span: Span
    arguments: _Text
    arguments_recorded: bool = False
    #: Why it failed, when TOOL_CALL_END said so (the origin runner's Claude adapter does).
    failure: str | None = None


@dataclass(slots=True)
class _Reasoning:
    span: Span
    text: _Text
    implicit: bool


@dataclass(slots=True)
class _Step:
    name: str
    span: Span
    open: bool = True


@dataclass(slots=True)
class _RunState:
    """What the tracer keeps of the run open on its stream."""

    opened: OpenRun
    root: _Node
    text: _Text
    other_role_messages: set[str] = field(default_factory=set)
    tools: dict[str, _ToolCall] = field(default_factory=dict)
    # Open steps, innermost last; a step finished out of order stays (closed) until it is on top.
    steps: list[_Step] = field(default_factory=list)
    # Open steps by name, innermost last: STEP_FINISHED finds its step without searching the stack.
    steps_by_name: dict[str, list[_Step]] = field(default_factory=dict)
    reasoning: list[_Reasoning] = field(default_factory=list)
    subagents: dict[str, Span] = field(default_factory=dict)
    spans_left: int = 0
    spans_dropped: int = 0
    metrics: SessionMetrics | None = None


class RunOpener:
    """Opens the runs of one stream under their trace ids: the part of RUN_STARTED the doors do on
    the event loop (the id is announced right after it); the rest is :meth:`StreamTracer.start_run`."""

    __slots__ = ("_request", "_runs")

    def __init__(self, runs: Runs, request: RunRequest) -> None:
        self._runs = runs
        self._request = request

    def open(self, event: Event, start_time_ns: int | None = None) -> OpenRun | None:
        """Open the run a RUN_STARTED event starts (at ``start_time_ns``, else now); None when no
        backend records it."""
        request = self._request
        run_input = event.get("input")
        user_message = (
            last_user_message(run_input.get("messages")) if isinstance(run_input, Mapping) else None
        )
        run_id = _str(event.get("runId")) or request.run_id
        caller = request.caller
        if caller is not None and caller.applies_to(run_id):
            self._request = request.with_caller(None)  # one run per settled id
        else:
            caller = None
        return self._runs.open(
            thread_id=_str(event.get("threadId")) or request.thread_id,
            run_id=run_id,
            user_id=request.user_id,
            user_name=request.user_name,
            input=user_message if user_message is not None else request.user_message,
            caller=caller,
            start_time_ns=start_time_ns,
        )


class StreamTracer:
    """Traces the runs of one AG-UI event stream.

    Feed every event to :meth:`on_event`; it returns the trace id to announce right after an event
    that opened a traced run, else None. Call :meth:`close` once when the stream ends, however it
    ends, so nothing stays open.
    """

    __slots__ = ("_opener", "_request", "_run", "_runs", "_text_limit", "_warned", "clock")

    def __init__(self, runs: Runs, request: RunRequest) -> None:
        self._runs = runs
        self._request = request
        self._opener = RunOpener(runs, request)
        self._run: _RunState | None = None
        self._warned = False
        #: Set by the door before each event it hands over: when that event passed it.
        self.clock = EventClock()
        # With the mask on, text past its limit is redacted whole: no need to keep more of it.
        self._text_limit = MAX_VISIBLE_CHARS + 1 if runs.mask_messages else MAX_TEXT_CHARS

    @property
    def trace_id(self) -> str | None:
        """The id of the run being traced now, if any."""
        return self._run.opened.trace_id if self._run else None

    def wants(self, kind: str) -> bool:
        """Whether an event of this type can change the trace now; a door may skip parsing it if not."""
        run = self._run
        if run is None:
            return kind == "RUN_STARTED"
        if kind in _TEXT_EVENTS:
            return not run.text.truncated
        return kind in _HANDLERS or kind == "RUN_STARTED"

    def on_event(self, event: Event) -> str | None:
        kind = event.get("type")
        if kind == "RUN_STARTED":  # one the door did not open (e.g. its type written with escapes)
            return self.start_run(self._opener.open(event, self.clock.now_ns))
        run = self._run
        handler = _HANDLERS.get(kind) if run is not None and isinstance(kind, str) else None
        if handler is not None:
            handler(self, run, event)  # type: ignore[arg-type]
        return None

    def close(self, error: str | None = None) -> None:
        """End the open run, if any: with ``error`` as its ERROR status, or as incomplete."""
        if self._run is not None:
            self._end_run(error=error or "stream ended before RUN_FINISHED")

    # -- helpers ------------------------------------------------------------------------------

    def warn(self, message: str, *args: Any) -> None:
        """Log at most one warning per stream: bad input must not flood the logs."""
        if not self._warned:
            self._warned = True
            logger.warning(message, *args)

    def _parent(self, run: _RunState, event: Event) -> Span:
        """Where a step or subagent nests: its subagent, else the innermost open step, else the run's root."""
        subagent = run.subagents.get(_id(event, "subagentRunId"))
        if subagent is not None:
            return subagent
        return run.steps[-1].span if run.steps else run.root

    def _owner(self, run: _RunState, event: Event) -> Span:
        """Where a tool call or reasoning nests: its subagent, else the run's root, never a step. Producers
        close steps before the calls made in them end (LangGraph's ``agent`` step ends before the
        result arrives in its ``tools`` step); nested under the step, the step would have to be
        stretched to cover the call. The step open at the start is kept as ``ambient.step``."""
        return run.subagents.get(_id(event, "subagentRunId")) or run.root

    @staticmethod
    def _step_attribute(run: _RunState) -> dict[str, str]:
        return {"ambient.step": run.steps[-1].name} if run.steps else {}

    def _child(self, run: _RunState, parent: Span, name: str, kind: SpanKind, **options: Any) -> Span:
        """A child span, or a NullSpan past the run's span cap (counted, reported on the root)."""
        if run.spans_left <= 0:
            run.spans_dropped += 1
            return NULL_SPAN
        run.spans_left -= 1
        return parent.start_child(name, kind, **options)

    def _record_arguments(self, call: _ToolCall) -> None:
        if not call.arguments_recorded:
            call.arguments_recorded = True
            call.span.set_input(_json_text(call.arguments.value()))

    def _end_run(
        self,
        *,
        error: str | None = None,
        usage: tuple[TokenUsage, ...] = (),
        outcome: str | None = None,
        result: Any = None,
    ) -> None:
        run = self._run
        if run is None:
            return
        self._run = None
        if run.metrics is not None:
            run.metrics.run_ended(usage)
        self._end_open_children(run, f"run ended: {error}" if error else None)
        opened = run.opened
        now_ns = self.clock.now_ns
        models = {entry.model for entry in usage}
        if len(models) > 1:
            # One generation per model, so each backend prices and sums them separately.
            for entry in usage:
                opened.span.start_child("model_usage", SpanKind.GENERATION, start_time_ns=now_ns).end(
                    model=entry.model, usage=(entry,), end_time_ns=now_ns
                )
            usage = ()
        attributes: dict[str, Any] = {"ambient.outcome": outcome} if outcome else {}
        if run.spans_dropped:
            attributes["ambient.spans_not_recorded"] = run.spans_dropped
        output = run.text.value()
        opened.span.end(
            output=output if output is not None else result,
            error=error,
            model=next(iter(models)) if len(models) == 1 else None,
            usage=usage,
            attributes=attributes,
            end_time_ns=now_ns,
        )
        self._runs.ended(opened)
        self._runs.stream_closed(self)

    def _end_open_children(self, run: _RunState, child_error: str | None) -> None:
        """At a run's end, what is still open ends too: as failed by the run's error, if any."""
        for call in run.tools.values():
            self._record_arguments(call)
            failure = call.failure or child_error
            call.span.end(
                error=failure, attributes={"ambient.tool_result": "none", "is_error": failure is not None}
            )
        for reasoning in reversed(run.reasoning):
            reasoning.span.end(output=reasoning.text.value(), error=child_error)
        for step in reversed(run.steps):
            if step.open:
                step.span.end(error=child_error)
        for subagent in run.subagents.values():
            subagent.end(error=child_error)

    # -- runs ---------------------------------------------------------------------------------

    def start_run(self, opened: OpenRun | None) -> str | None:
        """Follow a run opened by :meth:`RunOpener.open` for this stream's next RUN_STARTED (the one
        still open ends first); its trace id, or None when it is not traced."""
        if self._run is not None:
            self._end_run(error="a new RUN_STARTED arrived before RUN_FINISHED")
        if opened is None:
            return None
        request = self._request
        metrics = self._runs.session_metrics(opened, request.user_id, request.user_name)
        self._run = _RunState(
            opened=opened,
            root=_Node(opened.span, None, self.clock),
            text=_Text(self._text_limit),
            metrics=metrics,
            spans_left=MAX_SPANS_PER_RUN,
        )
        self._runs.stream_opened(self)
        return opened.trace_id

    def _on_run_finished(self, run: _RunState, event: Event) -> None:
        outcome = event.get("outcome")
        if run.metrics is not None:
            run.metrics.run_finished(outcome)
        self._end_run(
            usage=_usage(event.get("usage")) or self._result_usage(run, event.get("result")),
            # AG-UI 1.0: a RUN_FINISHED without an outcome is a success (most producers send none).
            outcome=(_str(outcome.get("type")) if isinstance(outcome, Mapping) else None) or "success",
            result=event.get("result"),
        )

    def _result_usage(self, run: _RunState, result: Any) -> tuple[TokenUsage, ...]:
        """Usage in ``RUN_FINISHED.result.usage``, as the origin runner's Claude adapter reports it:
        Anthropic's counts (``input_tokens`` without the cache counts), possibly cumulative over the
        thread, so only what is new since the thread's last report counts (as the origin counted)."""
        if not isinstance(result, Mapping):
            return ()
        raw = _as_mapping(result.get("usage"))
        if raw is None:
            return ()
        totals = {key: count for key in _ANTHROPIC_USAGE if (count := _int(raw.get(key))) is not None}
        if not totals:
            return ()
        new = self._runs.usage_delta(run.opened.thread_id, totals)
        cache_read = new.get("cache_read_input_tokens", 0)
        cache_write = new.get("cache_creation_input_tokens", 0)
        return (
            TokenUsage(
                model=_str(result.get("model")) or _str(raw.get("model")),
                input_tokens=new.get("input_tokens", 0) + cache_read + cache_write,
                output_tokens=new.get("output_tokens", 0),
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
            ),
        )

    def _on_run_error(self, run: _RunState, event: Event) -> None:
        message = _str(event.get("message")) or "RUN_ERROR"
        code = _str(event.get("code"))
        error = f"{code}: {message}" if code else message
        if run.metrics is not None:
            run.metrics.run_error(error)
        self._end_run(error=error, usage=_usage(event.get("usage")))

    # -- text -----------------------------------------------------------------------------------

    def _on_text_start(self, run: _RunState, event: Event) -> None:
        role = event.get("role")
        if role is not None and role != "assistant":
            run.other_role_messages.add(_id(event, "messageId"))

    def _on_text_content(self, run: _RunState, event: Event) -> None:
        if _id(event, "messageId") not in run.other_role_messages:
            run.text.add(event.get("delta"))

    def _on_text_chunk(self, run: _RunState, event: Event) -> None:
        self._on_text_start(run, event)
        self._on_text_content(run, event)

    # -- tool calls -----------------------------------------------------------------------------

    def _on_tool_start(self, run: _RunState, event: Event) -> None:
        call_id = _id(event, "toolCallId")
        name = _str(event.get("toolCallName")) or "unknown"
        if not call_id or call_id in run.tools:
            self.warn("TOOL_CALL_START without a toolCallId, or for a call already open: %r", call_id)
            return
        span = self._child(
            run,
            self._owner(run, event),
            f"tool_{name}",
            SpanKind.TOOL,
            attributes={
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": name,
                "gen_ai.tool.call.id": call_id,
                # The origin runner's names, which its dashboards read.
                "tool_name": name,
                "tool_id": call_id,
                **self._step_attribute(run),
            },
        )
        run.tools[call_id] = _ToolCall(span=span, arguments=_Text(MAX_TEXT_CHARS))
        if run.metrics is not None:
            run.metrics.tool_started(call_id, name)

    def _on_tool_args(self, run: _RunState, event: Event) -> None:
        call = run.tools.get(_id(event, "toolCallId"))
        if call is None:
            self.warn("TOOL_CALL_ARGS for an unknown tool call %r", _id(event, "toolCallId"))
            return
        call.arguments.add(event.get("delta"))

    def _on_tool_end(self, run: _RunState, event: Event) -> None:
        call = run.tools.get(_id(event, "toolCallId"))
        if call is None:
            return
        self._record_arguments(call)
        error = event.get("error")
        if error and call.failure is None:
            # Not AG-UI 1.0, but what the origin runner's Claude adapter sends for a failed tool; the
            # span stays open for the TOOL_CALL_RESULT that follows and ends as ERROR then.
            call.failure = failure_reason(error if error is not True else "error")
            if run.metrics is not None:
                run.metrics.tool_result(_id(event, "toolCallId"), call.failure)

    def _on_tool_chunk(self, run: _RunState, event: Event) -> None:
        if _id(event, "toolCallId") not in run.tools and event.get("toolCallName"):
            self._on_tool_start(run, event)
        if event.get("delta") is not None:
            self._on_tool_args(run, event)

    def _on_tool_result(self, run: _RunState, event: Event) -> None:
        call_id = _id(event, "toolCallId")
        call = run.tools.pop(call_id, None)
        failure = tool_failure_reason(event)
        if run.metrics is not None and (call is None or call.failure is None):
            run.metrics.tool_result(call_id, failure)
        if call is not None and call.failure is not None:
            failure = call.failure
        content = event.get("content")
        if isinstance(content, str) and len(content) > MAX_TEXT_CHARS:
            content = content[:MAX_TEXT_CHARS] + TRUNCATED
        if call is None:
            self.warn("TOOL_CALL_RESULT for an unknown tool call %r", call_id)
            span = self._child(
                run,
                self._owner(run, event),
                "tool_unknown",
                SpanKind.TOOL,
                attributes={"gen_ai.tool.call.id": str(call_id), "tool_id": str(call_id)},
            )
        else:
            self._record_arguments(call)
            span = call.span
        span.end(
            output=_json_text(content),
            error=failure,
            attributes={"is_error": failure is not None},
        )

    # -- steps, reasoning, subagents ------------------------------------------------------------

    def _on_step_started(self, run: _RunState, event: Event) -> None:
        name = _str(event.get("stepName")) or "unnamed"
        step = _Step(name, self._child(run, self._parent(run, event), f"step_{name}", SpanKind.STEP))
        run.steps.append(step)
        run.steps_by_name.setdefault(name, []).append(step)

    def _on_step_finished(self, run: _RunState, event: Event) -> None:
        name = _str(event.get("stepName")) or "unnamed"
        same_name = run.steps_by_name.get(name)
        if not same_name:
            self.warn("STEP_FINISHED for a step that is not open: %r", name)
            return
        step = same_name.pop()
        if not same_name:
            del run.steps_by_name[name]
        step.open = False
        step.span.end()
        steps = run.steps
        while steps and not steps[-1].open:  # each step is popped once: constant time per event
            steps.pop()

    def _open_reasoning(self, run: _RunState, event: Event, *, implicit: bool) -> _Reasoning:
        reasoning = _Reasoning(
            span=self._child(
                run,
                self._owner(run, event),
                "reasoning",
                SpanKind.REASONING,
                attributes=self._step_attribute(run),
            ),
            text=_Text(self._text_limit),
            implicit=implicit,
        )
        run.reasoning.append(reasoning)
        return reasoning

    def _end_reasoning(self, run: _RunState) -> None:
        reasoning = run.reasoning.pop()
        reasoning.span.end(output=reasoning.text.value())

    def _on_reasoning_start(self, run: _RunState, event: Event) -> None:
        self._open_reasoning(run, event, implicit=False)

    def _on_reasoning_end(self, run: _RunState, event: Event) -> None:
        if run.reasoning:
            self._end_reasoning(run)

    def _on_reasoning_message_start(self, run: _RunState, event: Event) -> None:
        if not run.reasoning:
            self._open_reasoning(run, event, implicit=True)

    def _on_reasoning_content(self, run: _RunState, event: Event) -> None:
        stack = run.reasoning
        reasoning = stack[-1] if stack else self._open_reasoning(run, event, implicit=True)
        reasoning.text.add(event.get("delta"))

    def _on_reasoning_message_end(self, run: _RunState, event: Event) -> None:
        stack = run.reasoning
        if stack and stack[-1].implicit:
            self._end_reasoning(run)

    def _on_subagent_started(self, run: _RunState, event: Event) -> None:
        subagent_id = _id(event, "subagentRunId")
        if not subagent_id or subagent_id in run.subagents:
            self.warn("SUBAGENT_STARTED without a subagentRunId, or for one already open: %r", subagent_id)
            return
        name = _str(event.get("name")) or "unnamed"
        parent = run.subagents.get(_id(event, "parentSubagentRunId")) or self._parent(run, {})
        run.subagents[subagent_id] = self._child(
            run,
            parent,
            f"subagent_{name}",
            SpanKind.SUBAGENT,
            input=event.get("description"),
            attributes={"gen_ai.agent.name": name, "ambient.subagent_run_id": subagent_id},
        )

    def _on_subagent_finished(self, run: _RunState, event: Event) -> None:
        span = run.subagents.pop(_id(event, "subagentRunId"), None)
        if span is not None:
            outcome = event.get("outcome")
            span.end(
                output=event.get("result"),
                attributes={"ambient.outcome": outcome.get("type")} if isinstance(outcome, Mapping) else None,
            )

    def _on_subagent_error(self, run: _RunState, event: Event) -> None:
        span = run.subagents.pop(_id(event, "subagentRunId"), None)
        if span is not None:
            span.end(error=_str(event.get("message")) or "SUBAGENT_ERROR")


_Handler = Callable[[StreamTracer, _RunState, Event], None]

_HANDLERS: dict[str, _Handler] = {
    "RUN_FINISHED": StreamTracer._on_run_finished,
    "RUN_ERROR": StreamTracer._on_run_error,
    "TEXT_MESSAGE_START": StreamTracer._on_text_start,
    "TEXT_MESSAGE_CONTENT": StreamTracer._on_text_content,
    "TEXT_MESSAGE_CHUNK": StreamTracer._on_text_chunk,
    "TOOL_CALL_START": StreamTracer._on_tool_start,
    "TOOL_CALL_ARGS": StreamTracer._on_tool_args,
    "TOOL_CALL_END": StreamTracer._on_tool_end,
    "TOOL_CALL_CHUNK": StreamTracer._on_tool_chunk,
    "TOOL_CALL_RESULT": StreamTracer._on_tool_result,
    "STEP_STARTED": StreamTracer._on_step_started,
    "STEP_FINISHED": StreamTracer._on_step_finished,
    "REASONING_START": StreamTracer._on_reasoning_start,
    "REASONING_END": StreamTracer._on_reasoning_end,
    "REASONING_MESSAGE_START": StreamTracer._on_reasoning_message_start,
    "REASONING_MESSAGE_CONTENT": StreamTracer._on_reasoning_content,
    "REASONING_MESSAGE_CHUNK": StreamTracer._on_reasoning_content,
    "REASONING_MESSAGE_END": StreamTracer._on_reasoning_message_end,
    # AG-UI 0.x names of the reasoning events, still sent by older producers.
    "THINKING_START": StreamTracer._on_reasoning_start,
    "THINKING_END": StreamTracer._on_reasoning_end,
    "THINKING_TEXT_MESSAGE_START": StreamTracer._on_reasoning_message_start,
    "THINKING_TEXT_MESSAGE_CONTENT": StreamTracer._on_reasoning_content,
    "THINKING_TEXT_MESSAGE_END": StreamTracer._on_reasoning_message_end,
    "SUBAGENT_STARTED": StreamTracer._on_subagent_started,
    "SUBAGENT_FINISHED": StreamTracer._on_subagent_finished,
    "SUBAGENT_ERROR": StreamTracer._on_subagent_error,
}


def _id(event: Event, key: str) -> str:
    """An id field of the event; "" when missing or not a string (never an id the core stores)."""
    value = event.get(key)
    return value if isinstance(value, str) else ""


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _json_text(text: Any) -> Any:
    """Tool arguments and results: text is marked as maybe JSON, decoded off the event loop."""
    return JsonText(text) if isinstance(text, str) else text


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _usage(entries: Any) -> tuple[TokenUsage, ...]:
    """AG-UI ``usage`` (a list of TokenUsage dicts) as :class:`TokenUsage`; entries without counts skipped."""
    if not isinstance(entries, list):
        return ()
    usage = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        counts = {name: _int(entry.get(key)) for key, name in _USAGE_FIELDS.items()}
        if any(count is not None for count in counts.values()):
            usage.append(
                TokenUsage(model=_str(entry.get("model")), provider=_str(entry.get("provider")), **counts)
            )
    return tuple(usage)


_ANTHROPIC_USAGE = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
    """A usage dict, or the dict of an object (a dataclass or pydantic model a Python door passes)."""
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            value = dump()
        except Exception:
            return None
        return value if isinstance(value, Mapping) else None
    attributes = getattr(value, "__dict__", None)
    return attributes if isinstance(attributes, Mapping) else None


_USAGE_FIELDS = {
    "inputTokens": "input_tokens",
    "outputTokens": "output_tokens",
    "totalTokens": "total_tokens",
    "reasoningTokens": "reasoning_tokens",
    "cachedInputTokens": "cache_read_tokens",
    "cacheWriteInputTokens": "cache_write_tokens",
}
