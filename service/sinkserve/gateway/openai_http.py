"""The OpenAI-compatible HTTP API of the gateway (aiohttp), beside its gRPC port.

Routes: POST /v1/chat/completions, POST /v1/responses, POST /v1/conversations,
GET and DELETE /v1/conversations/{id}, GET /v1/models (docs/openai.md). A conversation is
a sinkserve session, held by the model like every other; the gateway keeps nothing per
conversation, and a response's id names its session and turn. Callers authenticate with
the gRPC API's tokens (`Authorization: Bearer`), and their turns count against the same
per-caller quotas and metrics. Every error is answered in OpenAI's error shape; a stream
that already began reports its error as its last event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
import structlog
from aiohttp import web

from sinkserve.gateway import openai_wire as wire
from sinkserve.gateway.auth import Authenticator
from sinkserve.gateway.backend import Delta, Final, TritonBackend, TurnEvent, TurnRequest
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.errors import GatewayError
from sinkserve.gateway.metrics import GatewayMetrics
from sinkserve.gateway.openai_wire import ApiError, Json, ResponseRequest
from sinkserve.gateway.quotas import CallerQuotas
from sinkserve.gateway.timeouts import within
from sinkserve.gateway.turn_runner import TurnRunner

Log = structlog.typing.FilteringBoundLogger
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# gRPC status of a GatewayError -> (HTTP status, OpenAI error type, error code).
_HTTP_OF: Mapping[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.CANCELLED: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
_CANCEL_AFTER_S = 1.0  # how long requests cancelled at the end of a stop get to unwind
# What the middleware sets on every request: its id, its logger and its caller.
_REQUEST_ID = web.RequestKey("request_id", str)
_LOG: web.RequestKey[Log] = web.RequestKey("log")
_CALLER = web.RequestKey("caller", str)


def api_error(err: GatewayError) -> ApiError:
    """The HTTP answer to a GatewayError: the client's mistakes are 4xx, never 500."""
    status, kind, code = _HTTP_OF.get(err.code, (500, "server_error", "internal_error"))
    return ApiError(status, err.message, kind=kind, code=code, retry_after_s=err.retry_after_s)


