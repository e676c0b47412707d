from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sinkserve.engine.engine import SessionSnapshot
from sinkserve.triton_server.handoff import Handoff


def snap(sid: str, kv: object = None) -> SessionSnapshot:
    return SessionSnapshot(sid, None, 3, [1], [2, 3], [], False, 1, kv=kv)  # type: ignore[arg-type]


def test_a_successor_takes_the_sessions_only_after_its_predecessor_left(tmp_path: Path) -> None:
    old = Handoff(tmp_path)
    new = Handoff(tmp_path)
    # A spy on the collector's looks at its predecessors: once it has seen the live one
    # twice, it is waiting for it (it looked again instead of taking what is there).
    looks: list[int] = []
    waiting = threading.Event()
    alive = new.predecessors_alive

    def look() -> list[Path]:
        found = alive()
        looks.append(len(found))
        if looks.count(1) >= 2:
            waiting.set()
        return found

    new.predecessors_alive = look  # type: ignore[method-assign]
    taken: list[object] = []
    collector = threading.Thread(target=lambda: taken.extend(new.collect("fp", timeout_s=60)))
    collector.start()
    assert waiting.wait(60), looks
    assert collector.is_alive() and taken == []
    old.leave("fp", [snap("a"), snap("b")])
    collector.join(timeout=60)
    assert taken == [snap("a"), snap("b")]
    assert looks[-1] == 0  # it took them once it saw no predecessor
    assert list(tmp_path.glob("*.sessions")) == []
    new.release()


def test_a_successor_gives_up_waiting_after_the_timeout(tmp_path: Path) -> None:
    old = Handoff(tmp_path)
    new = Handoff(tmp_path)
    with pytest.raises(TimeoutError, match="draining"):
        new.collect("fp", timeout_s=0.2)
    old.release()
    new.release()


def test_sessions_left_by_an_unloaded_model_wait_for_the_next_load(tmp_path: Path) -> None:
    Handoff(tmp_path).leave("fp", [snap("a", kv="exact")])
    later = Handoff(tmp_path)
    assert later.collect("fp", timeout_s=1) == [snap("a", kv="exact")]
    later.release()


def test_exact_kv_is_dropped_when_the_engine_differs(tmp_path: Path) -> None:
    Handoff(tmp_path).leave("old weights", [snap("a", kv="exact")])
    later = Handoff(tmp_path)
    assert later.collect("new weights", timeout_s=1) == [snap("a")]
    later.release()
