"""A client that goes away while its turn waits (no response yet) must not have that turn
run later: the gateway learns of the cancelled call at once, not at its next write."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from sinkserve.client import ChatClient, sampling
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway.server import Gateway
from tests.gateway.conftest import GatewayFactory, served, target
from tests.gateway.test_gateway_without_triton import scrape
from tests.waits import until

LONG = sampling(max_tokens=400, temperature=0.8, seed=1)
SHORT = sampling(max_tokens=8)


async def until_open_streams(gw: Gateway, want: int) -> None:
    """Wait until the gateway's open-streams gauge reads `want`."""

    async def gauge() -> float:
        samples = await asyncio.to_thread(scrape, gw.metrics_port)
        return samples[("sinkserve_gateway_open_streams", ())]

    await until(f"{want} open streams", gauge, lambda got: got == want)


@pytest.mark.parametrize("leave", ["cancel the call", "close the channel"])
async def test_a_turn_cut_while_it_waits_for_its_busy_session_never_runs(
    make_gateway: GatewayFactory, triton_url: str, leave: str
) -> None:
    gw = await served(make_gateway, triton_url)
    # B's client has a connection of its own: closing its channel closes that connection.
    own = grpc.aio.insecure_channel(target(gw), options=(("grpc.use_local_subchannel_pool", 1),))
    async with (
        ChatClient(target(gw), "alice-token") as alice,
        alice.conversation(defaults=LONG) as a,
    ):
        running = a.send("Tell me a long story.")
        await anext(running)  # A runs on the model
        before = await alice.get_session(a.session_id)
        b = ChatClient(target(gw), "alice-token", channel=own).conversation(
            a.session_id, defaults=SHORT
        )
        await b.open()
        # B waits (the gateway sends it again while A runs); its client goes away.
        await b.write(pb.ChatRequest(turn=pb.UserTurn(text="Never mind.")))
        b.drop()
        if leave == "close the channel":
            await own.close()
        await a.cancel()
        async for _ in running:
            pass
        assert a.last_turn is not None
        assert a.last_turn.finish_reason == pb.FINISH_REASON_CANCELLED
        await until_open_streams(gw, 1)  # B's stream is gone, A's is left
        after = await alice.get_session(a.session_id)
        assert not after.turn_running
        assert after.turns == before.turns  # B never ran...
        assert after.cache_position == a.last_turn.usage.cache_position  # ...nor fed
