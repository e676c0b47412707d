"""Crashes survived, with real processes: the model's Python-backend process, tritonserver,
the gateway and the whole `sinkserve serve` are killed or restarted under a conversation.
Each turn that a crash cuts ends with UNAVAILABLE within seconds, health tells the truth
while the stack repairs itself, and every session continues from its last completed turn.

Slow (about three minutes on 2 cores): every recovery loads the model again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from sinkserve.client import ChatClient, sampling
from sinkserve.cluster import Replica, descendant, running
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.triton_server.launcher import free_port
from tests.faults.stack import gateway, stack, wait_health

QUESTIONS = ["What is the capital of France?", "And of Germany?"]
LONG = "Write a long story about a dragon who learns to cook."
GREEDY = sampling(max_tokens=24)
READY_S = 300  # a cold model load on a busy 2-core machine


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    root = tmp_path_factory.mktemp("stack")
    replica = stack(root, store=f"sqlite://{root / 'sessions.sqlite3'}")
    replica.start()
    asyncio.run(wait_health(replica.target, True, READY_S))
    yield replica
    replica.stop()
    print(f"sinkserve serve log: {root / 'stack.log'}")


@pytest.fixture
async def alice(serve: Replica) -> AsyncIterator[ChatClient]:
    async with ChatClient(serve.target, "alice-token") as client:
        yield client


async def ask(
    client: ChatClient, session_id: str | None, texts: list[str]
) -> tuple[str, list[tuple[list[int], pb.TurnEnd]]]:
    """Turns on a stream of a new or resumed session: (session id, [(token ids, TurnEnd)])."""
    async with client.conversation(session_id, defaults=GREEDY) as chat:
        out = []
        for text in texts:
            ids = [i async for d in chat.send(text) for i in d.token_ids]
            assert chat.last_turn is not None
            out.append((ids, chat.last_turn))
        return chat.session_id, out


async def cut_by(
    kill: Callable[[], object], client: ChatClient, sid: str
) -> tuple[grpc.StatusCode, str, float, float]:
    """Start a long turn on the session, kill once its first delta arrived; the turn's
    status, details, the seconds from the kill to the stream's end, and the kill's time."""
    chat = client.conversation(sid, defaults=GREEDY)
    await chat.open()
    try:
        turn = chat.send(LONG, params=sampling(max_tokens=64))
        await turn.__anext__()
        kill()
        killed = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            async for _ in turn:
                pass
        ended = time.monotonic() - killed
        return failed.value.code(), failed.value.details() or "", ended, killed
    finally:
        chat.drop()


async def crash_mid_turn(serve: Replica, alice: ChatClient, kill: Callable[[], object]) -> float:
    """The acceptance of a crash below the gateway; returns the recovery seconds."""
    _, reference = await ask(alice, None, QUESTIONS)
    sid, first = await ask(alice, None, QUESTIONS[:1])
    assert first[0][0] == reference[0][0]
    watch = asyncio.create_task(wait_health(serve.target, False, 30))
    code, details, seconds, killed = await cut_by(kill, alice, sid)
    assert code is grpc.StatusCode.UNAVAILABLE, details
    assert seconds < 5, seconds
    assert await watch - killed < 2  # health NOT_SERVING within 2 s of the kill
    recovery = await wait_health(serve.target, True, READY_S) - killed
    # The cut turn never happened: the session continues from its first turn, exactly.
    _, second = await ask(alice, sid, QUESTIONS[1:])
    assert second[0][0] == reference[1][0]
    assert second[0][1].usage.cache_position == reference[1][1].usage.cache_position
    print(f"recovered in {recovery:.1f} s")
    return recovery


async def test_a_killed_model_process_fails_its_turn_fast_and_the_session_continues(
    serve: Replica, alice: ChatClient
) -> None:
    stub = descendant(serve, "triton_python")
    await crash_mid_turn(serve, alice, lambda: os.kill(stub, signal.SIGKILL))


async def test_a_killed_tritonserver_fails_its_turn_fast_and_the_session_continues(
    serve: Replica, alice: ChatClient
) -> None:
    server = descendant(serve, "tritonserver")
    orphan = descendant(serve, "triton_python")
    await crash_mid_turn(serve, alice, lambda: os.kill(server, signal.SIGKILL))
    # The killed server's model process (orphaned, holding a whole engine) ended itself.
    assert not running(orphan)


async def test_a_killed_gateway_is_replaced_and_its_sessions_resume_with_their_owner(
    serve: Replica, tmp_path: Path
) -> None:
    port = free_port()
    triton_url = f"127.0.0.1:{serve.triton_grpc}"
    target = f"127.0.0.1:{port}"
    first = gateway(tmp_path, "gateway", port, triton_url)
    first.start()
    await wait_health(target, True, 60)
    async with ChatClient(target, "alice-token") as alice:
        sid, before = await ask(alice, None, QUESTIONS[:1])
        code, _, seconds, _ = await cut_by(lambda: first.stop(signal.SIGKILL), alice, sid)
    assert code is grpc.StatusCode.UNAVAILABLE and seconds < 5
    second = gateway(tmp_path, "gateway2", port, triton_url)
    second.start()
    try:
        await wait_health(target, True, 60)
        async with ChatClient(target, "alice-token") as alice:
            _, after = await ask(alice, sid, QUESTIONS[1:])
        # The cut turn was cancelled on the model when its stream broke; what it had fed
        # stays in the session, which goes on after it.
        assert after[0][1].usage.cache_position > before[0][1].usage.cache_position
        async with ChatClient(target, "bob-token") as bob:
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await bob.get_session(sid)
            assert denied.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        second.stop()


async def test_the_whole_stack_restarted_resumes_every_session_by_id(
    serve: Replica, alice: ChatClient
) -> None:
    sessions = [await ask(alice, None, QUESTIONS[:1]) for _ in range(3)]
    assert serve.stop() == 0
    serve.start()
    await wait_health(serve.target, True, READY_S)
    async with ChatClient(serve.target, "alice-token") as client:
        listed = {s.session_id for s in await client.list_sessions()}
        for sid, first in sessions:
            assert sid in listed
            resumed, after = await ask(client, sid, QUESTIONS[1:])
            assert resumed == sid
            position = first[0][1].usage.cache_position
            assert after[0][1].usage.cache_position > position
