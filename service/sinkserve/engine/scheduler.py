"""Which tokens run in the next step, and what the step did to the sessions (no torch).

Every step batches one decode token for each generating turn with chunks of pending
prefill under a per-step token budget (chunked prefill), so a long prompt never stalls the
sessions that are generating. Turns join and leave between steps.

Session invariants:
- `position` counts the tokens fed to the session's cache; the cache holds the first
  `sinks` of them and the last `window` of them (`sink_tokens`, `window_tokens`).
- `owed` are tokens the conversation holds but the cache has not seen yet (the last
  sampled token of a turn); the next turn feeds them before its own.
- A session is in a slot (`slot`), or swapped to host (`host`), or in neither (new, or
  waiting for a rebuild from its tokens: `rebuild`).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sinkserve.engine.slots import SlotManager
from sinkserve.engine.types import Event, SamplingParams

# What the engine keeps on turns and sessions, opaque here (this module stays torch-free):
StateT = TypeVar("StateT")  # a turn's engine-side state (detokenizer, stop matcher, rng)
HostT = TypeVar("HostT")  # the runner's exact host copy of a swapped-out slot
ClaimT = TypeVar("ClaimT")  # the store record of the claim a running turn holds


@dataclass(frozen=True)
class StepItem:
    """Tokens of one session fed in one step (from the scheduler; plain ints)."""

    slot: int
    tokens: Sequence[int]
    start: int  # absolute position of tokens[0]
    want_logits: bool  # the logits after the last token are needed
    all_logits: bool = False  # the logits after every token (perplexity evaluation)


@dataclass(eq=False)  # identity semantics: mutable state, hashable
class Turn(Generic[StateT, HostT, ClaimT]):
    """One user turn: its tokens to prefill, then generation until a finish condition."""

    turn_id: int
    session: Session[StateT, HostT, ClaimT]
    params: SamplingParams
    pending: list[int]  # owed + this turn's tokens, fed by prefill
    submitted_at: float
    on_events: Callable[[list[Event]], None]
    fed: int = 0  # how many of `pending` the cache has seen
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, not yet fed
    cancelled: bool = False
    state: StateT | None = None  # engine-side per-turn state (detokenizer, stop matcher, rng)

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.pending)


@dataclass(eq=False)
class Session(Generic[StateT, HostT, ClaimT]):
    session_id: str
    sinks: int
    window: int
    last_used: float  # wall-clock seconds: it outlives the process (the session record)
    system: str | None = None
    owner: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)  # the session's sampling defaults
    created_at: float = 0.0
    version: int = 0  # of the last record written to the session store
    lease_until: float = 0.0  # while a turn runs: until when its claim holds the session
    claimed: ClaimT | None = None  # the store record of that claim (renewed as the turn runs)
    lost: bool = False  # another replica took the session: this copy must not be written
    position: int = 0
    sink_tokens: list[int] = field(default_factory=list)
    window_tokens: deque[int] = field(default_factory=deque)
    owed: list[int] = field(default_factory=list)
    last_finished_eos: bool = False
    turns: int = 0
    slot: int | None = None
    host: HostT | None = None  # the runner's exact host copy of the slot
    rebuild: list[tuple[int, list[int]]] = field(default_factory=list)  # (start, tokens)
    turn: Turn[StateT, HostT, ClaimT] | None = None

    def __post_init__(self) -> None:
        self.window_tokens = deque(self.window_tokens, maxlen=self.window)

    def feed(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if self.position < self.sinks:
                self.sink_tokens.append(t)
            else:
                self.window_tokens.append(t)
            self.position += 1

    @property
    def cached_tokens(self) -> int:
        return len(self.sink_tokens) + len(self.window_tokens)

    @property
    def evicted_tokens(self) -> int:
        return self.position - self.cached_tokens

    def cache_token_ids(self) -> list[int]:
        return self.sink_tokens + list(self.window_tokens)


@dataclass
class Plan(Generic[StateT, HostT, ClaimT]):
    """One step: slot moves to make first, then items to run. `sampled[i]` is the turn
    whose token comes from the i-th item that wants logits."""

    swap_out: list[tuple[Session[StateT, HostT, ClaimT], int]]
    swap_in: list[tuple[Session[StateT, HostT, ClaimT], int]]
    clear: list[int]
    items: list[StepItem]
    # Who each item feeds, and how many tokens.
    fed: list[tuple[Turn[StateT, HostT, ClaimT] | Session[StateT, HostT, ClaimT], int]]
    sampled: list[Turn[StateT, HostT, ClaimT]]
    timed_out: list[Turn[StateT, HostT, ClaimT]]


class Scheduler(Generic[StateT, HostT, ClaimT]):
    """Admission into slots, LRU swapping of idle sessions, and step composition."""

    def __init__(self, num_slots: int, step_token_budget: int, slot_wait_s: float) -> None:
        self.slots = SlotManager(num_slots)
        self.budget = step_token_budget
        self.slot_wait_s = slot_wait_s
        self.waiting: deque[Turn[StateT, HostT, ClaimT]] = deque()
        self.running: list[Turn[StateT, HostT, ClaimT]] = []
        self._ids = itertools.count(1)

    def next_turn_id(self) -> int:
        return next(self._ids)

    def add(self, turn: Turn[StateT, HostT, ClaimT]) -> None:
        self.waiting.append(turn)

    def release(self, session: Session[StateT, HostT, ClaimT]) -> int | None:
        """Forget a session's slot (ended or expired); returns the slot to clear."""
        slot, session.slot, session.host = session.slot, None, None
        if slot is not None:
            self.slots.free(slot)
        return slot

    def finish(self, turn: Turn[StateT, HostT, ClaimT]) -> None:
        if turn in self.running:
            self.running.remove(turn)
        elif turn in self.waiting:
            self.waiting.remove(turn)
        turn.session.turn = None

    def schedule(
        self, now: float, sessions: Sequence[Session[StateT, HostT, ClaimT]]
    ) -> Plan[StateT, HostT, ClaimT]:
        plan: Plan[StateT, HostT, ClaimT] = Plan([], [], [], [], [], [], [])
        self._admit(now, sessions, plan)
        decode = [t for t in self.running if not t.prefilling and not t.session.rebuild]
        budget = self.budget - len(decode)
        for t in decode:
            assert t.next_token is not None and t.session.slot is not None
            plan.items.append(StepItem(t.session.slot, [t.next_token], t.session.position, True))
            plan.fed.append((t, 1))
            plan.sampled.append(t)
        # Prefill keeps moving (a quarter of the budget) even when decodes fill the budget.
        budget = max(budget, self.budget // 4, 1)
        for t in self.running:
            s = t.session
            if budget <= 0 or not (t.prefilling or s.rebuild):
                continue
            assert s.slot is not None
            if s.rebuild:
                start, toks = s.rebuild[0]
                n = min(budget, len(toks))
                plan.items.append(StepItem(s.slot, toks[:n], start, False))
                plan.fed.append((s, n))
            else:
                n = min(budget, len(t.pending) - t.fed)
                done = t.fed + n == len(t.pending)
                plan.items.append(StepItem(s.slot, t.pending[t.fed : t.fed + n], s.position, done))
                plan.fed.append((t, n))
                if done:
                    plan.sampled.append(t)
            budget -= n
        return plan

    def _admit(
        self,
        now: float,
        sessions: Sequence[Session[StateT, HostT, ClaimT]],
        plan: Plan[StateT, HostT, ClaimT],
    ) -> None:
        """Move waiting turns into slots: their own, a free one, or one taken from the
        least recently used idle session (swapped to host)."""
        still: deque[Turn[StateT, HostT, ClaimT]] = deque()
        for turn in self.waiting:
            s = turn.session
            if s.slot is None:
                if not self.slots.can_allocate():
                    victim = self._lru_idle(sessions)
                    if victim is not None:
                        slot = victim.slot
                        assert slot is not None
                        plan.swap_out.append((victim, slot))
                        victim.slot = None
                        self.slots.free(slot)
                if self.slots.can_allocate():
                    s.slot = self.slots.allocate()
                    if s.host is not None:
                        plan.swap_in.append((s, s.slot))
                    else:
                        plan.clear.append(s.slot)
            if s.slot is not None:
                self.running.append(turn)
            elif now - turn.submitted_at > self.slot_wait_s:
                plan.timed_out.append(turn)
            else:
                still.append(turn)
        self.waiting = still

    def _lru_idle(
        self, sessions: Sequence[Session[StateT, HostT, ClaimT]]
    ) -> Session[StateT, HostT, ClaimT] | None:
        idle = [s for s in sessions if s.slot is not None and s.turn is None]
        return min(idle, key=lambda s: s.last_used, default=None)

    def advance(self, plan: Plan[StateT, HostT, ClaimT]) -> None:
        """Account the tokens a step fed (sampling results are the engine's business)."""
        for who, n in plan.fed:
            if isinstance(who, Session):  # a rebuild chunk: tokens already counted
                start, toks = who.rebuild[0]
                if n == len(toks):
                    who.rebuild.pop(0)
                else:
                    who.rebuild[0] = (start + n, toks[n:])
                continue
            s = who.session
            if who.prefilling:
                s.feed(who.pending[who.fed : who.fed + n])
                who.fed += n
            else:
                assert who.next_token is not None
                s.feed([who.next_token])
                who.next_token = None
