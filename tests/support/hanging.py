"""A TCP server on 127.0.0.1 that accepts connections and never answers (a hung tracking server),
optionally forwarding to a real server until told to hang."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class HangingServer:
    """Accepts every connection, reads what comes, never writes. ``upstream`` (host, port): until
    :meth:`hang` is called, connections are forwarded there instead (so setup can succeed first)."""

    def __init__(self, upstream: tuple[str, int] | None = None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._upstream = upstream
        self._hanging = threading.Event()
        if upstream is None:
            self._hanging.set()
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._accept, name="hanging-server", daemon=True).start()

    def hang(self) -> None:
        """From now on, new connections are accepted and never answered."""
        self._hanging.set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            if self._hanging.is_set() or self._upstream is None:
                self._held.append(connection)
                threading.Thread(target=self._swallow, args=(connection,), daemon=True).start()
            else:
                upstream = socket.create_connection(self._upstream)
                self._held += [connection, upstream]
                for source, target in ((connection, upstream), (upstream, connection)):
                    threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _swallow(self, connection: socket.socket) -> None:
        try:
            while connection.recv(65536):
                pass
        except OSError:
            pass

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        """Forward until told to hang; then swallow (kept-alive connections hang too)."""
        try:
            while data := source.recv(65536):
                if not self._hanging.is_set():
                    target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for connection in self._held:
            with contextlib.suppress(OSError):
                connection.close()

    def __enter__(self) -> HangingServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
