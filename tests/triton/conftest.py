"""A real tritonserver on 127.0.0.1 (free ports) serving the real engine on the default
SmolLM2 GGUF with a small window, and a small tritonclient.grpc.aio helper."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import np_to_triton_dtype

from sinkserve.triton_server.launcher import TritonServer, default_model_repository

MODEL = "sinkserve"
# Small enough for CPU; the window rolls within a few turns.
TEST_PARAMETERS = {
    "sinks": "4",
    "window": "60",
    "max_sessions": "4",
    "max_host_sessions": "28",
    "step_token_budget": "64",
    "max_new_tokens": "64",
    "slot_wait_s": "5",
    "max_sessions_per_owner": "12",
    # One turn alone sends a delta at most every 0.2 s: several tokens each (StreamPacer).
    "stream_responses_per_s": "5",
    # The tests compare replies with known ones and with each other: greedy, no penalty.
    "sampling": "greedy",
}


def write_parameters(config: Path, values: dict[str, str]) -> None:
    """Replace the `parameters [...]` block of a config.pbtxt."""
    text = config.read_text()
    entries = ",\n".join(
        f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }}' for k, v in values.items()
    )
    block = f"parameters [\n{entries}\n]\n"
    new, n = re.subn(r"^parameters \[.*?^\]\n", block, text, flags=re.S | re.M)
    assert n == 1, "config.pbtxt has one parameters block"
    config.write_text(new)


@dataclass
class Reply:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    responses: int = 0
    final: dict[str, Any] = field(default_factory=dict)  # outputs of the last response
    error: str = ""

    @property
    def usage(self) -> dict[str, int]:
        keys = ("prompt_tokens", "generated_tokens", "cache_position", "cached_tokens")
        return {k: int(self.final[k][0]) for k in (*keys, "evicted_tokens")}


def _tensor(name: str, value: Any) -> grpcclient.InferInput:
    arr: npt.NDArray[np.generic]
    if isinstance(value, str):
        arr = np.array([value.encode()], dtype=np.object_)
    elif isinstance(value, list):
        arr = np.array([v.encode() for v in value], dtype=np.object_)
    elif isinstance(value, bool):
        arr = np.array([value], dtype=np.bool_)
    elif isinstance(value, float):
        arr = np.array([value], dtype=np.float32)
    else:
        arr = np.array([value], dtype=np.int32)
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


class Client:
    """One gRPC stream per request; responses are collected until the stream ends."""

    def __init__(self, server: TritonServer):
        self.server = server
        self.grpc = grpcclient.InferenceServerClient(server.grpc_url)

    def stream(self, **inputs: Any) -> Any:
        tensors = [_tensor(k, v) for k, v in inputs.items()]

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": MODEL, "inputs": tensors}

        return self.grpc.stream_infer(requests())

    async def turn(
        self,
        session_id: str,
        text: str,
        timeout_s: float = 120,
        started: asyncio.Event | None = None,  # set at the first response
        **inputs: Any,
    ) -> Reply:
        reply = Reply()

        async def collect() -> None:
            async for result, error in self.stream(
                session_id=session_id, text_input=text, **inputs
            ):
                reply.responses += 1
                if started is not None:
                    started.set()
                if error is not None:
                    reply.error = str(error)
                    continue
                outputs = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
                reply.text += b"".join(outputs["text_output"]).decode()
                reply.ids += outputs["output_ids"].tolist()
                if "finish_reason" in outputs:
                    reply.final = outputs

        await asyncio.wait_for(collect(), timeout_s)
        return reply

    async def call(self, action: str, session_id: str = "", **inputs: Any) -> Any:
        """A session call: its `session_info` answer (JSON), or the error text."""
        if session_id:
            inputs["session_id"] = session_id
        tensors = [_tensor(k, v) for k, v in {"request_type": action, **inputs}.items()]

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": MODEL, "inputs": tensors}

        async for result, error in self.grpc.stream_infer(requests()):
            if error is not None:
                return str(error)
            return json.loads(result.as_numpy("session_info")[0])
        raise AssertionError("no response")

    async def open(self, session_id: str, **inputs: Any) -> Any:
        info = await self.call("open", session_id, **inputs)
        assert isinstance(info, dict), info
        return info

    async def reload(self) -> None:
        """Make Triton reload the model (it reloads only when files changed)."""
        model_py = Path(self.server.model_repository) / MODEL / "1" / "model.py"
        model_py.touch()
        await self.grpc.load_model(MODEL)

    async def close(self) -> None:
        await self.grpc.close()


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("model_repo")
    shutil.copytree(default_model_repository() / MODEL, repo / MODEL)
    write_parameters(repo / MODEL / "config.pbtxt", TEST_PARAMETERS)
    log = repo.parent / "tritonserver.log"
    store = f"sqlite://{repo.parent / 'sessions.sqlite3'}"
    with TritonServer(
        model_repository=repo, log_path=log, ready_timeout_s=240, session_store=store
    ) as server:
        yield server
    print(f"tritonserver log: {log}")


@pytest.fixture
async def client(triton: TritonServer) -> AsyncIterator[Client]:
    c = Client(triton)
    yield c
    await c.close()
