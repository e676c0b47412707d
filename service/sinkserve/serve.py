"""`sinkserve serve`: Triton (with the engine) and the gateway on this machine, one command.

Triton runs as a child process through the launcher, watched by a `Supervisor` that
restarts it (or reloads the model) after a crash; the gateway runs in this process.
Triton's gRPC and HTTP APIs (no authentication, model control) listen on 127.0.0.1
whatever `--host` says; the gateway and both metrics endpoints listen on `--host`.
Sessions are kept in the session store (SQLite under $XDG_STATE_HOME by default), so they
outlive a restart of the whole command. Ctrl-C (or SIGTERM) drains the gateway, then
stops Triton.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from sinkserve.gateway.auth import Authenticator
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.server import Gateway
from sinkserve.triton_server.launcher import (
    TritonLaunchError,
    TritonServer,
    default_model_repository,
)
from sinkserve.triton_server.settings import default_state_dir
from sinkserve.triton_server.supervisor import Supervisor


def add_serve_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="run Triton and the gateway together (CPU default)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address of the gateway and the metrics (Triton's APIs stay on 127.0.0.1); "
        "beyond loopback it needs --tls-cert/--tls-key or --insecure-plaintext",
    )
    p.add_argument("--port", type=int, default=50051, help="gateway gRPC port")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=GatewayConfig.metrics_port,
        help="gateway Prometheus port (default %(default)s, as in deploy/)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="OpenAI-compatible HTTP API of the gateway (docs/openai.md; -1 = off)",
    )
    p.add_argument(
        "--model-repository",
        type=Path,
        default=default_model_repository(),
        help="Triton model repository (default: the checkout's triton_model_repo)",
    )
    p.add_argument("--triton-grpc-port", type=int, default=8001)
    p.add_argument("--triton-http-port", type=int, default=8000)
    p.add_argument("--triton-metrics-port", type=int, default=8002)
    p.add_argument(
        "--session-store",
        default=f"sqlite://{default_state_dir() / 'sessions.sqlite3'}",
        help="where sessions are kept: sqlite:///path or redis://host:port/db "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--replica",
        default="",
        help="this replica's name in session records (replicas sharing a store must "
        "differ; default: the host name)",
    )
    p.add_argument("--tokens-file", default="", help="file of 'caller:token' lines")
    p.add_argument("--no-auth", action="store_true", help="accept calls without a token")
    p.add_argument("--tls-cert", default="", help="PEM certificate chain of the gateway (TLS)")
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", default="", help="PEM CA bundle: require client certificates it signed"
    )
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="plaintext on a non-loopback --host: only behind a TLS-terminating proxy",
    )
    p.set_defaults(func=main_serve)
    return p


def gateway_config(args: argparse.Namespace) -> GatewayConfig:
    """The gateway's settings from `sinkserve serve` flags (ConfigError when invalid)."""
    return GatewayConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        triton_url=f"127.0.0.1:{args.triton_grpc_port}",
        tokens_file=args.tokens_file,
        auth_disabled=args.no_auth,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_client_ca_file=args.tls_client_ca,
        insecure_plaintext=args.insecure_plaintext,
    )


def triton_server(args: argparse.Namespace) -> TritonServer:
    """Triton as `sinkserve serve` runs it: its APIs on loopback (the launcher's default),
    only its read-only metrics on `--host`."""
    return TritonServer(
        model_repository=args.model_repository,
        metrics_host=args.host,
        grpc_port=args.triton_grpc_port,
        http_port=args.triton_http_port,
        metrics_port=args.triton_metrics_port,
        session_store=args.session_store,
        replica=args.replica,
    )


def main_serve(args: argparse.Namespace) -> int:
    config = gateway_config(args)
    auth = Authenticator.from_environ(
        disabled=config.auth_disabled, tokens_file=config.tokens_file, tokens_env=config.tokens_env
    )
    triton = triton_server(args)
    print("starting tritonserver and loading the model (about a minute on CPU)...", flush=True)
    try:
        triton.start()
    except TritonLaunchError as exc:
        print(f"sinkserve serve: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_run_gateway(config, auth, triton))
    except OSError as err:  # a port of the gateway already taken
        print(f"sinkserve serve: {err}", file=sys.stderr)
        return 2
    finally:
        triton.stop()
    return 0


async def _run_gateway(config: GatewayConfig, auth: Authenticator, triton: TritonServer) -> None:
    gateway = Gateway(config, auth)
    await gateway.start()
    stopped = False
    supervisor = asyncio.create_task(Supervisor(triton).run(lambda: stopped))
    token = "" if config.auth_disabled else " --token <your token>"
    http = f", OpenAI HTTP :{gateway.http_port}/v1" if gateway.http_port else ""
    if config.tls:
        token += " --tls-ca <the CA of the gateway's certificate>"
    print(
        f"sinkserve is up: gateway {config.host}:{gateway.port} "
        f"(metrics :{gateway.metrics_port}{http}), Triton gRPC {triton.grpc_url} "
        f"HTTP {triton.http_url} metrics {triton.metrics_url}\n"
        f"chat with:  .venv/bin/sinkserve chat --target {config.host}:{gateway.port}{token}\n"
        "Ctrl-C stops both.",
        flush=True,
    )
    try:
        await gateway.run_until_signal()
    finally:
        stopped = True
        await supervisor
