"""The engine as the owner of durable sessions: records written at open and turn end,
sessions rebuilt from their records by another engine, ownership, and a store outage."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from sinkserve.engine.engine import Engine
from sinkserve.engine.store import RedisStore, SessionStore, SQLiteStore
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.types import (
    Event,
    FinishReason,
    SamplingParams,
    StoreUnreachable,
    TokenEvent,
    TurnEnd,
    UnknownSession,
)
from sinkserve.redis_server import RedisServer
from tests.engine.helpers import RecordingEngine, TinyModel, tiny_model
from tests.waits import wait_until

GREEDY = {"max_new_tokens": 12, "ignore_eos": True}


class MakeStoreEngine(Protocol):
    """The `make` fixture: `make(store, **EngineConfig)` builds a started engine."""

    def __call__(self, store: SessionStore | None, **config: object) -> Engine: ...


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> TinyModel:
    return tiny_model(tokenizer.vocab_size, seed=7)


@pytest.fixture
def make(tokenizer: Tokenizer, model: TinyModel) -> Iterator[MakeStoreEngine]:
    engines: list[Engine] = []

    def build(store: SessionStore | None, **config: Any) -> Engine:
        rec = RecordingEngine(tokenizer, model[1], model[0], store=store, **config)
        rec.engine.start()
        engines.append(rec.engine)
        return rec.engine

    yield build
    for e in engines:
        e.shutdown()


def turn(
    engine: Engine, sid: str, prompt: Sequence[int], owner: str | None = None, **params: Any
) -> tuple[list[int], TurnEnd]:
    async def run() -> list[Event]:
        return [e async for e in engine.generate(sid, prompt, params or GREEDY, owner=owner)]

    events = asyncio.run(run())
    end = events[-1]
    assert isinstance(end, TurnEnd) and end.finish_reason is not FinishReason.ERROR, end
    return [e.token_id for e in events if isinstance(e, TokenEvent)], end


def test_the_record_is_written_at_open_and_after_every_turn(
    make: MakeStoreEngine, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    engine = make(store)
    sid = engine.open_session(system="be brief", owner="alice", sampling={"temperature": 0.0})
    assert engine.flush_store(5)
    opened = store.get(sid, now=0)
    assert opened is not None and opened.owner == "alice" and opened.position == 0
    assert opened.system_prompt == "be brief" and opened.sampling == {"temperature": 0.0}
    made, end = turn(engine, sid, [5, 9, 13])
    assert engine.flush_store(5)
    after = store.get(sid, now=0)
    assert after is not None and after.version > opened.version
    # The last sampled token is owed to the next turn: the cache has not seen it yet.
    assert after.position == end.usage.position and after.turns == 1
    assert list(after.sink_ids) + list(after.window_ids) == [5, 9, 13, *made[:-1]]
    assert after.owed_ids == (made[-1],)


def test_another_engine_rebuilds_a_session_from_its_record_with_the_same_greedy_tokens(
    make: MakeStoreEngine, tmp_path: Path
) -> None:
    """No evictions yet: the rebuilt cache is the same computation as the original."""
    store = SQLiteStore(tmp_path / "s.db")
    a, ref = make(store, sinks=4, window=64), make(None, sinks=4, window=64)
    sid, sr = a.open_session(owner="alice"), ref.open_session()
    for engine, s in ((a, sid), (ref, sr)):
        turn(engine, s, [5, 9, 13, 2])
    assert a.flush_store(5)
    b = make(SQLiteStore(tmp_path / "s.db"), sinks=4, window=64)
    assert not b.has_session(sid)
    rebuilt, end = turn(b, sid, [7, 7], owner="alice")
    stayed, ref_end = turn(ref, sr, [7, 7])
    assert rebuilt == stayed and end.usage == ref_end.usage


def test_a_rebuilt_session_past_its_window_carries_on_from_its_position(
    make: MakeStoreEngine, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    a = make(store, sinks=2, window=16)
    sid = a.open_session(owner="bob")
    _, first = turn(a, sid, list(range(3, 40)), owner="bob")
    assert first.usage.evicted_tokens > 0
    assert a.flush_store(5)
    b = make(SQLiteStore(tmp_path / "s.db"), sinks=2, window=16)
    _, end = turn(b, sid, [7, 7], owner="bob", max_new_tokens=3, ignore_eos=True)
    # The owed token and the turn's own two are fed, then three generated (one owed again).
    assert end.usage.position == first.usage.position + 1 + 2 + 2
    assert end.usage.cached_tokens == 18


def test_ownership_and_listing_hold_for_sessions_only_in_the_store(
    make: MakeStoreEngine, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    a = make(store)
    mine = [a.open_session(owner="alice") for _ in range(2)]
    a.open_session(owner="bob")
    assert a.flush_store(5)
    b = make(SQLiteStore(tmp_path / "s.db"))
    listed = b.list_sessions("alice")
    assert [i.session_id for i in listed] == mine and {i.state for i in listed} == {"stored"}
    with pytest.raises(UnknownSession, match="no session"):
        b.get_session(mine[0], owner="bob")
    with pytest.raises(UnknownSession, match="no session"):
        turn(b, mine[0], [5], owner="bob")
    assert b.get_session(mine[0], owner="alice").owner == "alice"


def test_ending_or_expiring_a_session_deletes_its_record(
    make: MakeStoreEngine, tmp_path: Path
) -> None:
    store = SQLiteStore(tmp_path / "s.db")
    clock = [1000.0]
    engine = make(store, session_ttl_s=60)
    engine._clock = lambda: clock[0]  # a test clock for the TTL
    ended, idle = engine.open_session(), engine.open_session()
    engine.end_session(ended)
    assert engine.flush_store(5) and store.get(ended, now=clock[0]) is None
    assert store.get(idle, now=clock[0]) is not None
    clock[0] += 61
    engine.step()  # the loop's expiry check runs at most once a second
    wait_until(f"idle session {idle} to expire", lambda: engine.has_session(idle), lambda x: not x)
    assert engine.flush_store(5) and store.get(idle, now=0) is None
    with pytest.raises(UnknownSession):
        engine.get_session(idle)


def test_with_a_store_idle_sessions_leave_memory_and_come_back_when_asked_for(
    make: MakeStoreEngine, tmp_path: Path
) -> None:
    engine = make(SQLiteStore(tmp_path / "s.db"), max_sessions=1, max_host_sessions=1)
    first = engine.open_session()
    turn(engine, first, [5, 9])
    second, third = engine.open_session(), engine.open_session()  # memory holds two
    assert not engine.has_session(first) and engine.has_session(third)
    _, end = turn(engine, first, [7])
    assert engine.has_session(first) and end.usage.position > 3
    assert second  # still stored
    assert engine.get_session(second).session_id == second


def test_turns_go_on_while_redis_is_down_and_the_records_follow_once_it_is_back(
    make: MakeStoreEngine, redis_server: RedisServer
) -> None:
    engine = make(RedisStore(redis_server.url))
    sid = engine.open_session(owner="alice")
    turn(engine, sid, [5, 9, 13])
    assert engine.flush_store(5)
    redis_server.stop()
    _, end = turn(engine, sid, [7, 7], owner="alice")  # served from the cache in memory
    wait_until("the store to be reported unhealthy", engine.stats, lambda s: not s.store_healthy)
    assert engine.stats().store_pending == 1 and engine.stats().store_write_errors > 0
    with pytest.raises(StoreUnreachable):
        engine.get_session("not-in-memory")
    redis_server.start()
    assert engine.flush_store(15)
    assert engine.stats().store_healthy
    record = RedisStore(redis_server.url).get(sid, now=0)
    assert record is not None and record.position == end.usage.position


def test_whole_sampling_params_still_skip_the_session_defaults(
    make: MakeStoreEngine, tmp_path: Path
) -> None:
    engine = make(SQLiteStore(tmp_path / "s.db"))
    sid = engine.open_session(sampling={"max_new_tokens": 2})
    events = asyncio.run(_events(engine, sid, SamplingParams(max_new_tokens=5, ignore_eos=True)))
    assert sum(isinstance(e, TokenEvent) for e in events) == 5
    _, end = turn(engine, sid, [4], ignore_eos=True)
    assert end.usage.generated_tokens == 2  # the session's default


async def _events(engine: Engine, sid: str, params: SamplingParams) -> list[Event]:
    return [e async for e in engine.generate(sid, [5, 6], params)]
