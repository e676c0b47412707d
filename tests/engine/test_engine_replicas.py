"""Two engines (two replicas) sharing one session store: one serves a session at a time,
a stale copy is rebuilt from the newer record, and a dead replica's lease runs out."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from sinkserve.engine.engine import Engine, Sampling
from sinkserve.engine.store import SessionRecord, SessionStore, SQLiteStore
from sinkserve.engine.tokenizer import Tokenizer
from sinkserve.engine.types import Event, FinishReason, SessionBusy, TokenEvent, TurnEnd
from tests.engine.helpers import RecordingEngine, TinyModel, tiny_model

LEASE_S = 1.5
LONG = {"max_new_tokens": 4000, "ignore_eos": True}  # cancelled long before its end
SHORT = {"max_new_tokens": 4, "ignore_eos": True}


@pytest.fixture(scope="module")
def model(tokenizer: Tokenizer) -> TinyModel:
    return tiny_model(tokenizer.vocab_size, seed=7)


@pytest.fixture
def replicas(tokenizer: Tokenizer, model: TinyModel, tmp_path: Path) -> Iterator[list[Engine]]:
    """Two started engines, replicas "a" and "b", on one SQLite file."""
    engines = [
        RecordingEngine(
            tokenizer,
            model[1],
            model[0],
            store=SQLiteStore(tmp_path / "sessions.db"),
            lease_s=LEASE_S,
            sinks=4,
            window=512,
        ).engine
        for _ in "ab"
    ]
    for name, engine in zip("ab", engines, strict=True):
        engine._holder = f"{name}/0"
        engine.start()
    yield engines
    for engine in engines:
        engine.shutdown()


def store_of(engine: Engine) -> SessionStore:
    assert engine._writer is not None  # the replicas have a store
    return engine._writer.store


def stored(engine: Engine, sid: str) -> SessionRecord:
    record = store_of(engine).get(sid, now=0)
    assert record is not None, sid
    return record


def run(engine: Engine, sid: str, prompt: Sequence[int], params: Sampling) -> TurnEnd:
    async def go() -> list[Event]:
        return [e async for e in engine.generate(sid, prompt, params)]

    events = asyncio.run(go())
    assert isinstance(events[-1], TurnEnd), events[-1]
    return events[-1]


def test_a_turn_running_on_one_replica_makes_the_other_answer_busy(replicas: list[Engine]) -> None:
    a, b = replicas
    sid = a.open_session()
    run(a, sid, [5, 9], SHORT)
    assert a.flush_store(5)
    started, done = threading.Event(), threading.Event()
    ended: list[TurnEnd] = []

    def on_events(events: list[Event]) -> None:
        started.set()
        if isinstance(events[-1], TurnEnd):
            ended.append(events[-1])
            done.set()

    turn = a.submit(sid, [7], LONG, on_events)
    assert started.wait(10)
    # b waits while a's lease could be a dead replica's; a renews it, so b gives up.
    with pytest.raises(SessionBusy, match="another replica"):
        b.submit(sid, [8], SHORT, lambda events: None)
    assert not done.is_set()  # a's turn was running all along
    a.cancel(turn)
    assert done.wait(30) and ended[0].finish_reason is FinishReason.CANCELLED
    assert a.flush_store(5)
    # Now b takes the session over from a's record, exactly where a's turn left it.
    after = run(b, sid, [8], SHORT)
    assert after.usage.position == ended[0].usage.position + 1 + 1 + SHORT["max_new_tokens"] - 1
    assert b.flush_store(5)
    # a's copy is stale: its next turn rebuilds from b's record and carries on from there.
    again = run(a, sid, [6], SHORT)
    assert again.usage.position == after.usage.position + 1 + 1 + SHORT["max_new_tokens"] - 1


def test_two_replicas_racing_for_one_session_never_both_advance_it(replicas: list[Engine]) -> None:
    """Each round both replicas start a turn at once: the loser of the claim waits for
    the winner's turn to end (or answers busy if it outlasts a lease renewal), then goes
    on from the winner's record. A split brain (both turns from the same state) would
    record fewer tokens than the turns that ran."""
    a, b = replicas
    sid = a.open_session()
    position = run(a, sid, [5, 9], SHORT).usage.position
    assert a.flush_store(5)
    b.get_session(sid)  # both hold a copy of the same version
    n = 40
    params = {"max_new_tokens": n, "ignore_eos": True}
    for _ in range(6):
        gate = threading.Barrier(2)
        outcome: dict[str, object] = {}
        threads = [
            threading.Thread(target=_race, args=(name, e, sid, params, gate, outcome))
            for name, e in zip("ab", replicas, strict=True)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        ran = [name for name in "ab" if outcome[name] == "ran"]
        position += len(ran) * (n + 1)  # the owed token, the prompt, n - 1 generated
        for engine in replicas:
            assert engine.flush_store(5)
        record = stored(a, sid)
        assert record.position == position and record.lease_until == 0, outcome


def _race(
    name: str,
    engine: Engine,
    sid: str,
    params: Sampling,
    gate: threading.Barrier,
    outcome: dict[str, object],
) -> None:
    done = threading.Event()

    def on_events(events: list[Event]) -> None:
        if isinstance(events[-1], TurnEnd):
            done.set()

    gate.wait()
    try:
        engine.submit(sid, [7], params, on_events)
    except SessionBusy:
        outcome[name] = "busy"
        return
    outcome[name] = "ran"
    assert done.wait(30)


def test_the_lease_of_a_dead_replica_runs_out_and_the_session_moves_on(
    replicas: list[Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = replicas
    sid = a.open_session()
    end = run(a, sid, [5, 9], SHORT)
    assert a.flush_store(5)
    store = store_of(a)
    record = stored(a, sid)
    # A third replica claimed the session for a turn and died without ending it.
    ghost = replace(record, version=record.version + 1, holder="ghost/1")
    ghost = replace(ghost, lease_until=time.time() + LEASE_S)
    assert store.put(ghost)
    # b's leases, as it writes them: a claim's lease is b's clock at the claim + LEASE_S.
    leases: list[float] = []
    put = store_of(b).put

    def recording_put(rec: SessionRecord) -> bool:
        if rec.session_id == sid and rec.lease_until > 0:
            leases.append(rec.lease_until)
        return put(rec)

    monkeypatch.setattr(store_of(b), "put", recording_put)
    after = run(b, sid, [7], SHORT)
    # It waited the lease out: b claimed the session only once, by its own clock, the
    # ghost's lease had run out.
    assert leases and min(leases) >= ghost.lease_until + LEASE_S, (leases, ghost.lease_until)
    assert after.finish_reason is FinishReason.LENGTH
    assert after.usage.position == end.usage.position + 1 + 1 + SHORT["max_new_tokens"] - 1


def test_a_replica_whose_session_was_taken_drops_its_copy_and_writes_nothing_older(
    replicas: list[Engine],
) -> None:
    a, b = replicas
    sid = a.open_session()
    run(a, sid, [5, 9], SHORT)
    assert a.flush_store(5)
    run(b, sid, [7], SHORT)  # b takes it over and advances it
    assert b.flush_store(5)
    newest = stored(b, sid)
    # a still holds its old copy in memory; touching it rebuilds from b's newer record.
    assert a.has_session(sid)
    tokens = [e.token_id for e in asyncio.run(_events(a, sid)) if isinstance(e, TokenEvent)]
    assert len(tokens) == SHORT["max_new_tokens"]
    assert a.flush_store(5)
    latest = stored(a, sid)
    assert latest.version > newest.version and latest.position > newest.position


async def _events(engine: Engine, sid: str) -> list[Event]:
    return [e async for e in engine.generate(sid, [4], SHORT)]
