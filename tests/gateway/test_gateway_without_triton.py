"""The gateway's own checks, against a real gateway whose Triton is down (nothing listens)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.client import ChatClient
from service.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from service.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from tests.gateway.conftest import GatewayFactory


def target(gateway: object) -> str:
    return f"127.0.0.1:{gateway.port}"  # type: ignore[attr-defined]


async def code_of(awaitable: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await awaitable  # type: ignore[misc]
    return excinfo.value.code(), excinfo.value.details() or ""


async def test_a_call_without_a_valid_token_is_unauthenticated(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    for token in (None, "wrong"):
        async with ChatClient(target(gw), token) as client:
            code, details = await code_of(client.create_session())
            assert code is grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in details
            code, _ = await code_of(client.conversation().open())
            assert code is grpc.StatusCode.UNAUTHENTICATED


async def test_sessions_are_created_listed_got_and_deleted_by_their_owner(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with ChatClient(target(gw), "alice-token") as alice:
        made = [await alice.create_session(f"sys {i}") for i in range(3)]
        assert all(s.owner == "alice" for s in made)
        listed = await alice.list_sessions()
        assert [s.session_id for s in listed] == [s.session_id for s in made]
        got = await alice.get_session(made[0].session_id)
        assert got.turns == 0 and not got.turn_running
        assert got.expire_time.seconds > got.create_time.seconds
        await alice.delete_session(made[0].session_id)
        code, _ = await code_of(alice.get_session(made[0].session_id))
        assert code is grpc.StatusCode.NOT_FOUND


async def test_listing_pages_through_the_callers_sessions(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        md = (("authorization", "Bearer alice-token"),)
        for _ in range(5):
            await stub.CreateSession(pb.CreateSessionRequest(), metadata=md)
        page = await stub.ListSessions(pb.ListSessionsRequest(page_size=2), metadata=md)
        seen = list(page.sessions)
        while page.next_page_token:
            req = pb.ListSessionsRequest(page_size=2, page_token=page.next_page_token)
            page = await stub.ListSessions(req, metadata=md)
            seen.extend(page.sessions)
        assert len({s.session_id for s in seen}) == 5


async def test_another_callers_session_is_permission_denied(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with (
        ChatClient(target(gw), "alice-token") as alice,
        ChatClient(target(gw), "bob-token") as bob,
    ):
        session = await alice.create_session()
        code, details = await code_of(bob.get_session(session.session_id))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert "another caller" in details
        code, _ = await code_of(bob.conversation(session.session_id).open())
        assert code is grpc.StatusCode.PERMISSION_DENIED
        code, _ = await code_of(bob.delete_session(session.session_id))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert await bob.list_sessions() == []


async def test_resuming_an_unknown_session_is_not_found(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with ChatClient(target(gw), "alice-token") as alice:
        code, details = await code_of(alice.conversation("no-such-session").open())
        assert code is grpc.StatusCode.NOT_FOUND
        assert "no-such-session" in details


async def test_a_stream_that_does_not_start_with_open_or_resume_is_invalid(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.Chat(metadata=(("authorization", "Bearer alice-token"),))
        await call.write(pb.ChatRequest(turn=pb.UserTurn(text="hi")))
        code, details = await code_of(call.read())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "first request must be open or resume" in details


async def test_an_empty_turn_or_bad_sampling_is_invalid_argument(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(max_tokens_limit=100, default_max_tokens=16)
    async with ChatClient(target(gw), "alice-token") as alice:
        bad_turns = [
            ("", None, "empty"),
            ("hi", pb.SamplingParams(max_tokens=101), "max_tokens=101"),
            ("hi", pb.SamplingParams(top_p=0.0), "top_p"),
            ("hi", pb.SamplingParams(temperature=-1), "temperature"),
        ]
        for text, params, detail in bad_turns:
            chat = alice.conversation()
            await chat.open()
            code, details = await code_of(chat.turn(text, params=params))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert detail in details


async def test_the_per_caller_session_limit_is_resource_exhausted(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway(max_sessions_per_caller=2)
    async with ChatClient(target(gw), "alice-token") as alice:
        await alice.create_session()
        await alice.create_session()
        code, details = await code_of(alice.create_session())
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per-caller limit" in details
        code, _ = await code_of(alice.conversation().open())
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_turn_while_triton_is_down_is_unavailable(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation()
        await chat.open()
        code, details = await code_of(chat.turn("Hello"))
        assert code is grpc.StatusCode.UNAVAILABLE
        assert "Triton" in details


async def test_an_idle_stream_past_its_deadline_is_deadline_exceeded(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.Chat(metadata=(("authorization", "Bearer alice-token"),), timeout=0.5)
        await call.write(pb.ChatRequest(open=pb.OpenSession()))
        assert (await call.read()).HasField("session_opened")
        # Nothing more is sent and the stream stays open: the deadline ends it.
        code, _ = await code_of(call.read())
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_health_is_not_serving_while_triton_is_down(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sinkserve.v1.ChatService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_the_chat_service_without_a_token(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="sinkserve.v1.ChatService"
            ),
        ]
        replies = [r async for r in stub.ServerReflectionInfo(iter(requests))]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"sinkserve.v1.ChatService", "grpc.health.v1.Health"} <= names
        assert replies[1].file_descriptor_response.file_descriptor_proto


async def test_metrics_are_served_on_the_metrics_port(make_gateway: GatewayFactory) -> None:
    import urllib.request

    gw = await make_gateway()
    async with ChatClient(target(gw), None) as anonymous:
        await code_of(anonymous.create_session())
    body = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics").read().decode()
    assert "sinkserve_gateway_open_streams" in body
    assert "sinkserve_gateway_time_to_first_token_seconds_bucket" in body
