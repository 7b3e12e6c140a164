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

logger = logging.getLogger(__name__)

_HEX32 = re.compile(r"[0-9a-f]{32}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE_ID = "0" * 32


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
