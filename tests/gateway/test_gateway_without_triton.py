"""The gateway's own checks, against a real gateway whose Triton is down (nothing listens).

The model owns every session, so with Triton down every session call is UNAVAILABLE;
what the gateway decides alone (auth, the shape of a stream's first request, health,
reflection, metrics) is tested here. Sessions themselves are tested end to end
(test_gateway_e2e.py).
"""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from sinkserve.client import ChatClient
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from tests.gateway.conftest import GatewayFactory, target

ALICE = (("authorization", "Bearer alice-token"),)


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


async def test_every_session_call_while_triton_is_down_is_unavailable(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with ChatClient(target(gw), "alice-token") as alice:
        calls = {
            "CreateSession": alice.create_session(),
            "GetSession": alice.get_session("some-session"),
            "ListSessions": alice.list_sessions(),
            "DeleteSession": alice.delete_session("some-session"),
            "Chat open": alice.conversation().open(),
            "Chat resume": alice.conversation("some-session").open(),
        }
        for name, call in calls.items():
            code, details = await code_of(call)
            assert code is grpc.StatusCode.UNAVAILABLE, name
            assert "Triton" in details, (name, details)


@pytest.mark.parametrize(
    "first",
    [
        pb.ChatRequest(turn=pb.UserTurn(text="hi")),
        pb.ChatRequest(cancel=pb.CancelTurn()),
        pb.ChatRequest(end=pb.EndSession()),
        pb.ChatRequest(),
    ],
    ids=["turn", "cancel", "end", "empty"],
)
async def test_a_stream_that_does_not_start_with_open_or_resume_is_invalid(
    make_gateway: GatewayFactory, first: pb.ChatRequest
) -> None:
    # Checked before the model is asked: INVALID_ARGUMENT, not UNAVAILABLE, with Triton down.
    gw = await make_gateway()
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        call = chat_pb2_grpc.ChatServiceStub(channel).Chat(metadata=ALICE)
        await call.write(first)
        code, details = await code_of(call.read())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "first request must be open or resume" in details


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


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


async def test_metrics_count_failed_calls_by_code_and_show_the_backend_down(
    make_gateway: GatewayFactory,
) -> None:
    gw = await make_gateway()
    async with ChatClient(target(gw), "alice-token") as alice:
        for _ in range(2):
            await code_of(alice.create_session())
        async with grpc.aio.insecure_channel(target(gw)) as channel:
            call = chat_pb2_grpc.ChatServiceStub(channel).Chat(metadata=ALICE)
            await call.write(pb.ChatRequest(turn=pb.UserTurn(text="hi")))
            await code_of(call.read())
    samples = await asyncio.to_thread(scrape, gw.metrics_port)
    assert samples[("sinkserve_gateway_errors_total", (("code", "UNAVAILABLE"),))] == 2
    assert samples[("sinkserve_gateway_errors_total", (("code", "INVALID_ARGUMENT"),))] == 1
    assert samples[("sinkserve_gateway_backend_ready", ())] == 0
    assert samples[("sinkserve_gateway_open_streams", ())] == 0
