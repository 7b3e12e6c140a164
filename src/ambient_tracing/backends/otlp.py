"""OTLP/HTTP protobuf export of :class:`~ambient_tracing.backends.records.SpanRecord`: encoder and exporter.

A destination is an :class:`OtlpExporter` (endpoint, headers) plus a :class:`SpanMapper` that says
what a record becomes there (attributes, status, resource, scope): Langfuse, an MLflow tracking
server and any OpenTelemetry collector (otel_mapper.py: GenAI semantic conventions) each have one.

The exporter never blocks the caller: :meth:`OtlpExporter.submit` appends to a bounded queue (the
oldest record is dropped and counted when it is full) and one daemon thread batches, encodes,
gzips and POSTs, with a per-request timeout and a bounded number of retries. A collector that
hangs or refuses costs the stream nothing; memory stays bounded by ``max_queue`` records.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from ambient_tracing.backends.record_queue import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_INTERVAL,
    DEFAULT_MAX_QUEUE,
    RecordQueue,
)
from ambient_tracing.backends.records import SpanRecord
from ambient_tracing.failures import warn_once

logger = logging.getLogger(__name__)

STATUS_UNSET = Status.STATUS_CODE_UNSET
STATUS_OK = Status.STATUS_CODE_OK
STATUS_ERROR = Status.STATUS_CODE_ERROR

DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY = 0.5  # doubled after each failed try, at most 8 s
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class _Null:
    """An attribute whose value is an empty ``AnyValue`` (decoded as null), not left out."""

    def __repr__(self) -> str:
        return "NULL"


NULL: Any = _Null()
#: :meth:`SpanMapper.run_attributes` of a destination whose spans share none.
NO_ATTRIBUTES: Mapping[str, Any] = MappingProxyType({})


class Scope(NamedTuple):
    """The OTLP instrumentation scope the spans are reported under."""

    name: str
    version: str = ""
    attributes: Mapping[str, Any] | None = None


class SpanMapper(Protocol):
    """What a record becomes at one destination. Runs on the exporter thread."""

    resource: Mapping[str, Any]
    scope: Scope
    #: Whether the destination stores a payload's JSON text as the value it holds (Langfuse, an
    #: MLflow server 3.7+): then a payload that came as JSON text may stay that text
    #: (:func:`~ambient_tracing.privacy.outgoing_payload`).
    json_as_text: bool

    def run_attributes(self, record: SpanRecord) -> Mapping[str, Any]:
        """The attributes the spans of the record's run share, written first: the same object for
        each of them (so it is encoded once per batch), or an empty mapping."""
        ...

    def attributes(self, record: SpanRecord) -> Mapping[str, Any]:
        """The span's own attributes, written after :meth:`run_attributes`."""
        ...

    def status(self, record: SpanRecord) -> tuple[int, str]:
        """``(STATUS_*, message)``."""
        ...


def valid_text(text: str) -> str:
    """``text`` without lone surrogates (JSON allows ``"\\ud800"``; protobuf strings must be UTF-8)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def set_any_value(target: AnyValue, value: Any) -> None:
    """Write a Python value into an OTLP ``AnyValue`` (dicts and lists nested, None left empty).
    Exact types are tested first: decoded JSON is all of them, and ABC checks cost more."""
    kind = type(value)
    if kind is str:
        _set_text(target, value)
    elif kind is dict:
        _set_mapping(target, value)
    elif kind is list or kind is tuple:
        _set_sequence(target, value)
    elif isinstance(value, str):
        _set_text(target, value)
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            target.int_value = value
        else:
            target.string_value = str(value)
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, Mapping):
        _set_mapping(target, value)
    elif isinstance(value, list | tuple):
        _set_sequence(target, value)
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif value is not None:
        target.string_value = str(value)


def _set_text(target: AnyValue, text: str) -> None:
    try:
        target.string_value = text
    except UnicodeEncodeError:
        target.string_value = valid_text(text)


def _set_sequence(target: AnyValue, value: list[Any] | tuple[Any, ...]) -> None:
    target.array_value.SetInParent()
    items = target.array_value.values
    for item in value:
        set_any_value(items.add(), item)


def _set_mapping(target: AnyValue, value: Mapping[Any, Any]) -> None:
    target.kvlist_value.SetInParent()  # an empty mapping is still a mapping, not "no value"
    entries = target.kvlist_value.values
    for key, item in value.items():
        entry = entries.add()
        try:
            entry.key = key if type(key) is str else str(key)
        except UnicodeEncodeError:
            entry.key = valid_text(str(key))
        set_any_value(entry.value, item)


def _add_attributes(target: Any, attributes: Mapping[str, Any]) -> None:
    for key, value in attributes.items():
        if value is not None:
            entry: KeyValue = target.add()
            try:
                entry.key = key
            except UnicodeEncodeError:
                entry.key = valid_text(key)
            if value is not NULL:
                set_any_value(entry.value, value)


def encode(records: Iterable[SpanRecord], mapper: SpanMapper) -> bytes:
    """One ``ExportTraceServiceRequest`` (serialized protobuf) for ``records`` at ``mapper``'s destination."""
    return encode_counting(records, mapper)[0]


