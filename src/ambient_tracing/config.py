"""Configuration, read once from the environment into frozen objects.

The variable names are the ambient-code runner's, so a deployment configured for the runner works
unchanged. Nothing else in the package reads ``os.environ``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

logger = logging.getLogger(__name__)

DEFAULT_RUNNER_TYPE = "claude-agent-sdk"
DEFAULT_EXPERIMENT_NAME = "ambient-code-sessions"
DEFAULT_FLUSH_TIMEOUT = 30.0
DEFAULT_MAX_ROWS = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SET_ASIDE = 1_000
#: Ratings whose trace owner is checked only at delivery (a trace no backend holds yet) may take
#: at most this share of the store: a flood of made-up trace ids cannot lock real ratings out.
DEFAULT_MAX_UNCHECKED = 1_000
DEFAULT_MAX_PER_THREAD = 200
DEFAULT_MAX_PER_CALLER = 200
#: Seconds without activity after which a thread's Session Metrics are emitted.
DEFAULT_SESSION_IDLE_SECONDS = 900.0
#: What a missing workflow or namespace is reported as.
UNKNOWN = "unknown"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, slots=True)
class FeedbackLimits:
    """Bounds of the durable rating queue (:mod:`ambient_tracing.feedback.spool`). ``max_rows`` /
    ``max_bytes`` bound the ratings not yet delivered; set-aside
    ones are kept apart, the newest ``max_set_aside`` rows up to ``max_bytes`` bytes."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_bytes: int = DEFAULT_MAX_BYTES
    max_unchecked: int = DEFAULT_MAX_UNCHECKED
    max_per_thread: int = DEFAULT_MAX_PER_THREAD
    max_per_caller: int = DEFAULT_MAX_PER_CALLER
    max_set_aside: int = DEFAULT_MAX_SET_ASIDE


@dataclass(frozen=True, slots=True)
class LangfuseSettings:
    public_key: str
    secret_key: str
    host: str
    sample_rate: float | None = None
    flush_timeout: float = DEFAULT_FLUSH_TIMEOUT


@dataclass(frozen=True, slots=True)
class MlflowSettings:
    tracking_uri: str
    experiment_name: str = DEFAULT_EXPERIMENT_NAME


@dataclass(frozen=True, slots=True)
class OtelSettings:
    """The OpenTelemetry backend, from the standard ``OTEL_*`` variables. ``endpoint`` is the full
    traces URL; None: the app's global SDK ``TracerProvider`` if it installed one, else
    ``http://localhost:4318/v1/traces`` (decided at setup)."""

    endpoint: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    service_name: str | None = None
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    sample_rate: float = 1.0
    timeout: float = 10.0
    compress: bool = True


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """What to trace to and how. ``langfuse``/``mlflow``/``otel`` are None when that backend is off."""

    langfuse: LangfuseSettings | None = None
    mlflow: MlflowSettings | None = None
    otel: OtelSettings | None = None
    runner_type: str = DEFAULT_RUNNER_TYPE
    mask_messages: bool = True
    #: The durable rating queue, a SQLite file (None: :func:`default_spool_path`).
    feedback_spool: Path | None = None
    #: Bounds of that queue (``AMBIENT_FEEDBACK_MAX_ROWS``, ``AMBIENT_FEEDBACK_MAX_BYTES``).
    feedback_limits: FeedbackLimits = field(default_factory=FeedbackLimits)
    # Seconds without activity after which a thread's Session Metrics are emitted; None: only on
    # end_session and at shutdown.
    session_idle_seconds: float | None = DEFAULT_SESSION_IDLE_SECONDS
    #: ``AGENTIC_SESSION_NAMESPACE``: the origin runner's Kubernetes namespace (None when unset).
    namespace: str | None = None
    #: ``AMBIENT_TRUST_TRACEPARENT``: a W3C ``traceparent`` request header sets the run's trace id
    #: and parent span (off by default: a caller-chosen id is an attack surface).
    trust_traceparent: bool = False
    #: ``AMBIENT_TRACE_ID_FROM_RUN_ID``: a run's trace id is derived from its AG-UI runId.
    trace_id_from_run_id: bool = False
    #: ``AMBIENT_RESULT_TRACE_ID``: also put the id in ``RUN_FINISHED.result.traceId``.
    result_trace_id: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TracingConfig:
        """Parse the runner's variables; a misconfigured backend is switched off with one warning."""
        env = os.environ if environ is None else environ
        listed = {
            name.strip().lower()
            for name in env.get("OBSERVABILITY_BACKENDS", "langfuse").split(",")
            if name.strip()
        }
        return cls(
            langfuse=_langfuse_settings(env) if "langfuse" in listed else None,
            mlflow=_mlflow_settings(env) if "mlflow" in listed else None,
            otel=otel_settings(env) if "otel" in listed else None,
            runner_type=runner_type_slug(env.get("RUNNER_TYPE", "")),
            mask_messages=_flag(env, "LANGFUSE_MASK_MESSAGES", default=True),
            feedback_spool=Path(spool) if (spool := env.get("AMBIENT_FEEDBACK_SPOOL", "").strip()) else None,
            feedback_limits=FeedbackLimits(
                max_rows=_count(env, "AMBIENT_FEEDBACK_MAX_ROWS", DEFAULT_MAX_ROWS),
                max_bytes=_count(env, "AMBIENT_FEEDBACK_MAX_BYTES", DEFAULT_MAX_BYTES),
            ),
            session_idle_seconds=_seconds(env, "SESSION_METRICS_IDLE_SECONDS", DEFAULT_SESSION_IDLE_SECONDS)
            or None,
            namespace=_label(env.get("AGENTIC_SESSION_NAMESPACE", "")) or None,
            trust_traceparent=_flag(env, "AMBIENT_TRUST_TRACEPARENT", default=False),
            trace_id_from_run_id=_flag(env, "AMBIENT_TRACE_ID_FROM_RUN_ID", default=False),
            result_trace_id=_flag(env, "AMBIENT_RESULT_TRACE_ID", default=False),
        )


