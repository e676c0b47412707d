"""Fixtures of the OpenAI API's tests: a gateway with its HTTP API on a free port in front
of the real Triton (tests/conftest.py), and the official `openai` SDK's async client of it.

The gateway runs in the test's event loop, so clients here are asynchronous (the SDK's
AsyncOpenAI, aiohttp, subprocesses). The SDK's retries are off: a test sees every answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from openai import AsyncOpenAI

from sinkserve.gateway.server import Gateway
from tests.gateway.conftest import GatewayFactory, served

MODEL = "sinkserve"


def base_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.http_port}/v1"


def sdk(gateway: Gateway, token: str = "alice-token") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url(gateway), api_key=token, max_retries=0)


@pytest.fixture
async def api(make_gateway: GatewayFactory, triton_url: str) -> Gateway:
    """A gateway serving the OpenAI API (and gRPC) in front of the real Triton."""
    return await served(make_gateway, triton_url, http_port=0)


@pytest.fixture
async def client(api: Gateway) -> AsyncIterator[AsyncOpenAI]:
    async with sdk(api) as openai:
        yield openai
