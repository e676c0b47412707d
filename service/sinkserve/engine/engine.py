"""The engine: sessions with StreamingLLM caches served by one in-flight-batching loop.

The engine is the one owner of a session's lifecycle: its id, owner, sampling defaults,
TTL, busy state, turns and cache. With a session store (`store.StoreWriter`) it writes
each session's record on open and at every turn's end (never per token, never waiting on
the store), deletes it when the session ends or expires, and rebuilds a session it does
not hold from its record (at most sinks + window tokens to prefill) when asked for it.

Public API (thread-safe; the Triton model, the CLI and the tests use it):

    engine = Engine.load(config, store)    # weights, tokenizer, runner (progress bar)
    engine.start()                         # the step loop runs in its own thread
    sid = engine.open_session(system="...", owner="alice", sampling={"temperature": 0.7})
    turn = engine.submit(sid, "Hello", {"max_new_tokens": 64}, on_events, owner="alice")
    async for event in engine.generate(sid, "Hello", SamplingParams()): ...  # whole: greedy
    engine.get_session(sid, "alice"); engine.list_sessions("alice")
    engine.cancel(turn); engine.cancel_session(sid, "alice"); engine.end_session(sid)
    snaps = engine.export_sessions(); engine.import_sessions(snaps)   # across reloads
    engine.stats(); engine.shutdown()

`owner=None` skips the ownership check (callers inside the process: CLI, benchmarks).
`on_events(events)` is called from the engine thread once per step per turn with that
step's events: `TokenEvent`s, and a `TurnEnd` last in the final call. Keep it short.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import structlog
import torch

from sinkserve.config import EngineConfig
from sinkserve.engine.chat_format import ChatFormat
from sinkserve.engine.kv_cache import HostSlot
from sinkserve.engine.runner import Runner
from sinkserve.engine.sampler import SampleRow, turn_seed
from sinkserve.engine.sampling_defaults import default_sampling
from sinkserve.engine.scheduler import Scheduler, Session, Turn
from sinkserve.engine.stops import StopMatcher
from sinkserve.engine.store import SessionRecord, SessionStore, StoreUnavailable, StoreWriter
from sinkserve.engine.tokenizer import IncrementalDecoder, Tokenizer
from sinkserve.engine.types import (
    EngineError,
    EngineStats,
    EngineStopped,
    Event,
    FinishReason,
    InvalidRequest,
    ResourceExhausted,
    SamplingParams,
    SessionBusy,
    SessionInfo,
    StoreUnreachable,
    TokenEvent,
    TurnEnd,
    UnknownSession,
    Usage,
)

T = TypeVar("T")

# A cancelled turn ends at the next step; what a caller waiting for that (end_session, a
# new turn of the session) waits at most, should the loop be stuck.
CANCELLED_TURN_WAIT_S = 5.0
OnEvents = Callable[[list[Event]], None]
Sampling = SamplingParams | Mapping[str, Any]  # whole params, or overrides of the defaults


@dataclass
class SessionSnapshot:
    """Everything needed to continue a session elsewhere: its tokens, and optionally the
    exact KV (valid only for the same weights, dtype and cache shape)."""

    session_id: str
    system: str | None
    position: int
    sink_tokens: list[int]
    window_tokens: list[int]
    owed: list[int]
    last_finished_eos: bool
    turns: int
    owner: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    last_active: float = 0.0
    version: int = 0
    kv: HostSlot | None = None


@dataclass
class _TurnState:
    """Per-turn engine state that the scheduler does not look at."""

    decoder: IncrementalDecoder
    stops: StopMatcher
    rng: torch.Generator | None
    prompt_tokens: int
    inherited: int  # tokens owed by the previous turn, at the head of `pending`
    end_session: bool = False  # end_session() arrived while the turn ran


# The scheduler's turns and sessions, holding what the engine keeps on them.
_Turn = Turn[_TurnState, HostSlot, SessionRecord]
_Session = Session[_TurnState, HostSlot, SessionRecord]


def _state(turn: _Turn) -> _TurnState:
    """A submitted turn's engine state (`submit` sets it as it makes the turn)."""
    assert turn.state is not None
    return turn.state


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        runner: Runner,
        tokenizer: Tokenizer,
        store: SessionStore | None = None,
        clock: Callable[[], float] = time.time,
        replica: str = "",
        recommended: Mapping[str, Any] | None = None,
    ) -> None:
        """`recommended`: the checkpoint's recommended sampling (`Engine.load` reads it),
        used under `config.sampling == "model"`."""
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer)
        self.log = structlog.get_logger("sinkserve.engine")
        self._clock = clock  # wall clock: TTLs and times outlive the process in records
        self._sched: Scheduler[_TurnState, HostSlot, SessionRecord] = Scheduler(
            config.max_sessions, config.step_token_budget, config.slot_wait_s
        )
        self._writer = (
            StoreWriter(store, clock=clock, on_refused=self._on_refused)
            if store is not None
            else None
        )
        # Who this engine is in the records it writes: "replica/instance". A successor of
        # the same replica (a restart) may take over a lease its predecessor left.
        self._holder = f"{replica or socket.gethostname()}/{secrets.token_hex(4)}"
        # Every turn starts from these, then its session's defaults, then its own fields.
        self._defaults = default_sampling(config, recommended or {})
        self._sessions: dict[str, _Session] = {}
        self._turns: dict[int, _Turn] = {}
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()  # held across a store read: never under _lock
        self._wake = threading.Condition(self._lock)
        self._ended = threading.Condition(self._lock)  # notified when a turn or session ends
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters = {"prefill": 0, "generated": 0, "steps": 0, "evicted": 0}
        self._step_seconds: deque[float] = deque(maxlen=10_000)  # drained by metrics
        self._last_expiry = time.monotonic()
        self.log.info(
            "engine ready",
            bytes_per_slot=runner.bytes_per_slot,
            slots=config.max_sessions,
            sinks=config.sinks,
            window=config.window,
            store=type(store).__name__ if store is not None else None,
            sampling=asdict(self._defaults),
        )

    @classmethod
    def load(
        cls, config: EngineConfig, store: SessionStore | None = None, replica: str = ""
    ) -> Engine:
        """Load the checkpoint named by `config.model` (default: SmolLM2-135M-Instruct).

        Builds on one intra-op thread; the step thread takes `config.threads` (torch's
        default when 0) for itself. Every thread that runs a parallel torch op keeps an
        OpenMP team of its own, and once a process holds more OpenMP threads than CPUs,
        libgomp stops spin-waiting between parallel regions, so each of a step's
        thousands of regions pays a futex wake-up: with a 2-thread team left behind by
        loading, a SmolLM2 decode step on 2 cores took 37 ms, not 15. So the calling
        thread should run no parallel torch work of its own while the engine runs."""
        from sinkserve.engine.loader import build_runner

        before = torch.get_num_threads()
        config = replace(config, threads=config.threads or before)
        torch.set_num_threads(1)
        try:
            runner, tokenizer = build_runner(config)
        finally:
            torch.set_num_threads(before)  # no team yet: one forms at the next parallel op
        recommended = dict(runner.model.cfg.sampling)  # read with the weights
        return cls(config, runner, tokenizer, store, replica=replica, recommended=recommended)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sinkserve-engine", daemon=True)
            self._thread.start()
            if self._writer is not None:
                threading.Thread(
                    target=self._keep_leases, name="sinkserve-lease", daemon=True
                ).start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel every turn (each gets its TurnEnd), stop the loop, then write every
        record still waiting for the store (bounded by the same timeout)."""
        with self._lock:
            for turn in list(self._turns.values()):
                turn.cancelled = True
            self._wake.notify()
        deadline = time.monotonic() + timeout_s
        while self._turns and time.monotonic() < deadline and self._thread is not None:
            time.sleep(0.01)
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        if self._writer is not None:
            self._writer.close(max(0.0, deadline - time.monotonic()) + 1.0)

    def flush_store(self, timeout_s: float) -> bool:
        """Wait until every record written so far reached the store (tests, shutdown)."""
        return self._writer is None or self._writer.flush(timeout_s)

    # ---- sessions --------------------------------------------------------------------

    def open_session(
        self,
        session_id: str | None = None,
        system: str | None = None,
        *,
        owner: str = "",
        sampling: Mapping[str, Any] | None = None,
    ) -> str:
        """A new session of `owner`; `sampling` overrides the server's defaults for every
        turn of it (validated here). ResourceExhausted past the owner's quota."""
        defaults = dict(sampling or {})
        self._defaults.updated(defaults).validate(self.config.max_new_tokens)
        if system:
            try:
                self._check_fits("system prompt", len(self.chat.first_turn(system, "")))
            except ValueError as err:  # the model's chat template takes no system prompt
                raise InvalidRequest(str(err)) from None
        sid = session_id or secrets.token_urlsafe(16)
        quota = self.config.max_sessions_per_owner
        with self._open_lock:  # count and insert as one: opens run on several threads
            owned = self._owned(owner)
            if len(owned) >= quota:
                # Unless one is ended first, the least recently used one expires then.
                wait = min(owned.values()) + self.config.session_ttl_s - self._clock()
                raise ResourceExhausted(
                    f"owner {owner!r} already has {quota} sessions (the per-owner limit); "
                    f"end one first (retry after {max(wait, 1.0):.0f} s)"
                )
            with self._lock:
                if sid in self._sessions:
                    raise InvalidRequest(f"session {sid!r} already exists")
                self._make_room()
                s = self._new_session(sid, system)
                s.owner, s.sampling, s.created_at = owner, defaults, s.last_used
                self._sessions[sid] = s
                self._persist(s)
        self.log.info("session opened", session_id=sid, owner=owner)
        return sid

    def _new_session(self, sid: str, system: str | None) -> _Session:
        c = self.config
        now = self._clock()
        return Session(sid, c.sinks, c.window, last_used=now, system=system, created_at=now)

    def _make_room(self) -> None:
        """Keep at most max_sessions + max_host_sessions sessions in memory (lock held):
        with a store, the least recently used idle one leaves memory (its record stays)."""
        limit = self.config.max_sessions + self.config.max_host_sessions
        if len(self._sessions) < limit:
            return
        idle = [s for s in self._sessions.values() if s.turn is None]
        if self._writer is None or not idle:
            raise ResourceExhausted(f"too many sessions in memory ({limit})")
        self._forget(min(idle, key=lambda s: s.last_used))

    def _forget(self, s: _Session) -> None:
        """Drop a session from memory only (lock held): its record stays in the store."""
        del self._sessions[s.session_id]
        slot = self._sched.release(s)
        if slot is not None:
            self.runner.clear(slot)
        self.log.info("session left memory", session_id=s.session_id)

    def _owned(self, owner: str) -> dict[str, float]:
        """The owner's sessions, in memory or stored: id -> last active (unix seconds)."""
        with self._lock:
            owned = {s.session_id: s.last_used for s in self._sessions.values() if s.owner == owner}
        if self._writer is not None:
            for r in self._stored(self._writer.owned_by, owner):
                owned.setdefault(r.session_id, r.last_active)
        return owned

    def _stored(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` on the store, its failure as the engine's UNAVAILABLE error."""
        try:
            return call(*args)
        except StoreUnavailable as exc:
            raise StoreUnreachable(f"the session store is unreachable: {exc}") from None

    def _session(self, session_id: str, owner: str | None) -> _Session:
        """The session, from memory or rebuilt from its record; NOT_FOUND when unknown,
        and (in the same words) when `owner` is given and is not its owner: a caller
        learns nothing about the sessions of another."""
        if not session_id:
            raise InvalidRequest("session_id is empty")
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            s = self._load(session_id)
        if owner is not None and s.owner != owner:
            raise _unknown(session_id)
        return s

    def _load(self, session_id: str) -> _Session:
        """Bring a session back from its record: it is rebuilt from its tokens (at most
        sinks + window) on its next turn. Store I/O happens outside the lock."""
        unknown = _unknown(session_id)
        if self._writer is None:
            raise unknown
        record: SessionRecord | None = self._stored(self._writer.get, session_id)
        if record is None:
            raise unknown
        with self._lock:
            if (s := self._sessions.get(session_id)) is not None:
                return s  # loaded by another request meanwhile
            self._make_room()
            s = self._from_record(record)
            self._sessions[session_id] = s
        self.log.info("session loaded from the store", session_id=session_id, position=s.position)
        return s

    def _from_record(self, r: SessionRecord) -> _Session:
        s = self._new_session(r.session_id, r.system_prompt)
        s.owner, s.sampling, s.version = r.owner, dict(r.sampling), r.version
        s.created_at, s.last_used = r.created_at, r.last_active
        s.position, s.turns, s.last_finished_eos = r.position, r.turns, r.last_finished_eos
        self._set_tokens(s, list(r.sink_ids), list(r.window_ids), list(r.owed_ids))
        return s

    def _set_tokens(
        self, s: _Session, sinks: list[int], window: list[int], owed: list[int]
    ) -> None:
        """Give a session without a cache its tokens, to be rebuilt on its next turn."""
        s.sink_tokens = sinks[: s.sinks]
        s.window_tokens.extend(window)
        s.owed = owed
        start = s.position - len(s.window_tokens)
        s.rebuild = [(a, t) for a, t in ((0, s.sink_tokens), (start, list(s.window_tokens))) if t]

    def _record(self, s: _Session) -> SessionRecord:
        return SessionRecord(
            session_id=s.session_id,
            owner=s.owner,
            system_prompt=s.system,
            sampling=dict(s.sampling),
            sink_ids=tuple(s.sink_tokens),
            window_ids=tuple(s.window_tokens),
            owed_ids=tuple(s.owed),
            position=s.position,
            turns=s.turns,
            last_finished_eos=s.last_finished_eos,
            created_at=s.created_at,
            last_active=s.last_used,
            expire_at=s.last_used + self.config.session_ttl_s,
            version=s.version,
            holder=self._holder,
            lease_until=s.lease_until,
        )

    def _persist(self, s: _Session) -> None:
        """Queue the session's record for the store (lock held; never waits on I/O)."""
        if self._writer is not None:
            s.version += 1
            self._writer.put(self._record(s))

    # ---- one replica at a time -------------------------------------------------------

    def _claim(self, s: _Session) -> _Session:
        """Take the session's lease for a turn (request thread; store I/O, no lock held).

        Invariant: a turn runs only on the engine whose claim, a record of a higher
        version than any stored, the store accepted (a compare-and-set on the version).
        So this engine first makes sure it holds the newest state: a copy older than the
        store's (another replica advanced the session) is dropped and rebuilt from the
        record. A live lease of another replica means a turn runs there: wait while the
        lease runs out unrenewed (its holder died), else SessionBusy."""
        if self._writer is None:
            return s
        try:
            return self._claim_in_store(s)
        except StoreUnreachable:
            # Availability first: a session in memory keeps serving through a store outage
            # (its records follow once the store is back; if two replicas both advanced it
            # meanwhile, the higher version wins and the other copy is dropped).
            self.log.warning("turn runs unclaimed: store unreachable", session_id=s.session_id)
            return s

    def _claim_in_store(self, s: _Session) -> _Session:
        assert self._writer is not None
        store, sid = self._writer.store, s.session_id
        deadline = time.monotonic() + self.config.lease_s + 1.0
        waited_on: SessionRecord | None = None
        while True:
            now = self._clock()
            stored = self._stored(store.get, sid, now)
            if stored is None and not self._writer.has_pending(sid):
                with self._lock:
                    if self._sessions.get(sid) is s and s.turn is None:
                        self._forget(s)
                raise _unknown(sid)
            if stored is not None and self._leased_elsewhere(stored, now):
                renewed = waited_on is not None and stored.version != waited_on.version
                if renewed or time.monotonic() > deadline:
                    raise SessionBusy(f"session {sid!r} has a turn running on another replica")
                waited_on = stored
                time.sleep(0.1)
                continue
            if stored is not None and stored.version > s.version:
                s = self._refresh(s, stored)
            with self._lock:
                if s.turn is not None:
                    raise SessionBusy(
                        f"session {sid!r} already has a turn running; wait for its "
                        "TurnEnd or cancel it"
                    )
                version = max(s.version, stored.version if stored else 0) + 1
                claim = replace(
                    self._record(s), version=version, lease_until=now + self.config.lease_s
                )
            if self._stored(store.put, claim):
                with self._lock:
                    s.version, s.lease_until, s.claimed = claim.version, claim.lease_until, claim
                return s
            if time.monotonic() > deadline:  # lost every race meanwhile
                raise SessionBusy(f"session {sid!r} is being taken by another replica")

    def _leased_elsewhere(self, r: SessionRecord, now: float) -> bool:
        replica = self._holder.rsplit("/", 1)[0]
        theirs = r.holder.rsplit("/", 1)[0]
        return r.lease_until > now and r.holder != self._holder and theirs != replica

    def _refresh(self, s: _Session, stored: SessionRecord) -> _Session:
        """Replace a stale copy of a session by one rebuilt from the newer record."""
        with self._lock:
            if s.turn is not None:
                raise SessionBusy(f"session {s.session_id!r} has a turn running")
            if self._sessions.get(s.session_id) is s:
                self._forget(s)
            fresh = self._sessions.get(s.session_id)
            if fresh is None or fresh.version < stored.version:
                if fresh is not None:
                    self._forget(fresh)
                fresh = self._from_record(stored)
                self._sessions[s.session_id] = fresh
        self.log.info("stale session rebuilt from the store", session_id=s.session_id)
        return fresh

    def _keep_leases(self) -> None:
        """Renew the lease of every running turn a third of a lease before it runs out
        (its own thread: never the step loop). The renewal is the claimed record with a
        new version and lease, never the turn's half-done state."""
        assert self._writer is not None
        period = self.config.lease_s / 3
        while not self._stopping:
            time.sleep(period)
            now = self._clock()
            with self._lock:
                for s in self._sessions.values():
                    if s.turn is None or s.claimed is None or s.lost:
                        continue
                    renewal = replace(
                        s.claimed, version=s.version + 1, lease_until=now + self.config.lease_s
                    )
                    s.version, s.lease_until, s.claimed = (
                        renewal.version,
                        renewal.lease_until,
                        renewal,
                    )
                    self._writer.put(renewal)

    def _on_refused(self, record: SessionRecord) -> None:
        """The store holds a newer version than one this engine wrote: if it was this
        engine's latest, another replica took the session. Its running turn is cancelled
        and never recorded; the copy leaves memory (the next touch rebuilds it)."""
        with self._lock:
            s = self._sessions.get(record.session_id)
            if s is None or record.version < s.version:
                return  # superseded by a later write of our own
            s.lost = True
            if s.turn is not None:
                s.turn.cancelled = True
                self._wake.notify()
            else:
                self._forget(s)
        self.log.warning("session taken by another replica", session_id=record.session_id)

    def has_session(self, session_id: str) -> bool:
        """Whether the session is in this engine's memory (the store is not asked)."""
        with self._lock:
            return session_id in self._sessions

    def get_session(self, session_id: str, owner: str | None = None) -> SessionInfo:
        s = self._session(session_id, owner)
        with self._lock:
            return self._info(s)

    def list_sessions(self, owner: str) -> list[SessionInfo]:
        """The owner's sessions, in memory or only stored, oldest first."""
        with self._lock:
            held = [s for s in self._sessions.values() if s.owner == owner]
            mine = {s.session_id: self._info(s) for s in held}
        if self._writer is not None:
            for r in self._stored(self._writer.owned_by, owner):
                mine.setdefault(r.session_id, self._stored_info(r))
        return sorted(mine.values(), key=lambda i: (i.created_at, i.session_id))

    def _info(self, s: _Session) -> SessionInfo:
        state = (
            ("generating" if s.slot is not None else "waiting")
            if s.turn is not None
            else "slot"
            if s.slot is not None
            else "host"
            if s.host is not None
            else "new"  # never in a slot yet, or waiting to be rebuilt
        )
        return SessionInfo(
            session_id=s.session_id,
            owner=s.owner,
            position=s.position,
            cached_tokens=s.cached_tokens,
            evicted_tokens=s.evicted_tokens,
            turns=s.turns,
            turn_running=s.turn is not None,
            created_at=s.created_at,
            last_active=s.last_used,
            expire_at=s.last_used + self.config.session_ttl_s,
            state=state,
            sampling=asdict(self._defaults.updated(s.sampling)),
        )

    def _stored_info(self, r: SessionRecord) -> SessionInfo:
        return SessionInfo(
            session_id=r.session_id,
            owner=r.owner,
            position=r.position,
            cached_tokens=len(r.sink_ids) + len(r.window_ids),
            evicted_tokens=r.evicted,
            turns=r.turns,
            turn_running=False,
            created_at=r.created_at,
            last_active=r.last_active,
            expire_at=r.expire_at,
            state="stored",
            sampling=asdict(self._defaults.updated(r.sampling)),
        )

    def end_session(self, session_id: str, owner: str | None = None) -> None:
        """End the session: its slot is freed and its record deleted; a running turn is
        cancelled first (it gets its TurnEnd, then the session ends, then this returns)."""
        s = self._session(session_id, owner)
        with self._lock:
            if self._sessions.get(session_id) is not s:
                return  # ended meanwhile
            if s.turn is not None:
                s.turn.cancelled = True
                _state(s.turn).end_session = True  # the loop ends it after the turn
                self._wake.notify()
                # Answer once it is gone (the cancelled turn ends within a step), so that
                # whoever ended it never sees it again.
                self._ended.wait_for(
                    lambda: self._sessions.get(session_id) is not s, CANCELLED_TURN_WAIT_S
                )
                return
            self._drop(s)

    def cancel_session(self, session_id: str, owner: str | None = None) -> bool:
        """Cancel the session's running turn, if any (its TurnEnd(CANCELLED) arrives
        within one step); returns whether one was running."""
        s = self._session(session_id, owner)
        with self._lock:
            if s.turn is None:
                return False
            s.turn.cancelled = True
            self._wake.notify()
            return True

    def _drop(self, s: _Session) -> None:
        del self._sessions[s.session_id]
        self._ended.notify_all()
        slot = self._sched.release(s)
        if slot is not None:
            self.runner.clear(slot)
        if self._writer is not None:
            self._writer.delete(s.session_id)
        self.log.info("session ended", session_id=s.session_id)

    # ---- turns -----------------------------------------------------------------------

    def submit(
        self,
        session_id: str,
        prompt: str | Sequence[int],
        params: Sampling,
        on_events: OnEvents,
        *,
        raw: bool = False,
        owner: str | None = None,
    ) -> int:
        """Queue a turn; returns its id. `params` are whole SamplingParams, or overrides
        of the session's defaults. Raises an EngineError for requests that cannot run;
        everything after that arrives through `on_events`."""
        if not prompt:
            raise InvalidRequest("empty prompt")
        s = self._claim(self._session(session_id, owner))
        if not isinstance(params, SamplingParams):
            params = self._defaults.updated(s.sampling).updated(params)
        params.validate(self.config.max_new_tokens)
        with self._lock:
            if self._stopping:
                raise EngineStopped("engine is shutting down")
            self._await_free(s)
            first, finished_eos = s.turns == 0 and s.position == 0, s.last_finished_eos
            system = s.system
        tokens = self._encode(prompt, raw=raw, first=first, system=system, eos=finished_eos)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in tokens):
            raise InvalidRequest("token id out of range")
        self._check_fits("turn", len(s.owed) + len(tokens))
        with self._lock:
            if self._sessions.get(session_id) is not s:
                raise UnknownSession(f"session {session_id!r} ended while submitting")
            self._await_free(s)
            turn = Turn(
                turn_id=self._sched.next_turn_id(),
                session=s,
                params=params,
                pending=s.owed + tokens,
                submitted_at=time.monotonic(),
                on_events=on_events,
            )
            turn.state = _TurnState(
                decoder=IncrementalDecoder(self.tokenizer),
                stops=StopMatcher(params.stop),
                rng=self.runner.new_rng(
                    None if params.seed is None else turn_seed(params.seed, s.turns)
                ),
                prompt_tokens=len(turn.pending),
                inherited=len(s.owed),
            )
            s.owed, s.turn = [], turn
            s.turns += 1
            s.last_used = self._clock()
            self._turns[turn.turn_id] = turn
            self._sched.add(turn)
            self._wake.notify()
        return turn.turn_id

    def _await_free(self, s: _Session) -> None:
        """Return once `s` has no running turn (lock held), else raise SessionBusy. A turn
        already cancelled (its client went away, or cancelled it) ends within a step, so a
        new turn waits for that instead of being refused: the client that resumes its
        session after a disconnect sends its next turn at once."""
        self._ended.wait_for(lambda: s.turn is None or not s.turn.cancelled, CANCELLED_TURN_WAIT_S)
        if s.turn is not None:
            raise SessionBusy(
                f"session {s.session_id!r} already has a turn running; wait for its "
                "TurnEnd or cancel it"
            )

    def _check_fits(self, what: str, tokens: int) -> None:
        """Refuse what the cache cannot hold (by default a prompt longer than the window
        would be prefilled only to have its own start evicted) and what has no bounded
        prefill time.
        (The limit counts the chat template's tokens and, for a session's first turn,
        its system prompt.)"""
        limit = self.config.prompt_limit
        if tokens > limit:
            raise InvalidRequest(
                f"{what} is {tokens} tokens with its chat template; the limit is {limit} "
                f"tokens (the cache window is {self.config.window}): send it as several turns"
            )

    def _encode(
        self, prompt: str | Sequence[int], *, raw: bool, first: bool, system: str | None, eos: bool
    ) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if raw:
            return self.tokenizer.encode(prompt)
        if first:
            return self.chat.first_turn(system, prompt)
        return self.chat.next_turn(prompt, prev_finished_with_eos=eos)

    def cancel(self, turn_id: int) -> bool:
        """Cancel a turn; its TurnEnd(CANCELLED) arrives within one step. Returns whether
        it was running: unknown or finished turns are ignored (a cancel may race the
        turn's end)."""
        with self._lock:
            turn = self._turns.get(turn_id)
            if turn is None:
                return False
            turn.cancelled = True
            self._wake.notify()
            return True

    async def generate(
        self,
        session_id: str,
        prompt: str | Sequence[int],
        params: Sampling,
        *,
        raw: bool = False,
        owner: str | None = None,
    ) -> AsyncIterator[Event]:
        """asyncio view of `submit`: yields events; leaving early cancels the turn."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()

        def deliver(events: list[Event]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, events)  # raises once loop closed

        turn_id = self.submit(session_id, prompt, params, deliver, raw=raw, owner=owner)
        done = False
        try:
            while not done:
                for event in await queue.get():
                    done = isinstance(event, TurnEnd)
                    yield event
        finally:
            if not done:
                self.cancel(turn_id)

    # ---- snapshots -------------------------------------------------------------------

    def export_sessions(self, *, with_kv: bool = True) -> list[SessionSnapshot]:
        """Snapshot every idle session (running turns are not included in their state)."""
        with self._lock:
            out = []
            for s in self._sessions.values():
                kv = None
                if with_kv:
                    kv = self.runner.save(s.slot) if s.slot is not None else s.host
                out.append(
                    SessionSnapshot(
                        session_id=s.session_id,
                        system=s.system,
                        position=s.position,
                        sink_tokens=list(s.sink_tokens),
                        window_tokens=list(s.window_tokens),
                        owed=list(s.owed) if s.turn is None else [],
                        last_finished_eos=s.last_finished_eos,
                        turns=s.turns,
                        owner=s.owner,
                        sampling=dict(s.sampling),
                        created_at=s.created_at,
                        last_active=s.last_used,
                        version=s.version,
                        kv=kv if not s.rebuild else None,
                    )
                )
            return out

    def import_sessions(self, snapshots: Sequence[SessionSnapshot]) -> None:
        """Adopt sessions from another engine: swapped in from their exact KV when given,
        else rebuilt from their tokens (at most sinks + window) on their next turn."""
        with self._lock:
            for snap in snapshots:
                s = self._new_session(snap.session_id, snap.system)
                s.owner, s.sampling, s.version = snap.owner, dict(snap.sampling), snap.version
                s.created_at, s.last_used = snap.created_at, snap.last_active
                s.position, s.turns = snap.position, snap.turns
                s.last_finished_eos = snap.last_finished_eos
                self._set_tokens(s, snap.sink_tokens, snap.window_tokens, snap.owed)
                if snap.kv is not None:
                    s.host, s.rebuild = snap.kv, []
                self._sessions[s.session_id] = s

    # ---- stats -----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._lock:
            sessions = list(self._sessions.values())
            w = self._writer
            return EngineStats(
                slots_total=self.config.max_sessions,
                slots_free=self._sched.slots.num_free,
                sessions=len(sessions),
                sessions_in_slots=sum(s.slot is not None for s in sessions),
                sessions_swapped=sum(s.host is not None for s in sessions),
                turns_running=len(self._sched.running),
                turns_waiting=len(self._sched.waiting),
                prefill_tokens=self._counters["prefill"],
                generated_tokens=self._counters["generated"],
                evicted_tokens=self._counters["evicted"],
                steps=self._counters["steps"],
                bytes_per_slot=self.runner.bytes_per_slot,
                store_healthy=w is None or w.healthy,
                store_pending=0 if w is None else w.pending,
                store_write_errors=0 if w is None else w.write_errors,
            )

    def take_step_seconds(self) -> list[float]:
        """Durations of the steps run since the last call (for a histogram)."""
        out = []
        while self._step_seconds:
            out.append(self._step_seconds.popleft())
        return out

    # ---- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        if self.config.threads:  # this thread's own OpenMP team (see `load`)
            torch.set_num_threads(self.config.threads)
        while True:
            with self._lock:
                while not self._stopping and not self._turns:
                    self._wake.wait(timeout=1.0)
                    self._expire(time.monotonic())
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a broken step must not hang every stream
                self.log.exception("engine step failed")
                self._fail_all(exc)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            ends = [
                (t, self._end(t, FinishReason.ERROR, error=str(exc), code="INTERNAL"))
                for t in list(self._turns.values())
            ]
        for turn, events in ends:
            self._deliver(turn, events)

    def step(self) -> None:
        """Run one engine step (the loop calls this; tests may too, without start())."""
        out: list[tuple[_Turn, list[Event]]] = []
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            for turn in [t for t in self._turns.values() if t.cancelled]:
                out.append((turn, self._end(turn, FinishReason.CANCELLED)))
            plan = self._sched.schedule(now, list(self._sessions.values()))
            for turn in plan.timed_out:
                msg = (
                    f"no KV slot became free within {self.config.slot_wait_s:g} s: every "
                    "slot is busy (retry after 1 s)"
                )
                out.append((turn, self._end(turn, FinishReason.ERROR, msg, "RESOURCE_EXHAUSTED")))
            for session, slot in plan.swap_out:
                session.host = self.runner.save(slot)
            for session, slot in plan.swap_in:
                assert session.host is not None  # the scheduler swaps in only what it holds
                self.runner.load(slot, session.host)
                session.host = None
            for slot in plan.clear:
                self.runner.clear(slot)
            rows = [
                SampleRow(
                    turn_id=t.turn_id,
                    params=t.params,
                    rng=_state(t).rng,
                    history=t.session.cache_token_ids() if t.params.repetition_penalty != 1 else (),
                )
                for t in plan.sampled
            ]
        if plan.items:
            started = time.perf_counter()
            tokens = self.runner.step(plan.items, rows)
            self._step_seconds.append(time.perf_counter() - started)
            with self._lock:
                self._counters["steps"] += 1
                self._counters["prefill"] += sum(
                    n for who, n in plan.fed if isinstance(who, Turn) and who.prefilling
                )
                fed = {who if isinstance(who, Session) else who.session for who, _ in plan.fed}
                evicted_before = sum(s.evicted_tokens for s in fed)
                self._sched.advance(plan)
                self._counters["evicted"] += sum(s.evicted_tokens for s in fed) - evicted_before
                for turn, token in zip(plan.sampled, tokens, strict=True):
                    if turn.turn_id in self._turns:
                        out.append((turn, self._on_token(turn, token)))
        for turn, events in out:
            if events:
                self._deliver(turn, events)

    def _deliver(self, turn: _Turn, events: list[Event]) -> None:
        """Hand events to the turn's consumer. A consumer that fails (e.g. its event loop
        closed) loses its turn, never the engine loop."""
        try:
            turn.on_events(events)
        except Exception:
            self.log.exception("event consumer failed; cancelling its turn", turn=turn.turn_id)
            turn.cancelled = True

    def _on_token(self, turn: _Turn, token: int) -> list[Event]:
        """Account a sampled token; return the turn's events for this step."""
        st = _state(turn)
        p = turn.params
        turn.generated.append(token)
        turn.next_token = token
        self._counters["generated"] += 1
        index = len(turn.generated) - 1
        is_eos = token in self.tokenizer.eos_ids and not p.ignore_eos
        if is_eos or token in p.stop_token_ids:
            return self._end(turn, FinishReason.STOP, eos=is_eos)
        text, stopped = st.stops.push(st.decoder.feed(token))
        events: list[Event] = [TokenEvent(token, text, index)]
        if stopped:
            return events + self._end(turn, FinishReason.STOP, flush=False)
        if len(turn.generated) >= p.max_new_tokens:
            return events + self._end(turn, FinishReason.LENGTH)
        return events

    def _end(
        self,
        turn: _Turn,
        reason: FinishReason,
        error: str = "",
        code: str = "",
        *,
        eos: bool = False,
        flush: bool = True,
    ) -> list[Event]:
        """Finish a turn (lock held): the session keeps its cache; tokens the cache has
        not seen yet are owed to the next turn, except the prompt of a turn refused
        before it ran (ERROR, nothing fed): the client is told to send it again."""
        s = turn.session
        self._sched.finish(turn)
        del self._turns[turn.turn_id]
        self._ended.notify_all()
        refused = reason is FinishReason.ERROR and turn.fed == 0
        unfed = turn.pending[: _state(turn).inherited] if refused else turn.pending[turn.fed :]
        s.owed = unfed + ([turn.next_token] if turn.next_token is not None else [])
        s.last_finished_eos = eos
        s.last_used = self._clock()
        usage = Usage(
            prompt_tokens=_state(turn).prompt_tokens,
            generated_tokens=len(turn.generated),
            position=s.position,
            cached_tokens=s.cached_tokens,
            evicted_tokens=s.evicted_tokens,
        )
        tail = ""
        if flush:  # the bytes of a character the turn ended inside, as U+FFFD
            held, _ = _state(turn).stops.push(_state(turn).decoder.flush())
            tail = held + _state(turn).stops.flush()
        s.lease_until, s.claimed = 0.0, None
        if _state(turn).end_session:
            self._drop(s)
        elif s.lost:
            self._forget(s)
        else:
            self._persist(s)
        return [TurnEnd(reason, usage, text=tail, error=error, error_code=code)]

    def _expire(self, now: float) -> None:
        """End idle sessions past their TTL (lock held); checked about once a second."""
        if now - self._last_expiry < 1.0:
            return
        self._last_expiry = now
        wall, ttl = self._clock(), self.config.session_ttl_s
        for s in [s for s in self._sessions.values() if s.turn is None]:
            if wall - s.last_used > ttl:
                self._drop(s)


__all__ = ["Engine", "EngineError", "SessionSnapshot"]


def _unknown(session_id: str) -> UnknownSession:
    return UnknownSession(f"no session {session_id!r} (ended or expired?)")
