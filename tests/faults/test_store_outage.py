"""Redis stopped under a conversation served by the whole stack (`sinkserve serve` with a
Redis session store): turns go on from the cache in memory, a log line and a metric say
that records are not being written, and once Redis is back the latest record is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from sinkserve.client import ChatClient, sampling
from sinkserve.engine.store import RedisStore
from sinkserve.redis_server import RedisServer
from tests.faults.stack import metric, stack, wait_health

READY_S = 300


async def until(ok: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


def logged(path: Path, event: str) -> bool:
    """Whether a log line of the stack (JSON or console format) names `event`."""
    return any(event in line for line in path.read_text(errors="replace").splitlines())


async def test_turns_go_on_while_redis_is_down_and_the_latest_record_is_written_when_it_is_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    serve = stack(tmp_path, store=redis_server.url)
    serve.start()
    try:
        await wait_health(serve.target, True, READY_S)
        async with (
            ChatClient(serve.target, "alice-token") as alice,
            alice.conversation(defaults=sampling(max_tokens=16)) as chat,
        ):
            await chat.turn("What is the capital of France?")
            redis_server.stop()
            _, end = await chat.turn("And of Germany?")  # from the cache in memory
            await until(lambda: metric(serve, "sinkserve_store_up") == 0)
            assert (metric(serve, "sinkserve_store_pending_records") or 0) >= 1
            assert logged(serve.workdir / "stack.log", "session store unavailable")
            redis_server.start()
            await until(lambda: metric(serve, "sinkserve_store_up") == 1)
            assert logged(serve.workdir / "stack.log", "session store available again")
            record = RedisStore(redis_server.url).get(chat.session_id, now=time.time())
            assert record is not None and record.position == end.usage.cache_position
            text, _ = await chat.turn("And of Italy?")
            assert text
        assert (await wait_health(serve.target, True, 1)) > 0  # serving throughout
    finally:
        assert serve.stop() == 0
