"""`sinkserve.v1.ChatService`: the Chat stream and the unary session calls.

The gateway holds no session state: the model owns every session (its owner, TTL, busy
state, turns and cache) and the gateway authenticates, forwards and maps status codes.
What it keeps lives only as long as a stream is open: the stream's running and queued
turns (service/sinkserve/gateway/stream.py), and per-caller counts of streams and turns.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc
from sinkserve.gateway.auth import Authenticator
from sinkserve.gateway.backend import TritonBackend
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.decoding import Undecodable
from sinkserve.gateway.errors import GatewayError
from sinkserve.gateway.metrics import GatewayMetrics
from sinkserve.gateway.quotas import CallerQuotas
from sinkserve.gateway.stream import (
    DRAIN,
    ChatStream,
    Opened,
    StreamDeps,
    read_requests,
)
from sinkserve.gateway.timeouts import within

_LIST_PAGE_DEFAULT = 100
_LIST_PAGE_MAX = 1000


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
        self._streams: set[ChatStream] = set()
        self._streams_of: dict[str, int] = {}  # open streams per caller (a limit)
        # Shared with the gateway's HTTP API: a caller's turns count once, whatever the API.
        self.quotas = CallerQuotas(config.max_turns_per_caller, config.tokens_per_minute_per_caller)
        self._deps = StreamDeps(config, backend, metrics, self.quotas)
        self._draining = False
        # (sinks, window) reported to clients; the server refreshes it from the model config.
        self.cache_shape = (config.sinks, config.window)

    # -- shutdown and backend loss ----------------------------------------------------------

    def drain(self) -> None:
        """Refuse new streams and turns; idle streams end now, busy ones after their turn."""
        self._draining = True
        for stream in self._streams:
            stream.inbox.put_nowait(DRAIN)

    def backend_lost(self, reason: str) -> None:
        """The model stopped answering: every running turn ends now with UNAVAILABLE (its
        responses would never come). The session keeps its last completed turn."""
        err = GatewayError(
            grpc.StatusCode.UNAVAILABLE,
            f"the model stopped answering mid-turn ({reason}); resume the session on a new "
            "stream: it continues from its last completed turn",
        )
        for stream in self._streams:
            stream.fail_turn(err)

    @property
    def turns_running(self) -> int:
        return sum(s.turn is not None for s in self._streams)

    # -- Chat -------------------------------------------------------------------------------

    # A coroutine that writes with context.write, not a generator of responses: a write
    # can then be timed out, which is how a client that stopped reading loses its turn.
    async def Chat(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.ChatRequest], context: grpc.aio.ServicerContext
    ) -> None:
        caller = await self._caller(context)
        log = self._log.bind(rpc="Chat", request_id=secrets.token_hex(8), caller=caller)
        stream = ChatStream(self._deps, context, log, _deadline(context))
        reader = asyncio.create_task(read_requests(request_iterator, stream.inbox))
        counted = False
        try:
            if self._draining:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            self._count_stream(caller, +1)
            counted = True
            self._streams.add(stream)
            self._metrics.open_streams.inc()
            first = await stream.next()
            if not isinstance(first, pb.ChatRequest):
                return  # the client closed without a request
            opened, reply = await self._open(first, caller, _session_header(context))
            stream.log = log = log.bind(session_id=opened.session_id)
            log.info("stream opened", resumed=reply.resumed)
            await stream.send(pb.ChatResponse(session_opened=reply))
            await stream.run(opened)
        except asyncio.CancelledError:
            log.info("call cancelled", turn_running=stream.turn is not None)
            raise
        except GatewayError as err:
            await self._cut(stream, log)  # first: the status may wait for a stalled reader
            await self._abort(context, err, log)
        finally:
            reader.cancel()
            await self._cut(stream, log)
            if stream in self._streams:
                self._streams.discard(stream)
                self._metrics.open_streams.dec()
            if counted:
                self._count_stream(caller, -1)

    async def _cut(self, stream: ChatStream, log: structlog.typing.FilteringBoundLogger) -> None:
        """Stop the stream's running turn, if any, on the model: the client went away, or
        the call fails, so the session must be free for its next turn."""
        if stream.turn is not None:
            started = time.monotonic()
            await stream.cut_turn()
            log.info("turn cut: stream closed mid-turn", cut_s=round(time.monotonic() - started, 3))

    async def _open(
        self, first: pb.ChatRequest, caller: str, header: str | None
    ) -> tuple[Opened, pb.SessionOpened]:
        """The stream's first request: open a new session, or resume one."""
        action = first.WhichOneof("action")
        if action == "open":
            opened, info = await self._open_new(first.open, caller)
        elif action == "resume":
            opened, info = await self._resume(first.resume, caller, header)
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
            resumed=action == "resume",
            cache_position=info["position"],
        )
        return opened, reply

    async def _open_new(self, request: pb.OpenSession, caller: str) -> tuple[Opened, Any]:
        if self._draining:
            raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
        self._check_system_prompt(request.system_prompt)
        info = await self._backend.call(
            "open",
            owner=caller,
            system_prompt=request.system_prompt,
            sampling=request.sampling,
        )
        # The session keeps these defaults itself (they outlive this stream).
        return Opened(info["session_id"], caller, pb.SamplingParams()), info

    async def _resume(
        self, request: pb.ResumeSession, caller: str, header: str | None
    ) -> tuple[Opened, Any]:
        _check_header(header, request.session_id)
        info = await self._backend.call("get", request.session_id, caller)
        return Opened(request.session_id, caller, request.sampling), info

    # -- unary calls ------------------------------------------------------------------------

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateSessionResponse:
        async def create(caller: str) -> pb.CreateSessionResponse:
            if self._draining:
                raise GatewayError(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down")
            self._check_system_prompt(request.system_prompt)
            info = await self._backend.call(
                "open", owner=caller, system_prompt=request.system_prompt
            )
            return pb.CreateSessionResponse(session=self._describe(info))

        response: pb.CreateSessionResponse = await self._unary(
            "CreateSession", request, context, create
        )
        return response

    async def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetSessionResponse:
        async def get(caller: str) -> pb.GetSessionResponse:
            _check_header(_session_header(context), request.session_id)
            info = await self._backend.call("get", request.session_id, caller)
            return pb.GetSessionResponse(session=self._describe(info))

        response: pb.GetSessionResponse = await self._unary("GetSession", request, context, get)
        return response

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteSessionResponse:
        async def delete(caller: str) -> pb.DeleteSessionResponse:
            _check_header(_session_header(context), request.session_id)
            # A turn running on another stream is cancelled first (it gets its TurnEnd).
            await self._backend.call("end", request.session_id, caller)
            return pb.DeleteSessionResponse()

        response: pb.DeleteSessionResponse = await self._unary(
            "DeleteSession", request, context, delete
        )
        return response

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        async def list_(caller: str) -> pb.ListSessionsResponse:
            if request.page_size < 0:
                raise GatewayError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"page_size={request.page_size} must be >= 0 (0 = {_LIST_PAGE_DEFAULT})",
                )
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

        response: pb.ListSessionsResponse = await self._unary(
            "ListSessions", request, context, list_
        )
        return response

    # -- helpers ----------------------------------------------------------------------------

    async def _unary(
        self, rpc: str, request: object, context: grpc.aio.ServicerContext, run: Any
    ) -> Any:
        caller = await self._caller(context)
        log = self._log.bind(rpc=rpc, request_id=secrets.token_hex(8), caller=caller)
        try:
            if isinstance(request, Undecodable):
                raise GatewayError(grpc.StatusCode.INVALID_ARGUMENT, request.message)
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

    def _check_system_prompt(self, text: str) -> None:
        """A cheap bound before the model tokenizes it (which bounds it in tokens)."""
        if len(text) > self._config.max_turn_chars:
            raise GatewayError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"system prompt has {len(text)} characters; the limit is "
                f"{self._config.max_turn_chars}",
            )

    async def _caller(self, context: grpc.aio.ServicerContext) -> str:
        """The call's caller. The interceptor checked the token, but a reload of the
        tokens may have revoked it since: then the call ends UNAUTHENTICATED here."""
        caller = self._auth.caller(context.invocation_metadata())
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the bearer token was revoked")
        return caller or ""

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
            sampling=_sampling_message(info["sampling"]),
        )

    async def _abort(
        self,
        context: grpc.aio.ServicerContext,
        err: GatewayError,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self._metrics.errors.labels(err.code.name).inc()
        log.info("call failed", code=err.code.name, error=err.message)
        hint: tuple[tuple[str, str], ...] = ()
        if err.retry_after_s is not None:
            hint = (("retry-after-ms", str(max(1, round(err.retry_after_s * 1000)))),)
        # Bounded: the status queues behind responses a stalled client has not read.
        try:
            await within(
                context.abort(err.code, err.message, trailing_metadata=hint),
                self._config.stall_timeout_s,
            )
        except asyncio.TimeoutError:
            log.info("status not delivered: the client reads nothing", code=err.code.name)


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


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _sampling_message(fields: Mapping[str, Any]) -> pb.SamplingParams:
    """A session's sampling as the model reports it (engine `SamplingParams` fields) in the
    API's terms; the engine's own fields (stop token ids, ignore_eos) stay internal."""
    values = {
        "max_tokens": fields["max_new_tokens"],
        "temperature": fields["temperature"],
        "top_k": fields["top_k"],
        "top_p": fields["top_p"],
        "repetition_penalty": fields["repetition_penalty"],
        "seed": fields["seed"],  # None: the session has none (left unset)
        "stop": fields["stop"],
    }
    return pb.SamplingParams(**{k: v for k, v in values.items() if v is not None})
