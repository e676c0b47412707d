"""One open Chat stream: its session, its running turn and the turns queued behind it.

Everything that can happen to a stream (a request from the client, an event of the
running turn, the backend lost, server shutdown) arrives through one inbox queue and is
handled by `ChatStream.run` alone, so responses go out in the order events were queued.

Invariants:
- at most one turn of a stream runs at a time; turns written meanwhile wait in `queued`
  (at most `max_queued_turns`) and start in order, each after the previous TurnEnd;
- at most `turn_buffer` events of the running turn wait in the inbox: beyond that the
  turn's reader stops reading Triton until the client takes responses again, and a
  client that takes none for `stall_timeout_s` has its turn cancelled;
- every started turn is counted in the caller's quotas until its end or its cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog

from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway.backend import Delta, Final, TritonBackend, TurnEvent, TurnRequest
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.decoding import Undecodable
from sinkserve.gateway.errors import GatewayError
from sinkserve.gateway.metrics import GatewayMetrics
from sinkserve.gateway.quotas import CallerQuotas
from sinkserve.gateway.timeouts import within

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


class Signal:
    """A named inbox sentinel."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REQUESTS_DONE = Signal("requests-done")  # the client half-closed
DRAIN = Signal("drain")  # the server is shutting down


@dataclass(eq=False)
class Turn:
    request: TurnRequest
    arrived: float  # monotonic, when the client's request arrived
    room: asyncio.Semaphore  # free places in the inbox for this turn's events
    tokens: int = 0
    last_token: float | None = None
    task: asyncio.Task[None] | None = None
    cancel_sent: bool = False


@dataclass(frozen=True)
class FromTurn:
    """An event of a turn, tagged so events of a finished turn can be dropped."""

    turn: Turn
    event: TurnEvent | GatewayError
    buffered: bool = True  # took a place of the turn's buffer (events from Triton do)


Item = pb.ChatRequest | Signal | FromTurn


@dataclass(frozen=True)
class Opened:
    """Who a stream talks for: its session and caller, and its stream-wide sampling."""

    session_id: str
    caller: str
    defaults: pb.SamplingParams


@dataclass(eq=False)
class StreamDeps:
    """What every stream of one gateway shares."""

    config: GatewayConfig
    backend: TritonBackend
    metrics: GatewayMetrics
    quotas: CallerQuotas
    background: set[asyncio.Task[None]] = field(default_factory=set)


