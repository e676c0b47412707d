"""`sinkserve triton`: tritonserver in the foreground, kept answering by a `Supervisor`
(restarted when it exits, the model reloaded when its process dies) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from sinkserve.triton_server.launcher import (
    DEFAULT_MODEL,
    TritonLaunchError,
    TritonServer,
    default_model_repository,
)
from sinkserve.triton_server.supervisor import Supervisor


def add_triton_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `sinkserve triton` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "triton",
        help="run tritonserver on the sinkserve model repository",
        description="Run a real tritonserver (the system one, else nvidia-pytriton's) on the "
        "model repository in explicit model-control mode; Ctrl-C stops it cleanly. "
        "Arguments after `--` go to tritonserver.",
    )
    p.add_argument("--model-repository", type=Path, default=default_model_repository())
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        help=f"model to load (default {DEFAULT_MODEL}; repeatable)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address of the gRPC and HTTP APIs (no authentication, model control: keep "
        "it loopback, where only the gateway beside Triton reaches it)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address of the Prometheus metrics (read-only; 0.0.0.0 for a scraper elsewhere)",
    )
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for readiness"
    )
    p.add_argument("--exit-timeout", type=int, default=30, help="seconds to drain on shutdown")
    p.add_argument(
        "--handoff-dir", type=Path, help="where sessions wait across reloads (default: a temp dir)"
    )
    p.add_argument(
        "--session-store",
        help="sqlite:///path or redis://host:port/db (default: sqlite under $XDG_STATE_HOME)",
    )
    p.add_argument(
        "--replica",
        default="",
        help="this replica's name in session records (replicas sharing a store must "
        "differ; default: the host name)",
    )
    p.add_argument("--tritonserver", type=Path, help="the binary to run (default: find one)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("tritonserver_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=main_triton)
    return p


def main_triton(args: argparse.Namespace) -> int:
    """Run tritonserver in the foreground until it exits or SIGINT/SIGTERM stops it."""
    extra = [a for a in args.tritonserver_args if a != "--"]
    server = TritonServer(
        model_repository=args.model_repository,
        models=args.models or (DEFAULT_MODEL,),
        host=args.host,
        metrics_host=args.metrics_host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        ready_timeout_s=args.ready_timeout,
        exit_timeout_s=args.exit_timeout,
        log_verbose=args.log_verbose,
        handoff_dir=args.handoff_dir,
        session_store=args.session_store,
        replica=args.replica,
        server=args.tritonserver,
        extra_args=extra,
    )
    stop_requested = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True
        if server.process is not None and server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    with _signals(on_signal):
        try:
            server.start()
        except TritonLaunchError as exc:
            print(f"sinkserve triton: {exc}", file=sys.stderr)
            return 1
        if stop_requested:
            return server.stop() or 0
        print(
            f"tritonserver ready: gRPC {server.grpc_url}  HTTP {server.http_url}  "
            f"metrics {server.metrics_url}  models {', '.join(server.models)}",
            flush=True,
        )
        asyncio.run(Supervisor(server).run(lambda: stop_requested))
        assert server.process is not None
        rc = server.process.wait()
        server.stop()
        return 0 if stop_requested and rc in (0, -signal.SIGTERM) else rc


@contextlib.contextmanager
def _signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
