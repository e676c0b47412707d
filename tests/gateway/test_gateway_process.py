"""The gateway as a process (`sinkserve gateway`): SIGTERM lets the turn finish."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import pytest

from sinkserve.client import ChatClient, sampling
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from tests.gateway.conftest import REPO_ROOT, free_port, wait_serving


async def test_sigterm_lets_the_running_turn_finish_then_exits_cleanly(triton_url: str) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sinkserve.cli", "--log-json", "gateway",
        "--port", str(port), "--metrics-port", "-1",
        "--triton-url", triton_url, "--no-auth", "--health-interval-s", "0.2",
        cwd=REPO_ROOT, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_serving(f"127.0.0.1:{port}")
        async with ChatClient(f"127.0.0.1:{port}") as client:
            chat = client.conversation(defaults=sampling(max_tokens=24))
            await chat.open()
            turn = chat.send("Count to twenty.")
            await anext(turn)
            proc.send_signal(signal.SIGTERM)
            async for _ in turn:
                pass
            assert chat.last_turn is not None
            assert chat.last_turn.finish_reason != pb.FINISH_REASON_CANCELLED
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    logs = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert '"event": "gateway stopped"' in logs


@pytest.mark.parametrize("flag", ["--http-port", "--metrics-port", "--port"])
async def test_a_port_already_taken_is_a_clear_error_not_a_traceback(flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = {"--port": free_port(), "--metrics-port": -1, "--http-port": -1}
        ports[flag] = busy
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sinkserve.cli", "gateway",
            *(str(a) for kv in ports.items() for a in kv),
            "--triton-url", f"127.0.0.1:{free_port()}", "--no-auth",
            cwd=REPO_ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 2, text
    assert f"127.0.0.1:{busy}" in text and "cannot listen" in text, text
    assert "Traceback" not in text, text
