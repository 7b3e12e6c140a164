"""The ``ambient-tracing`` command."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ambient-tracing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="trace a scripted AG-UI agent to a local MLflow store and show it"
    )
    demo.add_argument(
        "--store", type=Path, default=Path("ambient-demo/mlflow.db"), help="sqlite file (created if missing)"
    )
    demo.add_argument("--web", action="store_true", help="serve a page to chat, rate and see the traces")
    demo.add_argument("--port", type=int, default=8765, help="--web: port on 127.0.0.1 (default 8765)")
    demo.add_argument(
        "--mlflow-ui",
        metavar="URL",
        help="--web: link each trace to this MLflow UI (e.g. http://127.0.0.1:5000)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    if args.command == "demo" and args.web:
        from ambient_tracing.demo_web import run_web

        run_web(args.store, port=args.port, mlflow_ui=args.mlflow_ui)
    elif args.command == "demo":
        from ambient_tracing.demo import run_demo

        run_demo(args.store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
