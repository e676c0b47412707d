"""`sinkserve.v1.ChatService`: the Chat stream and the unary session calls.

A Chat stream is one async generator. Everything that can happen to it (a request from the
client, an event of the running turn, a cancel from DeleteSession, server shutdown) arrives
through one inbox queue, so the generator is the only place that yields responses and the
order of events is the order they were queued.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

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
from service.gateway.sessions import CacheUsage, Session, SessionRegistry

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
_CANCEL = _Signal("cancel")  # DeleteSession cancels the running turn
_DRAIN = _Signal("drain")  # the server is shutting down


@dataclass(eq=False)
class _Turn:
    arrived: float  # monotonic
    tokens: int = 0
    last_token: float | None = None
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class _FromTurn:
    """An event of a turn, tagged so events of a cancelled turn can be dropped."""

    turn: _Turn | None
    event: TurnEvent | GatewayError


_Item = pb.ChatRequest | _Signal | _FromTurn


@dataclass(eq=False)
class _Stream:
    """One open Chat stream."""

    inbox: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    turn: _Turn | None = None


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    def __init__(
        self,
        config: GatewayConfig,
        registry: SessionRegistry,
        backend: TritonBackend,
        auth: Authenticator,
        metrics: GatewayMetrics,
    ) -> None:
        self._config = config
        self._registry = registry
        self._backend = backend
        self._auth = auth
        self._metrics = metrics
        self._log = structlog.get_logger("sinkserve.gateway")
        self._streams: set[_Stream] = set()
        self._draining = False
        # (sinks, window) reported to clients; the server refreshes it from the model config.
        self.cache_shape = (config.sinks, config.window)

    # -- shutdown ---------------------------------------------------------------------------

    def drain(self) -> None:
        """Refuse new streams and turns; idle streams end now, busy ones after their turn."""
        self._draining = True
        for stream in self._streams:
            stream.inbox.put_nowait(_DRAIN)

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
        session: Session | None = None
        reader = asyncio.create_task(_read_requests(request_iterator, stream.inbox))
        deadline = _deadline(context)
        counted = False
        try:
            if self._draining:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            self._registry.open_stream(caller)
            counted = True
            self._streams.add(stream)
            self._metrics.open_streams.inc()
            first = await _next(stream, deadline)
            if not isinstance(first, pb.ChatRequest):
                return  # the client closed without a request
            session, defaults, opened = self._open(first, caller)
            log = log.bind(session_id=session.session_id)
            log.info("stream opened", resumed=opened.resumed)
            yield pb.ChatResponse(session_opened=opened)
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
                        self._start_turn(stream, session, item.turn, defaults, deadline)
                        log.info("turn started", chars=len(item.turn.text))
                    elif action == "cancel":
                        if stream.turn is not None:
                            yield await self._cancel_turn(stream, session)
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
                elif item is _CANCEL:
                    if stream.turn is not None:
                        yield await self._cancel_turn(stream, session)
                        log.info("turn cancelled by DeleteSession")
                elif isinstance(item, _FromTurn) and item.turn is stream.turn:
                    if isinstance(item.event, GatewayError):
                        stream.turn = None
                        self._registry.end_turn(session, None, completed=False)
                        raise item.event
                    response = self._on_event(stream, session, item.event)
                    if isinstance(item.event, Final):
                        log.info("turn ended", reason=item.event.finish_reason)
                    yield response
                if stream.turn is None:
                    if ending:
                        await self._end_session(session)
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
            if stream.turn is not None and session is not None:
                # The client went away (or the call was aborted) mid-turn: cancel the turn
                # on the model so the session is free for the next one.
                await self._stop_turn(stream, session)
                log.info("turn cut: stream closed mid-turn")
            if stream in self._streams:
                self._streams.discard(stream)
                self._metrics.open_streams.dec()
            if counted:
                self._registry.close_stream(caller)

    def _open(
        self, first: pb.ChatRequest, caller: str
    ) -> tuple[Session, pb.SamplingParams, pb.SessionOpened]:
        action = first.WhichOneof("action")
        if action == "open":
            session = self._registry.create(caller, first.open.system_prompt)
            self._metrics.sessions.set(len(self._registry))
            defaults, resumed = first.open.sampling, False
        elif action == "resume":
            session = self._registry.get(first.resume.session_id, caller)
            defaults, resumed = first.resume.sampling, True
        else:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first request must be open or resume, not {action or 'empty'!r}",
            )
        sinks, window = self.cache_shape
        opened = pb.SessionOpened(
            session_id=session.session_id,
            sinks=sinks,
            window=window,
            resumed=resumed,
            cache_position=session.cache.position,
        )
        return session, defaults, opened

    def _start_turn(
        self,
        stream: _Stream,
        session: Session,
        turn: pb.UserTurn,
        defaults: pb.SamplingParams,
        deadline: float | None,
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
            session_id=session.session_id,
            text=turn.text,
            sampling=self._sampling(defaults, turn.sampling),
            raw=turn.raw,
            start_session=not session.started,
            system_prompt=session.system_prompt,
        )
        # begin_turn first: it raises FAILED_PRECONDITION when another stream runs a turn.
        self._registry.begin_turn(session, lambda: stream.inbox.put_nowait(_CANCEL))
        turn_state = _Turn(arrived=time.monotonic())
        turn_state.task = asyncio.create_task(
            self._run_turn(stream.inbox, turn_state, session, request, deadline)
        )
        stream.turn = turn_state

    async def _run_turn(
        self,
        inbox: asyncio.Queue[_Item],
        turn: _Turn,
        session: Session,
        request: TurnRequest,
        deadline: float | None,
    ) -> None:
        try:
            async for event in self._turn_events(request, deadline):
                session.started = True
                await inbox.put(_FromTurn(turn, event))
        except GatewayError as err:
            await inbox.put(_FromTurn(turn, err))

    async def _turn_events(
        self, request: TurnRequest, deadline: float | None
    ) -> AsyncIterator[TurnEvent]:
        """The backend's events; a FAILED_PRECONDITION before any event is retried briefly.

        The registry lets one turn per session run, so the model refusing a turn as busy
        means a cancelled turn is still winding down there (it stops within a step).
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._config.busy_retry_s
        while True:
            timeout = None if deadline is None else max(deadline - loop.time(), 0.001)
            seen = False
            try:
                async for event in self._backend.turn(request, timeout):
                    seen = True
                    yield event
                return
            except GatewayError as err:
                busy = err.code is grpc.StatusCode.FAILED_PRECONDITION
                if seen or not busy or loop.time() >= give_up:
                    raise
            await asyncio.sleep(0.05)

    def _on_event(self, stream: _Stream, session: Session, event: TurnEvent) -> pb.ChatResponse:
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
        cache = CacheUsage(event.cache_position, event.cached_tokens, event.evicted_tokens)
        self._registry.end_turn(session, cache, completed=True)
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

    async def _stop_turn(self, stream: _Stream, session: Session) -> _Turn:
        """Cancel the running turn's Triton stream (the model then cancels the request)."""
        turn = stream.turn
        assert turn is not None
        stream.turn = None
        if turn.task is not None:
            turn.task.cancel()
            await asyncio.gather(turn.task, return_exceptions=True)
        # The request reached the model (or may have): treat the session as started there.
        session.started = True
        self._registry.end_turn(session, None, completed=True)
        self._metrics.turns.labels("cancelled").inc()
        return turn

    async def _cancel_turn(self, stream: _Stream, session: Session) -> pb.ChatResponse:
        """Cancel the running turn; its TurnEnd reports the last known cache state."""
        turn = await self._stop_turn(stream, session)
        usage = pb.Usage(
            generated_tokens=turn.tokens,
            cache_position=session.cache.position,
            cached_tokens=session.cache.cached_tokens,
            evicted_tokens=session.cache.evicted_tokens,
        )
        end = pb.TurnEnd(finish_reason=pb.FINISH_REASON_CANCELLED, usage=usage)
        return pb.ChatResponse(turn_end=end)

    def _sampling(self, defaults: pb.SamplingParams, turn: pb.SamplingParams) -> Sampling:
        def pick(name: str) -> float | int | None:
            for source in (turn, defaults):
                if source.HasField(name):  # type: ignore[arg-type]
                    value: float | int = getattr(source, name)
                    return value
            return None

        max_tokens = int(pick("max_tokens") or self._config.default_max_tokens)
        if not 1 <= max_tokens <= self._config.max_tokens_limit:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_tokens={max_tokens} must be in 1..{self._config.max_tokens_limit}",
            )
        temperature, top_p = pick("temperature"), pick("top_p")
        if temperature is not None and temperature < 0:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT, f"temperature={temperature} must be >= 0"
            )
        if top_p is not None and not 0 < top_p <= 1:
            raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, f"top_p={top_p} must be in (0, 1]")
        top_k, penalty, seed = pick("top_k"), pick("repetition_penalty"), pick("seed")
        return Sampling(
            max_tokens=max_tokens,
            temperature=None if temperature is None else float(temperature),
            top_k=None if top_k is None else int(top_k),
            top_p=None if top_p is None else float(top_p),
            repetition_penalty=None if penalty is None else float(penalty),
            seed=None if seed is None else int(seed),
            stop=tuple(turn.stop or defaults.stop),
        )

    # -- unary calls ------------------------------------------------------------------------

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        caller = self._caller(context)
        try:
            if self._draining:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            session = self._registry.create(caller, request.system_prompt)
            self._metrics.sessions.set(len(self._registry))
        except GatewayError as err:
            await self._abort(context, err, self._log.bind(rpc="CreateSession", caller=caller))
        self._log.info("session created", caller=caller, session_id=session.session_id)
        return pb.CreateSessionResponse(session=self._describe(session))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        caller = self._caller(context)
        try:
            session = self._registry.get(request.session_id, caller)
        except GatewayError as err:
            await self._abort(context, err, self._log.bind(rpc="GetSession", caller=caller))
        return pb.GetSessionResponse(session=self._describe(session))

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        caller = self._caller(context)
        try:
            session = self._registry.get(request.session_id, caller)
        except GatewayError as err:
            await self._abort(context, err, self._log.bind(rpc="DeleteSession", caller=caller))
        if session.cancel_turn is not None:
            session.cancel_turn()
        await self._end_session(session)
        self._log.info("session deleted", caller=caller, session_id=session.session_id)
        return pb.DeleteSessionResponse()

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        caller = self._caller(context)
        mine = self._registry.owned_by(caller)
        size = min(request.page_size or _LIST_PAGE_DEFAULT, _LIST_PAGE_MAX)
        start = 0
        if request.page_token:
            ids = [s.session_id for s in mine]
            if request.page_token not in ids:
                err = GatewayError(grpc.StatusCode.INVALID_ARGUMENT, "unknown page_token")
                await self._abort(context, err, self._log.bind(rpc="ListSessions"))
            start = ids.index(request.page_token) + 1
        page = mine[start : start + size]
        more = start + size < len(mine)
        return pb.ListSessionsResponse(
            sessions=[self._describe(s) for s in page],
            next_page_token=page[-1].session_id if more and page else "",
        )

    # -- helpers ----------------------------------------------------------------------------

    async def end_expired(self) -> int:
        """End sessions idle past the TTL; returns how many."""
        expired = self._registry.expired()
        for session in expired:
            await self._end_session(session)
            self._log.info("session expired", session_id=session.session_id)
        return len(expired)

    async def _end_session(self, session: Session) -> None:
        """Forget the session and free its cache on the model (best effort)."""
        self._registry.remove(session.session_id)
        self._metrics.sessions.set(len(self._registry))
        if not session.started:
            return
        try:
            async for _ in self._turn_events(
                TurnRequest(session.session_id, "", Sampling(max_tokens=1), end_session=True),
                asyncio.get_running_loop().time() + 30.0,
            ):
                pass
        except GatewayError as err:
            # The engine's own idle TTL reclaims a session the gateway could not end.
            self._log.warning(
                "could not end session on the model",
                session_id=session.session_id,
                code=err.code.name,
                error=err.message,
            )

    def _caller(self, context: grpc.aio.ServicerContext) -> str:
        # The interceptor already rejected calls without a valid token.
        return self._auth.caller(context.invocation_metadata()) or ""

    def _describe(self, session: Session) -> pb.Session:
        sinks, window = self.cache_shape
        return pb.Session(
            session_id=session.session_id,
            owner=session.owner,
            sinks=sinks,
            window=window,
            cache_position=session.cache.position,
            cached_tokens=session.cache.cached_tokens,
            evicted_tokens=session.cache.evicted_tokens,
            turns=session.turns,
            turn_running=session.turn_running,
            create_time=_timestamp(session.created_at),
            last_active_time=_timestamp(session.last_active),
            expire_time=_timestamp(self._registry.expires_at(session)),
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


async def _read_requests(
    requests: AsyncIterator[pb.ChatRequest], inbox: asyncio.Queue[_Item]
) -> None:
    async for request in requests:
        await inbox.put(request)
    await inbox.put(_REQUESTS_DONE)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


async def _next(stream: _Stream, deadline: float | None) -> _Item:
    if deadline is None:
        return await stream.inbox.get()
    remaining = deadline - asyncio.get_running_loop().time()
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
