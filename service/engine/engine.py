"""The engine: sessions with StreamingLLM caches served by one in-flight-batching loop.

Public API (thread-safe; the Triton model, the CLI and the tests use it):

    engine = Engine.load(config)           # weights, tokenizer, runner (progress bar)
    engine.start()                         # the step loop runs in its own thread
    sid = engine.open_session(system="...")
    turn = engine.submit(sid, "Hello", SamplingParams(), on_events)
    async for event in engine.generate(sid, "Hello", SamplingParams()): ...
    engine.cancel(turn); engine.end_session(sid); engine.stats()
    snaps = engine.export_sessions(); engine.import_sessions(snaps)   # across reloads
    engine.shutdown()

`on_events(events)` is called from the engine thread once per step per turn with that
step's events: `TokenEvent`s, and a `TurnEnd` last in the final call. Keep it short.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import structlog
import torch

from service.config import EngineConfig
from service.engine.chat_format import ChatFormat
from service.engine.kv_cache import HostSlot
from service.engine.runner import Runner
from service.engine.sampler import SampleRow
from service.engine.scheduler import Scheduler, Session, Turn
from service.engine.stops import StopMatcher
from service.engine.tokenizer import IncrementalDecoder, Tokenizer
from service.engine.types import (
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
    TokenEvent,
    TurnEnd,
    UnknownSession,
    Usage,
)

OnEvents = Callable[[list[Event]], None]


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
    kv: HostSlot | None = None


@dataclass
class _TurnState:
    """Per-turn engine state that the scheduler does not look at."""

    decoder: IncrementalDecoder
    stops: StopMatcher
    rng: torch.Generator | None
    prompt_tokens: int
    end_session: bool = False  # end_session() arrived while the turn ran


class Engine:
    def __init__(self, config: EngineConfig, runner: Runner, tokenizer: Tokenizer) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer)
        self.log = structlog.get_logger("sinkserve.engine")
        self._sched = Scheduler(config.max_sessions, config.step_token_budget, config.slot_wait_s)
        self._sessions: dict[str, Session] = {}
        self._turns: dict[int, Turn] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
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
        )

    @classmethod
    def load(cls, config: EngineConfig) -> Engine:
        """Load the checkpoint named by `config.model` (default: SmolLM2-135M-Instruct).

        Builds on one intra-op thread; the step thread takes `config.threads` (torch's
        default when 0) for itself. Every thread that runs a parallel torch op keeps an
        OpenMP team of its own, and once a process holds more OpenMP threads than CPUs,
        libgomp stops spin-waiting between parallel regions, so each of a step's
        thousands of regions pays a futex wake-up: with a 2-thread team left behind by
        loading, a SmolLM2 decode step on 2 cores took 37 ms, not 15. So the calling
        thread should run no parallel torch work of its own while the engine runs."""
        from service.engine.loader import build_runner

        before = torch.get_num_threads()
        config = replace(config, threads=config.threads or before)
        torch.set_num_threads(1)
        try:
            runner, tokenizer = build_runner(config)
        finally:
            torch.set_num_threads(before)  # no team yet: one forms at the next parallel op
        return cls(config, runner, tokenizer)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sinkserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Cancel every turn (each gets its TurnEnd), then stop the loop."""
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

    # ---- sessions --------------------------------------------------------------------

    def open_session(self, session_id: str | None = None, system: str | None = None) -> str:
        sid = session_id or secrets.token_urlsafe(16)
        limit = self.config.max_sessions + self.config.max_host_sessions
        with self._lock:
            if sid in self._sessions:
                raise InvalidRequest(f"session {sid!r} already exists")
            if len(self._sessions) >= limit:
                raise ResourceExhausted(f"too many sessions ({limit})")
            self._sessions[sid] = self._new_session(sid, system)
        self.log.info("session opened", session_id=sid)
        return sid

    def _new_session(self, sid: str, system: str | None) -> Session:
        c = self.config
        return Session(sid, c.sinks, c.window, last_used=time.monotonic(), system=system)

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def end_session(self, session_id: str) -> None:
        """Forget the session and free its slot; a running turn is cancelled first."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(f"unknown session {session_id!r}")
            if s.turn is not None:
                s.turn.cancelled = True
                s.turn.state.end_session = True  # the loop ends it after the turn
                self._wake.notify()
                return
            self._drop(s)

    def _drop(self, s: Session) -> None:
        del self._sessions[s.session_id]
        slot = self._sched.release(s)
        if slot is not None:
            self.runner.clear(slot)
        self.log.info("session ended", session_id=s.session_id)

    # ---- turns -----------------------------------------------------------------------

    def submit(
        self,
        session_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        on_events: OnEvents,
        *,
        raw: bool = False,
    ) -> int:
        """Queue a turn; returns its id. Raises an EngineError for requests that cannot
        run; everything after that arrives through `on_events`."""
        params.validate(self.config.max_new_tokens)
        if not prompt:
            raise InvalidRequest("empty prompt")
        with self._lock:
            if self._stopping:
                raise EngineStopped("engine is shutting down")
            s = self._sessions.get(session_id)
            if s is None:
                raise UnknownSession(f"unknown session {session_id!r}")
            if s.turn is not None:
                raise SessionBusy(f"session {session_id!r} has a turn running")
            first, finished_eos = s.turns == 0 and s.position == 0, s.last_finished_eos
            system = s.system
        tokens = self._encode(prompt, raw=raw, first=first, system=system, eos=finished_eos)
        if any(not 0 <= t < self.tokenizer.vocab_size for t in tokens):
            raise InvalidRequest("token id out of range")
        with self._lock:
            if s.turn is not None or self._sessions.get(session_id) is not s:
                raise SessionBusy(f"session {session_id!r} changed while submitting")
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
                rng=self.runner.new_rng(params.seed),
                prompt_tokens=len(turn.pending),
            )
            s.owed, s.turn = [], turn
            s.turns += 1
            self._turns[turn.turn_id] = turn
            self._sched.add(turn)
            self._wake.notify()
        return turn.turn_id

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

    def cancel(self, turn_id: int) -> None:
        """Cancel a turn; its TurnEnd(CANCELLED) arrives within one step. Unknown or
        finished turns are ignored (a cancel may race the turn's end)."""
        with self._lock:
            turn = self._turns.get(turn_id)
            if turn is not None:
                turn.cancelled = True
                self._wake.notify()

    async def generate(
        self,
        session_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams,
        *,
        raw: bool = False,
    ) -> AsyncIterator[Event]:
        """asyncio view of `submit`: yields events; leaving early cancels the turn."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()

        def deliver(events: list[Event]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, events)  # raises once loop closed

        turn_id = self.submit(session_id, prompt, params, deliver, raw=raw)
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
                s.position, s.turns = snap.position, snap.turns
                s.sink_tokens = list(snap.sink_tokens[: s.sinks])
                s.window_tokens.extend(snap.window_tokens)
                s.owed, s.last_finished_eos = list(snap.owed), snap.last_finished_eos
                if snap.kv is not None:
                    s.host = snap.kv
                else:
                    start = s.position - len(s.window_tokens)
                    s.rebuild = [(0, s.sink_tokens), (start, list(s.window_tokens))]
                    s.rebuild = [(a, t) for a, t in s.rebuild if t]
                self._sessions[s.session_id] = s

    # ---- stats -----------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._lock:
            sessions = list(self._sessions.values())
            infos = tuple(
                SessionInfo(
                    session_id=s.session_id,
                    position=s.position,
                    cached_tokens=s.cached_tokens,
                    evicted_tokens=s.evicted_tokens,
                    state=(
                        "generating"
                        if s.turn is not None and s.slot is not None
                        else "waiting"
                        if s.turn is not None
                        else "slot"
                        if s.slot is not None
                        else "host"
                        if s.host is not None
                        else "new"  # never in a slot yet, or waiting to be rebuilt
                    ),
                    turns=s.turns,
                )
                for s in sessions
            )
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
                session_info=infos,
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
        out: list[tuple[Turn, list[Event]]] = []
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            for turn in [t for t in self._turns.values() if t.cancelled]:
                out.append((turn, self._end(turn, FinishReason.CANCELLED)))
            plan = self._sched.schedule(now, list(self._sessions.values()))
            for turn in plan.timed_out:
                msg = f"no KV slot became free within {self.config.slot_wait_s:g}s"
                out.append((turn, self._end(turn, FinishReason.ERROR, msg, "RESOURCE_EXHAUSTED")))
            for session, slot in plan.swap_out:
                session.host = self.runner.save(slot)
            for session, slot in plan.swap_in:
                self.runner.load(slot, session.host)
                session.host = None
            for slot in plan.clear:
                self.runner.clear(slot)
            rows = [
                SampleRow(
                    turn_id=t.turn_id,
                    params=t.params,
                    rng=t.state.rng,
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

    def _deliver(self, turn: Turn, events: list[Event]) -> None:
        """Hand events to the turn's consumer. A consumer that fails (e.g. its event loop
        closed) loses its turn, never the engine loop."""
        try:
            turn.on_events(events)
        except Exception:
            self.log.exception("event consumer failed; cancelling its turn", turn=turn.turn_id)
            turn.cancelled = True

    def _on_token(self, turn: Turn, token: int) -> list[Event]:
        """Account a sampled token; return the turn's events for this step."""
        st: _TurnState = turn.state
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
        turn: Turn,
        reason: FinishReason,
        error: str = "",
        code: str = "",
        *,
        eos: bool = False,
        flush: bool = True,
    ) -> list[Event]:
        """Finish a turn (lock held): the session keeps its cache; tokens the cache has
        not seen yet are owed to the next turn."""
        s = turn.session
        self._sched.finish(turn)
        del self._turns[turn.turn_id]
        s.owed = turn.pending[turn.fed :] + (
            [turn.next_token] if turn.next_token is not None else []
        )
        s.last_finished_eos = eos
        s.last_used = time.monotonic()
        usage = Usage(
            prompt_tokens=turn.state.prompt_tokens,
            generated_tokens=len(turn.generated),
            position=s.position,
            cached_tokens=s.cached_tokens,
            evicted_tokens=s.evicted_tokens,
        )
        tail = turn.state.stops.flush() if flush else ""
        if turn.state.end_session:
            self._drop(s)
        return [TurnEnd(reason, usage, text=tail, error=error, error_code=code)]

    def _expire(self, now: float) -> None:
        """End idle sessions past their TTL (lock held); checked about once a second."""
        if now - self._last_expiry < 1.0:
            return
        self._last_expiry = now
        ttl = self.config.session_ttl_s
        for s in [s for s in self._sessions.values() if s.turn is None]:
            if now - s.last_used > ttl:
                self._drop(s)


__all__ = ["Engine", "EngineError", "SessionSnapshot"]
