"""Who owns which session, what it is doing, and the limits on both.

The registry is the gateway's only session state; Triton holds the cache. A session is
created here first and started on Triton lazily by its first turn (`started`), so creating
one costs no model work. At most one turn of a session runs at a time (`turn_running`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from service.gateway.errors import GatewayError


@dataclass(frozen=True)
class CacheUsage:
    """Where the session's cache stands (as reported by the last finished turn)."""

    position: int = 0
    cached_tokens: int = 0
    evicted_tokens: int = 0


@dataclass
class Session:
    session_id: str
    owner: str
    system_prompt: str
    created_at: float
    last_active: float
    # Triton knows it: set once a turn carrying start_session reached the model.
    started: bool = False
    turn_running: bool = False
    turns: int = 0
    cache: CacheUsage = field(default_factory=CacheUsage)
    # Cancels the running turn (set by the stream that runs it).
    cancel_turn: Callable[[], None] | None = None


class SessionRegistry:
    """Sessions by id, with ownership, an idle TTL and per-caller limits.

    `clock` returns wall-clock seconds; tests pass their own.
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        max_sessions: int,
        max_sessions_per_caller: int,
        max_streams_per_caller: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl_s = ttl_s
        self._max_sessions = max_sessions
        self._max_per_caller = max_sessions_per_caller
        self._max_streams = max_streams_per_caller
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._streams: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, owner: str, system_prompt: str = "") -> Session:
        """A new session with an unguessable id; RESOURCE_EXHAUSTED past a limit."""
        if len(self._sessions) >= self._max_sessions:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the gateway holds its maximum of {self._max_sessions} sessions",
            )
        if sum(s.owner == owner for s in self._sessions.values()) >= self._max_per_caller:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"caller {owner!r} already has {self._max_per_caller} sessions "
                "(the per-caller limit); delete one first",
            )
        now = self._clock()
        session = Session(secrets.token_urlsafe(18), owner, system_prompt, now, now)
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str, caller: str) -> Session:
        """The caller's session; NOT_FOUND or PERMISSION_DENIED otherwise."""
        if not session_id:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        session = self._sessions.get(session_id)
        if session is None:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND, f"no session {session_id!r} (ended or expired?)"
            )
        if session.owner != caller:
            raise GatewayError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"session {session_id!r} belongs to another caller",
            )
        return session

    def owned_by(self, caller: str) -> list[Session]:
        """The caller's sessions, oldest first."""
        mine = (s for s in self._sessions.values() if s.owner == caller)
        return sorted(mine, key=lambda s: (s.created_at, s.session_id))

    def remove(self, session_id: str) -> Session | None:
        return self._sessions.pop(session_id, None)

    def begin_turn(self, session: Session, cancel: Callable[[], None]) -> None:
        """Mark a turn running; FAILED_PRECONDITION if one already is."""
        if session.session_id not in self._sessions:
            raise GatewayError(
                grpc.StatusCode.NOT_FOUND, f"session {session.session_id!r} was deleted"
            )
        if session.turn_running:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {session.session_id!r} already has a turn running; "
                "wait for its TurnEnd or cancel it",
            )
        session.turn_running = True
        session.cancel_turn = cancel
        session.last_active = self._clock()

    def end_turn(self, session: Session, cache: CacheUsage | None, *, completed: bool) -> None:
        """The turn is over; `cache` is None when its outcome is unknown (failed or cut)."""
        session.turn_running = False
        session.cancel_turn = None
        session.turns += completed
        if cache is not None:
            session.cache = cache
        session.last_active = self._clock()

    def expires_at(self, session: Session) -> float:
        return session.last_active + self.ttl_s

    def expired(self) -> list[Session]:
        """Idle sessions past the TTL (never one with a turn running)."""
        now = self._clock()
        return [
            s for s in self._sessions.values() if not s.turn_running and now >= self.expires_at(s)
        ]

    def open_stream(self, caller: str) -> None:
        """Count a Chat stream against the caller's limit; RESOURCE_EXHAUSTED past it."""
        if self._streams.get(caller, 0) >= self._max_streams:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"caller {caller!r} already has {self._max_streams} open streams",
            )
        self._streams[caller] = self._streams.get(caller, 0) + 1

    def close_stream(self, caller: str) -> None:
        left = self._streams.get(caller, 0) - 1
        if left > 0:
            self._streams[caller] = left
        else:
            self._streams.pop(caller, None)
