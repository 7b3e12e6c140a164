"""Pytest fixtures: a local Langfuse receiver and LangfuseBackends pointed at it.

Each backend gets unique keys and its own client resources (LangfuseBackend builds a client on its
own TracerProvider and replaces the SDK's per-public-key cache entry), so backends of different tests
never share an exporter. Short batch settings make spans arrive within ~0.1 s.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .langfuse_receiver import LangfuseReceiver

FAST_CLIENT_OPTIONS: dict[str, Any] = {"flush_at": 1, "flush_interval": 0.05, "timeout": 2}


@pytest.fixture
def langfuse_receiver() -> Iterator[LangfuseReceiver]:
    receiver = LangfuseReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def langfuse_backend(langfuse_receiver: LangfuseReceiver) -> Iterator[Callable[..., Any]]:
    """Factory: ``langfuse_backend(host=None, **kwargs)`` -> LangfuseBackend (default host: the receiver).

    kwargs go to LangfuseBackend (e.g. ``sample_rate``, ``environment``, or Langfuse() options such
    as ``timeout``). Backends are shut down at teardown, each bounded to a few seconds.
    """
    from ambient_tracing.backends.langfuse import LangfuseBackend

    made: list[LangfuseBackend] = []

    def make(host: str | None = None, **kwargs: Any) -> LangfuseBackend:
        key = uuid.uuid4().hex[:12]
        options = {**FAST_CLIENT_OPTIONS, "flush_timeout": 5.0, **kwargs}
        backend = LangfuseBackend(
            public_key=f"pk-lf-test-{key}",
            secret_key=f"sk-lf-test-{key}",
            host=host or langfuse_receiver.base_url,
            **options,
        )
        made.append(backend)
        return backend

    yield make
    closers = [threading.Thread(target=backend.shutdown, daemon=True) for backend in made]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(timeout=10)


def sdk_langfuse_backend(receiver: LangfuseReceiver) -> Any:
    """Langfuse through the SDK (an app's own client, on its own TracerProvider), exporting to
    ``receiver``: the path that makes spans with the SDK on the span worker (the default is OTLP)."""
    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider

    from ambient_tracing.backends.langfuse import LangfuseBackend

    key = uuid.uuid4().hex[:8]
    client = Langfuse(
        public_key=f"pk-{key}",
        secret_key=f"sk-{key}",
        base_url=receiver.base_url,
        flush_at=1,
        flush_interval=0.05,
        tracer_provider=TracerProvider(),
    )
    return LangfuseBackend(client=client, flush_timeout=5)
