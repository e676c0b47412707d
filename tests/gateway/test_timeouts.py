"""`within`: a time limit that never loses a cancel of its caller.

The case that matters is a gRPC handler cancelled (its client went away) in the same
event-loop step as the write it awaits completes. These tests make that step happen
exactly, without a server: the work is a future resolved in the same step as the cancel.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import pytest

from sinkserve.gateway.timeouts import within

Limit = Callable[[Awaitable[None], float], Awaitable[None]]


async def cancel_as_the_work_completes(limit: Limit) -> asyncio.Task[None]:
    """A caller that awaits work under `limit`, then waits on (as a handler waits for its
    next event); it is cancelled in the step its work completes. Returns it a few steps
    later."""
    work: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def caller() -> None:
        await limit(work, 30.0)
        await asyncio.Event().wait()  # never set: only a cancel ends this

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)  # the caller now awaits its work
    work.set_result(None)
    task.cancel()
    for _ in range(5):  # steps, not time: the cancel has landed by then, or never will
        await asyncio.sleep(0)
    return task


async def test_a_cancel_that_comes_as_the_work_completes_reaches_the_caller() -> None:
    task = await cancel_as_the_work_completes(within)
    assert task.cancelled()


async def test_asyncio_wait_for_loses_that_cancel_before_python_3_12() -> None:
    """Why `within` exists: the same step under asyncio.wait_for."""
    task = await cancel_as_the_work_completes(asyncio.wait_for)
    lost = not task.done()
    task.cancel()  # a second cancel ends it where the first was lost
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lost == (sys.version_info < (3, 12))


async def test_within_returns_the_result_or_times_out_and_cancels_the_work() -> None:
    async def answer() -> int:
        return 42

    assert await within(answer(), 1.0) == 42
    never = asyncio.ensure_future(asyncio.Event().wait())
    with pytest.raises(asyncio.TimeoutError):
        await within(never, 0.0)
    await asyncio.sleep(0)  # the cancel of the work lands
    assert never.cancelled()
