"""Per-caller limits of one gateway: concurrent turns and tokens per minute.

Open sessions per caller are the model's limit (it owns sessions); these two are the
gateway's, since it sees every turn of its callers. Each gateway process counts its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from sinkserve.gateway.errors import GatewayError


@dataclass
class _Bucket:
    level: float  # tokens that may still be spent; negative after a turn overspent
    at: float  # when `level` was last refilled (monotonic)


@dataclass
class CallerQuotas:
    """`begin_turn` before a turn starts (RESOURCE_EXHAUSTED with a retry hint past a
    limit), `spend` for its tokens as they are made, `end_turn` when it ends.

    Tokens per minute is a token bucket of that capacity refilled at that rate: a turn
    may start while the caller's bucket is above zero and is never cut mid-way, so a
    caller overspends by at most one turn per stream and then waits it off."""

    max_turns: int
    tokens_per_minute: int  # 0 = no limit
    clock: Callable[[], float] = time.monotonic
    _turns: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def begin_turn(self, caller: str) -> None:
        running = self._turns.get(caller, 0)
        if running >= self.max_turns:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"caller {caller!r} is at its limit of {self.max_turns} running turns",
                retry_after_s=1.0,
            )
        if self.tokens_per_minute:
            bucket = self._refilled(caller)
            if bucket.level <= 0:
                rate = self.tokens_per_minute / 60.0
                raise GatewayError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"caller {caller!r} used its {self.tokens_per_minute} tokens per minute",
                    retry_after_s=(1.0 - bucket.level) / rate,
                )
        self._turns[caller] = running + 1

    def spend(self, caller: str, tokens: int) -> None:
        if self.tokens_per_minute:
            self._refilled(caller).level -= tokens

    def end_turn(self, caller: str) -> None:
        left = self._turns.get(caller, 0) - 1
        if left > 0:
            self._turns[caller] = left
        else:
            self._turns.pop(caller, None)

    def _refilled(self, caller: str) -> _Bucket:
        now = self.clock()
        cap = float(self.tokens_per_minute)
        bucket = self._buckets.setdefault(caller, _Bucket(cap, now))
        bucket.level = min(cap, bucket.level + (now - bucket.at) * cap / 60.0)
        bucket.at = now
        return bucket
