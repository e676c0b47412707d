"""`sinkserve.v1.ChatService`: the Chat stream and the unary session calls.

The gateway holds no session state: the model owns every session (its owner, TTL, busy
state, turns and cache) and the gateway authenticates, forwards and maps status codes.
What it keeps lives only as long as a stream is open: the stream's running turn.

A Chat stream is one async generator. Everything that can happen to it (a request from the
client, an event of the running turn, the backend lost, server shutdown) arrives through
one inbox queue, so the generator is the only place that yields responses and the order
of events is the order they were queued.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from service.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from service.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from service.gateway.auth import Authenticator
from service.gateway.backend import Delta, Final, Sampling, TritonBackend, TurnEvent, TurnRequest
from service.gateway.config import GatewayConfig
from service.gateway.errors import GatewayError
from service.gateway.metrics import GatewayMetrics

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
_LIST_PAGE_DEFAULT = 100
_LIST_PAGE_MAX = 1000


class _Signal:
    """A named inbox sentinel."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_REQUESTS_DONE = _Signal("requests-done")  # the client half-closed
_DRAIN = _Signal("drain")  # the server is shutting down


@dataclass(eq=False)
class _Turn:
    arrived: float  # monotonic
    tokens: int = 0
    last_token: float | None = None
    task: asyncio.Task[None] | None = None
    cancel_sent: bool = False


@dataclass(frozen=True)
class _FromTurn:
    """An event of a turn, tagged so events of a finished turn can be dropped."""

    turn: _Turn | None
    event: TurnEvent | GatewayError


_Item = pb.ChatRequest | _Signal | _FromTurn


@dataclass(eq=False)
class _Stream:
    """One open Chat stream."""

    inbox: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    turn: _Turn | None = None


