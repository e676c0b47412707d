from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

# Triton kernels (the CUDA path) run in Triton's interpreter on CPU tensors here: CI has no
# GPU. The variable is read when a kernel module is first imported, so it is set before
# any test module imports one. GPU results come from bench/gpu.py (bench/results/).
os.environ.setdefault("TRITON_INTERPRET", "1")

from service.engine.tokenizer import Tokenizer
from service.engine.weights import default_model_path
from service.redis_server import INSTALL_HINT, RedisServer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The default model's tokenizer (SmolLM2, from its GGUF)."""
    return Tokenizer.load(default_model_path())


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server (service/redis_server.py) on a free port, stopped at teardown.
    Fails, never skips, where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    server = RedisServer(directory=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
