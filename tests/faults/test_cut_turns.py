"""A client that goes away while its turn waits for a KV slot, and at once resumes its
session with the next turn (what the soak does): the cut turn never runs, and the next
turn is answered, not refused as the session being busy."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sinkserve.client import ChatClient, sampling
from sinkserve.cluster import Replica
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from tests.faults.stack import model_repository, tokens_file, wait_health

READY_S = 300
LONG = sampling(max_tokens=400, temperature=0.8, seed=1)
SHORT = sampling(max_tokens=8)


async def test_a_turn_cut_while_it_waits_for_a_slot_never_runs_and_the_next_one_does(
    tmp_path: Path,
) -> None:
    repo = model_repository(tmp_path, max_sessions="1", max_new_tokens="400")  # one KV slot
    serve = Replica("stack", tmp_path, f"sqlite://{tmp_path / 's.db'}", repo, tokens_file(tmp_path))
    serve.start()
    try:
        await wait_health(serve.target, True, READY_S)
        async with (
            ChatClient(serve.target, "alice-token") as alice,
            alice.conversation(defaults=LONG) as hog,
        ):
            cut = alice.conversation(defaults=SHORT)  # dropped below: not closed
            await cut.open()
            await cut.turn("Hello.")
            before = await alice.get_session(cut.session_id)
            holding = hog.send("Tell me a long story.")
            await anext(holding)  # the other session holds the only slot
            # The turn waits for the slot on the model; its client goes away at once and
            # resumes the session on a new stream with its next turn.
            await cut.write(pb.ChatRequest(turn=pb.UserTurn(text="Never mind.")))
            cut.drop()
            async with alice.conversation(cut.session_id, defaults=SHORT) as again:
                nxt = asyncio.create_task(again.turn("What is the capital of France?"))
                await hog.cancel()  # the slot frees
                async for _ in holding:
                    pass
                _, end = await nxt
            assert end.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
            u = end.usage
            assert (
                u.cache_position == before.cache_position + u.prompt_tokens + u.generated_tokens - 1
            )
            after = await alice.get_session(cut.session_id)
            assert after.turns == before.turns + 1  # the cut turn never ran
    finally:
        assert serve.stop() == 0