@dataclass(frozen=True)
class _Open:
    """Who a stream talks for: its session and caller, and its stream-wide sampling."""

    session_id: str
    caller: str
    defaults: pb.SamplingParams


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        config: GatewayConfig,
        backend: TritonBackend,
        auth: Authenticator,
        metrics: GatewayMetrics,
    ) -> None:
        self._config = config
        self._backend = backend
        self._auth = auth
        self._metrics = metrics
        self._log = structlog.get_logger("sinkserve.gateway")
        self._streams: set[_Stream] = set()
        self._streams_of: dict[str, int] = {}  # open streams per caller (a limit)
        self._background: set[asyncio.Task[None]] = set()
        self._draining = False
        # (sinks, window) reported to clients; the server refreshes it from the model config.
        self.cache_shape = (config.sinks, config.window)

    # -- shutdown and backend loss ----------------------------------------------------------

    def drain(self) -> None:
        """Refuse new streams and turns; idle streams end now, busy ones after their turn."""
        self._draining = True
        for stream in self._streams:
            stream.inbox.put_nowait(_DRAIN)

    def backend_lost(self, reason: str) -> None:
        """The model stopped answering: every running turn ends now with UNAVAILABLE (its
        responses would never come). The session keeps its last completed turn."""
        err = GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            f"the model stopped answering mid-turn ({reason}); resume the session on a new "
            "stream: it continues from its last completed turn",
        )
        for stream in self._streams:
            if stream.turn is not None:
                stream.inbox.put_nowait(_FromTurn(stream.turn, err))

    @property
    def turns_running(self) -> int:
        return sum(s.turn is not None for s in self._streams)

    # -- Chat -------------------------------------------------------------------------------

    async def Chat(
        self, request_iterator: AsyncIterator[pb.ChatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatResponse]:
        caller = self._caller(context)
        log = self._log.bind(rpc="Chat", request_id=secrets.token_hex(8), caller=caller)
        stream = _Stream()
        opened: _Open | None = None
        reader = asyncio.create_task(_read_requests(request_iterator, stream.inbox))
        deadline = _deadline(context)
        counted = False
        try:
            if self._draining:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            self._count_stream(caller, +1)
            counted = True
            self._streams.add(stream)
            self._metrics.open_streams.inc()
            first = await _next(stream, deadline)
            if not isinstance(first, pb.ChatRequest):
                return  # the client closed without a request
            opened, reply = await self._open(first, caller, _session_header(context))
            log = log.bind(session_id=opened.session_id)
            log.info("stream opened", resumed=reply.resumed)
            yield pb.ChatResponse(session_opened=reply)
            ending = closing = draining = False
            while True:
                item = await _next(stream, deadline)
                if isinstance(item, pb.ChatRequest):
                    action = item.WhichOneof("action")
                    if action == "turn":
                        if stream.turn is not None or ending:
                            raise GatewayError(
                                grpc.StatusCode.FAILED_PRECONDITION,
                                "a turn is already running on this stream; wait for its "
                                "TurnEnd or send CancelTurn",
                            )
                        if self._draining:
                            raise GatewayError(
                                grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down"
                            )
                        self._start_turn(stream, opened, item.turn, deadline)
                        log.info("turn started", chars=len(item.turn.text))
                    elif action == "cancel":
                        if stream.turn is not None:
                            cut = await self._cancel_turn(stream, opened)
                            if cut is not None:
                                yield cut
                            log.info("turn cancelled by the client")
                    elif action == "end":
                        ending = True
                    else:
                        raise GatewayError(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"request {action or 'with no action'!r} is only valid first; "
                            "later requests are turn, cancel or end",
                        )
                elif item is _REQUESTS_DONE:
                    closing = True
                elif item is _DRAIN:
                    draining = True
                elif isinstance(item, _FromTurn) and item.turn is stream.turn:
                    if isinstance(item.event, GatewayError):
                        raise item.event
                    response = self._on_event(stream, item.event)
                    if isinstance(item.event, Final):
                        log.info("turn ended", reason=item.event.finish_reason)
                    yield response
                if stream.turn is None:
                    if ending:
                        await self._backend.call("end", opened.session_id, opened.caller)
                        log.info("session ended by the client")
                        return
                    if closing:
                        return
                    if draining:
                        raise GatewayError(
                            grpc.StatusCode.UNAVAILABLE,
                            "the gateway is shutting down; resume the session on a new stream",
                        )
        except GatewayError as err:
            await self._abort(context, err, log)
        finally:
            reader.cancel()
            if stream.turn is not None and opened is not None:
                # The client went away (or the call was aborted) mid-turn: stop the turn
                # on the model so the session is free for the next one.
                await self._stop_turn(stream, opened)
                log.info("turn cut: stream closed mid-turn")
            if stream in self._streams:
                self._streams.discard(stream)
                self._metrics.open_streams.dec()
            if counted:
                self._count_stream(caller, -1)

    async def _open(
        self, first: pb.ChatRequest, caller: str, header: str | None
    ) -> tuple[_Open, pb.SessionOpened]:
        action = first.WhichOneof("action")
        if action == "open":
            if self._draining:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            info = await self._backend.call(
                "open",
                owner=caller,
                system_prompt=first.open.system_prompt,
                sampling=_sampling(first.open.sampling),
            )
            # The session keeps these defaults itself (they outlive this stream).
            opened, resumed = _Open(info["session_id"], caller, pb.SamplingParams()), False
        elif action == "resume":
            sid = first.resume.session_id
            _check_header(header, sid)
            info = await self._backend.call("get", sid, caller)
            opened, resumed = _Open(sid, caller, first.resume.sampling), True
        else:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first request must be open or resume, not {action or 'empty'!r}",
            )
        sinks, window = self.cache_shape
        reply = pb.SessionOpened(
            session_id=opened.session_id,
            sinks=sinks,
            window=window,
            resumed=resumed,
            cache_position=info["position"],
        )
        return opened, reply

    def _start_turn(
        self, stream: _Stream, opened: _Open, turn: pb.UserTurn, deadline: float | None
    ) -> None:
        if not turn.text:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "turn text is empty")
        if len(turn.text) > self._config.max_turn_chars:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"turn text has {len(turn.text)} characters; the limit is "
                f"{self._config.max_turn_chars}",
            )
        request = TurnRequest(
            session_id=opened.session_id,
            owner=opened.caller,
            text=turn.text,
            sampling=_sampling(opened.defaults, turn.sampling),
            raw=turn.raw,
        )
        turn_state = _Turn(arrived=time.monotonic())
        turn_state.task = asyncio.create_task(
            self._run_turn(stream.inbox, turn_state, request, deadline)
        )
        stream.turn = turn_state

    async def _run_turn(
        self,
        inbox: asyncio.Queue[_Item],
        turn: _Turn,
        request: TurnRequest,
        deadline: float | None,
    ) -> None:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            async for event in self._backend.turn(request, timeout):
                await inbox.put(_FromTurn(turn, event))
        except GatewayError as err:
            await inbox.put(_FromTurn(turn, err))

    def _on_event(self, stream: _Stream, event: TurnEvent) -> pb.ChatResponse:
        turn = stream.turn
        assert turn is not None
        if isinstance(event, Delta):
            now = time.monotonic()
            if turn.last_token is None:
                self._metrics.ttft.observe(now - turn.arrived)
            else:
                self._metrics.inter_token.observe(now - turn.last_token)
            turn.last_token = now
            index = turn.tokens
            turn.tokens += len(event.token_ids)
            self._metrics.tokens.inc(len(event.token_ids))
            return pb.ChatResponse(
                delta=pb.TokenDelta(text=event.text, token_ids=event.token_ids, index=index)
            )
        stream.turn = None
        self._metrics.turns.labels(event.finish_reason).inc()
        usage = pb.Usage(
            prompt_tokens=event.prompt_tokens,
            generated_tokens=event.generated_tokens,
            cache_position=event.cache_position,
            cached_tokens=event.cached_tokens,
            evicted_tokens=event.evicted_tokens,
        )
        reason = _FINISH_REASONS.get(event.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        return pb.ChatResponse(turn_end=pb.TurnEnd(finish_reason=reason, usage=usage))

    async def _cancel_turn(self, stream: _Stream, opened: _Open) -> pb.ChatResponse | None:
        """Ask the model to cancel the running turn: its own TurnEnd(CANCELLED), with the
        session's real usage, follows within a step. If the model had no turn running
        (the turn's request had not reached it yet), cut the turn's stream instead and
        answer a TurnEnd here."""
        turn = stream.turn
        assert turn is not None
        if turn.cancel_sent:
            return None
        turn.cancel_sent = True
        answer = await self._backend.call("cancel", opened.session_id, opened.caller)
        finished = turn.task is not None and turn.task.done()  # its real end is queued
        if answer.get("cancelled") or finished or stream.turn is not turn:
            return None
        await self._stop_turn(stream, opened)
        end = pb.TurnEnd(
            finish_reason=pb.FINISH_REASON_CANCELLED,
            usage=pb.Usage(generated_tokens=turn.tokens),
        )
        return pb.ChatResponse(turn_end=end)

    async def _stop_turn(self, stream: _Stream, opened: _Open) -> None:
        """Cut the running turn's Triton stream (the model then cancels the request) and
        tell the model at once, so the session is free for its next turn."""
        turn = stream.turn
        assert turn is not None
        stream.turn = None
        if turn.task is not None:
            turn.task.cancel()
            await asyncio.gather(turn.task, return_exceptions=True)
        self._metrics.turns.labels("cancelled").inc()
        # Not awaited: this runs in the `finally` of a stream the client may have cancelled.
        task = asyncio.create_task(self._tell_cancel(opened))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _tell_cancel(self, opened: _Open) -> None:
        try:
            await self._backend.call("cancel", opened.session_id, opened.caller)
        except GatewayError as err:  # the cut stream cancels it on the model anyway
            self._log.info("cancel not delivered", session_id=opened.session_id, error=err.message)

    # -- unary calls ------------------------------------------------------------------------

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        async def create(caller: str) -> pb.CreateSessionResponse:
            if self._draining:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            info = await self._backend.call(
                "open", owner=caller, system_prompt=request.system_prompt
            )
            return pb.CreateSessionResponse(session=self._describe(info))

        return await self._unary("CreateSession", context, create)

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        async def get(caller: str) -> pb.GetSessionResponse:
            _check_header(_session_header(context), request.session_id)
            info = await self._backend.call("get", request.session_id, caller)
            return pb.GetSessionResponse(session=self._describe(info))

        return await self._unary("GetSession", context, get)

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        async def delete(caller: str) -> pb.DeleteSessionResponse:
            _check_header(_session_header(context), request.session_id)
            # A turn running on another stream is cancelled first (it gets its TurnEnd).
            await self._backend.call("end", request.session_id, caller)
            return pb.DeleteSessionResponse()

        return await self._unary("DeleteSession", context, delete)

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        async def list_(caller: str) -> pb.ListSessionsResponse:
            mine = await self._backend.call("list", owner=caller)
            ids = [s["session_id"] for s in mine]
            size = min(request.page_size or _LIST_PAGE_DEFAULT, _LIST_PAGE_MAX)
            start = 0
            if request.page_token:
                if request.page_token not in ids:
                    raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "unknown page_token")
                start = ids.index(request.page_token) + 1
            page = mine[start : start + size]
            more = start + size < len(mine)
            return pb.ListSessionsResponse(
                sessions=[self._describe(s) for s in page],
                next_page_token=page[-1]["session_id"] if more and page else "",
            )

        return await self._unary("ListSessions", context, list_)

    # -- helpers ----------------------------------------------------------------------------

    async def _unary(self, rpc: str, context: grpc.aio.ServicerContext, run: Any) -> Any:
        caller = self._caller(context)
        log = self._log.bind(rpc=rpc, request_id=secrets.token_hex(8), caller=caller)
        try:
            return await run(caller)
        except GatewayError as err:
            await self._abort(context, err, log)

    def _count_stream(self, caller: str, change: int) -> None:
        """Count a Chat stream against the caller's limit; RESOURCE_EXHAUSTED past it."""
        now = self._streams_of.get(caller, 0)
        if change > 0 and now >= self._config.max_streams_per_caller:
            raise GatewayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"caller {caller!r} already has {self._config.max_streams_per_caller} open streams",
            )
        if now + change > 0:
            self._streams_of[caller] = now + change
        else:
            self._streams_of.pop(caller, None)

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        # The interceptor already rejected calls without a valid token.
        return self._auth.caller(context.invocation_metadata()) or ""

    def _describe(self, info: Mapping[str, Any]) -> pb.Session:
        sinks, window = self.cache_shape
        return pb.Session(
            session_id=info["session_id"],
            owner=info["owner"],
            sinks=sinks,
            window=window,
            cache_position=info["position"],
            cached_tokens=info["cached_tokens"],
            evicted_tokens=info["evicted_tokens"],
            turns=info["turns"],
            turn_running=info["turn_running"],
            create_time=_timestamp(info["created_at"]),
            last_active_time=_timestamp(info["last_active"]),
            expire_time=_timestamp(info["expire_at"]),
        )

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,
        err: GatewayError,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._metrics.errors.labels(err.code.name).inc()
        log.info("call failed", code=err.code.name, error=err.message)
        await context.abort(err.code, err.message)


