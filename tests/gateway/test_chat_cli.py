from __future__ import annotations

import argparse
import io
import re

import grpc
import pytest

from service.chat import _chat, add_chat_parser
from service.client import ChatClient
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
