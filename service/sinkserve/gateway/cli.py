"""`sinkserve gateway`: flags, config, logging, run until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Any

from sinkserve.config import ConfigError
from sinkserve.gateway.auth import Authenticator
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.server import Gateway

_FLAG_HELP = {
    "host": "address to listen on",
    "port": "gRPC port (0 = any free port)",
    "triton_url": "Triton gRPC endpoint host:port",
    "model": "Triton model name",
    "metrics_port": "Prometheus port (-1 = off, 0 = any free port)",
    "http_port": "OpenAI-compatible HTTP API port (-1 = off, 0 = any free port)",
    "tokens_file": "file of 'caller:token' lines",
    "tokens_env": "env var holding 'caller:token,caller:token'",
    "tls_cert_file": "PEM certificate chain of the gateway (with --tls-key: TLS on)",
    "tls_key_file": "PEM private key of --tls-cert",
    "tls_client_ca_file": "PEM CA bundle: clients must present a certificate it signed",
    "insecure_plaintext": "plaintext on a non-loopback --host: only behind a "
    "TLS-terminating proxy or mesh that alone can reach this port",
}
# Flags named other than their field (the short names the docs use).
_FLAG_NAMES = {
    "tls_cert_file": "tls-cert",
    "tls_key_file": "tls-key",
    "tls_client_ca_file": "tls-client-ca",
}


def add_gateway_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `gateway` subcommand (one flag per GatewayConfig field) to `subparsers`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", help="run the gRPC gateway in front of Triton"
    )
    defaults = GatewayConfig()
    for f in dataclasses.fields(GatewayConfig):
        if f.name == "auth_disabled":
            continue
        value = getattr(defaults, f.name)
        flag = "--" + _FLAG_NAMES.get(f.name, f.name.replace("_", "-"))
        help_text = _FLAG_HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(value, bool):  # every bool field is off by default: a switch
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                type=type(value),
                default=value,
                help=f"{help_text} (default {value!r})",
            )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="accept calls without a token (local use only; every caller is 'anonymous')",
    )
    parser.set_defaults(func=main_gateway)
    return parser


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GatewayConfig)
        if f.name != "auth_disabled"
    }
    return GatewayConfig(auth_disabled=args.no_auth, **values)


def main_gateway(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the exit status."""
    try:
        config = config_from_args(args)
        auth = Authenticator.from_environ(
            disabled=config.auth_disabled,
            tokens_file=config.tokens_file,
            tokens_env=config.tokens_env,
        )
    except (ConfigError, OSError) as err:
        print(f"sinkserve gateway: {err}", file=sys.stderr)
        return 2

    async def run() -> None:
        gateway = Gateway(config, auth)
        await gateway.start()
        await gateway.run_until_signal()

    try:
        asyncio.run(run())
    except OSError as err:  # a port already taken
        print(f"sinkserve gateway: {err}", file=sys.stderr)
        return 2
    return 0
