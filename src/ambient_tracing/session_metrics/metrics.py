"""Session metrics: what happened in an AG-UI thread, reported as one ``Session Metrics`` span.

Per thread (AG-UI ``threadId``) the core counts tool calls by category, tool failures by category
and reason, clarification questions, human interrupts, tokens by model, and prices them. A
:class:`SessionReporter` emits the counts to every backend when the thread goes idle, on
``Observability.end_session`` and at shutdown. Each report carries the counts since the previous
one (so reports add up); a thread with nothing new reports nothing.

How things are recognised (see the README's "Session metrics"):

- Tool category: :func:`default_tool_category` (``mcp__<server>__<tool>`` -> ``<server>``, else the
  tool name), or the caller's own function.
- Failed tool: :func:`tool_failure_reason` (an ``isError``/``error`` field on the result event, a
  JSON object result with ``"error"`` or ``"isError": true``, or text starting with ``Error`` or
  ``<tool_use_error>``). A ``RUN_ERROR`` fails every tool call still open, or counts under ``run``.
- Clarification: a tool call whose name (its last ``__`` part, lower-cased, letters and digits
  only) is in :data:`DEFAULT_CLARIFICATION_NAMES`, or an interrupt whose ``reason`` is.
- Interrupt: a ``RUN_FINISHED`` whose ``outcome.type`` is ``interrupt`` (one per run).
- Cost: :class:`Pricing`, USD per million tokens, longest prefix of the model name.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ambient_tracing.backends.base import TokenUsage
from ambient_tracing.config import DEFAULT_SESSION_IDLE_SECONDS, UNKNOWN
from ambient_tracing.failures import warn_once
from ambient_tracing.privacy import mask as mask_value
from ambient_tracing.privacy import mask_id
from ambient_tracing.session_metrics.emitter import Emitter
from ambient_tracing.session_metrics.pricing import ModelPrice, Pricing, TokenCounts
from ambient_tracing.tool_signals import (
    DEFAULT_CLARIFICATION_NAMES,
    ToolCategoriser,
    default_tool_category,
    failure_reason,
    normal_name,
    tool_failure_reason,
)

if TYPE_CHECKING:
    from ambient_tracing.backends.base import TracingBackend

logger = logging.getLogger(__name__)

SPAN_NAME = "Session Metrics"
SOURCE = "ambient-runner-metrics"
#: The origin runner's value for a namespace or workflow name it does not know.
RUN_CATEGORY = "run"  # failures of a RUN_ERROR with no tool call open
#: Threads examined per timer tick: the sweep's cost on the loop does not grow with their number.
MAX_SWEEP_PER_TICK = 64
_MAX_KEYS = 100  # categories, reasons per category and models kept per report; the rest count as "other"
_OTHER = "other"


# -- the accumulator -------------------------------------------------------------------------------


class SessionMetrics:
    """The counts of one thread since its last report. The core calls the ``run_*``/``tool_*`` methods
    (never per text delta); :meth:`report` reads and resets them."""

    __slots__ = (
        "_categorise",
        "_clarification_names",
        "_clarifying",
        "_pending",
        "cancellations",
        "clarifications",
        "context",
        "interrupts",
        "last_activity",
        "model_runs",
        "open_runs",
        "period_start",
        "run_errors",
        "runs",
        "thread_id",
        "tokens",
        "tool_calls",
        "tool_failures",
        "user_id",
        "user_name",
    )

    def __init__(
        self,
        thread_id: str,
        *,
        categorise: ToolCategoriser = default_tool_category,
        clarification_names: Iterable[str] = DEFAULT_CLARIFICATION_NAMES,
    ) -> None:
        self.thread_id = thread_id
        self.user_id: str | None = None
        self.user_name: str | None = None
        #: Namespace and workflow attributes of the thread's latest run (see Observability.run_context).
        self.context: Mapping[str, str] = {}
        self.open_runs = 0
        self.last_activity = time.monotonic()
        self._categorise = categorise
        self._clarification_names = frozenset(normal_name(name) for name in clarification_names)
        self._pending: dict[str, str] = {}  # open tool call id -> category
        self._clarifying: set[str] = set()  # open clarification tool call ids
        self._reset()

    def _reset(self) -> None:
        self.period_start: float | None = None
        self.runs = self.run_errors = self.clarifications = self.interrupts = self.cancellations = 0
        self.tool_calls: dict[str, int] = {}
        self.tool_failures: dict[str, dict[str, int]] = {}
        self.tokens: dict[str, TokenCounts] = {}
        self.model_runs: dict[str, int] = {}  # the origin's models_seen: runs that reported each model

    @property
    def active(self) -> bool:
        """Whether anything happened since the last report."""
        return self.period_start is not None

    def _touch(self) -> None:
        self.last_activity = time.monotonic()
        if self.period_start is None:
            self.period_start = time.time()

    # -- fed by the core ---------------------------------------------------------------------------

    def run_started(
        self, user_id: str | None, user_name: str | None = None, context: Mapping[str, str] | None = None
    ) -> None:
        self._touch()
        self.runs += 1
        self.open_runs += 1
        if user_id:
            self.user_id = user_id
        if user_name:
            self.user_name = user_name
        if context is not None:
            self.context = context

    def tool_started(self, call_id: str, name: str) -> None:
        self._touch()
        try:  # capture_internal_exceptions, written out: this runs for every tool call, on the loop
            category = str(self._categorise(name)) or name
        except Exception as exc:
            warn_once(logger, "categoriser", "the tool categoriser failed: %r", exc)
            category = default_tool_category(name)
        category = _bounded_key(self.tool_calls, category)
        self.tool_calls[category] = self.tool_calls.get(category, 0) + 1
        self._pending[call_id] = category
        if normal_name(name) in self._clarification_names:
            self.clarifications += 1
            self._clarifying.add(call_id)

    def tool_result(self, call_id: str, failure: str | Mapping[str, Any] | None) -> None:
        """The call ended; ``failure`` is why it failed, None if it did not (or the TOOL_CALL_RESULT
        event, read with :func:`tool_failure_reason`)."""
        self._touch()
        category = self._pending.pop(call_id, "unknown")
        if isinstance(failure, Mapping):
            failure = tool_failure_reason(failure)
        if failure is not None:
            self._fail(category, failure)

    def run_error(self, message: str) -> None:
        """A RUN_ERROR: every tool call still open failed with its reason, else one ``run`` failure."""
        self._touch()
        self.run_errors += 1
        reason = failure_reason(message)
        for category in self._pending.values() or (RUN_CATEGORY,):
            self._fail(category, reason)
        self._pending.clear()

    def run_finished(self, outcome: Any) -> None:
        """RUN_FINISHED's ``outcome``: ``interrupt`` is a human interrupt, ``cancelled`` a cancellation."""
        if not isinstance(outcome, Mapping):
            return
        self._touch()
        kind = outcome.get("type")
        if kind == "cancelled":
            self.cancellations += 1
        elif kind == "interrupt":
            self.interrupts += 1
            interrupts = outcome.get("interrupts")
            for interrupt in interrupts if isinstance(interrupts, list) else ():
                if (
                    isinstance(interrupt, Mapping)
                    and interrupt.get("toolCallId") not in self._clarifying
                    and isinstance(reason := interrupt.get("reason"), str)
                    and normal_name(reason) in self._clarification_names
                ):
                    self.clarifications += 1

    def run_ended(self, usage: Sequence[TokenUsage]) -> None:
        """The run is over, however it ended: add its usage; calls left without a result are dropped."""
        self._touch()
        self.open_runs = max(self.open_runs - 1, 0)
        for entry in usage:
            model = _bounded_key(self.tokens, entry.model or "unknown")
            counts = self.tokens.get(model)
            if counts is None:
                counts = self.tokens[model] = TokenCounts()
            counts.add(entry)
            if entry.model:
                seen = _bounded_key(self.model_runs, entry.model)
                self.model_runs[seen] = self.model_runs.get(seen, 0) + 1
        if not self.open_runs:
            self._pending.clear()
            self._clarifying.clear()

    def _fail(self, category: str, reason: str) -> None:
        reasons = self.tool_failures.get(category)
        if reasons is None:
            reasons = self.tool_failures[_bounded_key(self.tool_failures, category)] = {}
        reason = _bounded_key(reasons, reason)
        reasons[reason] = reasons.get(reason, 0) + 1

    # -- read by the reporter ----------------------------------------------------------------------

    def report(self, pricing: Pricing) -> dict[str, Any]:
        """The counts since the last report, as a JSON-ready dict; resets them."""
        totals = TokenCounts()
        cost: float | None = None
        unpriced = []
        for model, counts in self.tokens.items():
            for name in ("input", "output", "cache_read", "cache_write", "reasoning"):
                setattr(totals, name, getattr(totals, name) + getattr(counts, name))
            model_cost = pricing.cost(None if model == "unknown" else model, counts)
            if model_cost is None:
                unpriced.append(model)
            else:
                cost = (cost or 0.0) + model_cost
        failures = {category: dict(reasons) for category, reasons in self.tool_failures.items()}
        report = {
            "thread_id": self.thread_id,
            "runs": self.runs,
            "tool_calls": dict(self.tool_calls),
            "tool_calls_total": sum(self.tool_calls.values()),
            "tool_failures": {category: sum(reasons.values()) for category, reasons in failures.items()},
            "tool_failures_total": sum(sum(reasons.values()) for reasons in failures.values()),
            "tool_failure_reasons": failures,
            "run_errors": self.run_errors,
            "clarifications": self.clarifications,
            "interrupts": self.interrupts,
            "cancellations": self.cancellations,
            "tokens": totals.as_dict(),
            "tokens_by_model": {model: counts.as_dict() for model, counts in self.tokens.items()},
            "models": sorted(model for model in self.tokens if model != "unknown"),
            "models_seen": dict(self.model_runs),
            "estimated_cost_usd": None if cost is None else round(cost, 6),
            "unpriced_models": sorted(unpriced),
            "period_start": _iso(self.period_start),
            "period_end": _iso(time.time()),
        }
        self._reset()
        return report


