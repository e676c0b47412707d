"""End to end: Python clients -> gateway -> real tritonserver -> real engine, all on loopback."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import ChatClient, sampling
from service.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from service.gateway.server import Gateway
from tests.gateway.conftest import GatewayFactory

SHORT = sampling(max_tokens=8)
LONG = sampling(max_tokens=400, temperature=0.8, seed=1)


def target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.port}"


async def served(make_gateway: GatewayFactory, triton_url: str, **config: object) -> Gateway:
    """A gateway in front of Triton, once its health says SERVING."""
    gateway = await make_gateway(triton_url=triton_url, **config)
    async with grpc.aio.insecure_channel(target(gateway)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return gateway
            await asyncio.sleep(0.1)
    raise AssertionError("gateway never became SERVING with Triton up")


async def test_three_turns_then_a_resumed_stream_continue_the_same_cache(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        positions = []
        async with alice.conversation(system_prompt="You are terse.", defaults=SHORT) as chat:
            assert chat.sinks > 0 and chat.window > 0 and not chat.resumed
            for question in ("What is the capital of France?", "And of Italy?", "Thanks!"):
                text, end = await chat.turn(question)
                assert text and end.finish_reason in (
                    pb.FINISH_REASON_STOP,
                    pb.FINISH_REASON_LENGTH,
                )
                assert end.usage.generated_tokens >= 1 and end.usage.prompt_tokens >= 1
                positions.append(end.usage.cache_position)
            session_id = chat.session_id
        assert positions == sorted(positions) and len(set(positions)) == 3
        async with alice.conversation(session_id, defaults=SHORT) as again:
            assert again.resumed and again.cache_position == positions[-1]
            _, end = await again.turn("One more.")
            assert end.usage.cache_position > positions[-1]
        info = await alice.get_session(session_id)
        assert info.turns == 4 and info.cache_position == end.usage.cache_position


async def test_sixteen_sessions_all_stream_their_first_token_before_any_finishes(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    first_token: list[float] = []
    finished: list[float] = []

    async def one(i: int) -> None:
        async with ChatClient(target(gw), "alice-token") as client:
            params = sampling(max_tokens=48, temperature=0.0)
            async with client.conversation(defaults=params) as chat:
                seen = False
                async for _delta in chat.send(f"Count from {i} upwards, one number per line."):
                    if not seen:
                        first_token.append(time.monotonic())
                        seen = True
                finished.append(time.monotonic())

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 300)
    assert len(first_token) == 16 and len(finished) == 16
    assert max(first_token) < min(finished)


async def test_a_second_turn_while_one_runs_is_failed_precondition(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=LONG)
        await chat.open()
        turn = chat.send("Tell me a long story.")
        await anext(turn)
        await chat.write(pb.ChatRequest(turn=pb.UserTurn(text="And another?")))
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            async for _ in turn:
                pass
        assert excinfo.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "already running" in (excinfo.value.details() or "")


async def test_a_turn_from_another_stream_of_a_busy_session_is_failed_precondition(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        first = alice.conversation(defaults=LONG)
        await first.open()
        running = first.send("Tell me a long story.")
        await anext(running)
        second = alice.conversation(first.session_id)
        await second.open()
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await second.turn("Me too")
        assert excinfo.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        await first.cancel()
        async for _ in running:
            pass
        assert first.last_turn is not None
        assert first.last_turn.finish_reason == pb.FINISH_REASON_CANCELLED


async def test_cancel_ends_the_turn_but_keeps_the_session(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with (
        ChatClient(target(gw), "alice-token") as alice,
        alice.conversation(defaults=LONG) as chat,
    ):
        turn = chat.send("Tell me a long story.")
        await anext(turn)
        await chat.cancel()
        async for _ in turn:
            pass
        assert chat.last_turn is not None
        assert chat.last_turn.finish_reason == pb.FINISH_REASON_CANCELLED
        _, end = await chat.turn("Short answer: 2+2?", params=SHORT)
        assert end.usage.generated_tokens >= 1


async def test_a_dropped_stream_frees_the_turn_for_the_next_one(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=LONG)
        await chat.open()
        turn = chat.send("Tell me a long story.")
        await anext(turn)
        chat.drop()  # the client goes away mid-turn
        with pytest.raises(asyncio.CancelledError):
            await anext(turn)
        assert await chat.code() is grpc.StatusCode.CANCELLED
        for _ in range(50):  # the gateway notices the drop asynchronously
            if not (await alice.get_session(chat.session_id)).turn_running:
                break
            await asyncio.sleep(0.1)
        async with alice.conversation(chat.session_id, defaults=SHORT) as again:
            _, end = await again.turn("Are you still there?")
            assert end.usage.generated_tokens >= 1


async def test_a_deadline_mid_turn_is_deadline_exceeded_and_frees_the_turn(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=LONG, timeout=1.5)
        await chat.open()
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await chat.turn("Tell me a long story.")
        assert excinfo.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.5)
        async with alice.conversation(chat.session_id, defaults=SHORT) as again:
            _, end = await again.turn("Hello?")
            assert end.usage.generated_tokens >= 1


async def test_bad_sampling_rejected_by_the_model_is_invalid_argument(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation()
        await chat.open()
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await chat.turn("Hi", params=sampling(max_tokens=4, temperature=1000.0))
        assert excinfo.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "temperature" in (excinfo.value.details() or "")


async def test_ending_a_session_frees_it_on_the_model(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=SHORT)
        await chat.open()
        await chat.turn("Hello")
        await chat.end()
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await alice.get_session(chat.session_id)
        assert excinfo.value.code() is grpc.StatusCode.NOT_FOUND


async def test_shutdown_lets_the_running_turn_finish_then_closes_the_stream(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=sampling(max_tokens=24))
        await chat.open()
        turn = chat.send("Count to twenty.")
        await anext(turn)
        stopping = asyncio.create_task(gw.stop(grace_s=60))
        async for _ in turn:
            pass
        assert chat.last_turn is not None
        assert chat.last_turn.finish_reason != pb.FINISH_REASON_CANCELLED
        # Then the gateway ends the stream with UNAVAILABLE, telling the client to resume
        # the session elsewhere. (A write racing that end may fail locally instead.)
        assert await chat.code() is grpc.StatusCode.UNAVAILABLE
        await stopping


async def test_health_is_serving_while_triton_is_ready(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="sinkserve.v1.ChatService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