@dataclass(frozen=True, slots=True)
class Workflow:
    """The workflow a session runs, from the origin runner's ``ACTIVE_WORKFLOW_*`` variables."""

    url: str
    branch: str = ""
    path: str = ""

    @property
    def name(self) -> str:
        """The repository name: the URL's last path segment without ``.git`` ("" when none)."""
        return _label(self.url.rstrip("/").split("/")[-1].removesuffix(".git"))

    def metadata(self) -> dict[str, str]:
        """The origin runner's metadata keys (``workflow_name`` is ``unknown`` when it has no name)."""
        values = {
            "workflow_name": self.name or UNKNOWN,
            "workflow_url": self.url,
            "workflow_branch": self.branch,
            "workflow_path": self.path,
        }
        return {key: value for key, value in values.items() if value}


def active_workflow(environ: Mapping[str, str] | None = None) -> Workflow | None:
    """The workflow active now, or None. Read at every run, not once: the origin runner changes
    ``ACTIVE_WORKFLOW_GIT_URL`` / ``_BRANCH`` / ``_PATH`` while it runs, when the user switches."""
    env = os.environ if environ is None else environ
    url = _without_credentials(_printable(env.get("ACTIVE_WORKFLOW_GIT_URL", "")))
    if not url:
        return None
    return Workflow(
        url=url,
        branch=_printable(env.get("ACTIVE_WORKFLOW_BRANCH", "")),
        path=_printable(env.get("ACTIVE_WORKFLOW_PATH", "")),
    )


def _printable(value: str, limit: int = 500) -> str:
    """Stripped, without control characters, at most ``limit`` characters (values go into logs and UIs)."""
    return "".join(char for char in value if char.isprintable()).strip()[:limit]


def _label(value: str) -> str:
    """A name fit for a tag: letters, digits and ``-_:@./`` only (the origin's model-name rule)."""
    return re.sub(r"[^A-Za-z0-9._:@/-]", "", value.strip())[:200]


def _without_credentials(url: str) -> str:
    """The URL without a ``user:token@`` part: a workflow URL may carry a git token."""
    return _CREDENTIALS.sub(r"\1", url)


_CREDENTIALS = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def default_spool_path() -> Path:
    """``$XDG_STATE_HOME/ambient-tracing/feedback.db`` (``~/.local/state`` when unset)."""
    return legacy_spool_path().with_name("feedback.db")


def legacy_spool_path() -> Path:
    """Where earlier versions kept their JSON-lines spool by default (imported once)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "ambient-tracing" / "feedback-spool.jsonl"


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    logger.warning("%s=%r is not a positive whole number; using %d", name, raw, default)
    return default


def runner_type_slug(value: str) -> str:
    """``RUNNER_TYPE`` as the runner tags it: lower case, spaces and odd characters as dashes."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", value.strip().lower()).strip("-")
    return slug or DEFAULT_RUNNER_TYPE


