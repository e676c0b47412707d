"""End to end: Python clients -> gateway -> real tritonserver -> real engine, all on loopback.

The model owns the sessions and one Triton serves every test of the run, so a test looks
only at the sessions it opened itself (a caller's list may hold others' leftovers).
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import tritonclient.grpc.aio as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sinkserve.client import ChatClient, SyncChatClient, sampling
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from tests.gateway.conftest import GatewayFactory, served, target
from tests.waits import until

SHORT = sampling(max_tokens=8)
LONG = sampling(max_tokens=400, temperature=0.8, seed=1)
ALICE = (("authorization", "Bearer alice-token"),)


async def code_of(awaitable: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as excinfo:
        await awaitable  # type: ignore[misc]
    return excinfo.value.code(), excinfo.value.details() or ""


async def until_idle(client: ChatClient, session_id: str) -> None:
    """Wait until the model reports no turn running on the session (the end of a turn that
    the gateway cut reaches the model asynchronously)."""
    await until(
        f"session {session_id} to report no turn running",
        lambda: client.get_session(session_id),
        lambda info: not info.turn_running,
    )


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
    arrivals: list[str] = []  # in the order the one event loop saw them

    async def one(i: int) -> None:
        async with ChatClient(target(gw), "alice-token") as client:
            chat = client.conversation(defaults=sampling(max_tokens=48, temperature=0.0))
            await chat.open()
            seen = False
            async for _delta in chat.send(f"Count from {i} upwards, one number per line."):
                if not seen:
                    arrivals.append("first token")
                    seen = True
            arrivals.append("finished")
            await chat.end()  # alice's sessions count against her per-caller limit

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(16))), 300)
    assert arrivals.count("first token") == 16 and arrivals.count("finished") == 16
    assert arrivals[:16] == ["first token"] * 16


async def test_a_turn_from_another_stream_of_a_busy_session_is_failed_precondition_from_the_model(
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
        code, details = await code_of(second.turn("Me too"))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "already has a turn running" in details
        # The running turn is untouched by the refused one.
        await first.cancel()
        async for _ in running:
            pass
        assert first.last_turn is not None
        assert first.last_turn.finish_reason == pb.FINISH_REASON_CANCELLED


async def test_cancel_ends_the_turn_with_the_models_usage_and_keeps_the_session(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with (
        ChatClient(target(gw), "alice-token") as alice,
        alice.conversation(defaults=LONG) as chat,
    ):
        turn = chat.send("Tell me a long story.")
        streamed = len((await anext(turn)).token_ids)
        await chat.cancel()
        async for delta in turn:
            streamed += len(delta.token_ids)
        end = chat.last_turn
        assert end is not None and end.finish_reason == pb.FINISH_REASON_CANCELLED
        # The model's own accounting: every token it made reached the client, and the
        # cache holds the prompt and those tokens.
        assert end.usage.generated_tokens == streamed >= 1
        assert end.usage.prompt_tokens >= 1
        assert end.usage.cache_position >= end.usage.prompt_tokens
        info = await alice.get_session(chat.session_id)
        assert not info.turn_running and info.cache_position == end.usage.cache_position
        _, after = await chat.turn("Short answer: 2+2?", params=SHORT)
        assert after.usage.generated_tokens >= 1
        assert after.usage.cache_position > end.usage.cache_position


async def test_the_sync_client_runs_turns_cancels_from_another_thread_and_lists_sessions(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)

    def converse() -> tuple[list[pb.TurnEnd], str, list[str]]:
        ends = []
        with SyncChatClient(target(gw), "alice-token") as alice:
            with alice.conversation(defaults=SHORT) as chat:
                ends.append(chat.turn("What is the capital of France?")[1])
                deltas = chat.send("Tell me a long story.", params=LONG)
                next(deltas)  # the turn runs: cancel it from another thread
                canceller = threading.Thread(target=chat.cancel)
                canceller.start()
                canceller.join()
                for _ in deltas:
                    pass
                assert chat.last_turn is not None
                ends.append(chat.last_turn)
                session_id = chat.session_id
            listed = [s.session_id for s in alice.list_sessions()]
            alice.delete_session(session_id)
        return ends, session_id, listed

    # In a thread: the gateway serves from this test's event loop.
    (first, cancelled), session_id, listed = await asyncio.to_thread(converse)
    assert first.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert cancelled.finish_reason == pb.FINISH_REASON_CANCELLED
    assert cancelled.usage.cache_position > first.usage.cache_position
    assert session_id in listed


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
        await until_idle(alice, chat.session_id)
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
        code, _ = await code_of(chat.turn("Tell me a long story."))
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED
        await until_idle(alice, chat.session_id)
        async with alice.conversation(chat.session_id, defaults=SHORT) as again:
            _, end = await again.turn("Hello?")
            assert end.usage.generated_tokens >= 1


async def test_an_idle_stream_past_its_deadline_is_deadline_exceeded(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.Chat(metadata=ALICE, timeout=1.0)
        await call.write(pb.ChatRequest(open=pb.OpenSession()))
        assert (await call.read()).HasField("session_opened")
        # Nothing more is sent and the stream stays open: the deadline ends it.
        code, _ = await code_of(call.read())
        assert code is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        (sampling(max_tokens=4097), "4097"),  # the model's max_new_tokens is 4096
        (sampling(max_tokens=4, top_p=0.0), "top_p"),
        (sampling(max_tokens=4, temperature=-1.0), "temperature"),
        (sampling(max_tokens=4, temperature=1000.0), "temperature"),
    ],
    ids=["max_tokens", "top_p", "negative-temperature", "huge-temperature"],
)
async def test_bad_sampling_is_invalid_argument_from_the_model_and_runs_no_turn(
    make_gateway: GatewayFactory, triton_url: str, params: pb.SamplingParams, detail: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        # As a turn's sampling: the stream ends, the session did not change.
        chat = alice.conversation()
        await chat.open()
        code, details = await code_of(chat.turn("Hi", params=params))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert detail in details
        info = await alice.get_session(chat.session_id)
        assert info.turns == 0 and info.cache_position == 0
        # As a new session's defaults: no session is opened.
        before = {s.session_id for s in await alice.list_sessions()}
        code, details = await code_of(alice.conversation(defaults=params).open())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert detail in details
        assert {s.session_id for s in await alice.list_sessions()} == before
        await alice.delete_session(chat.session_id)


async def test_an_empty_or_too_long_turn_is_invalid_argument_and_runs_no_turn(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url, max_turn_chars=10)
    async with ChatClient(target(gw), "alice-token") as alice:
        session = await alice.create_session()
        for text, detail in (("", "empty"), ("x" * 11, "11 characters")):
            chat = alice.conversation(session.session_id)
            await chat.open()
            code, details = await code_of(chat.turn(text))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert detail in details
        info = await alice.get_session(session.session_id)
        assert info.turns == 0 and info.cache_position == 0
        async with alice.conversation(session.session_id, defaults=SHORT) as chat:
            _, end = await chat.turn("x" * 10)  # at the limit
            assert end.usage.generated_tokens >= 1
        await alice.delete_session(session.session_id)


async def test_sessions_are_created_listed_got_and_deleted_by_their_owner(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        made = [await alice.create_session(f"sys {i}") for i in range(3)]
        ids = [s.session_id for s in made]
        assert len(set(ids)) == 3
        assert all(s.owner == "alice" and s.sinks > 0 and s.window > 0 for s in made)
        listed = await alice.list_sessions()
        assert all(s.owner == "alice" for s in listed)
        assert [s.session_id for s in listed if s.session_id in ids] == ids  # oldest first
        got = await alice.get_session(ids[0])
        assert got.session_id == ids[0] and got.owner == "alice"
        assert got.turns == 0 and not got.turn_running and got.cache_position == 0
        assert got.expire_time.seconds > got.create_time.seconds
        await alice.delete_session(ids[0])
        code, _ = await code_of(alice.get_session(ids[0]))
        assert code is grpc.StatusCode.NOT_FOUND
        code, _ = await code_of(alice.delete_session(ids[0]))
        assert code is grpc.StatusCode.NOT_FOUND
        remaining = {s.session_id for s in await alice.list_sessions()}
        assert ids[0] not in remaining and set(ids[1:]) <= remaining
        for sid in ids[1:]:
            await alice.delete_session(sid)


async def test_listing_pages_through_the_callers_sessions(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with grpc.aio.insecure_channel(target(gw)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        made = [
            (await stub.CreateSession(pb.CreateSessionRequest(), metadata=ALICE)).session.session_id
            for _ in range(5)
        ]
        whole = await stub.ListSessions(pb.ListSessionsRequest(page_size=1000), metadata=ALICE)
        assert not whole.next_page_token
        page = await stub.ListSessions(pb.ListSessionsRequest(page_size=2), metadata=ALICE)
        seen = list(page.sessions)
        while page.next_page_token:
            assert len(page.sessions) == 2
            req = pb.ListSessionsRequest(page_size=2, page_token=page.next_page_token)
            page = await stub.ListSessions(req, metadata=ALICE)
            seen.extend(page.sessions)
        seen_ids = [s.session_id for s in seen]
        assert seen_ids == [s.session_id for s in whole.sessions]  # each once, in order
        assert set(made) <= set(seen_ids)
        bad = pb.ListSessionsRequest(page_size=2, page_token="no-such-token")
        code, details = await code_of(stub.ListSessions(bad, metadata=ALICE))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details
        for sid in made:
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=ALICE)


async def test_another_callers_session_is_not_found_exactly_like_an_unknown_one(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with (
        ChatClient(target(gw), "alice-token") as alice,
        ChatClient(target(gw), "bob-token") as bob,
    ):
        session = await alice.create_session()
        sid = session.session_id
        for call in (
            bob.get_session(sid),
            bob.conversation(sid).open(),
            bob.delete_session(sid),
        ):
            code, details = await code_of(call)
            # Exactly what an id nobody holds gets: bob learns nothing of alice's session.
            assert code is grpc.StatusCode.NOT_FOUND
            assert details == f"no session {sid!r} (ended or expired?)"
        assert sid not in {s.session_id for s in await bob.list_sessions()}
        # Bob's attempts left it alone: alice still has it, and can use it.
        async with alice.conversation(sid, defaults=SHORT) as chat:
            _, end = await chat.turn("Hello")
            assert end.usage.generated_tokens >= 1
        await alice.delete_session(sid)


async def test_an_unknown_session_is_not_found(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        for call in (
            alice.conversation("no-such-session").open(),
            alice.get_session("no-such-session"),
            alice.delete_session("no-such-session"),
        ):
            code, details = await code_of(call)
            assert code is grpc.StatusCode.NOT_FOUND
            assert "no-such-session" in details


async def max_sessions_per_owner(triton_url: str) -> int:
    """The model's per-owner session limit, from its config (the engine's default: 64)."""
    client = triton_grpc.InferenceServerClient(triton_url)
    try:
        config = await client.get_model_config("sinkserve", as_json=True)
    finally:
        await client.close()
    parameters = config["config"].get("parameters", {})
    return int(parameters.get("max_sessions_per_owner", {}).get("string_value") or 64)


async def test_the_per_caller_session_limit_is_resource_exhausted(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    limit = await max_sessions_per_owner(triton_url)
    gw = await served(make_gateway, triton_url)
    async with (
        ChatClient(target(gw), "carol-token") as carol,
        ChatClient(target(gw), "bob-token") as bob,
    ):
        for left in await carol.list_sessions():  # from an earlier run on the same Triton
            await carol.delete_session(left.session_id)
        made = [await carol.create_session() for _ in range(limit)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await carol.create_session()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "per-owner limit" in (refused.value.details() or "")
        # The hint: when her least recently used session expires unless she ends one.
        hint = dict(refused.value.trailing_metadata() or ())
        assert 0 < int(hint["retry-after-ms"]) <= 3600 * 1000
        code, _ = await code_of(carol.conversation().open())
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(await carol.list_sessions()) == limit
        # The limit is carol's alone, and ending one of her sessions makes room again.
        other = await bob.create_session()
        await bob.delete_session(other.session_id)
        await carol.delete_session(made[0].session_id)
        made[0] = await carol.create_session()
        for session in made:
            await carol.delete_session(session.session_id)


async def test_an_x_session_id_header_that_names_another_session_is_invalid_argument(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with (
        ChatClient(target(gw), "alice-token") as alice,
        grpc.aio.insecure_channel(target(gw)) as channel,
    ):
        sid = (await alice.create_session()).session_id
        other = (await alice.create_session()).session_id
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        wrong = (*ALICE, ("x-session-id", other))
        code, details = await code_of(
            stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=wrong)
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "does not match" in details
        code, details = await code_of(
            stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=wrong)
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "does not match" in details
        call = stub.Chat(metadata=wrong)
        await call.write(pb.ChatRequest(resume=pb.ResumeSession(session_id=sid)))
        code, details = await code_of(call.read())
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "does not match" in details
        # Neither session was touched; with the right header (as ChatClient sends it) the
        # same calls succeed.
        right = (*ALICE, ("x-session-id", sid))
        got = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=right)
        assert got.session.session_id == sid and got.session.turns == 0
        assert (await alice.get_session(other)).turns == 0
        call = stub.Chat(metadata=right)
        await call.write(pb.ChatRequest(resume=pb.ResumeSession(session_id=sid)))
        opened = (await call.read()).session_opened
        assert opened.session_id == sid and opened.resumed
        await call.done_writing()
        assert await call.code() is grpc.StatusCode.OK
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=right)
        await alice.delete_session(other)


async def test_a_session_survives_a_gateway_restart(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    first = await served(make_gateway, triton_url)
    async with (
        ChatClient(target(first), "alice-token") as alice,
        alice.conversation(defaults=SHORT) as chat,
    ):
        _, before = await chat.turn("Remember the number seven.")
        sid = chat.session_id
    await first.stop(grace_s=0)
    second = await served(make_gateway, triton_url)
    async with (
        ChatClient(target(second), "alice-token") as alice,
        ChatClient(target(second), "bob-token") as bob,
    ):
        info = await alice.get_session(sid)
        assert info.turns == 1 and info.cache_position == before.usage.cache_position
        async with alice.conversation(sid, defaults=SHORT) as chat:
            assert chat.resumed and chat.cache_position == before.usage.cache_position
            _, after = await chat.turn("Which number?")
            assert after.usage.cache_position > before.usage.cache_position
        code, _ = await code_of(bob.conversation(sid).open())
        assert code is grpc.StatusCode.NOT_FOUND
        await alice.delete_session(sid)


async def test_deleting_a_session_cancels_its_turn_on_another_stream_then_it_is_gone(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=LONG)
        await chat.open()
        running = chat.send("Tell me a long story.")
        await anext(running)
        await alice.delete_session(chat.session_id)
        async for _ in running:
            pass
        assert chat.last_turn is not None
        assert chat.last_turn.finish_reason == pb.FINISH_REASON_CANCELLED
        assert chat.last_turn.usage.generated_tokens >= 1
        for call in (
            alice.get_session(chat.session_id),
            alice.conversation(chat.session_id).open(),
        ):
            code, _ = await code_of(call)
            assert code is grpc.StatusCode.NOT_FOUND
        chat.drop()


async def test_ending_a_session_frees_it_on_the_model(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    async with ChatClient(target(gw), "alice-token") as alice:
        chat = alice.conversation(defaults=SHORT)
        await chat.open()
        await chat.turn("Hello")
        await chat.end()
        code, _ = await code_of(alice.get_session(chat.session_id))
        assert code is grpc.StatusCode.NOT_FOUND


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
