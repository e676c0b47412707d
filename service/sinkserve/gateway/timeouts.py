"""Awaiting with a time limit, without losing a cancel.

`asyncio.wait_for` before Python 3.12 returns the result when the awaited work completes
in the same step as a cancel of the caller, and the cancel is lost. A gRPC handler is
cancelled exactly so when its client goes away: its client may read a response and
cancel the call at once (the soak does), and the handler's write of that response
completes as the cancel comes. With the cancel lost, the handler went on to run the turn
the client had written, and the session stayed busy until that turn ended. The gateway
awaits with a limit through `within` only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(work: Awaitable[T], limit_s: float) -> T:
    """`await work`, or `asyncio.TimeoutError` after `limit_s` (the work is then
    cancelled); a cancel of the caller always propagates, also one that comes as the
    work completes."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait((task,), timeout=limit_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()