def encode_counting(records: Iterable[SpanRecord], mapper: SpanMapper) -> tuple[bytes, int]:
    """:func:`encode`, and how many records could not be encoded (left out, not failing the rest)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    _add_attributes(resource_spans.resource.attributes, mapper.resource)
    scope_spans = resource_spans.scope_spans.add()
    scope = mapper.scope
    scope_spans.scope.name = scope.name
    scope_spans.scope.version = scope.version
    if scope.attributes:
        _add_attributes(scope_spans.scope.attributes, scope.attributes)
    spans = scope_spans.spans
    skipped = 0
    shared = _SharedAttributes()
    for record in records:
        span = spans.add()
        try:
            _encode_span(span, record, mapper, shared)
        except Exception:
            logger.debug("span %r could not be encoded", record.name, exc_info=True)
            del spans[-1]
            skipped += 1
    body: bytes = request.SerializeToString()
    return body, skipped


class _SharedAttributes:
    """Run attributes encoded once per batch: a span's ``attributes`` field, serialized, merged
    into each span that shares them (protobuf appends a repeated field's entries on merge)."""

    __slots__ = ("_encoded",)

    def __init__(self) -> None:
        # id(attributes) -> (attributes, their encoding): the mapping is kept, so its id stays its own.
        self._encoded: dict[int, tuple[Mapping[str, Any], bytes]] = {}

    def add_to(self, span: ProtoSpan, attributes: Mapping[str, Any]) -> None:
        encoded = self._encoded.get(id(attributes))
        if encoded is None or encoded[0] is not attributes:
            holder = ProtoSpan()
            _add_attributes(holder.attributes, attributes)
            encoded = self._encoded[id(attributes)] = (attributes, holder.SerializeToString())
        span.MergeFromString(encoded[1])


def _encode_span(span: ProtoSpan, record: SpanRecord, mapper: SpanMapper, shared: _SharedAttributes) -> None:
    span.trace_id = bytes.fromhex(record.trace_id)
    span.span_id = record.span_id.to_bytes(8, "big")
    if record.parent_id is not None:
        span.parent_span_id = record.parent_id.to_bytes(8, "big")
    try:
        span.name = record.name
    except UnicodeEncodeError:
        span.name = valid_text(record.name)
    span.kind = ProtoSpan.SPAN_KIND_INTERNAL
    span.start_time_unix_nano = record.start_ns
    span.end_time_unix_nano = max(record.end_ns, record.start_ns)
    run_attributes = mapper.run_attributes(record)
    if run_attributes:
        shared.add_to(span, run_attributes)
    _add_attributes(span.attributes, mapper.attributes(record))
    code, message = mapper.status(record)
    if code != STATUS_UNSET:
        span.status.code = code  # type: ignore[assignment]
        if message:
            span.status.message = valid_text(message)


class OtlpExporter(RecordQueue):
    """One destination: batches of records encoded and sent by OTLP/HTTP (the queue and its thread
    are :class:`~.record_queue.RecordQueue`'s). ``on_exported`` runs on the exporter thread after
    each batch the destination accepted (e.g. a call that sets what OTLP cannot carry). ``failed``
    counts what the destination rejected or what still failed after the retries: a network error,
    408, 429 or 5xx is retried ``retries`` times after ``retry_delay`` seconds, doubling; any other
    status is final. Each try is bounded by ``timeout``.
    """

    def __init__(
        self,
        name: str,
        endpoint: str,
        mapper: SpanMapper,
        *,
        headers: Mapping[str, str] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        compress: bool = True,
        on_exported: Callable[[Sequence[SpanRecord]], None] | None = None,
    ) -> None:
        """Long because it is the constructor: one line per setting of the queue and the connection."""
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        super().__init__(
            name,
            thread_name=f"ambient-tracing-otlp-{name}",
            max_queue=max_queue,
            batch_size=batch_size,
            interval=interval,
            json_as_text=mapper.json_as_text,
        )
        self.endpoint = endpoint
        self.mapper = mapper
        self._url = url
        self._headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        if compress:
            self._headers["Content-Encoding"] = "gzip"
        self._compress = compress
        self._timeout = timeout
        self._retries = max(0, retries)
        self._retry_delay = max(0.0, retry_delay)
        self._connection: http.client.HTTPConnection | None = None
        self._on_exported = on_exported

    # -- the exporter thread ------------------------------------------------------------------------

    def _deliver(self, batch: list[SpanRecord]) -> None:
        try:
            body, skipped = encode_counting(batch, self.mapper)
        except Exception as exc:  # pragma: no cover - per-record errors are caught inside
            self.failed += len(batch)
            self._warn("encode", f"could not encode {len(batch)} spans: {exc!r}")
            return
        if skipped:
            self.failed += skipped
            self._warn("encode", f"left out {skipped} spans that could not be encoded")
        if self._compress:
            body = gzip.compress(body, compresslevel=1, mtime=0)
        if not self._post(body):
            self.failed += len(batch) - skipped
            return
        self.exported += len(batch) - skipped
        if self._on_exported is not None:
            try:
                self._on_exported(batch)
            except Exception as exc:
                self._warn("after-export", f"follow-up call failed: {exc!r}")

    def _on_stop(self) -> None:
        self._close_connection()

    def _post(self, body: bytes) -> bool:
        delay = self._retry_delay
        for attempt in range(self._retries + 1):
            if attempt:
                if self._stopping.wait(delay):
                    return False
                delay = min(delay * 2, 8.0)
            try:
                status, reason = self._request(body)
            except (OSError, http.client.HTTPException) as exc:
                self._close_connection()
                self._warn("network", f"cannot reach {self.endpoint}: {exc!r}; retrying")
                continue
            if 200 <= status < 300:
                return True
            if status not in _RETRY_STATUSES:
                self._warn(f"status-{status}", f"{self.endpoint} rejected spans: HTTP {status} {reason}")
                return False
            self._warn(f"status-{status}", f"{self.endpoint} answered HTTP {status}; retrying")
        return False

    def _request(self, body: bytes) -> tuple[int, str]:
        connection = self._connection
        if connection is None:
            url = self._url
            kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
            connection = kind(url.hostname or "", url.port, timeout=self._timeout)
            self._connection = connection
        path = self._url.path or "/"
        if self._url.query:
            path += "?" + self._url.query
        connection.request("POST", path, body=body, headers=self._headers)
        response = connection.getresponse()
        response.read(1 << 20)  # drain (bounded) so the connection can be reused
        if response.will_close or not response.isclosed():
            self._close_connection()
        return response.status, response.reason

    def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # closing a broken socket
                connection.close()

    def _warn(self, key: str, message: str) -> None:
        warn_once(logger, f"{self.name}:{key}", "%s export: %s", self.name, message)


def wait_all(exporters: Sequence[OtlpExporter], timeout: float) -> bool:
    """Flush several exporters within one overall ``timeout``."""
    deadline = time.monotonic() + timeout
    return all([exporter.flush(deadline - time.monotonic()) for exporter in exporters])
