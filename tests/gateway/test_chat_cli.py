from __future__ import annotations

import argparse
import io

from service.chat import _chat, add_chat_parser
from tests.gateway.conftest import GatewayFactory
from tests.gateway.test_gateway_e2e import served


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
    assert "ended]" in text
    assert len(gw.registry) == 0
