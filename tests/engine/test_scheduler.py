"""The scheduler and slot manager are pure bookkeeping: tested without torch or a model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sinkserve.engine.scheduler import Scheduler, Session, Turn
from sinkserve.engine.slots import SlotManager
from sinkserve.engine.stops import StopMatcher
from sinkserve.engine.types import SamplingParams

# The scheduler alone: its turns and sessions hold nothing of an engine.
BareScheduler = Scheduler[None, None, None]
BareSession = Session[None, None, None]


def new_session(session_id: str, sinks: int, window: int, last_used: float) -> BareSession:
    return Session(session_id, sinks, window, last_used)


def make_turn(
    sched: BareScheduler, session: BareSession, n: int, now: float = 0.0
) -> Turn[None, None, None]:
    turn = Turn(sched.next_turn_id(), session, SamplingParams(), list(range(n)), now, print)
    session.turn = turn
    sched.add(turn)
    return turn


def test_the_scheduler_and_slot_manager_import_no_torch() -> None:
    code = (
        "import sys, sinkserve.engine.scheduler, sinkserve.engine.slots; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_lowest_free_slot_is_allocated_first_and_freed_slots_return() -> None:
    slots = SlotManager(3)
    assert [slots.allocate() for _ in range(3)] == [0, 1, 2]
    assert not slots.can_allocate()
    slots.free(1)
    assert slots.allocate() == 1
    with pytest.raises(ValueError):
        slots.free(3)  # never handed out
    slots.free(2)
    with pytest.raises(ValueError):
        slots.free(2)  # twice


def test_a_step_batches_decodes_with_prefill_chunks_under_the_budget() -> None:
    sched: BareScheduler = Scheduler(num_slots=4, step_token_budget=10, slot_wait_s=1.0)
    a, b = new_session("a", 4, 8, 0.0), new_session("b", 4, 8, 0.0)
    ta, tb = make_turn(sched, a, 3), make_turn(sched, b, 25)
    plan = sched.schedule(0.0, [a, b])
    assert [len(i.tokens) for i in plan.items] == [3, 7]
    assert plan.sampled == [ta]  # a's prompt is complete; b's is not
    sched.advance(plan)
    ta.next_token = 99
    plan = sched.schedule(0.0, [a, b])
    assert [(len(i.tokens), i.want_logits) for i in plan.items] == [(1, True), (9, False)]
    assert plan.items[0].start == 3 and plan.items[1].start == 7
    sched.advance(plan)
    assert a.position == 4 and b.position == 16 and tb.fed == 16


def test_prefill_keeps_moving_when_decodes_fill_the_budget() -> None:
    sched: BareScheduler = Scheduler(num_slots=16, step_token_budget=8, slot_wait_s=1.0)
    sessions = [new_session(str(i), 0, 8, 0.0) for i in range(10)]
    for s in sessions[:9]:
        make_turn(sched, s, 1)
    for _ in range(2):  # 9 one-token prompts take two steps of budget 8
        plan = sched.schedule(0.0, sessions)
        sched.advance(plan)
        for t in plan.sampled:
            t.next_token = 1
    make_turn(sched, sessions[9], 100)
    plan = sched.schedule(0.0, sessions)
    assert sum(i.want_logits for i in plan.items) == 9
    assert [len(i.tokens) for i in plan.items if not i.want_logits] == [2]


def test_the_least_recently_used_idle_session_is_swapped_out_for_a_new_turn() -> None:
    sched: BareScheduler = Scheduler(num_slots=2, step_token_budget=64, slot_wait_s=1.0)
    a, b, c = (new_session(x, 4, 8, t) for x, t in (("a", 5.0), ("b", 1.0), ("c", 9.0)))
    for s in (a, b):
        t = make_turn(sched, s, 2)
        sched.advance(sched.schedule(0.0, [a, b, c]))
        sched.finish(t)
    make_turn(sched, c, 2)
    plan = sched.schedule(0.0, [a, b, c])
    assert plan.swap_out == [(b, 1)] and c.slot == 1 and b.slot is None


def test_a_turn_that_finds_every_slot_busy_times_out_after_the_wait() -> None:
    sched: BareScheduler = Scheduler(num_slots=1, step_token_budget=64, slot_wait_s=2.0)
    a, b = new_session("a", 4, 8, 0.0), new_session("b", 4, 8, 0.0)
    make_turn(sched, a, 2)
    tb = make_turn(sched, b, 2, now=0.0)
    assert sched.schedule(1.0, [a, b]).timed_out == []
    assert sched.schedule(2.5, [a, b]).timed_out == [tb]


def test_stop_strings_split_across_tokens_are_caught_and_never_shown() -> None:
    m = StopMatcher(("</end>",))
    assert m.push("hello </") == ("hello ", False)
    assert m.push("en") == ("", False)
    assert m.push("d> more") == ("", True)
    m = StopMatcher(("STOP",))
    assert m.push("ST") == ("", False)
    assert m.push("ay") == ("STay", False)
    assert m.flush() == ""
