"""Bounded work on a Chat stream, through a real gateway and a real Triton: pipelined
turns, per-caller quotas with retry hints, prompts longer than the cache, and a client
that stops reading."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from sinkserve.client import ChatClient, sampling
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from tests.gateway.conftest import GatewayFactory, served, target
from tests.waits import until

ALICE = (("authorization", "Bearer alice-token"),)
SHORT = sampling(max_tokens=4)
LONG = sampling(max_tokens=400, temperature=0.8, seed=1)


def turn(text: str, params: pb.SamplingParams = SHORT) -> pb.ChatRequest:
    return pb.ChatRequest(turn=pb.UserTurn(text=text, sampling=params))


async def read_turn(call: grpc.aio.StreamStreamCall) -> tuple[str, pb.TurnEnd]:
    """The text of the next turn's deltas, and its TurnEnd."""
    text = ""
    while True:
        reply = await call.read()
        assert reply is not grpc.aio.EOF, "the stream ended mid-turn"
        if reply.HasField("turn_end"):
            return text, reply.turn_end
        text += reply.delta.text


async def opened(call: grpc.aio.StreamStreamCall) -> str:
    await call.write(pb.ChatRequest(open=pb.OpenSession()))
    reply = await call.read()
    assert reply.HasField("session_opened")
    return str(reply.session_opened.session_id)


async def until_idle(client: ChatClient, session_id: str) -> None:
    """Wait for the model to report no turn running on the session."""
    await until(
        f"session {session_id} to report no turn running",
        lambda: client.get_session(session_id),
        lambda info: not info.turn_running,
    )


async def test_turns_written_up_front_run_in_order_each_with_its_own_turn_end(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(metadata=ALICE, timeout=120)
        await opened(call)
        for text in ("One.", "Two.", "Three."):  # all before the first TurnEnd
            await call.write(turn(text))
        await call.done_writing()
        ends = [(await read_turn(call))[1] for _ in range(3)]
        assert await call.read() is grpc.aio.EOF
        assert await call.code() is grpc.StatusCode.OK
    positions = [e.usage.cache_position for e in ends]
    assert positions == sorted(positions) and len(set(positions)) == 3
    assert all(e.usage.prompt_tokens > 0 and e.usage.generated_tokens > 0 for e in ends)


async def test_cancel_ends_only_the_running_turn_and_the_queued_one_runs(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(metadata=ALICE, timeout=120)
        await opened(call)
        await call.write(turn("Tell me a long story.", LONG))
        await call.write(turn("Thanks."))
        first = await call.read()
        assert first.HasField("delta")  # the long turn is running; the short one waits
        await call.write(pb.ChatRequest(cancel=pb.CancelTurn()))
        _, cancelled = await read_turn(call)
        _, answered = await read_turn(call)
        await call.done_writing()
        assert await call.code() is grpc.StatusCode.OK
    assert cancelled.finish_reason == pb.FINISH_REASON_CANCELLED
    assert answered.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert answered.usage.cache_position > cancelled.usage.cache_position


async def test_more_queued_turns_than_the_limit_is_resource_exhausted_with_a_retry_hint(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url, max_queued_turns=2)
    async with (
        grpc.aio.insecure_channel(target(gw)) as channel,
        ChatClient(target(gw), "alice-token") as alice,
    ):
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(metadata=ALICE, timeout=120)
        sid = await opened(call)
        for n in range(4):  # one runs, two wait, the fourth is one too many
            await call.write(turn(f"Turn {n}.", LONG))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            while True:
                await call.read()
        await until_idle(alice, sid)  # the running turn was cut with the stream
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 turns already wait" in (refused.value.details() or "")
    assert int(dict(refused.value.trailing_metadata() or ())["retry-after-ms"]) > 0


async def test_a_caller_past_its_concurrent_turns_is_resource_exhausted_with_a_retry_hint(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url, max_turns_per_caller=1)
    async with ChatClient(target(gw), "alice-token") as alice:
        first = alice.conversation(defaults=LONG)
        await first.open()
        running = first.send("Tell me a long story.")
        await anext(running)
        second = alice.conversation(defaults=SHORT)
        await second.open()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await second.turn("Me too.")
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 1 running turns" in (refused.value.details() or "")
        assert int(dict(refused.value.trailing_metadata() or ())["retry-after-ms"]) > 0
        await first.cancel()
        async for _ in running:
            pass
        # The running turn's end gave the caller's place back.
        async with alice.conversation(defaults=SHORT) as third:
            _, end = await third.turn("Now?")
            assert end.usage.generated_tokens >= 1
        await first.end()


async def test_a_caller_past_its_tokens_per_minute_waits_for_the_hint(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    per_minute = 20  # a bucket of 20 tokens, refilled at one every 3 s
    gw = await served(make_gateway, triton_url, tokens_per_minute_per_caller=per_minute)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=SHORT)
        await chat.open()
        _, end = await chat.turn("Hello there, how are you today?")  # never cut mid-turn
        spent = end.usage.prompt_tokens + end.usage.generated_tokens
        assert spent > per_minute
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat.turn("Again?")
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{per_minute} tokens per minute" in (refused.value.details() or "")
        wait_ms = int(dict(refused.value.trailing_metadata() or ())["retry-after-ms"])
        # Until the bucket is above zero again: the overspent tokens plus one, at the rate
        # (less what refilled between the turn's end and the refusal).
        due_ms = (spent - per_minute + 1) * 3000
        assert due_ms - 3000 < wait_ms <= due_ms


async def test_a_system_prompt_or_turn_longer_than_the_cache_is_invalid_argument(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    long_text = "Lisbon is a lovely city by the sea. " * 400  # ~3,600 tokens, chars < limit
    async with ChatClient(target(gw), "alice-token") as alice:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await alice.create_session(system_prompt=long_text)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "system prompt is" in (refused.value.details() or "")
        chat = alice.conversation(defaults=SHORT)
        await chat.open()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat.turn(long_text)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "the limit is 1020 tokens" in (refused.value.details() or "")
        session = await alice.get_session(chat.session_id)
        assert session.turns == 0 and not session.turn_running
        huge = "x" * 100_000  # beyond the gateway's character limit: refused unread
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await alice.create_session(system_prompt=huge)
        assert "characters" in (refused.value.details() or "")


async def test_a_client_that_reads_nothing_loses_its_turn_after_the_stall_limit(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url, stall_timeout_s=1.0, turn_buffer=4)
    # A small receive window, so that unread responses fill it within a few tokens.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    async with (
        grpc.aio.insecure_channel(target(gw), options=options) as channel,
        ChatClient(target(gw), "alice-token") as alice,
    ):
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(metadata=ALICE, timeout=300)
        sid = await opened(call)
        await call.write(turn("Tell me a very long story.", sampling(max_tokens=4096)))
        await until_idle_after_start(alice, sid)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            while True:  # what the client had buffered, then the status
                reply = await asyncio.wait_for(call.read(), 30)
                assert reply.HasField("delta"), reply
        session = await alice.get_session(sid)
    assert cut.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "read no response for 1s" in (cut.value.details() or "")
    assert session.turns == 1 and session.cache_position < 1024  # cut long before 4096


async def until_idle_after_start(client: ChatClient, session_id: str) -> None:
    """Wait for the session's turn to start, then for the model to report it ended."""
    await until(
        f"session {session_id} to report a turn",
        lambda: client.get_session(session_id),
        lambda info: info.turns > 0,
    )
    await until_idle(client, session_id)
