"""Recovery of `sinkserve serve` with its default settings (the CPU model, sinks 4 +
window 1020) from a crash mid-turn: the model's Python-backend process SIGKILLed, then
tritonserver SIGKILLed. For each: how long until the cut turn fails (UNAVAILABLE), until
health says NOT_SERVING, until it says SERVING again, and the next turn of the same
session (its cache rebuilt from the session store first) with its time to first token.

Prints one JSON object and writes bench/results/recovery-cpu-<cores>core.json.
Run: PYTHONPATH=. .venv/bin/python bench/recovery.py
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

from sinkserve.client import ChatClient, sampling
from sinkserve.cluster import Replica, descendant, serving
from sinkserve.triton_server.launcher import default_model_repository

LONG = "Write a long story about a dragon who learns to cook."


async def until(target: str, up: bool, since: float, timeout_s: float = 600) -> float:
    while await serving(target) != up:
        if time.monotonic() - since > timeout_s:
            raise TimeoutError(f"health not {up} after {timeout_s}s")
        await asyncio.sleep(0.05)
    return round(time.monotonic() - since, 2)


async def crash(replica: Replica, process: str) -> dict[str, object]:
    async with ChatClient(replica.target) as client:
        chat = client.conversation(defaults=sampling(max_tokens=64))
        await chat.open()
        await chat.turn("Hello! My name is Ada and I live in Lisbon.")
        turn = chat.send(LONG)
        await turn.__anext__()
        os.kill(descendant(replica, process), signal.SIGKILL)
        killed = time.monotonic()
        not_serving = asyncio.create_task(until(replica.target, False, killed))
        code = "OK"
        try:
            async for _ in turn:
                pass
        except grpc.aio.AioRpcError as err:
            code = err.code().name
        failed_s = round(time.monotonic() - killed, 2)
        chat.drop()
        result: dict[str, object] = {
            "killed": process,
            "cut_turn_status": code,
            "cut_turn_ended_s": failed_s,
            "not_serving_after_s": await not_serving,
            "serving_again_after_s": await until(replica.target, True, killed),
        }
        again = client.conversation(chat.session_id)
        await again.open()
        start = time.monotonic()
        ttft = None
        async for _ in again.send("What is my name?"):
            ttft = ttft or round(time.monotonic() - start, 2)
        assert again.last_turn is not None
        result["next_turn_ttft_s"] = ttft
        result["next_turn_s"] = round(time.monotonic() - start, 2)
        result["next_turn_cache_position"] = again.last_turn.usage.cache_position
        again.drop()
        return result


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="sinkserve-recovery-"))
    replica = Replica(
        "bench", root, f"sqlite://{root / 'sessions.sqlite3'}", default_model_repository()
    )
    replica.start()
    try:
        asyncio.run(until(replica.target, True, time.monotonic()))
        runs = [asyncio.run(crash(replica, name)) for name in ("triton_python", "tritonserver")]
    finally:
        replica.stop()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    result = {
        "what": "sinkserve serve (default settings) recovering from a SIGKILL mid-turn",
        "machine": cpu,
        "cores": os.cpu_count(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "runs": runs,
    }
    out = Path(__file__).parent / "results" / f"recovery-cpu-{os.cpu_count()}core.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
