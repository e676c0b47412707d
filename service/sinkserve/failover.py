"""The failover scenario on a local cluster (tests/cluster and bench/failover.py): many
sessions hold conversations turn by turn, in step, through the proxy; between two turns
a fault may strike (a replica killed or stopped). Clients retry a cut turn once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from sinkserve.client import ChatClient, Conversation, sampling

NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jade", "Kai", "Lea")
QUESTIONS = (
    "What is my name?",
    "What is two plus three?",
    "Name a colour.",
    "What is the capital of France?",
    "Say hello in Spanish.",
    "Name an animal.",
    "What is ten minus four?",
    "Name a fruit.",
    "Thank you!",
)


@dataclass(frozen=True)
class Turn:
    """One completed turn of one session, as its client saw it."""

    session: int
    index: int
    token_ids: tuple[int, ...]
    cache_position: int
    prompt_tokens: int
    generated_tokens: int
    evicted_tokens: int
    seconds: float
    retried: bool  # its first stream failed and the client sent it again


def script(session: int, turns: int) -> list[str]:
    """The user turns of session `session`: an introduction, then short questions."""
    name = f"{NAMES[session % len(NAMES)]}{session // len(NAMES) or ''}"
    return [f"Hello! My name is {name}.", *QUESTIONS][:turns]


async def converse(
    target: str,
    token: str | None,
    *,
    sessions: int,
    turns: int,
    max_tokens: int = 12,
    faults: Mapping[int, Callable[[], object]] | None = None,
    on_turn: Callable[[], object] = lambda: None,
    errors: dict[int, str] | None = None,
) -> list[list[Turn]]:
    """Run every session's script in step; `faults[k]()` runs once all sessions finished
    turn k (1-based). Returns each session's completed turns (a session that failed
    stops early, so a short list means a lost session; its error goes to `errors`)."""
    faults = faults or {}
    errors = {} if errors is None else errors
    results: list[list[Turn]] = [[] for _ in range(sessions)]
    async with ChatClient(target, token) as client:
        chats = [
            client.conversation(defaults=sampling(max_tokens=max_tokens)) for _ in range(sessions)
        ]
        await asyncio.gather(*(chat.open() for chat in chats))
        alive = set(range(sessions))
        for k in range(turns):
            done = await asyncio.gather(
                *(_turn(chats[i], i, k, script(i, turns)[k]) for i in sorted(alive)),
                return_exceptions=True,
            )
            for i, outcome in zip(sorted(alive), done, strict=True):
                if isinstance(outcome, Turn):
                    results[i].append(outcome)
                    on_turn()
                else:
                    alive.discard(i)
                    errors[i] = f"turn {k + 1}: {outcome!r}"
            if k + 1 in faults:
                faults[k + 1]()
        for chat in chats:
            chat.drop()
    return results


async def _turn(chat: Conversation, session: int, index: int, text: str) -> Turn:
    retries = chat.retries
    start = time.monotonic()
    ids = [i async for delta in chat.send(text) for i in delta.token_ids]
    end = chat.last_turn
    if end is None:
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNKNOWN, None, None, details="no TurnEnd")
    u = end.usage
    return Turn(
        session=session,
        index=index,
        token_ids=tuple(ids),
        cache_position=u.cache_position,
        prompt_tokens=u.prompt_tokens,
        generated_tokens=u.generated_tokens,
        evicted_tokens=u.evicted_tokens,
        seconds=time.monotonic() - start,
        retried=chat.retries > retries,
    )


def answered_once(turns: list[Turn]) -> bool:
    """Whether a session's cache positions account for each turn exactly once: a turn
    feeds its prompt (with the token owed by the previous turn) and all but the last of
    its generated tokens (the last is owed to the next)."""
    position = 0
    for t in turns:
        position += t.prompt_tokens + t.generated_tokens - 1
        if t.cache_position != position:
            return False
    return True
