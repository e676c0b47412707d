"""Turns of the request/response APIs (the OpenAI-compatible HTTP API): one turn a call.

A turn counts against its caller's quotas and the gateway's metrics exactly as a turn of
a Chat stream does (service/sinkserve/gateway/stream.py), and ends with UNAVAILABLE at once when
the model stops answering, instead of waiting for responses that never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator

import structlog

from sinkserve.gateway.backend import Delta, Final, TritonBackend, TurnEvent, TurnRequest
from sinkserve.gateway.errors import GatewayError
from sinkserve.gateway.metrics import GatewayMetrics
from sinkserve.gateway.quotas import CallerQuotas

_Item = TurnEvent | GatewayError


class TurnRunner:
    """Runs single turns on the model; `fail_all` ends every running one."""

    def __init__(
        self, backend: TritonBackend, metrics: GatewayMetrics, quotas: CallerQuotas
    ) -> None:
        self._backend = backend
        self._metrics = metrics
        self._quotas = quotas
        self._log = structlog.get_logger("sinkserve.gateway")
        # Invariant: holds the inbox of every turn between its start and its end.
        self._running: set[asyncio.Queue[_Item]] = set()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        return len(self._running)

    async def run(self, request: TurnRequest) -> AsyncGenerator[TurnEvent, None]:
        """Delta events, then exactly one Final; GatewayError on failure (RESOURCE_EXHAUSTED
        with a retry hint past the caller's quotas, before anything runs).

        Use inside `contextlib.aclosing`: leaving early cuts the turn's Triton stream (the
        model cancels the request) and asks the model to cancel it at once."""
        owner = request.owner
        self._quotas.begin_turn(owner)
        inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._running.add(inbox)
        feed = asyncio.create_task(self._feed(request, inbox))
        arrived, last = time.monotonic(), None
        ended = failed = False
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, GatewayError):
                    failed = True
                    raise item
                if isinstance(item, Delta):
                    now = time.monotonic()
                    latency = self._metrics.ttft if last is None else self._metrics.inter_token
                    latency.observe(now - (arrived if last is None else last))
                    last = now
                    self._metrics.tokens.inc(len(item.token_ids))
                    self._quotas.spend(owner, len(item.token_ids))
                elif isinstance(item, Final):
                    ended = True
                    self._metrics.turns.labels(item.finish_reason).inc()
                    self._quotas.spend(owner, item.prompt_tokens)
                yield item
                if ended:
                    return
        finally:
            self._running.discard(inbox)
            self._quotas.end_turn(owner)
            if not feed.done():
                feed.cancel()
                await asyncio.gather(feed, return_exceptions=True)
            if not (ended or failed):  # cut by the caller
                self._metrics.turns.labels("cancelled").inc()
                self._cancel_later(request)

    def fail_all(self, err: GatewayError) -> None:
        """End every running turn with `err` (the model stopped answering)."""
        for inbox in self._running:
            inbox.put_nowait(err)

    async def close(self) -> None:
        """Wait for the cancels still on their way to the model."""
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _feed(self, request: TurnRequest, inbox: asyncio.Queue[_Item]) -> None:
        # Unbounded: a turn makes at most max_new_tokens events, and the HTTP side's
        # writes time out for a client that reads nothing.
        try:
            async with contextlib.aclosing(self._backend.turn(request)) as events:
                async for event in events:
                    inbox.put_nowait(event)
        except GatewayError as err:
            inbox.put_nowait(err)

    def _cancel_later(self, request: TurnRequest) -> None:
        """Tell the model at once that a cut turn is over, so its session is free for the
        next turn (the cut Triton stream alone is seen within 0.25 s and a step)."""

        async def cancel() -> None:
            try:
                await self._backend.cancel_turn(request)
            except GatewayError as err:
                self._log.info(
                    "cancel not delivered", session_id=request.session_id, error=err.message
                )

        task = asyncio.create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