def _flag(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw not in _FALSE:
        logger.warning("%s=%r is not a boolean; using %s", name, raw, default)
        return default
    return False


def _is_http_url(value: str) -> bool:
    try:
        parsed = urlparse(value)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _langfuse_settings(env: Mapping[str, str]) -> LangfuseSettings | None:
    if not _flag(env, "LANGFUSE_ENABLED", default=False):
        return None
    host = env.get("LANGFUSE_HOST") or env.get("LANGFUSE_BASE_URL") or ""
    missing = [
        name
        for name, value in (
            ("LANGFUSE_PUBLIC_KEY", env.get("LANGFUSE_PUBLIC_KEY")),
            ("LANGFUSE_SECRET_KEY", env.get("LANGFUSE_SECRET_KEY")),
            ("LANGFUSE_HOST", host),
        )
        if not value
    ]
    if missing:
        logger.warning("Langfuse tracing is off: %s not set", ", ".join(missing))
        return None
    if not _is_http_url(host):
        logger.warning("Langfuse tracing is off: LANGFUSE_HOST=%r is not an http(s) URL", host)
        return None
    return LangfuseSettings(
        public_key=env["LANGFUSE_PUBLIC_KEY"],
        secret_key=env["LANGFUSE_SECRET_KEY"],
        host=host.rstrip("/"),
        sample_rate=_rate(env, "LANGFUSE_SAMPLE_RATE"),
        flush_timeout=_seconds(env, "LANGFUSE_FLUSH_TIMEOUT", DEFAULT_FLUSH_TIMEOUT),
    )


def _mlflow_settings(env: Mapping[str, str]) -> MlflowSettings | None:
    if not _flag(env, "MLFLOW_TRACING_ENABLED", default=False):
        return None
    uri = env.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        logger.warning("MLflow tracing is off: MLFLOW_TRACKING_URI not set")
        return None
    try:
        scheme = urlparse(uri).scheme
    except ValueError:
        scheme = "?"
    if scheme not in ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", ""):
        logger.warning("MLflow tracing is off: MLFLOW_TRACKING_URI=%r has an unknown scheme", uri)
        return None
    return MlflowSettings(
        tracking_uri=uri,
        experiment_name=env.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT_NAME,
    )


def _rate(env: Mapping[str, str], name: str) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        rate = float(raw)
    except ValueError:
        rate = -1.0
    if not 0.0 <= rate <= 1.0:
        logger.warning("%s=%r is not a number in [0, 1]; not sampling", name, raw)
        return None
    return rate


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %s", name, raw, default)
        return default


def otel_settings(env: Mapping[str, str]) -> OtelSettings | None:
    """The ``OTEL_*`` variables as the OpenTelemetry SDK reads them (traces-specific ones first);
    None when ``OTEL_SDK_DISABLED`` is true or the settings cannot work (warned)."""
    if _flag(env, "OTEL_SDK_DISABLED", default=False):
        logger.info("OpenTelemetry tracing is off: OTEL_SDK_DISABLED is set")
        return None
    protocol = (_otel(env, "PROTOCOL") or "http/protobuf").strip().lower()
    if protocol == "grpc":
        logger.warning("OpenTelemetry tracing is off: OTLP over gRPC is not supported; use http/protobuf")
        return None
    if protocol != "http/protobuf":
        logger.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%r: sending http/protobuf", protocol)
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip() or None
    if endpoint is None and (base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()):
        endpoint = base.rstrip("/") + "/v1/traces"
    if endpoint is not None and not _is_http_url(endpoint):
        logger.warning("OpenTelemetry tracing is off: the OTLP endpoint %r is not an http(s) URL", endpoint)
        return None
    headers = {
        **_pairs(env, "OTEL_EXPORTER_OTLP_HEADERS"),
        **_pairs(env, "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
    }
    resource = _pairs(env, "OTEL_RESOURCE_ATTRIBUTES")
    timeout_ms = _seconds(env, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 0.0) or _seconds(
        env, "OTEL_EXPORTER_OTLP_TIMEOUT", 10_000.0
    )
    return OtelSettings(
        endpoint=endpoint,
        headers=headers,
        service_name=env.get("OTEL_SERVICE_NAME", "").strip() or resource.get("service.name") or None,
        resource_attributes=resource,
        sample_rate=_otel_sample_rate(env),
        timeout=max(timeout_ms, 1.0) / 1000.0,
        compress=(_otel(env, "COMPRESSION") or "gzip").strip().lower() != "none",
    )


def _otel(env: Mapping[str, str], setting: str) -> str:
    """``OTEL_EXPORTER_OTLP_TRACES_<setting>``, else ``OTEL_EXPORTER_OTLP_<setting>``."""
    return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{setting}") or env.get(f"OTEL_EXPORTER_OTLP_{setting}") or ""


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """``k=v,k2=v2`` with URL-encoded values (the OTel format). A malformed entry is skipped with a
    warning that names the variable only: the values may be credentials."""
    pairs: dict[str, str] = {}
    for entry in env.get(name, "").split(","):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            logger.warning("%s has an entry that is not key=value; skipped", name)
            continue
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _otel_sample_rate(env: Mapping[str, str]) -> float:
    """``OTEL_TRACES_SAMPLER`` (always_on/off, [parentbased_]traceidratio with ``..._ARG``) as a ratio."""
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        rate = _rate(env, "OTEL_TRACES_SAMPLER_ARG")
        return 1.0 if rate is None else rate
    return 1.0