def origin_flat_metrics(report: Mapping[str, Any]) -> dict[str, float | None]:
    """A report as the origin runner's flat metadata keys, which its dashboards read: names with
    spaces and dots as ``_``, counts as floats; ``token_input`` without the cache counts (Anthropic's
    accounting); ``estimated_cost_usd`` None when no model had a price."""
    flat: dict[str, float | None] = {}

    def add(key: str, count: float) -> None:
        key = key.replace(" ", "_").replace(".", "_")
        flat[key] = (flat.get(key) or 0.0) + count

    add("interrupt_tool_failure_total", report["tool_failures_total"])
    for category, count in report["tool_failures"].items():
        add(f"interrupt_tool_failure_{category}", count)
    reasons = [
        (f"{category}: {reason}", count)
        for category, counts in report["tool_failure_reasons"].items()
        for reason, count in counts.items()
    ]
    for index, (reason, count) in enumerate(reasons):  # at most _MAX_KEYS keys, the rest as "other"
        add(f"interrupt_reason_{reason if index < _MAX_KEYS else _OTHER}", count)
    add("interrupt_unclear_context", report["clarifications"])
    add("interrupt_human", report["interrupts"])
    add("tool_calls_total", report["tool_calls_total"])
    for category, count in report["tool_calls"].items():
        add(f"tool_calls_{category}", count)
    tokens = report["tokens"]
    flat["token_input"] = float(max(tokens["input"] - tokens["cache_read"] - tokens["cache_write"], 0))
    flat["token_output"] = float(tokens["output"])
    flat["token_cache_creation"] = float(tokens["cache_write"])
    flat["token_cache_read"] = float(tokens["cache_read"])
    flat["token_total"] = float(tokens["input"] + tokens["output"])
    flat["estimated_cost_usd"] = report["estimated_cost_usd"]
    return flat


