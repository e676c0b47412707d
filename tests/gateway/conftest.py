"""Fixtures: a gateway in this event loop, and (for end-to-end tests) a real tritonserver.

The end-to-end fixture starts tritonserver with the real model repository and engine via
`service.triton.launcher.TritonServer`. `SINKSERVE_E2E_TRITON_URL=host:port` points the tests
at an already running Triton serving the real model instead (e.g. a deployed one).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service.gateway.auth import Authenticator
from service.gateway.config import GatewayConfig
from service.gateway.server import Gateway

TOKENS = {"alice-token": "alice", "bob-token": "bob"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


REPO_ROOT = Path(__file__).resolve().parents[2]
# Enough KV slots for the 16-concurrent-sessions test (each needs its own slot to stream).
E2E_MAX_SESSIONS = 16

GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Start gateways on free loopback ports: `await make_gateway(triton_url=..., **config)`."""
    started: list[Gateway] = []

    async def make(**overrides: Any) -> Gateway:
        settings: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "health_interval_s": 0.2,
            "shutdown_grace_s": 5.0,
            "triton_url": f"127.0.0.1:{free_port()}",  # nothing listens there
        }
        settings.update(overrides)
        gateway = Gateway(GatewayConfig(**settings), Authenticator(TOKENS))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop(grace_s=0)


@pytest.fixture(scope="session")
def triton_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gRPC address of a real tritonserver serving the real `sinkserve` model."""
    if url := os.environ.get("SINKSERVE_E2E_TRITON_URL"):
        yield url
        return
    from service.triton.launcher import TritonServer

    repo = tmp_path_factory.mktemp("model_repo") / "triton_model_repo"
    shutil.copytree(REPO_ROOT / "triton_model_repo", repo)
    config = repo / "sinkserve" / "config.pbtxt"
    text, n = re.subn(
        r'(key: "max_sessions", value: \{ string_value: ")\d+(")',
        rf"\g<1>{E2E_MAX_SESSIONS}\g<2>",
        config.read_text(),
    )
    assert n == 1, f"no max_sessions parameter in {config}"
    config.write_text(text)
    log_path = tmp_path_factory.mktemp("triton") / "triton.log"
    with TritonServer(model_repository=repo, log_path=log_path) as server:
        yield server.grpc_url
