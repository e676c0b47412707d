"""Waiting on what the code under test reports, not on time.

A test proves behaviour by an event, a state or a value the code reports. Where the only
way to see that value is to read it again (a metric, a session's state), `wait_until`
polls it. Its deadline only guards against a hang: it is generous, it is not what the
test checks, and when it passes the failure names what was awaited and the last value.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

HANG_GUARD_S = 60.0


def wait_until(
    what: str,
    read: Callable[[], T],
    ok: Callable[[T], bool],
    timeout_s: float = HANG_GUARD_S,
    poll_s: float = 0.02,
) -> T:
    """Read until `ok(value)` holds and return that value, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout_s}s waiting for {what}; last: {value!r}")
        time.sleep(poll_s)


async def until(
    what: str,
    read: Callable[[], Awaitable[T]],
    ok: Callable[[T], bool],
    timeout_s: float = HANG_GUARD_S,
    poll_s: float = 0.05,
) -> T:
    """`wait_until` for an async `read` (a call to a server)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await read()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout_s}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(poll_s)