def _bounded_key(counts: Mapping[str, Any], key: str) -> str:
    """``key``, or ``other`` once ``counts`` holds as many keys as a report keeps."""
    return key if key in counts or len(counts) < _MAX_KEYS else _OTHER


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


# -- reporting -------------------------------------------------------------------------------------


class SessionReporter:
    """Holds the :class:`SessionMetrics` of every thread and emits them as ``Session Metrics`` spans.

    Not thread-safe: every call comes from the tracer worker's thread
    (:mod:`ambient_tracing.tracer.worker`), whose tick runs :meth:`sweep_if_due`; a sweep looks at
    no more than :data:`MAX_SWEEP_PER_TICK` threads. Masking the reports and the backends' span calls
    run on the reporter's own thread (:class:`.emitter.Emitter`).
    """

    def __init__(
        self,
        backends: Callable[[], Sequence[TracingBackend]],
        *,
        runner_type: str,
        pricing: Pricing | Mapping[str, ModelPrice] | None = None,
        tool_category: ToolCategoriser | None = None,
        clarification_names: Iterable[str] | None = None,
        idle_seconds: float | None = DEFAULT_SESSION_IDLE_SECONDS,
        max_threads: int = 10_000,
        mask: Callable[[], bool] = lambda: False,
    ) -> None:
        self._backends = backends
        self._runner_type = runner_type
        self.pricing = pricing if isinstance(pricing, Pricing) else Pricing(pricing)
        self._categorise = tool_category or default_tool_category
        self._clarification_names = frozenset(
            DEFAULT_CLARIFICATION_NAMES if clarification_names is None else clarification_names
        )
        self.idle_seconds = idle_seconds if idle_seconds and idle_seconds > 0 else None
        self._max_threads = max_threads
        self._mask = mask
        self._sessions: OrderedDict[str, SessionMetrics] = OrderedDict()
        self._next_sweep = 0.0
        self._closed = False
        self._emitter = Emitter("ambient-tracing-session-metrics")

    def __len__(self) -> int:
        return len(self._sessions)

    def run_started(
        self,
        thread_id: str,
        user_id: str | None,
        user_name: str | None = None,
        context: Mapping[str, str] | None = None,
    ) -> SessionMetrics | None:
        """The thread's accumulator with one more run started (None once closed)."""
        if self._closed:
            return None
        self.sweep_if_due()
        session = self._sessions.get(thread_id)
        if session is None:
            session = self._sessions[thread_id] = SessionMetrics(
                thread_id, categorise=self._categorise, clarification_names=self._clarification_names
            )
            while len(self._sessions) > self._max_threads:
                oldest = next(iter(self._sessions.values()))
                if oldest.active:
                    self._emit(oldest)
                if oldest.open_runs:  # still in use by a stream: keep it, newest last
                    self._sessions.move_to_end(oldest.thread_id)
                    break
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(thread_id)
        session.run_started(user_id, user_name, context)
        return session

    def end_session(self, thread_id: str) -> Future[None] | None:
        """Report the thread now: done when its spans are made; None when it has nothing unreported."""
        session = self._sessions.get(thread_id)
        if session is None or not session.active:
            return None
        done = self._emit(session)
        if not session.open_runs:
            del self._sessions[thread_id]
        return done

    def close(self) -> int:
        """Report every thread with unreported activity (on the reporter's thread) and stop the timer;
        returns how many. :meth:`drain` waits until they are recorded."""
        self._closed = True
        sessions = [session for session in self._sessions.values() if session.active]
        self._sessions.clear()

        def report_all() -> None:  # nothing feeds them any more: every stream was closed first
            for session in sessions:
                self._record(*self._take(session))

        self._emitter.submit(report_all)
        return len(sessions)

    def drain(self, timeout: float) -> bool:
        """Blocking: wait until every report emitted so far is recorded; False on timeout."""
        return self._emitter.drain(timeout)

    def sweep(self, now: float | None = None, limit: int | None = None) -> int:
        """Report the threads idle for ``idle_seconds`` with no run open, looking at no more than
        ``limit`` threads (least recently started first); returns how many were reported."""
        if self.idle_seconds is None:
            return 0
        deadline = (time.monotonic() if now is None else now) - self.idle_seconds
        sessions = self._sessions
        reported = 0
        for _ in range(len(sessions) if limit is None else min(limit, len(sessions))):
            session = next(iter(sessions.values()))
            if session.open_runs or session.last_activity > deadline:
                sessions.move_to_end(session.thread_id)  # busy: looked at again after the others
                continue
            if session.active:
                self._emit(session)
            del sessions[session.thread_id]
            reported += 1
        return reported

    # -- internals ---------------------------------------------------------------------------------

    @property
    def tick_seconds(self) -> float:
        """How often :meth:`sweep_if_due` should be called (a quarter of the idle time, 50 ms to 30 s)."""
        if self.idle_seconds is None:
            return 30.0
        return min(max(self.idle_seconds / 4, 0.05), 30.0)

    def sweep_if_due(self) -> None:
        """Sweep (bounded by :data:`MAX_SWEEP_PER_TICK`) when :attr:`tick_seconds` have passed."""
        if self._closed or self.idle_seconds is None or time.monotonic() < self._next_sweep:
            return
        reported = self.sweep(limit=MAX_SWEEP_PER_TICK)
        # A full sweep may have left idle threads behind: the next tick looks again.
        self._next_sweep = 0.0 if reported == MAX_SWEEP_PER_TICK else time.monotonic() + self.tick_seconds

    def _emit(self, session: SessionMetrics) -> Future[None]:
        """Take the thread's counts (bounded per thread) and record them on the reporter's thread."""
        taken = self._take(session)
        return self._emitter.submit(lambda: self._record(*taken))

    def _take(self, session: SessionMetrics) -> tuple[dict[str, Any], dict[str, Any], Mapping[str, str]]:
        """The thread's report (its counts reset), its identity and its context."""
        identity = {
            "session_id": session.thread_id,
            "user_id": session.user_id,
            "namespace": session.context.get("ambient.namespace", UNKNOWN),
            "user_name": session.user_name,
        }
        return session.report(self.pricing), identity, session.context

    def _record(self, report: dict[str, Any], identity: dict[str, Any], context: Mapping[str, str]) -> None:
        """On the reporter's thread: mask the report when asked and hand it to every backend.

        Masked: ids as digests (sessions still group), the user's name, and model names, tool
        categories and failure reasons (keys included) past the limit. The context (namespace,
        workflow) is the operator's configuration, not content: kept."""
        if self._mask():
            session_id, user_id = mask_id(identity["session_id"]) or "", mask_id(identity["user_id"])
            identity = {**identity, "session_id": session_id, "user_id": user_id}
            identity["user_name"] = mask_value(identity["user_name"])
            report = mask_value({**report, "thread_id": session_id})
        metadata = {
            **report,
            **context,
            **identity,
            "source": SOURCE,
            "runner_type": self._runner_type,
            "collected_at": report["period_end"],
            **(mask_value(origin_flat_metrics(report)) if self._mask() else origin_flat_metrics(report)),
        }
        thread_id, user_id = identity["session_id"], identity["user_id"]
        for backend in self._backends():
            try:
                backend.record_span(
                    SPAN_NAME,
                    thread_id=thread_id,
                    user_id=user_id,
                    runner_type=self._runner_type,
                    input=identity,
                    output=report,
                    metadata=metadata,
                )
            except Exception as exc:
                logger.warning("%s could not record session metrics: %r", backend.name, exc)
