"""Loopback stand-ins run as child processes (so their CPU is not counted as the app's).

``python -m benchmarks.receivers langfuse``: the tests' LangfuseReceiver (decodes OTLP, answers 200).
``python -m benchmarks.receivers blackhole``: accepts TCP connections and never reads nor answers.
Each prints its base URL, then serves until its stdin closes.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .common import child, wait_for_stdin_eof

MAX_BLACKHOLE_CONNECTIONS = 10_000


def _blackhole(stop: threading.Event, max_seconds: float = 3600.0) -> str:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    server.settimeout(0.2)
    held: list[socket.socket] = []

    def accept() -> None:
        deadline = time.monotonic() + max_seconds
        while not stop.is_set() and time.monotonic() < deadline and len(held) < MAX_BLACKHOLE_CONNECTIONS:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            held.append(connection)  # never read, never answered, never closed until the end
        server.close()

    threading.Thread(target=accept, name="blackhole", daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


def main(kind: str) -> None:
    if kind == "langfuse":
        from tests.support.langfuse_receiver import LangfuseReceiver

        receiver = LangfuseReceiver().start()
        print(receiver.base_url, flush=True)
        wait_for_stdin_eof()
        receiver.stop()
    elif kind == "blackhole":
        stop = threading.Event()
        print(_blackhole(stop), flush=True)
        wait_for_stdin_eof()
        stop.set()
    else:
        raise SystemExit(f"unknown receiver {kind!r}")


@contextmanager
def receiver(kind: str) -> Iterator[str]:
    """A receiver child process; yields its base URL."""
    with child(["benchmarks.receivers", kind], ready_timeout=60) as url:
        yield url


def closed_port_url() -> str:
    """A 127.0.0.1 URL on which nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "langfuse")
