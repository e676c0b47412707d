"""The turns of one model instance by the caller's turn id, so that a cancel names one turn.

A session-wide cancel is not enough for a client that was cut off: its cancel travels
beside its next turn, so it may find the cut turn not started yet (the turn waits for a
pool thread and would run later, after the client had moved on) or, arriving late,
cancel the next turn instead. A cancel by turn id finds one of three things:

- the turn running (or being submitted): the engine cancels it and its own TurnEnd
  (CANCELLED) follows;
- nothing yet: the cancel is kept, and the turn, if it comes, is refused before it
  starts, so its prompt never reaches the session;
- a turn already finished: nothing to do.

The `capacity` most recent ids are kept, which bounds memory: an id pushed out is
forgotten, the cancel of a turn that old finds nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

_CANCELLED: Final = -1  # a cancel came first: the turn must not start
_STARTING: Final = -2  # being submitted to the engine: a cancel applies once it has an id


Key = tuple[str, str]  # (session id, the caller's turn id)


class TurnIds:
    """(session id, caller's turn id) -> the engine's turn id, or a kept cancel."""

    def __init__(self, cancel: Callable[[int], bool], capacity: int = 4096) -> None:
        self._cancel = cancel  # the engine's cancel by its turn id; True if it was running
        self._capacity = capacity
        self._ids: OrderedDict[Key, int] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, session_id: str, turn_id: str, submit: Callable[[], int]) -> int | None:
        """Submit the turn unless a cancel for it came first: the engine's turn id, or
        None when a cancel did. `submit` runs outside the lock (it may wait for the
        session's previous turn); a cancel arriving meanwhile applies once it returns."""
        key = (session_id, turn_id)
        with self._lock:
            if self._ids.get(key) == _CANCELLED:
                return None
            self._put(key, _STARTING)
        try:
            engine_id = submit()
        except BaseException:
            with self._lock:
                if self._ids.get(key) == _STARTING:
                    del self._ids[key]
            raise
        with self._lock:
            cancelled = self._ids.get(key) == _CANCELLED
            self._put(key, engine_id)
        if cancelled:
            self._cancel(engine_id)
        return engine_id

    def cancel(self, session_id: str, turn_id: str) -> bool:
        """Cancel the turn; True when it is running (its TurnEnd follows), False when it
        has not started (it never will) or has ended."""
        key = (session_id, turn_id)
        with self._lock:
            state = self._ids.get(key)
            self._put(key, _CANCELLED)
        if state == _STARTING:
            return True
        return state is not None and state >= 0 and self._cancel(state)

    def _put(self, key: Key, state: int) -> None:
        self._ids[key] = state
        self._ids.move_to_end(key)
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