class OpenAIServer:
    """The HTTP API of one gateway: `await start()` (returns the bound port), `drain()`,
    `await stop()`; `backend_lost()` ends every running turn (the model stopped)."""

    def __init__(
        self,
        config: GatewayConfig,
        backend: TritonBackend,
        auth: Authenticator,
        metrics: GatewayMetrics,
        quotas: CallerQuotas,
    ) -> None:
        self._config = config
        self._backend = backend
        self._auth = auth
        self._metrics = metrics
        self._turns = TurnRunner(backend, metrics, quotas)
        self._log = structlog.get_logger("sinkserve.gateway.http")
        self._started_at = int(time.time())
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Session ends still on their way (a request cancelled at shutdown leaves them).
        self._background: set[asyncio.Task[None]] = set()
        app = web.Application(
            client_max_size=config.max_message_bytes, middlewares=[self._middleware]
        )
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/conversations", self._create_conversation)
        app.router.add_get("/v1/conversations/{conversation_id}", self._get_conversation)
        app.router.add_delete("/v1/conversations/{conversation_id}", self._delete_conversation)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        # stop() waits out the grace itself; what still runs after it is cancelled.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=_CANCEL_AFTER_S
        )

    async def start(self) -> int:
        """Listen on the gateway's host and `http_port` (TLS when the gateway has it)."""
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self._config.host,
            self._config.http_port,
            ssl_context=_ssl_context(self._config),
        )
        try:
            await site.start()
        except OSError as err:  # the port is taken: say which, not a traceback
            where = f"{self._config.host}:{self._config.http_port}"
            raise OSError(f"cannot listen for HTTP on {where}: {err.strerror}") from None
        port = int(self._runner.addresses[0][1])
        self._log.info("http listening", address=f"{self._config.host}:{port}")
        return port

    def drain(self) -> None:
        """Refuse new requests (503); running ones go on until `stop`'s grace ends."""
        self._draining = True

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests, give running ones up to `grace_s` to finish, then stop
        listening and cancel what still runs (its turns are cut on the model)."""
        self._draining = True
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self._idle.wait(), grace_s)
        await self._runner.cleanup()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._turns.close()

    def backend_lost(self, reason: str) -> None:
        if self._turns.running:
            self._turns.fail_all(
                GatewayError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the model stopped answering mid-turn ({reason}); the conversation keeps "
                    "its last completed turn",
                )
            )

    # -- every request ----------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = secrets.token_hex(8)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        log: Log = self._log.bind(request_id=request_id, method=request.method, route=route)
        request[_REQUEST_ID], request[_LOG] = request_id, log
        started = time.monotonic()
        self._in_flight += 1
        self._idle.clear()
        try:
            if self._draining:
                raise ApiError(
                    503, "the gateway is shutting down", kind="server_error", code="unavailable"
                )
            request[_CALLER] = self._caller(request)
            request[_LOG] = log = log.bind(caller=request[_CALLER])
            response = await handler(request)
        except ApiError as err:
            response = self._error_response(err, log)
        except GatewayError as failed:  # counted by gRPC code, as the gRPC API's are
            self._metrics.errors.labels(failed.code.name).inc()
            response = self._error_response(api_error(failed), log)
        except web.HTTPException as exc:  # no such route or method, a body too large
            code = exc.reason.lower().replace(" ", "_")
            refused = ApiError(exc.status, exc.text or exc.reason, code=code)
            response = self._error_response(refused, log)
        except Exception:  # a bug: logged with its traceback, answered without it
            log.exception("http request failed")
            internal = ApiError(500, "internal error", kind="server_error", code="internal_error")
            response = self._error_response(internal, log)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
        if not response.prepared:
            response.headers["x-request-id"] = request_id
        self._metrics.http_requests.labels(route, str(response.status)).inc()
        log.info(
            "http request",
            status=response.status,
            ms=round(1000 * (time.monotonic() - started), 1),
        )
        return response

    def _caller(self, request: web.Request) -> str:
        """The caller the bearer token names (auth off: anonymous); 401 otherwise."""
        header = request.headers.get("Authorization", "")
        caller = self._auth.caller([("authorization", header)])
        if caller is None:
            raise ApiError(
                401,
                "missing or invalid bearer token (header 'Authorization: Bearer <token>')",
                code="invalid_api_key",
            )
        return caller

    def _error_response(self, err: ApiError, log: Log) -> web.Response:
        code = err.code or str(err.status)
        log.info("http error", status=err.status, code=code, error=err.message)
        headers = {}
        if err.retry_after_s is not None:
            headers["retry-after-ms"] = str(max(1, round(err.retry_after_s * 1000)))
            headers["retry-after"] = str(max(1, math.ceil(err.retry_after_s)))
        if err.code == "response_not_latest":  # waiting cannot make it the latest again
            headers["x-should-retry"] = "false"
        return web.json_response(err.body(), status=err.status, headers=headers)

    def _check_model(self, model: str) -> None:
        if model != self._config.model:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self._config.model!r}",
                param="model",
                code="model_not_found",
            )

    def _check_chars(self, chars: int, param: str) -> None:
        """A cheap bound before the model counts tokens (which bounds them again)."""
        if chars > self._config.max_turn_chars:
            raise wire.bad(
                f"the turn has {chars} characters; the limit is {self._config.max_turn_chars}",
                param,
            )

    # -- models -----------------------------------------------------------------------------

    def _model_object(self) -> Json:
        return {
            "id": self._config.model,
            "object": "model",
            "created": self._started_at,
            "owned_by": "sinkserve",
        }

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_object()]})

    async def _model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(self._model_object())

    # -- conversations ----------------------------------------------------------------------

    async def _create_conversation(self, request: web.Request) -> web.Response:
        wire.parse_conversation_create(await _json(request))
        info = await self._backend.call("open", owner=request[_CALLER])
        conversation = wire.conversation_id(info["session_id"])
        request[_LOG].info("conversation created", session_id=info["session_id"])
        return web.json_response(wire.conversation_object(conversation, info))

    def _conversation_session(self, conversation: str, param: str | None = None) -> str:
        session = wire.session_of_conversation(conversation)
        if session is None:
            raise ApiError(404, f"no conversation {conversation!r}", param=param, code="not_found")
        return session

    async def _get_conversation(self, request: web.Request) -> web.Response:
        conversation = request.match_info["conversation_id"]
        session = self._conversation_session(conversation)
        info = await self._backend.call("get", session, request[_CALLER])
        return web.json_response(wire.conversation_object(conversation, info))

    async def _delete_conversation(self, request: web.Request) -> web.Response:
        conversation = request.match_info["conversation_id"]
        session = self._conversation_session(conversation)
        # A turn running on it is cancelled first (its own request ends normally).
        await self._backend.call("end", session, request[_CALLER])
        request[_LOG].info("conversation deleted", session_id=session)
        return web.json_response(
            {"id": conversation, "object": "conversation.deleted", "deleted": True}
        )

    # -- chat completions -------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        caller = request[_CALLER]
        req = wire.parse_chat_completion(await _json(request), request.headers.get("x-session-id"))
        self._check_model(req.model)
        if req.session_id is not None:  # a server-held session: only the new message
            session = wire.session_of_conversation(req.session_id) or req.session_id
            text = req.messages[-1][1]
            self._check_chars(len(text), "messages")
            turn = TurnRequest(session, caller, text, req.sampling)
            owned = False
        else:  # stateless: the whole conversation, in a session of its own
            self._check_chars(sum(len(content) for _, content in req.messages), "messages")
            info = await self._backend.call("open", owner=caller)
            session = info["session_id"]
            turn = TurnRequest(session, caller, "", req.sampling, messages=req.messages)
            owned = True
        log: Log = request[_LOG].bind(session_id=session)
        completion = _Completion(
            f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), req.model, session
        )
        try:
            async with contextlib.aclosing(self._turns.run(turn)) as events:
                first = await anext(events)  # errors before any output are HTTP errors
                if req.stream:
                    return await self._stream_chat(request, completion, first, events, log, req)
                text, final = await _collect(first, events)
                return web.json_response(
                    wire.chat_completion(
                        completion.id, completion.created, req.model, text, final, session
                    ),
                    headers={"x-session-id": session} if not owned else None,
                )
        finally:
            if owned:
                await self._end_session(session, caller, log)

    async def _stream_chat(
        self,
        request: web.Request,
        c: _Completion,
        first: TurnEvent,
        events: AsyncIterator[TurnEvent],
        log: Log,
        req: wire.ChatCompletionRequest,
    ) -> web.StreamResponse:
        usage = req.include_usage
        stream = await self._sse(request, c.session if req.session_id is not None else None)

        def chunk(
            delta: Json | None, reason: str | None = None, final: Final | None = None
        ) -> Json:
            out = wire.chat_chunk(
                c.id,
                c.created,
                c.model,
                delta,
                reason,
                usage=None if final is None else wire.chat_usage(final),
                with_usage=usage,
            )
            if final is not None:
                out["sinkserve"] = wire.session_stats(c.session, final)
            return out

        try:
            await stream.data(chunk({"role": "assistant", "content": ""}))
            event = first
            while isinstance(event, Delta):
                if event.text:
                    await stream.data(chunk({"content": event.text}))
                event = await anext(events)
            await stream.data(chunk({}, wire.chat_finish_reason(event)))
            if usage:
                await stream.data(chunk(None, final=event))
            await stream.done()
        except GatewayError as err:
            self._metrics.errors.labels(err.code.name).inc()
            await stream.fail(api_error(err).body(), log)
        except _ClientGone as gone:
            log.info("client went away mid-stream; turn cut", reason=str(gone))
        return stream.response

    # -- responses --------------------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        caller = request[_CALLER]
        req = wire.parse_response_request(await _json(request))
        self._check_model(req.model)
        owned = False
        if req.conversation is not None:
            session = self._conversation_session(req.conversation, "conversation")
            info = await self._backend.call("get", session, caller)
        elif req.previous_response_id is not None:
            session, info = await self._latest(req.previous_response_id, caller)
        else:
            info = await self._backend.call("open", owner=caller)
            session, owned = info["session_id"], True
        header = request.headers.get("x-session-id")
        if not owned and header is not None and header != session:
            # a proxy routes by the header: it must name the session the request continues
            raise wire.bad(
                f"the x-session-id header {header!r} does not name this request's session",
                "x-session-id",
            )
        log: Log = request[_LOG].bind(session_id=session)
        if req.instructions and info["turns"]:
            log.info("instructions of a continued conversation ignored (its start keeps them)")
        turn = self._response_turn(session, caller, req, fresh=not info["turns"])
        # The engine counts a turn when it takes it: this one's number.
        response = wire.response_id(session, info["turns"] + 1)
        shape = wire.ResponseShape(
            request=req,
            created_at=int(time.time()),
            message_id=f"msg_{secrets.token_hex(12)}",
            conversation=req.conversation,
        )
        final: Final | None = None
        try:
            async with contextlib.aclosing(self._turns.run(turn)) as events:
                first = await anext(events)  # errors before any output are HTTP errors
                if req.stream:
                    stream, final = await self._stream_response(
                        request, shape, response, session, first, events, log
                    )
                    return stream
                text, final = await _collect(first, events)
                status = wire.response_status(final)
                body = shape.render(
                    response,
                    status,
                    [wire.output_message(shape.message_id, text, status)],
                    final,
                    session,
                    completed_at=int(time.time()),
                )
                return web.json_response(body, headers={"x-session-id": session})
        finally:
            # A response that is not stored, or never was, leaves no session behind.
            if owned and (not req.store or final is None):
                await self._end_session(session, caller, log)

    async def _latest(self, previous: str, caller: str) -> tuple[str, Mapping[str, Any]]:
        """The session of `previous`, while that response is still its latest turn."""
        parsed = wire.parse_response_id(previous)
        missing = ApiError(
            404, f"no response {previous!r}", param="previous_response_id", code="not_found"
        )
        if parsed is None:
            raise missing
        session, number = parsed
        try:
            info = await self._backend.call("get", session, caller)
        except GatewayError as err:
            if err.code is grpc.StatusCode.NOT_FOUND:
                raise missing from None
            raise
        if info["turns"] != number or info["turn_running"]:
            raise ApiError(
                409,
                f"response {previous!r} is not the latest of its conversation (it was turn "
                f"{number}; the session has had {info['turns']} turns"
                f"{', one running now' if info['turn_running'] else ''}): the server holds "
                "only the latest state, continue from the latest response",
                param="previous_response_id",
                code="response_not_latest",
            )
        return session, info

    def _response_turn(
        self, session: str, caller: str, req: ResponseRequest, fresh: bool
    ) -> TurnRequest:
        """A new session's first turn renders its whole input (and instructions) with the
        chat template; a continued session takes only new user text."""
        roles = {role for role, _ in req.input}
        if fresh and (req.instructions or roles != {"user"} or len(req.input) > 1):
            system = (("system", req.instructions),) if req.instructions else ()
            messages = system + req.input
            self._check_chars(sum(len(content) for _, content in messages), "input")
            return TurnRequest(session, caller, "", req.sampling, messages=messages)
        if roles != {"user"}:
            raise wire.bad(
                "a conversation that has turns takes only user messages as input: the server "
                "holds the rest",
                "input",
            )
        text = "\n\n".join(content for _, content in req.input)
        if not text:
            raise wire.bad("input is empty", "input")
        self._check_chars(len(text), "input")
        return TurnRequest(session, caller, text, req.sampling)

    async def _stream_response(
        self,
        request: web.Request,
        shape: wire.ResponseShape,
        response: str,
        session: str,
        first: TurnEvent,
        events: AsyncIterator[TurnEvent],
        log: Log,
    ) -> tuple[web.StreamResponse, Final | None]:
        stream = await self._sse(request, session)
        mid = shape.message_id
        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        parts: list[str] = []
        try:
            in_progress = shape.render(response, "in_progress", [])
            await stream.event("response.created", {"response": in_progress})
            await stream.event("response.in_progress", {"response": in_progress})
            await stream.event(
                "response.output_item.added",
                {"output_index": 0, "item": wire.output_message(mid, "", "in_progress")},
            )
            await stream.event(
                "response.content_part.added", {**where, "part": wire.output_text("")}
            )
            event = first
            while isinstance(event, Delta):
                if event.text:
                    parts.append(event.text)
                    await stream.event(
                        "response.output_text.delta",
                        {**where, "delta": event.text, "logprobs": []},
                    )
                event = await anext(events)
            text, status = "".join(parts), wire.response_status(event)
            item = wire.output_message(mid, text, status)
            await stream.event("response.output_text.done", {**where, "text": text, "logprobs": []})
            await stream.event(
                "response.content_part.done", {**where, "part": wire.output_text(text)}
            )
            await stream.event("response.output_item.done", {"output_index": 0, "item": item})
            done = shape.render(
                response, status, [item], event, session, completed_at=int(time.time())
            )
            await stream.event(f"response.{status}", {"response": done})
            await stream.end()
            return stream.response, event
        except GatewayError as err:
            self._metrics.errors.labels(err.code.name).inc()
            log.info("turn failed mid-stream", code=err.code.name, error=err.message)
            body = api_error(err).body()["error"]
            with contextlib.suppress(_ClientGone):
                await stream.event(
                    "error", {"code": body["code"], "message": body["message"], "param": None}
                )
                failed = shape.render(response, "failed", [], error=body)
                await stream.event("response.failed", {"response": failed})
                await stream.end()
        except _ClientGone as gone:
            log.info("client went away mid-stream; turn cut", reason=str(gone))
        return stream.response, None

    # -- helpers ----------------------------------------------------------------------------

    async def _sse(self, request: web.Request, session: str | None) -> _EventStream:
        headers = {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-request-id": request[_REQUEST_ID],
        }
        if session is not None:
            headers["x-session-id"] = session
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        return _EventStream(response, self._config.stall_timeout_s)

    async def _end_session(self, session: str, caller: str, log: Log) -> None:
        """End a session the request opened for itself. Shielded: a request cancelled
        (at shutdown) still ends it, in the background."""

        async def end() -> None:
            try:
                await self._backend.call("end", session, caller)
            except GatewayError as err:
                log.info("session end not delivered", error=err.message)

        task = asyncio.create_task(end())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)


class _Completion:
    """What every chunk of one chat completion repeats."""

    def __init__(self, completion_id: str, created: int, model: str, session: str) -> None:
        self.id = completion_id
        self.created = created
        self.model = model
        self.session = session


class _ClientGone(Exception):
    """The client closed the connection, or read nothing for the stall limit."""


class _EventStream:
    """Server-sent events on a prepared response; writes time out for a stalled reader."""

    def __init__(self, response: web.StreamResponse, stall_timeout_s: float) -> None:
        self.response = response
        self._stall_timeout_s = stall_timeout_s
        self._sequence = 0  # the Responses API numbers its events

    async def data(self, payload: Json) -> None:
        """A chat completion chunk: a bare `data:` line."""
        await self._write(f"data: {json.dumps(payload)}\n\n")

    async def event(self, kind: str, payload: Json) -> None:
        """A Responses stream event: named, typed and numbered."""
        body = {"type": kind, "sequence_number": self._sequence, **payload}
        self._sequence += 1
        await self._write(f"event: {kind}\ndata: {json.dumps(body)}\n\n")

    async def done(self) -> None:
        await self._write("data: [DONE]\n\n")
        await self.end()

    async def fail(self, error: Json, log: Log) -> None:
        """End a chat completion stream with an error chunk (the SDKs raise it)."""
        log.info("turn failed mid-stream", error=error["error"]["message"])
        with contextlib.suppress(_ClientGone):
            await self.data(error)
            await self.end()

    async def end(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()

    async def _write(self, text: str) -> None:
        try:
            await within(self.response.write(text.encode()), self._stall_timeout_s)
        except ConnectionError as exc:
            raise _ClientGone(f"connection closed: {exc}") from None
        except asyncio.TimeoutError:
            raise _ClientGone(f"read nothing for {self._stall_timeout_s:g}s") from None


async def _json(request: web.Request) -> object:
    """The request body as JSON (None when empty); 400 when it is not JSON, 413 past
    max_message_bytes (aiohttp's client_max_size)."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise wire.bad("the request body is not valid JSON") from None


async def _collect(first: TurnEvent, events: AsyncIterator[TurnEvent]) -> tuple[str, Final]:
    """A whole turn's text and its Final (TurnRunner.run always ends with one)."""
    parts: list[str] = []
    event = first
    while isinstance(event, Delta):
        parts.append(event.text)
        event = await anext(events)
    return "".join(parts), event


def _ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The gateway's TLS settings for HTTPS (None: plaintext, loopback or behind a proxy)."""
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_client_ca_file:
        context.load_verify_locations(config.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