def _sampling(*sources: pb.SamplingParams) -> Sampling:
    """The fields set in `sources`, the first that sets a field winning; the model fills
    and validates the rest (one place for defaults and limits)."""

    def pick(name: str) -> Any:
        for source in sources:
            if source.HasField(name):  # type: ignore[arg-type]
                return getattr(source, name)
        return None

    stop = next((tuple(s.stop) for s in sources if s.stop), ())
    return Sampling(
        max_tokens=pick("max_tokens"),
        temperature=pick("temperature"),
        top_k=pick("top_k"),
        top_p=pick("top_p"),
        repetition_penalty=pick("repetition_penalty"),
        seed=pick("seed"),
        stop=stop,
    )


def _session_header(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "x-session-id":
            return str(value)
    return None


def _check_header(header: str | None, session_id: str) -> None:
    """A proxy routes by the `x-session-id` header: when present it must name the session
    of the request, or the call could reach a replica that does not keep it warm."""
    if header is not None and header != session_id:
        raise GatewayError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"x-session-id metadata {header!r} does not match the request's session {session_id!r}",
        )


async def _read_requests(
    requests: AsyncIterator[pb.ChatRequest], inbox: asyncio.Queue[_Item]
) -> None:
    async for request in requests:
        await inbox.put(request)
    await inbox.put(_REQUESTS_DONE)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _next(stream: _Stream, deadline: float | None) -> _Item:
    if deadline is None:
        return await stream.inbox.get()
    remaining = deadline - time.monotonic()
    try:
        return await asyncio.wait_for(stream.inbox.get(), max(remaining, 0))
    except asyncio.TimeoutError:
        where = "mid-turn" if stream.turn is not None else "between turns"
        raise GatewayError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the call's deadline passed {where}"
        ) from None


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
