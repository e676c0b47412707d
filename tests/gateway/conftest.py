"""Helpers of the gateway tests. Their fixtures, `make_gateway` and the real `triton_url`,
are in tests/conftest.py: the OpenAI API's tests (tests/openai_api) share the one Triton.

The model owns every session, and one Triton serves all the tests of a run: sessions
outlive the test (and the gateway) that opened them, so a test counts only its own.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sinkserve.gateway.server import Gateway

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
