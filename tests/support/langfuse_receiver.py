"""A stand-in Langfuse server on 127.0.0.1 that decodes what the real SDK sends.

Accepts OTLP/HTTP protobuf spans at ``/api/public/otel/v1/traces`` (gzip or not; also at any other
path ending in ``/v1/traces``, as a generic OpenTelemetry collector; ``headers`` keeps each export's
request headers), scores at
``/api/public/scores`` (SDK 5: JSON list, answered 202) and ``/api/public/ingestion`` (SDK 4: JSON
batch of ``score-create`` events, answered 207). Anything else gets a 404 JSON body.
``GET /api/public/traces/{id}`` and ``GET /api/public/traces?sessionId=&name=`` answer from the
spans received, as Langfuse's public API does once it has ingested them (404 before).
``score_status``: when set, score posts are answered with it (a Langfuse refusing scores only).
``mode``: "ok"; "503" (every POST answered 503); "hang" (requests are read, then held until
``stop()`` or ``hang_seconds``).
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

TRACES_PATH = "/api/public/otel/v1/traces"
OTLP_SUFFIX = "/v1/traces"
SCORES_PATH = "/api/public/scores"
INGESTION_PATH = "/api/public/ingestion"
TRACES_API = "/api/public/traces"
Mode = Literal["ok", "503", "hang"]


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    attributes: dict[str, Any]
    status_code: int
    status_message: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)

    def metadata(self, key: str, *, trace: bool = False) -> Any:
        """A metadata value decoded. SDK 5 JSON-encodes every value (``"x"`` arrives as ``'"x"'``);
        SDK 4 sends strings and ints as they are and JSON-encodes the rest."""
        prefix = "langfuse.trace.metadata." if trace else "langfuse.observation.metadata."
        raw = self.attributes.get(prefix + key)
        if isinstance(raw, str) and raw[:1] in ('"', "{", "["):
            try:
                return json.loads(raw)
            except ValueError:
                return raw
        return raw


def decode_any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [decode_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: decode_any_value(item.value) for item in value.kvlist_value.values}
    if kind is None:
        return None
    return getattr(value, kind)


def decode_spans(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: decode_any_value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        name=span.name,
                        attributes={kv.key: decode_any_value(kv.value) for kv in span.attributes},
                        status_code=span.status.code,
                        status_message=span.status.message,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        resource=resource,
                    )
                )
    return spans


class LangfuseReceiver:
    """Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, mode: Mode = "ok", *, hang_seconds: float = 30.0) -> None:
        self.mode: Mode = mode
        self.hang_seconds = hang_seconds
        self.score_status: int | None = None
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.headers: list[dict[str, str]] = []  # the request headers of every span export
        self._spans: list[ReceivedSpan] = []
        self._scores: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> LangfuseReceiver:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="langfuse-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> LangfuseReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._server is not None, "receiver not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # what was received
    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    @property
    def scores(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._scores)

    def spans_by_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for_spans(
        self, until: int | Callable[[list[ReceivedSpan]], bool] = 1, timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        """Poll until ``until`` spans arrived (or the predicate holds); AssertionError after timeout."""
        done = (lambda spans: len(spans) >= until) if isinstance(until, int) else until
        for _ in range(max(1, int(timeout / 0.02))):
            spans = self.spans
            if done(spans):
                return spans
            time.sleep(0.02)
        spans = self.spans
        assert done(spans), f"spans not received within {timeout} s; got {[s.name for s in spans]}"
        return spans

    def wait_for_scores(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        for _ in range(max(1, int(timeout / 0.02))):
            if len(self.scores) >= count:
                break
            time.sleep(0.02)
        scores = self.scores
        assert len(scores) >= count, f"{count} score(s) not received within {timeout} s: {scores}"
        return scores

    # request handling
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests.append((method, path))
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if self.mode == "hang":
            self._stopping.wait(self.hang_seconds)
            return _reply(handler, 503, b"{}", "application/json")
        traces = path.endswith(OTLP_SUFFIX)
        if method == "POST" and self.mode == "503" and (traces or path in (SCORES_PATH, INGESTION_PATH)):
            return _reply(handler, 503, b'{"message": "unavailable"}', "application/json")
        if method == "POST" and traces:
            with self._lock:
                self.headers.append(dict(handler.headers.items()))
            if handler.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            spans = decode_spans(body)
            with self._lock:
                self._spans.extend(spans)
            return _reply(
                handler, 200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf"
            )
        if method == "POST" and path == SCORES_PATH and self.score_status is not None:
            return _reply(handler, self.score_status, b'{"message": "refused"}', "application/json")
        if method == "POST" and path == SCORES_PATH:
            scores = json.loads(body)
            with self._lock:
                self._scores.extend(scores if isinstance(scores, list) else [scores])
            return _reply(handler, 202, b'{"message": "Accepted"}', "application/json")
        if method == "POST" and path == INGESTION_PATH:
            events = json.loads(body).get("batch", [])
            with self._lock:
                self._scores.extend(e["body"] for e in events if e.get("type") == "score-create")
            result = {"successes": [{"id": e.get("id"), "status": 201} for e in events], "errors": []}
            return _reply(handler, 207, json.dumps(result).encode(), "application/json")
        if method == "GET" and path.startswith(TRACES_API + "/"):
            trace = self.trace_view(urllib.parse.unquote(path[len(TRACES_API) + 1 :]))
            if trace is not None:
                return _reply(handler, 200, json.dumps(trace).encode(), "application/json")
        if method == "GET" and path == TRACES_API:
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
            data = self.traces_of(query.get("sessionId", [""])[0], query.get("name", [None])[0])
            limit = int(query.get("limit", ["50"])[0])
            body = {"data": data[:limit], "meta": {"page": 1, "limit": limit, "totalItems": len(data)}}
            return _reply(handler, 200, json.dumps(body).encode(), "application/json")
        return _reply(
            handler, 404, json.dumps({"message": f"no route {method} {path}"}).encode(), "application/json"
        )

    def trace_view(self, trace_id: str) -> dict[str, Any] | None:
        """The trace as ``GET /api/public/traces/{id}`` shows it: id, name, sessionId, timestamp."""
        spans = self.spans_by_trace(trace_id)
        if not spans:
            return None
        first = min(spans, key=lambda span: span.start_ns)
        session = next((s.attributes["session.id"] for s in spans if "session.id" in s.attributes), None)
        name = next(
            (s.attributes["langfuse.trace.name"] for s in spans if "langfuse.trace.name" in s.attributes),
            first.name,
        )
        return {"id": trace_id, "name": name, "sessionId": session, "timestamp": first.start_ns}

    def traces_of(self, session_id: str, name: str | None) -> list[dict[str, Any]]:
        """The session's traces (named ``name`` when given), newest first."""
        views = [self.trace_view(trace_id) for trace_id in dict.fromkeys(s.trace_id for s in self.spans)]
        chosen = [
            view
            for view in views
            if view is not None and view["sessionId"] == session_id and (name is None or view["name"] == name)
        ]
        return sorted(chosen, key=lambda view: view["timestamp"], reverse=True)


def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    except OSError:  # the client gave up (timeout) while we were holding the request
        pass


def _handler_for(receiver: LangfuseReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            receiver._handle(self, "POST")

        def do_GET(self) -> None:
            receiver._handle(self, "GET")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
