"""Trace and span ids, chosen by this package so that every backend records a run under one id.

The package, not a vendor SDK, picks each run's trace id: the id frame can then go out before any
SDK call, and the SDK calls run off the event loop (a hanging SDK cannot delay the stream). A caller
may choose the id instead (``Observability.open_turn(trace_id=...)``): a bare 32-hex id, a W3C
``traceparent`` header, or an id derived from a seed such as the AG-UI runId.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_HEX32 = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16
# W3C Trace Context, version 00 exactly: lowercase hex, no trailing fields.
_STRICT_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A caller's span, from a W3C ``traceparent`` header: the run's trace joins it as a child."""

    trace_id: str  # 32 lowercase hex
    parent_span_id: str  # 16 lowercase hex: the caller's span
    flags: str  # 2 hex


def parse_traceparent(value: str | bytes | None) -> TraceParent | None:
    """A ``traceparent`` header validated strictly (version ``00``, lowercase hex, a trace id and a
    parent id that are not all zero); None for anything else, which is then ignored."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str) or len(value) > 64:
        return None
    match = _STRICT_TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    return TraceParent(trace_id, span_id, flags)


def trace_id_from_run_id(run_id: str) -> str | None:
    """The trace id a run gets from its AG-UI ``runId`` (``trace_id_from_run_id=True``); a client can
    compute it before the run:

    - a runId in the canonical UUID form (``8-4-4-4-12`` hex digits, any case, not the nil UUID):
      its 32 hex digits, lowercased (``crypto.randomUUID().replaceAll("-", "")``);
    - any other non-empty runId: the first 16 bytes of the SHA-256 of its UTF-8 bytes, as 32
      lowercase hex (:func:`trace_id_from_seed`).

    None for an empty runId (and for a digest of all zeros, which no runId is known to have).
    """
    if not run_id:
        return None
    if _UUID.fullmatch(run_id):
        trace_id = run_id.replace("-", "").lower()
        if trace_id != _ZERO_TRACE_ID:
            return trace_id
    trace_id = trace_id_from_seed(run_id)
    return None if trace_id == _ZERO_TRACE_ID else trace_id


def traceresponse(trace_id: str, span_id: int, sampled: bool = True) -> str:
    """A W3C Trace Context Level 2 ``traceresponse`` value: the trace and the callee's span."""
    return f"00-{trace_id}-{span_id:016x}-{'01' if sampled else '00'}"


def new_trace_id() -> str:
    """A random 128-bit trace id as 32 lowercase hex characters (never the invalid all-zero id)."""
    while True:
        trace_id = os.urandom(16).hex()
        if trace_id != _ZERO_TRACE_ID:
            return trace_id


def new_span_id() -> int:
    """A random non-zero 64-bit span id."""
    while True:
        span_id = int.from_bytes(os.urandom(8), "big")
        if span_id:
            return span_id


def parse_trace_id(value: str | None) -> str | None:
    """The trace id in ``value`` (32 hex, any case, or a W3C ``traceparent``); None when invalid."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    text = value.strip().lower()
    if _HEX32.fullmatch(text):
        trace_id = text
    elif match := _TRACEPARENT.fullmatch(text):
        trace_id = match.group(1)
    else:
        return None
    return None if trace_id == _ZERO_TRACE_ID else trace_id


def trace_id_or_new(value: str | None) -> str:
    """``value`` as a trace id when valid, else a new one (an invalid id is logged and replaced)."""
    if value is None:
        return new_trace_id()
    trace_id = parse_trace_id(value)
    if trace_id is None:
        logger.warning("ignoring invalid trace id %r", value[:100])
        return new_trace_id()
    return trace_id


def trace_id_from_seed(seed: str) -> str:
    """A deterministic trace id for ``seed`` (e.g. a runId): sha256 cut to 128 bits, as Langfuse's
    ``create_trace_id(seed=...)`` derives it, so both sides find the same id."""
    return hashlib.sha256(seed.encode("utf-8")).digest()[:16].hex()


def sampled(trace_id: str, rate: float) -> bool:
    """OpenTelemetry's ``TraceIdRatioBased`` decision for ``trace_id``: the SDKs sample by the id, so
    the package can tell on the event loop, with no SDK call, whether a backend will record a run."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    bound = round(rate * (1 << 64))
    return int(trace_id[16:], 16) < bound
