from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

# Triton kernels (the CUDA path) run in Triton's interpreter on CPU tensors here: CI has no
# GPU. The variable is read when a kernel module is first imported, so it is set before
# any test module imports one. GPU results come from bench/gpu.py (bench/results/).
os.environ.setdefault("TRITON_INTERPRET", "1")

from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.weights import default_model_path
from sinkserve.gateway.auth import Authenticator
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.server import Gateway
from sinkserve.redis_server import INSTALL_HINT, RedisServer
from tests.gateway.conftest import (
    E2E_MAX_SESSIONS,
    E2E_MAX_SESSIONS_PER_OWNER,
    REPO_ROOT,
    TOKENS,
    GatewayFactory,
    free_port,
    set_parameter,
)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The default model's tokenizer (SmolLM2, from its GGUF)."""
    return Tokenizer.load(default_model_path())


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (service/sinkserve/redis_server.py) on a free port, stopped at teardown.
    Fails, never skips, where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = RedisServer(directory=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


# A gateway in this event loop, and (for end-to-end tests) a real tritonserver: shared by
# tests/gateway and tests/openai_api, so one run starts one Triton. The end-to-end fixture
# starts tritonserver with the real model repository and engine via
# `sinkserve.triton_server.launcher.TritonServer`, with a session store of its own in a temp dir.
# `SINKSERVE_E2E_TRITON_URL=host:port` points the tests at an already running Triton
# serving the real model instead (e.g. a deployed one).


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


@pytest.fixture(scope="session")
def triton_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """gRPC address of a real tritonserver serving the real `sinkserve` model."""
    if url := os.environ.get("SINKSERVE_E2E_TRITON_URL"):
        yield url
        return
    from sinkserve.triton_server.launcher import TritonServer

    repo = tmp_path_factory.mktemp("model_repo") / "triton_model_repo"
    shutil.copytree(REPO_ROOT / "triton_model_repo", repo)
    config = repo / "sinkserve" / "config.pbtxt"
    text = set_parameter(config.read_text(), "max_sessions", str(E2E_MAX_SESSIONS))
    text = set_parameter(text, "max_sessions_per_owner", str(E2E_MAX_SESSIONS_PER_OWNER))
    text = set_parameter(text, "sampling", "greedy")  # the tests compare replies
    config.write_text(text)
    state = tmp_path_factory.mktemp("triton")
    store = f"sqlite://{state / 'sessions.sqlite3'}"  # sqlite:// + an absolute path
    with TritonServer(
        model_repository=repo, log_path=state / "triton.log", session_store=store
    ) as server:
        yield server.grpc_url
