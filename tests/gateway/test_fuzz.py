"""Fuzzing through the real servers: generated requests of every `sinkserve.v1` call sent
to a real gateway in front of the session's real Triton (tests/gateway/fuzz_requests.py has
the strategies and what a correct answer to each case is).

Each test runs its share of the cases (EXAMPLES; with the tensor fuzz test 2,550 in all)
derandomized and without an example database, so every CI run sends the same cases; then
it checks that the servers are whole (health SERVING, no turn left running, every caller
holding what it held, a normal two-turn conversation). The number of cases each ran is
printed, recorded as the junit property `fuzz_cases`, and summed at the end of the session.
A failing case is reported as found; SINKSERVE_FUZZ_SHRINK=1 shrinks it first, and
SINKSERVE_FUZZ_SCALE scales the counts (see fuzz_requests.scaled and .shrink). bench/fuzz.py
runs the same families for as long as asked.

A few plain tests pin the semantics the generated cases lean on: turns written while one
runs are queued (at most QUEUED_TURNS of them), a prompt longer than the cache window is
refused naming the limit, and a turn written right after a CancelTurn runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import MappingProxyType
from typing import TypeVar

import grpc
import pytest
from hypothesis import strategies as st

from sinkserve.client import sampling
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from tests.gateway.conftest import GatewayFactory, served, target
from tests.gateway.fuzz_requests import (
    QUEUED_TURNS,
    GatewayFuzzer,
    Tally,
    TokenCounter,
    auth_of,
    chat_cases,
    chat_timeout,
    cross_cases,
    fuzz,
    metadata,
    read_limits,
    scaled,
    shrink,
    unary_cases,
    unary_timeout,
    wire_cases,
)

T = TypeVar("T")
# Cases per test; cheap families get more. With tests/triton/test_fuzz_tensors.py's 500,
# 2,550 in all. SINKSERVE_FUZZ_SCALE (default 1) multiplies them, e.g. 0.05 for a quick look
# while changing a strategy.
EXAMPLES = MappingProxyType({"unary": 800, "wire": 250, "streams": 450, "turns": 300, "cross": 250})
# The gateway's turn limit for these tests: well under the generated huge texts (so the
# limit is tried) and over the window's worth of tokens most texts have.
MAX_TURN_CHARS = 3000
ALICE = metadata(auth_of("alice"))


@pytest.fixture(scope="session")
def fuzz_tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """The cases of every fuzz test of the session; their total is printed at its end."""
    tally = Tally()
    yield tally
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and tally.cases:
        reporter.write_line(f"fuzz: {tally.cases} cases in all; statuses {tally.by_code()}")


@pytest.fixture
async def fuzzer(
    make_gateway: GatewayFactory, triton_url: str, tokenizer: Tokenizer, fuzz_tally: Tally
) -> AsyncIterator[GatewayFuzzer]:
    gateway = await served(make_gateway, triton_url, max_turn_chars=MAX_TURN_CHARS)
    config = gateway.config
    limits = await read_limits(triton_url, config.max_turn_chars, config.max_message_bytes)
    fuzzer = GatewayFuzzer(target(gateway), triton_url, limits, TokenCounter(tokenizer), fuzz_tally)
    await fuzzer.start()
    yield fuzzer
    await fuzzer.close()


async def run(
    fuzzer: GatewayFuzzer,
    name: str,
    strategy: st.SearchStrategy[T],
    case: Callable[[T], Awaitable[None]],
    timeout_s: Callable[[T], float],
    record_property: Callable[[str, object], None],
) -> None:
    """EXAMPLES[name] cases of `strategy`, then the servers must be whole."""
    before, start = fuzzer.tally.cases, time.monotonic()
    try:
        await fuzz(
            strategy, case, examples=scaled(EXAMPLES[name]), timeout_s=timeout_s, shrink=shrink()
        )
    finally:
        ran = fuzzer.tally.cases - before
        record_property("fuzz_cases", ran)
        print(f"fuzz {name}: {ran} cases in {time.monotonic() - start:.1f}s")
    await fuzzer.check_batch()


async def test_generated_session_calls_get_documented_answers_and_leak_nothing(
    fuzzer: GatewayFuzzer, record_property: Callable[[str, object], None]
) -> None:
    await run(fuzzer, "unary", unary_cases(), fuzzer.unary, unary_timeout, record_property)


async def test_bytes_that_are_no_request_are_invalid_argument_and_never_hang_a_stream(
    fuzzer: GatewayFuzzer, record_property: Callable[[str, object], None]
) -> None:
    await run(fuzzer, "wire", wire_cases(), fuzzer.wire, unary_timeout, record_property)


async def test_generated_streams_without_turns_get_documented_answers(
    fuzzer: GatewayFuzzer, record_property: Callable[[str, object], None]
) -> None:
    cases = chat_cases(fuzzer.limits, turns=False)
    await run(fuzzer, "streams", cases, fuzzer.chat, chat_timeout, record_property)


async def test_generated_conversations_in_any_order_get_documented_answers(
    fuzzer: GatewayFuzzer, record_property: Callable[[str, object], None]
) -> None:
    cases = chat_cases(fuzzer.limits, turns=True)
    await run(fuzzer, "turns", cases, fuzzer.chat, chat_timeout, record_property)


async def test_another_callers_session_answers_exactly_like_an_unknown_id(
    fuzzer: GatewayFuzzer, record_property: Callable[[str, object], None]
) -> None:
    await run(fuzzer, "cross", cross_cases(), fuzzer.cross, unary_timeout, record_property)


# -- the semantics the generated cases lean on ----------------------------------------------


async def _queue_behind_a_running_turn(
    make_gateway: GatewayFactory, triton_url: str, queued: int, *, cancel: bool
) -> tuple[list[pb.ChatResponse], grpc.StatusCode, str, str]:
    """A long turn, and once it streams, `queued` short turns written at once, then (with
    `cancel`) a CancelTurn and a half-close. The responses, the status, its message, the
    session id. (Nothing is written where the server may have ended the stream: grpc.aio
    would report a write that lost that race as its own INTERNAL.)"""
    gateway = await served(make_gateway, triton_url)
    async with grpc.aio.insecure_channel(target(gateway)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        call = stub.Chat(metadata=ALICE, timeout=120)
        short = sampling(max_tokens=2)
        await call.write(pb.ChatRequest(open=pb.OpenSession(sampling=short)))
        long = pb.UserTurn(text="Tell me a long story.", sampling=sampling(max_tokens=400))
        await call.write(pb.ChatRequest(turn=long))
        responses = [await call.read(), await call.read()]  # SessionOpened, the first delta
        assert responses[1].HasField("delta"), responses
        for i in range(queued):
            await call.write(pb.ChatRequest(turn=pb.UserTurn(text=f"Say {i}.")))
        if cancel:
            await call.write(pb.ChatRequest(cancel=pb.CancelTurn()))
            await call.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):  # the status is read below
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
        sid = responses[0].session_opened.session_id
        code, details = await call.code(), await call.details() or ""
        delete = pb.DeleteSessionRequest(session_id=sid)
        await stub.DeleteSession(delete, metadata=ALICE, timeout=30)
    return responses, code, details, sid


async def test_turns_written_while_one_runs_are_queued_and_cancel_stops_only_the_running_one(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    responses, code, details, _ = await _queue_behind_a_running_turn(
        make_gateway, triton_url, QUEUED_TURNS, cancel=True
    )
    assert code is grpc.StatusCode.OK, details
    ends = [r.turn_end for r in responses if r.HasField("turn_end")]
    assert len(ends) == 1 + QUEUED_TURNS
    assert ends[0].finish_reason == pb.FINISH_REASON_CANCELLED
    assert all(e.finish_reason != pb.FINISH_REASON_CANCELLED for e in ends[1:])
    assert all(1 <= e.usage.generated_tokens <= 2 for e in ends[1:])
    positions = [e.usage.cache_position for e in ends]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # Each turn's deltas come before its own TurnEnd, indexed from 0.
    index = 0
    for r in responses[1:]:
        if r.HasField("delta"):
            assert r.delta.index == index
            index += len(r.delta.token_ids)
        else:
            index = 0


async def test_one_turn_more_than_the_queue_holds_is_resource_exhausted(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    _, code, details, _ = await _queue_behind_a_running_turn(
        make_gateway, triton_url, QUEUED_TURNS + 1, cancel=False
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(QUEUED_TURNS) in details


async def test_a_turn_or_system_prompt_longer_than_the_window_is_refused_naming_the_limit(
    make_gateway: GatewayFactory, triton_url: str, tokenizer: Tokenizer
) -> None:
    gateway = await served(make_gateway, triton_url)
    limits = await read_limits(triton_url, 10**6, gateway.config.max_message_bytes)
    words = " ".join(f"w{i}" for i in range(limits.prompt_limit + 10))
    assert len(tokenizer.encode(words)) > limits.prompt_limit
    async with grpc.aio.insecure_channel(target(gateway)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CreateSession(pb.CreateSessionRequest(system_prompt=words), metadata=ALICE)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert str(limits.prompt_limit) in (refused.value.details() or "")
        call = stub.Chat(metadata=ALICE, timeout=60)
        await call.write(pb.ChatRequest(open=pb.OpenSession(sampling=sampling(max_tokens=2))))
        sid = (await call.read()).session_opened.session_id
        await call.write(pb.ChatRequest(turn=pb.UserTurn(text=words)))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert str(limits.prompt_limit) in (refused.value.details() or "")
        got = await stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE)
        assert got.session.turns == 0 and got.session.cache_position == 0
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=ALICE)


async def test_a_turn_written_right_after_a_cancel_runs_once_the_cancelled_one_ends(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    """Turn, CancelTurn, turn, written at once: the cancel may cut the first turn before the
    model has it, and the model then ends it only once it sees the cut (its cancel
    watcher). The second turn waits for that instead of failing FAILED_PRECONDITION."""
    gateway = await served(make_gateway, triton_url)
    async with grpc.aio.insecure_channel(target(gateway)) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for attempt in range(5):
            call = stub.Chat(metadata=ALICE, timeout=60)
            await call.write(pb.ChatRequest(open=pb.OpenSession(sampling=sampling(max_tokens=4))))
            await call.write(pb.ChatRequest(turn=pb.UserTurn(text="Hi")))
            await call.write(pb.ChatRequest(cancel=pb.CancelTurn()))
            await call.write(pb.ChatRequest(turn=pb.UserTurn(text="Hi again")))
            await call.done_writing()
            responses = []
            with contextlib.suppress(grpc.aio.AioRpcError):  # the status is asserted below
                while (response := await call.read()) is not grpc.aio.EOF:
                    responses.append(response)
            assert await call.code() is grpc.StatusCode.OK, (attempt, await call.details())
            ends = [r.turn_end for r in responses if r.HasField("turn_end")]
            assert len(ends) == 2 and ends[1].finish_reason != pb.FINISH_REASON_CANCELLED
            sid = responses[0].session_opened.session_id
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=ALICE)
