from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service.triton.handoff import Handoff


def test_a_successor_takes_the_sessions_only_after_its_predecessor_left(tmp_path: Path):
    old = Handoff(tmp_path)
    new = Handoff(tmp_path)
    taken: list[object] = []
    collector = threading.Thread(target=lambda: taken.extend(new.collect(timeout_s=10)))
    collector.start()
    time.sleep(0.2)
    assert collector.is_alive() and taken == []
    old.leave([{"session": "a"}, {"session": "b"}])
    collector.join(timeout=5)
    assert taken == [{"session": "a"}, {"session": "b"}]
    assert list(tmp_path.glob("*.sessions")) == []
    new.release()


def test_a_successor_gives_up_waiting_after_the_timeout(tmp_path: Path):
    old = Handoff(tmp_path)
    new = Handoff(tmp_path)
    with pytest.raises(TimeoutError, match="draining"):
        new.collect(timeout_s=0.2)
    old.release()
    new.release()


def test_sessions_left_by_an_unloaded_model_wait_for_the_next_load(tmp_path: Path):
    Handoff(tmp_path).leave([1, 2])
    later = Handoff(tmp_path)
    assert later.collect(timeout_s=1) == [1, 2]
    later.release()
