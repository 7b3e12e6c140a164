"""Runs ``phoenix serve`` with every listener on loopback (run by the Phoenix venv's Python).

Phoenix binds its OTLP gRPC listener to ``[::]`` whatever ``PHOENIX_HOST`` says; this rewrites that
address to 127.0.0.1 before the server starts. Imports only Phoenix and grpc (not the test suite).
"""

from __future__ import annotations

import sys
from typing import Any

import grpc.aio._server as grpc_server


def _loopback(address: str) -> str:
    return "127.0.0.1:" + address.rsplit(":", 1)[1] if address.startswith(("[::]:", "0.0.0.0:")) else address


_insecure = grpc_server.Server.add_insecure_port


def _add_insecure_port(self: Any, address: str) -> int:
    return _insecure(self, _loopback(address))


grpc_server.Server.add_insecure_port = _add_insecure_port  # type: ignore[method-assign]

if __name__ == "__main__":
    from phoenix.server.main import main

    sys.argv = ["phoenix", "serve"]
    main()
