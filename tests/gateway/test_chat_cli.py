from __future__ import annotations

import argparse
import io
import re

import grpc
import pytest

from sinkserve.chat import _chat, add_chat_parser, local_sampling
from sinkserve.client import ChatClient, sampling
from tests.gateway.conftest import GatewayFactory, served, target


def chat_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_chat_parser(parser.add_subparsers())
    return parser.parse_args(["chat", *argv])


async def test_the_terminal_chat_streams_a_reply_shows_stats_and_ends_the_session(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    args = chat_args(
        "--target", f"127.0.0.1:{gw.port}", "--token", "alice-token", "--max-tokens", "8"
    )
    out = io.StringIO()
    rc = await _chat(args, io.StringIO("Hello there\n/stats\n/new\nHi again\n/end\n"), out)
    text = out.getvalue()
    assert rc == 0, text
    assert text.count("[new session") == 2
    assert "[turns 1 · position" in text
    # /new ended the first session, /end the second: the model holds neither any more.
    ids = re.findall(r"\[new session (\S+) ", text)
    assert len(ids) == 2 and f"[session {ids[1]} ended]" in text
    async with ChatClient(target(gw), "alice-token") as alice:
        for sid in ids:
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await alice.get_session(sid)
            assert excinfo.value.code() is grpc.StatusCode.NOT_FOUND


def test_sampling_flags_left_out_are_the_servers_and_greedy_means_no_penalty() -> None:
    assert local_sampling(chat_args()) == sampling()
    assert local_sampling(chat_args("--greedy")) == sampling(temperature=0.0, repetition_penalty=1)
    penalized = chat_args("--greedy", "--repetition-penalty", "1.2")
    assert local_sampling(penalized) == sampling(temperature=0.0, repetition_penalty=1.2)
    with pytest.raises(SystemExit):
        chat_args("--greedy", "--temperature", "0.5")


async def test_settings_shows_the_sessions_sampling_under_the_flags_of_this_stream(
    make_gateway: GatewayFactory, triton_url: str
) -> None:
    gw = await served(make_gateway, triton_url)
    base = ("--target", f"127.0.0.1:{gw.port}", "--token", "alice-token")
    # The tests' model is configured greedy (tests/conftest.py): that is the server's default.
    out = io.StringIO()
    assert await _chat(chat_args(*base), io.StringIO("/settings\n/end\n"), out) == 0
    assert "[sampling: greedy (temperature 0) · repetition_penalty 1 · max_tokens 256]" in (
        out.getvalue()
    )
    # A new session keeps the flags it was opened with; Ctrl-D (EOF) keeps the session.
    flags = ("--temperature", "0.5", "--top-k", "7", "--seed", "3", "--max-tokens", "8")
    out = io.StringIO()
    assert await _chat(chat_args(*base, *flags), io.StringIO("/settings\n"), out) == 0
    opened = out.getvalue()
    sid = re.findall(r"\[new session (\S+) ", opened)[0]
    kept = "top_k 7 · repetition_penalty 1 · max_tokens 8 · seed 3]"
    assert f"[sampling: temperature 0.5 · top_p 1 · {kept}" in opened
    # Resumed with another temperature: this stream's flag over the session's own.
    out = io.StringIO()
    resume = chat_args(*base, "--session", sid, "--temperature", "0.9")
    assert await _chat(resume, io.StringIO("/settings\n/end\n"), out) == 0
    assert f"[sampling: temperature 0.9 · top_p 1 · {kept}" in out.getvalue()
