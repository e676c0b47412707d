"""Fixtures: a gateway in this event loop, and (for end-to-end tests) a real tritonserver.

The end-to-end fixture starts tritonserver with the real model repository and engine via
`service.triton.launcher.TritonServer`, with a session store of its own in a temp dir.
`SINKSERVE_E2E_TRITON_URL=host:port` points the tests at an already running Triton serving
the real model instead (e.g. a deployed one).

The model owns every session, and one Triton serves all the tests of a run: sessions
outlive the test (and the gateway) that opened them, so a test counts only its own.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gateway.auth import Authenticator
from service.gateway.config import GatewayConfig
from service.gateway.server import Gateway

# carol is the caller of the per-caller session limit test only: her count is its own.
TOKENS = {"alice-token": "alice", "bob-token": "bob", "carol-token": "carol"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


REPO_ROOT = Path(__file__).resolve().parents[2]
# Enough KV slots for the 16-concurrent-sessions test (each needs its own slot to stream).
E2E_MAX_SESSIONS = 16
# Sessions one caller may hold (the model's max_sessions_per_owner): small enough for the
# limit test to reach, and more than alice, who opens most sessions, ever holds at once
# (she ends the sixteen concurrent ones after that test).
E2E_MAX_SESSIONS_PER_OWNER = 40

GatewayFactory = Callable[..., Awaitable[Gateway]]


def target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.port}"


async def wait_serving(address: str, timeout_s: float = 30.0) -> None:
    """Return once the gateway at `address` reports SERVING (its health Watch stream)."""
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
        )
        async for reply in watch:
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                return
    raise AssertionError(f"the gateway at {address} never became SERVING")


async def served(make_gateway: GatewayFactory, triton_url: str, **config: object) -> Gateway:
    """A gateway in front of Triton, once its health says SERVING."""
    gateway = await make_gateway(triton_url=triton_url, **config)
    await wait_serving(target(gateway))
    return gateway


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    """Start gateways on free loopback ports: `await make_gateway(triton_url=..., **config)`;
    `auth` replaces the authenticator of TOKENS."""
    started: list[Gateway] = []

    async def make(auth: Authenticator | None = None, **overrides: Any) -> Gateway:
        settings: dict[str, Any] = {
            "port": 0,
            "metrics_port": 0,
            "health_interval_s": 0.2,
            "shutdown_grace_s": 5.0,
            "drain_delay_s": 0.0,
            "triton_url": f"127.0.0.1:{free_port()}",  # nothing listens there
        }
        settings.update(overrides)
        gateway = Gateway(GatewayConfig(**settings), auth or Authenticator(TOKENS))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop(grace_s=0)


def set_parameter(config_text: str, key: str, value: str) -> str:
    """config.pbtxt text with parameter `key` set to `value` (added when missing)."""
    entry = f'{{ key: "{key}", value: {{ string_value: "{value}" }} }}'
    text, n = re.subn(
        rf'\{{ key: "{key}", value: \{{ string_value: "[^"]*" \}} \}}', entry, config_text
    )
    if n == 0:
        text, n = re.subn(
            r"^parameters \[\n", rf"parameters [\n  {entry},\n", config_text, flags=re.M
        )
    assert n == 1, f"one parameters block with at most one {key!r} in config.pbtxt"
    return text


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
    text = set_parameter(config.read_text(), "max_sessions", str(E2E_MAX_SESSIONS))
    text = set_parameter(text, "max_sessions_per_owner", str(E2E_MAX_SESSIONS_PER_OWNER))
    config.write_text(text)
    state = tmp_path_factory.mktemp("triton")
    store = f"sqlite://{state / 'sessions.sqlite3'}"  # sqlite:// + an absolute path
    with TritonServer(
        model_repository=repo, log_path=state / "triton.log", session_store=store
    ) as server:
        yield server.grpc_url
