"""TurnIds: a cancel names one turn, whether it comes before, during or after the start."""

from __future__ import annotations

import pytest

from sinkserve.triton_server.turn_ids import TurnIds


class Engine:
    """The engine's side: turn ids handed out and cancels received."""

    def __init__(self) -> None:
        self.running: set[int] = set()
        self.cancelled: list[int] = []
        self.next_id = 0

    def submit(self) -> int:
        self.next_id += 1
        self.running.add(self.next_id)
        return self.next_id

    def cancel(self, turn_id: int) -> bool:
        self.cancelled.append(turn_id)
        return turn_id in self.running


def test_a_cancel_before_the_turn_arrives_keeps_the_turn_from_starting() -> None:
    engine = Engine()
    turns = TurnIds(engine.cancel)
    assert turns.cancel("s", "t1") is False  # nothing runs: the caller answers the TurnEnd
    assert turns.start("s", "t1", engine.submit) is None
    assert engine.next_id == 0 and engine.cancelled == []
    # Another turn of the session, and the same id in another session, are not touched.
    assert turns.start("s", "t2", engine.submit) == 1
    assert turns.start("other", "t1", engine.submit) == 2


def test_a_cancel_of_a_running_turn_reaches_the_engine_and_only_that_turn() -> None:
    engine = Engine()
    turns = TurnIds(engine.cancel)
    first = turns.start("s", "t1", engine.submit)
    engine.running.discard(first)  # t1 ended; t2 runs now
    second = turns.start("s", "t2", engine.submit)
    assert turns.cancel("s", "t1") is False  # a late cancel of t1 leaves t2 alone
    assert engine.cancelled == [first]
    assert turns.cancel("s", "t2") is True
    assert engine.cancelled == [first, second]


def test_a_cancel_while_the_turn_is_being_submitted_applies_once_it_has_an_id() -> None:
    engine = Engine()
    turns = TurnIds(engine.cancel)
    answers: list[bool] = []

    def submit() -> int:
        answers.append(turns.cancel("s", "t1"))  # arrives while submit waits
        assert engine.cancelled == []
        return engine.submit()

    assert turns.start("s", "t1", submit) == 1
    assert answers == [True]  # the engine's own TurnEnd(CANCELLED) follows
    assert engine.cancelled == [1]


def test_a_refused_submit_forgets_the_turn_so_it_can_be_sent_again() -> None:
    engine = Engine()
    turns = TurnIds(engine.cancel)

    def busy() -> int:
        raise RuntimeError("session busy")

    with pytest.raises(RuntimeError):
        turns.start("s", "t1", busy)
    assert turns.start("s", "t1", engine.submit) == 1


def test_only_the_most_recent_ids_are_kept() -> None:
    engine = Engine()
    turns = TurnIds(engine.cancel, capacity=2)
    for name in ("a", "b", "c"):
        turns.cancel("s", name)
    assert turns.start("s", "a", engine.submit) == 1  # forgotten: it starts
    assert turns.start("s", "c", engine.submit) is None