class ChatStream:
    """The state and the loop of one Chat stream, after its session was opened."""

    def __init__(
        self,
        deps: StreamDeps,
        context: grpc.aio.ServicerContext,
        log: structlog.typing.FilteringBoundLogger,
        deadline: float | None,
    ) -> None:
        self._deps = deps
        self._context = context
        self.log = log
        self.deadline = deadline  # monotonic, from the client's deadline
        self.inbox: asyncio.Queue[Item | Undecodable] = asyncio.Queue()
        self.turn: Turn | None = None
        self.queued: deque[TurnRequest] = deque()
        self.opened: Opened | None = None
        self._ending = self._closing = self._draining = False

    # -- the loop ---------------------------------------------------------------------------

    async def next(self) -> Item:
        """The next inbox item; DEADLINE_EXCEEDED once the client's deadline passed,
        INVALID_ARGUMENT for a request that is no ChatRequest."""
        item = await self._next()
        if isinstance(item, Undecodable):
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, item.message)
        return item

    async def _next(self) -> Item | Undecodable:
        if self.deadline is None:
            return await self.inbox.get()
        try:
            return await within(self.inbox.get(), max(self.deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            where = "mid-turn" if self.turn is not None else "between turns"
            raise GatewayError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the call's deadline passed {where}"
            ) from None

    async def run(self, opened: Opened) -> None:
        """Serve the stream until the client ends or closes it (GatewayError otherwise)."""
        self.opened = opened
        while True:
            item = await self.next()
            if isinstance(item, pb.ChatRequest):
                await self._on_request(item)
            elif item is REQUESTS_DONE:
                self._closing = True
            elif item is DRAIN:
                self._draining = True
            elif isinstance(item, FromTurn):
                await self._on_turn_event(item)
            if self.turn is None and await self._done():
                return

    async def send(self, response: pb.ChatResponse) -> None:
        """Write one response; a client that takes none for the stall limit loses its turn."""
        limit = self._deps.config.stall_timeout_s
        try:
            await within(self._context.write(response), limit)
        except asyncio.TimeoutError:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the client read no response for {limit:g}s; its turn was cancelled "
                "(the session keeps what was generated before)",
            ) from None

    async def _on_request(self, item: pb.ChatRequest) -> None:
        action = item.WhichOneof("action")
        if action == "turn":
            self._queue(item.turn)
        elif action == "cancel":
            if self.turn is not None:  # queued turns stay queued
                cut = await self._cancel_turn()
                if cut is not None:
                    await self.send(cut)
                self.log.info("turn cancelled by the client")
        elif action == "end":
            self._ending = True
        else:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request {action or 'with no action'!r} is only valid first; "
                "later requests are turn, cancel or end",
            )

    def fail_turn(self, err: GatewayError) -> None:
        """End the running turn with `err` (its responses will never come)."""
        if self.turn is not None:
            self.inbox.put_nowait(FromTurn(self.turn, err, buffered=False))

    async def _on_turn_event(self, item: FromTurn) -> None:
        if item.buffered:
            item.turn.room.release()
        if item.turn is not self.turn:
            return  # an event of a turn already cut
        if isinstance(item.event, GatewayError):
            raise item.event
        response = self._response(item.event)
        if isinstance(item.event, Final):
            self.log.info("turn ended", reason=item.event.finish_reason)
            self._end_turn(prompt_tokens=item.event.prompt_tokens)
        await self.send(response)

    async def _done(self) -> bool:
        """With no turn running: start the next queued one, or tell whether the stream
        is over (ended, closed, or drained)."""
        if self.queued and not (self._draining or self._ending):
            self._start(self.queued.popleft())
            return False
        if self._ending:
            assert self.opened is not None
            await self._deps.backend.call("end", self.opened.session_id, self.opened.caller)
            self.log.info("session ended by the client")
            return True
        if self._draining:
            raise GatewayError(
                grpc.StatusCode.UNAVAILABLE,
                f"the gateway is shutting down ({len(self.queued)} queued turns not run); "
                "resume the session on a new stream",
            )
        return self._closing and not self.queued

    # -- turns ------------------------------------------------------------------------------

    def _queue(self, turn: pb.UserTurn) -> None:
        config = self._deps.config
        if not turn.text:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "turn text is empty")
        if len(turn.text) > config.max_turn_chars:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"turn text has {len(turn.text)} characters; the limit is {config.max_turn_chars}",
            )
        if self._ending:
            raise GatewayError(
                grpc.StatusCode.FAILED_PRECONDITION, "a turn after EndSession on the same stream"
            )
        if self._draining:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        if self.turn is not None and len(self.queued) >= config.max_queued_turns:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{config.max_queued_turns} turns already wait behind the running one on this "
                "stream (the limit); wait for a TurnEnd",
                retry_after_s=1.0,
            )
        assert self.opened is not None
        self.queued.append(
            TurnRequest(
                session_id=self.opened.session_id,
                owner=self.opened.caller,
                text=turn.text,
                sampling=sampling_of(turn.sampling, self.opened.defaults),
                raw=turn.raw,
            )
        )
        self.log.info("turn queued", chars=len(turn.text), waiting=len(self.queued))

    def _start(self, request: TurnRequest) -> None:
        self._deps.quotas.begin_turn(request.owner)
        turn = Turn(
            request=request,
            arrived=time.monotonic(),
            room=asyncio.Semaphore(self._deps.config.turn_buffer),
        )
        turn.task = asyncio.create_task(self._feed(turn))
        self.turn = turn

    async def _feed(self, turn: Turn) -> None:
        """Move the turn's events from Triton to the inbox, at most `turn_buffer` ahead."""
        timeout = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)
        try:
            # aclosing: when this task is cancelled while it waits for room, the turn's
            # generator is closed here, which cuts its Triton stream (and so the turn on
            # the model) at once, not when the abandoned generator is collected.
            async with contextlib.aclosing(
                self._deps.backend.turn(turn.request, timeout)
            ) as events:
                async for event in events:
                    await turn.room.acquire()
                    await self.inbox.put(FromTurn(turn, event))
        except GatewayError as err:
            await turn.room.acquire()
            await self.inbox.put(FromTurn(turn, err))

    def _response(self, event: TurnEvent) -> pb.ChatResponse:
        turn = self.turn
        assert turn is not None
        metrics = self._deps.metrics
        if isinstance(event, Delta):
            now = time.monotonic()
            if turn.last_token is None:
                metrics.ttft.observe(now - turn.arrived)
            else:
                metrics.inter_token.observe(now - turn.last_token)
            turn.last_token = now
            index = turn.tokens
            turn.tokens += len(event.token_ids)
            metrics.tokens.inc(len(event.token_ids))
            self._deps.quotas.spend(turn.request.owner, len(event.token_ids))
            return pb.ChatResponse(
                delta=pb.TokenDelta(text=event.text, token_ids=event.token_ids, index=index)
            )
        metrics.turns.labels(event.finish_reason).inc()
        usage = pb.Usage(
            prompt_tokens=event.prompt_tokens,
            generated_tokens=event.generated_tokens,
            cache_position=event.cache_position,
            cached_tokens=event.cached_tokens,
            evicted_tokens=event.evicted_tokens,
        )
        reason = _FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        return pb.ChatResponse(turn_end=pb.TurnEnd(finish_reason=reason, usage=usage))

    def _end_turn(self, prompt_tokens: int = 0) -> None:
        turn = self.turn
        assert turn is not None
        self.turn = None
        self._deps.quotas.spend(turn.request.owner, prompt_tokens)
        self._deps.quotas.end_turn(turn.request.owner)

    async def _cancel_turn(self) -> pb.ChatResponse | None:
        """Ask the model to cancel the running turn: its own TurnEnd(CANCELLED), with the
        session's real usage, follows within a step. If the model had no turn running
        (the turn's request had not reached it yet), cut the turn's stream instead and
        answer a TurnEnd here."""
        turn = self.turn
        assert turn is not None and self.opened is not None
        if turn.cancel_sent:
            return None
        turn.cancel_sent = True
        running = await self._deps.backend.cancel_turn(turn.request)
        finished = turn.task is not None and turn.task.done()  # its real end is queued
        if running or finished or self.turn is not turn:
            return None
        await self.cut_turn()
        # The session as the model has it (the turn fed nothing there).
        info = await self._deps.backend.call("get", self.opened.session_id, self.opened.caller)
        usage = pb.Usage(
            generated_tokens=turn.tokens,
            cache_position=info["position"],
            cached_tokens=info["cached_tokens"],
            evicted_tokens=info["evicted_tokens"],
        )
        end = pb.TurnEnd(finish_reason=pb.FINISH_REASON_CANCELLED, usage=usage)
        return pb.ChatResponse(turn_end=end)

    async def cut_turn(self) -> None:
        """Cut the running turn's Triton stream (the model then cancels the request) and
        tell the model at once, so the session is free for its next turn."""
        turn = self.turn
        assert turn is not None and self.opened is not None
        self._end_turn()
        # First, and not awaited (this runs in the `finally` of a stream the client may
        # have cancelled): the cancel names the turn, so it holds even if the turn's
        # request reaches the model after it.
        task = asyncio.create_task(self._tell_cancel(turn.request))
        self._deps.background.add(task)
        task.add_done_callback(self._deps.background.discard)
        if turn.task is not None:
            turn.task.cancel()
            await asyncio.gather(turn.task, return_exceptions=True)
        self._deps.metrics.turns.labels("cancelled").inc()

    async def _tell_cancel(self, request: TurnRequest) -> None:
        try:
            await self._deps.backend.cancel_turn(request)
        except GatewayError as err:  # the cut stream cancels it on the model anyway
            self.log.info("cancel not delivered", error=err.message)


def sampling_of(*sources: pb.SamplingParams) -> pb.SamplingParams:
    """The fields set in `sources`, the first that sets a field winning (the first with
    stop strings gives them all); the model fills and validates the rest (one place for
    defaults and limits)."""
    merged = pb.SamplingParams()
    for source in reversed(sources):  # later merges overwrite: the first source wins
        stop = tuple(merged.stop)
        merged.MergeFrom(source)
        del merged.stop[:]
        merged.stop.extend(tuple(source.stop) or stop)
    return merged


async def read_requests(
    requests: AsyncIterator[pb.ChatRequest | Undecodable], inbox: asyncio.Queue[Item | Undecodable]
) -> None:
    """Move the client's requests into the inbox, then REQUESTS_DONE."""
    async for request in requests:
        await inbox.put(request)
    await inbox.put(REQUESTS_DONE)
