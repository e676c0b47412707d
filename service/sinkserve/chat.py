"""`sinkserve chat`: an interactive terminal chat with the gateway, streaming tokens.

Commands: `/new` (end this session, start a fresh one), `/end` (end the session and quit),
`/stats` (the session's cache), `/settings` (the sampling its turns use), `/help`. Sampling
flags left out take the server's defaults (the model's recommendation, else temperature
0.8, top-k 40, top-p 0.95, repetition penalty 1.1); `--greedy` asks for temperature 0 and no
penalty. Ctrl-C during a reply cancels that turn only; Ctrl-D quits and keeps the session
(resume it with `--session ID`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import TextIO

import grpc

from sinkserve.client import ChatClient, Conversation, TLSConfig, sampling
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb

HELP = (
    "/new  fresh session · /end  end session and quit · /stats  cache · /settings  sampling"
    " · Ctrl-C  stop reply"
)


def add_chat_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the `chat` subcommand to `subparsers`."""
    p = subparsers.add_parser("chat", help="chat with a running gateway in the terminal")
    p.add_argument("--target", default="127.0.0.1:50051", help="gateway host:port")
    p.add_argument(
        "--token", default=os.environ.get("SINKSERVE_TOKEN", ""), help="($SINKSERVE_TOKEN)"
    )
    p.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    p.add_argument("--tls-ca", default="", help="TLS, trusting this PEM CA bundle")
    p.add_argument(
        "--tls-cert", default="", help="PEM client certificate (a gateway requiring one)"
    )
    p.add_argument("--tls-key", default="", help="PEM private key of --tls-cert")
    p.add_argument("--session", default="", help="resume this session id")
    p.add_argument("--system", default="", help="system prompt of a new session")
    # Sampling: None = the server's default (see `/settings`).
    p.add_argument("--max-tokens", type=int, default=None, help="(server default: 256)")
    chosen = p.add_mutually_exclusive_group()
    chosen.add_argument(
        "--temperature", type=float, default=None, help="(server default: the model's, or 0.8)"
    )
    chosen.add_argument(
        "--greedy",
        action="store_true",
        help="temperature 0; no repetition penalty unless --repetition-penalty",
    )
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="reproducible sampling")
    p.set_defaults(func=main_chat)
    return p


def local_sampling(args: argparse.Namespace) -> pb.SamplingParams:
    """The sampling flags that were given (the rest stay unset: the server's defaults);
    `--greedy` is temperature 0 with no repetition penalty unless one is given."""
    penalty = args.repetition_penalty
    return sampling(
        max_tokens=args.max_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=1.0 if args.greedy and penalty is None else penalty,
        seed=args.seed,
    )


def settings_line(session: pb.SamplingParams, local: pb.SamplingParams) -> str:
    """The sampling this chat's turns use: the session's as the server reports it, under
    the flags given here (a resumed session takes them for this stream only)."""
    s = pb.SamplingParams()
    s.CopyFrom(session)
    s.MergeFrom(local)  # scalars only: the chat sets no stop strings
    if s.temperature == 0:
        parts = ["greedy (temperature 0)"]
    else:
        parts = [f"temperature {s.temperature:g}", f"top_p {s.top_p:g}"]
        parts.append(f"top_k {s.top_k}" if s.top_k else "top_k off")
    parts += [f"repetition_penalty {s.repetition_penalty:g}", f"max_tokens {s.max_tokens}"]
    if s.HasField("seed"):
        parts.append(f"seed {s.seed}")
    if s.stop:
        parts.append("stop " + ", ".join(map(repr, s.stop)))
    return f"[sampling: {' · '.join(parts)}]"


def main_chat(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_chat(args, sys.stdin, sys.stdout))
    except grpc.RpcError as err:
        print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:  # TLS flags: a lone cert or key, a missing file
        print(f"sinkserve chat: {err}", file=sys.stderr)
        return 2


def tls_config(args: argparse.Namespace) -> TLSConfig | None:
    """TLS settings from the flags; None (plaintext) when no TLS flag is given."""
    if not (args.tls or args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TLSConfig(root_ca_file=args.tls_ca, cert_file=args.tls_cert, key_file=args.tls_key)


async def _chat(args: argparse.Namespace, stdin: TextIO, out: TextIO) -> int:
    loop = asyncio.get_running_loop()
    defaults = local_sampling(args)
    async with ChatClient(args.target, args.token or None, tls=tls_config(args)) as client:

        async def open_chat(session_id: str | None) -> Conversation:
            chat = client.conversation(session_id, system_prompt=args.system, defaults=defaults)
            await chat.open()
            verb = "resumed" if chat.resumed else "new"
            print(
                f"[{verb} session {chat.session_id} · sinks {chat.sinks} · window "
                f"{chat.window}] {HELP}",
                file=out,
                flush=True,
            )
            return chat

        chat = await open_chat(args.session or None)
        replying = False
        pending: set[asyncio.Task[None]] = set()

        def on_interrupt() -> None:
            if replying:  # cancel the turn, not the session
                task = asyncio.ensure_future(chat.cancel())
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                print("\n(Ctrl-D quits and keeps the session; /end ends it)", file=out, flush=True)

        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        try:
            while True:
                print("> ", end="", file=out, flush=True)
                line = await loop.run_in_executor(None, stdin.readline)
                if not line:
                    await chat.close()
                    print(f"\n[session {chat.session_id} kept]", file=out)
                    return 0
                text = line.strip()
                if not text:
                    continue
                if text == "/help":
                    print(HELP, file=out)
                elif text == "/end":
                    await chat.end()
                    print(f"[session {chat.session_id} ended]", file=out)
                    return 0
                elif text == "/new":
                    await chat.end()
                    chat = await open_chat(None)
                elif text == "/settings":
                    s = await client.get_session(chat.session_id)
                    print(settings_line(s.sampling, defaults), file=out)
                elif text == "/stats":
                    s = await client.get_session(chat.session_id)
                    print(
                        f"[turns {s.turns} · position {s.cache_position} · cached "
                        f"{s.cached_tokens}/{s.sinks + s.window} · evicted {s.evicted_tokens}]",
                        file=out,
                    )
                else:
                    replying = True
                    try:
                        async for delta in chat.send(text):
                            print(delta.text, end="", file=out, flush=True)
                    finally:
                        replying = False
                    end = chat.last_turn
                    assert end is not None
                    note = " [cancelled]" if end.finish_reason == pb.FINISH_REASON_CANCELLED else ""
                    print(note, file=out, flush=True)
        finally:
            loop.remove_signal_handler(signal.SIGINT)
