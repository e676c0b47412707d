"""The benchmark's arithmetic: percentiles, the aggregate decode rate counting only
tokens that arrive while every session is decoding, and token counting over gRPC."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc
import pytest

from sinkserve.bench import (
    Trace,
    add_bench_parser,
    gateway_driver,
    percentiles,
    steady_decode_rate,
    summarize,
)
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc


def test_percentiles_are_nearest_rank_in_milliseconds() -> None:
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(values) == {"p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0}
    assert percentiles([]) == {}


def test_steady_rate_counts_only_the_window_where_all_sessions_decode() -> None:
    # Session a decodes at 10 tok/s from t=0; b starts at t=1 at 10 tok/s; both end at t=3.
    a = Trace(sent=0.0, token_times=[i / 10 for i in range(0, 31)])
    b = Trace(sent=0.0, token_times=[1 + i / 10 for i in range(0, 21)])
    assert abs(steady_decode_rate([a, b]) - 20.0) < 1e-6


def test_one_session_rate_is_its_inter_token_rate() -> None:
    a = Trace(sent=0.0, token_times=[0.5 + i * 0.02 for i in range(11)])
    assert abs(steady_decode_rate([a]) - 50.0) < 1e-6


def test_bench_flags_parse_a_list_of_session_counts() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--sessions", "1,4,16", "--quant", "int4"])
    assert args.sessions == [1, 4, 16] and args.quant == "int4" and args.target == "engine"


def test_a_bad_engine_flag_is_named_and_exits_2_without_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sinkserve import cli

    # main() would point the process-wide structlog at this test's captured stderr.
    monkeypatch.setattr(cli, "configure_logging", lambda **_: None)
    assert cli.main(["bench", "--quant", "int8", "--no-save"]) == 2
    err = capsys.readouterr().err
    assert "quant='int8': must be one of none, int4" in err and "Traceback" not in err


class DeltasOfThree(chat_pb2_grpc.ChatServiceServicer):
    """A Chat service that answers every turn with 9 tokens in deltas of 3."""

    async def Chat(
        self, requests: AsyncIterator[pb.ChatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatResponse]:
        async for request in requests:
            kind = request.WhichOneof("action")
            if kind == "open":
                yield pb.ChatResponse(session_opened=pb.SessionOpened(session_id="s"))
            elif kind == "turn":
                for i in range(0, 9, 3):
                    delta = pb.TokenDelta(text="abc", token_ids=[i, i + 1, i + 2], index=i)
                    yield pb.ChatResponse(delta=delta)
                usage = pb.Usage(prompt_tokens=5, generated_tokens=9)
                end = pb.TurnEnd(finish_reason=pb.FINISH_REASON_LENGTH, usage=usage)
                yield pb.ChatResponse(turn_end=end)
            elif kind == "end":
                return


async def test_the_gateway_driver_counts_tokens_not_deltas() -> None:
    server = grpc.aio.server()
    # The generated stubs make every RPC abstract; the runtime base answers UNIMPLEMENTED.
    chat_pb2_grpc.add_ChatServiceServicer_to_server(DeltasOfThree(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        traces = await gateway_driver(f"127.0.0.1:{port}", None)(2, "hi", 9)
    finally:
        await server.stop(0)
    assert [len(t.token_times) for t in traces] == [9, 9]
    assert [t.deltas for t in traces] == [3, 3]
    assert summarize({"2": [traces]}, traces)["by_sessions"]["2"]["tokens_per_delta"] == 3
    assert [t.prompt_tokens for t in traces] == [5, 5]
