"""Plain data that crosses the engine's public boundary (no torch here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any


class EngineError(Exception):
    """Base of the errors the engine reports to callers; `code` maps to gRPC/Triton codes."""

    code = "INTERNAL"


class InvalidRequest(EngineError):
    code = "INVALID_ARGUMENT"


class UnknownSession(EngineError):
    code = "NOT_FOUND"


class SessionBusy(EngineError):
    """A turn was submitted while the session's previous turn is still running."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(EngineError):
    """No slot became free within `slot_wait_s`, or too many sessions exist."""

    code = "RESOURCE_EXHAUSTED"


class EngineStopped(EngineError):
    code = "UNAVAILABLE"


class StoreUnreachable(EngineError):
    """A session had to be read from the session store, and the store did not answer."""

    code = "UNAVAILABLE"


class FinishReason(str, Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """Per-turn sampling. temperature == 0 means greedy.

    The class defaults are greedy with no penalty: what whole params given to
    `Engine.submit` mean. Overrides given there start from the engine's own defaults
    instead (`sampling_defaults.default_sampling`: sampled, unless configured greedy)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # over the tokens in the session's cache
    seed: int | None = None  # reproducible sampling when set
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self, max_new_tokens_limit: int) -> None:
        """Raise InvalidRequest naming the first bad field."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens={self.max_new_tokens} must be in 1..{max_new_tokens_limit}"
            )
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature={self.temperature} must be in [0, 100]")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p={self.top_p} must be in (0, 1]")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequest(f"repetition_penalty={self.repetition_penalty} must be in (0, 10]")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty")

    def updated(self, overrides: Mapping[str, Any]) -> SamplingParams:
        """These params with `overrides` (field name -> plain JSON-like value) applied;
        InvalidRequest names an unknown field or a value of the wrong kind. Not validated:
        call `validate` on the result."""
        kinds = {f.name: f.type for f in fields(self)}
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in kinds:
                raise InvalidRequest(f"unknown sampling field {key!r}")
            try:
                values[key] = _coerce(str(kinds[key]), value)
            except (TypeError, ValueError):
                raise InvalidRequest(f"sampling field {key}={value!r} has the wrong type") from None
        return replace(self, **values)


def _coerce(kind: str, value: Any) -> Any:
    """A JSON-like value as the SamplingParams field of annotation `kind` wants it."""
    if kind.startswith("tuple[str"):
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise TypeError(kind)
        return tuple(value)
    if kind.startswith("tuple[int"):
        return tuple(int(v) for v in value)
    if value is None and "None" in kind:
        return None
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise TypeError(kind)
        return value
    if isinstance(value, bool):
        raise TypeError(kind)
    if kind.startswith("int"):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(kind)
        return int(value)
    return float(value)


@dataclass(frozen=True)
class Usage:
    """Token accounting of one turn, and where the session's cache stands after it."""

    prompt_tokens: int  # tokens this turn prefilled (its own tokens only)
    generated_tokens: int
    position: int  # absolute tokens seen by the session so far
    cached_tokens: int  # keys in the cache now (<= sinks + window)
    evicted_tokens: int  # tokens that have left the window so far


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `text` is the valid-UTF-8 text it completes (may be "")."""

    token_id: int
    text: str
    index: int  # 0-based index within the turn


@dataclass(frozen=True)
class TurnEnd:
    """Always the last event of a turn."""

    finish_reason: FinishReason
    usage: Usage
    text: str = ""  # held-back text flushed at the end (e.g. a partial stop-string match)
    error: str = ""  # set when finish_reason is ERROR
    error_code: str = ""  # an EngineError.code, e.g. "RESOURCE_EXHAUSTED"


Event = TokenEvent | TurnEnd


@dataclass(frozen=True)
class SessionInfo:
    """A session as its owner sees it. Times are wall-clock seconds since the epoch."""

    session_id: str
    owner: str
    position: int
    cached_tokens: int
    evicted_tokens: int
    turns: int
    turn_running: bool
    created_at: float
    last_active: float
    expire_at: float
    # "generating" | "waiting" | "slot" | "host" | "new" (no cache yet, or to be rebuilt
    # from its tokens) | "stored" (only in the session store)
    state: str
    # The sampling its turns start from: the engine's defaults updated by the session's
    # own (`SamplingParams` fields; a turn's own fields still override them).
    sampling: dict[str, Any]


@dataclass(frozen=True)
class EngineStats:
    slots_total: int
    slots_free: int
    sessions: int
    sessions_in_slots: int
    sessions_swapped: int
    turns_running: int
    turns_waiting: int
    prefill_tokens: int  # totals since start
    generated_tokens: int
    evicted_tokens: int  # tokens that left a window (rebuilt sessions do not count twice)
    steps: int
    bytes_per_slot: int
    store_healthy: bool = True  # the last write to the session store succeeded
    store_pending: int = 0  # records waiting to be written
    store_write_errors: int = 0  # failed write attempts since start
