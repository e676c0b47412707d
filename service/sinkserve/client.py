"""Python client of `sinkserve.v1.ChatService`, async (`ChatClient`) and sync (`SyncChatClient`).

    async with ChatClient("127.0.0.1:50051", token="...") as client:
        async with client.conversation(system_prompt="Be brief.") as chat:
            async for delta in chat.send("Hello!"):
                print(delta.text, end="")
            print(chat.last_turn.usage)

Errors arrive as `grpc.RpcError` (`.code()`, `.details()`); the session survives a failed
stream and can be resumed with `conversation(session_id=...)`.

A gateway serving TLS takes `tls=TLSConfig(root_ca_file="ca.pem")` (and `cert_file`,
`key_file` where it requires client certificates); without `tls` the channel is
plaintext, for a gateway on loopback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc

from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2 as pb
from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2_grpc

TokenDelta = pb.TokenDelta
# Stream failures after which a turn that streamed nothing is sent again (see Conversation).
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
TurnEnd = pb.TurnEnd
Session = pb.Session
T = TypeVar("T")


def sampling(**fields: Any) -> pb.SamplingParams:
    """SamplingParams from keyword arguments (max_tokens, temperature, top_k, top_p,
    repetition_penalty, seed, stop); None values are left unset."""
    return pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})


@dataclass(frozen=True)
class TLSConfig:
    """TLS of a client channel. `root_ca_file`: PEM of the CA(s) that signed the gateway's
    certificate ("": the system's trust store). `cert_file` and `key_file` (both or
    neither): this client's PEM certificate chain and key, for a gateway that requires
    client certificates."""

    root_ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials, with the files read now (OSError if one is missing)."""

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _about(
    metadata: tuple[tuple[str, str], ...], session_id: str | None
) -> tuple[tuple[str, str], ...]:
    """Metadata of a call about an existing session: `x-session-id` lets a proxy route it
    to the replica that keeps the session warm."""
    return (*metadata, ("x-session-id", session_id)) if session_id else metadata


def _first_request(
    session_id: str | None, system_prompt: str, defaults: pb.SamplingParams | None
) -> pb.ChatRequest:
    if session_id:
        return pb.ChatRequest(resume=pb.ResumeSession(session_id=session_id, sampling=defaults))
    return pb.ChatRequest(open=pb.OpenSession(system_prompt=system_prompt, sampling=defaults))


def _turn_request(text: str, raw: bool, params: pb.SamplingParams | None) -> pb.ChatRequest:
    return pb.ChatRequest(turn=pb.UserTurn(text=text, raw=raw, sampling=params))


class ChatClient:
    """Async client; one channel, many conversations."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls: TLSConfig | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """A client of the gateway at `target` (host:port), plaintext unless `tls` is
        given; `channel` replaces the one it would open."""
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, tls.credentials())
                if tls is not None
                else grpc.aio.insecure_channel(target)
            )
        self._channel = channel
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)
        self._metadata = _metadata(token)

    async def __aenter__(self) -> ChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def conversation(
        self,
        session_id: str | None = None,
        *,
        system_prompt: str = "",
        defaults: pb.SamplingParams | None = None,
        timeout: float | None = None,
    ) -> Conversation:
        """A Chat stream on a new session, or resuming `session_id`. Use `async with`."""

        def open_call(sid: str | None) -> Any:
            return self._stub.Chat(metadata=_about(self._metadata, sid), timeout=timeout)

        return Conversation(open_call, _first_request(session_id, system_prompt, defaults))

    async def create_session(self, system_prompt: str = "") -> pb.Session:
        req = pb.CreateSessionRequest(system_prompt=system_prompt)
        response: pb.CreateSessionResponse = await self._stub.CreateSession(
            req, metadata=self._metadata
        )
        return response.session

    async def get_session(self, session_id: str) -> pb.Session:
        req = pb.GetSessionRequest(session_id=session_id)
        md = _about(self._metadata, session_id)
        response: pb.GetSessionResponse = await self._stub.GetSession(req, metadata=md)
        return response.session

    async def delete_session(self, session_id: str) -> None:
        req = pb.DeleteSessionRequest(session_id=session_id)
        await self._stub.DeleteSession(req, metadata=_about(self._metadata, session_id))

    async def list_sessions(self) -> list[pb.Session]:
        sessions: list[pb.Session] = []
        token = ""
        while True:
            req = pb.ListSessionsRequest(page_token=token)
            page = await self._stub.ListSessions(req, metadata=self._metadata)
            sessions.extend(page.sessions)
            token = page.next_page_token
            if not token:
                return sessions


class Conversation:
    """One Chat stream: `send()` a turn and iterate its deltas; `cancel()`, `end()`.

    Failover: a turn whose stream fails with UNAVAILABLE, or INTERNAL (how a proxy
    reports a connection its replica reset; the gateway itself never answers a bad
    request with it), before its first delta (its replica died or drains; nothing of the
    turn was recorded) is sent once more, after `retry_delay_s`, on a new stream
    resuming the session (a proxy routes it to a live replica, which rebuilds the
    session from the store). A turn that had already streamed text is not retried: its
    error is raised, so no reply is shown twice."""

    retry_delay_s = 0.5

    def __init__(self, open_call: Callable[[str | None], Any], first: pb.ChatRequest) -> None:
        self._open_call = open_call
        self._call = open_call(first.resume.session_id or None)
        self._first = first
        self.session_id = ""
        self.sinks = 0
        self.window = 0
        self.resumed = False
        self.cache_position = 0
        self.last_turn: pb.TurnEnd | None = None
        self.retries = 0  # turns sent again after a failed stream

    async def __aenter__(self) -> Conversation:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            self._call.cancel()

    async def open(self) -> pb.SessionOpened:
        await self._write(self._first)
        response = await self._read()
        opened = response.session_opened
        self.session_id, self.sinks, self.window = opened.session_id, opened.sinks, opened.window
        self.resumed, self.cache_position = opened.resumed, opened.cache_position
        return opened

    async def send(
        self, text: str, *, raw: bool = False, params: pb.SamplingParams | None = None
    ) -> AsyncGenerator[pb.TokenDelta, None]:
        """Run one turn, yielding its deltas; its TurnEnd is then in `last_turn`."""
        for attempt in (1, 2):
            streamed = False
            try:
                await self._write(_turn_request(text, raw, params))
                while True:
                    response = await self._read()
                    kind = response.WhichOneof("event")
                    if kind == "delta":
                        streamed = True
                        yield response.delta
                    elif kind == "turn_end":
                        self.last_turn = response.turn_end
                        self.cache_position = response.turn_end.usage.cache_position
                        return
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRIED or streamed or attempt == 2:
                    raise
            self.retries += 1
            await asyncio.sleep(self.retry_delay_s)
            await self._reopen()

    async def _reopen(self) -> None:
        """A new stream resuming this conversation's session (with its stream defaults)."""
        self._call.cancel()
        defaults = self._first.resume.sampling if self._first.HasField("resume") else None
        if self._first.HasField("open"):
            defaults = None  # they were kept with the session when it was opened
        self._first = _first_request(self.session_id, "", defaults)
        self._call = self._open_call(self.session_id)
        await self.open()

    async def turn(
        self, text: str, *, raw: bool = False, params: pb.SamplingParams | None = None
    ) -> tuple[str, pb.TurnEnd]:
        """Run one turn to its end: (whole text, TurnEnd)."""
        parts = [d.text async for d in self.send(text, raw=raw, params=params)]
        assert self.last_turn is not None
        return "".join(parts), self.last_turn

    async def cancel(self) -> None:
        """Ask the server to cancel the running turn (it still ends with a TurnEnd)."""
        await self._write(pb.ChatRequest(cancel=pb.CancelTurn()))

    async def end(self) -> None:
        """End the session (after a running turn) and wait for the stream to close."""
        await self._write(pb.ChatRequest(end=pb.EndSession()))
        await self._call.done_writing()
        await self._drain()

    async def close(self) -> None:
        """Close the stream; the session stays and can be resumed."""
        await self._call.done_writing()
        await self._drain()

    def drop(self) -> None:
        """Abandon the stream at once (as a client that goes away); the session stays."""
        self._call.cancel()

    async def code(self) -> grpc.StatusCode:
        """The status the stream ended with (waits for the end)."""
        code: grpc.StatusCode = await self._call.code()
        return code

    async def write(self, request: pb.ChatRequest) -> None:
        """Send a raw request (for what the helpers above do not cover)."""
        await self._write(request)

    async def _write(self, request: pb.ChatRequest) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError:
            # A write can lose the race with the server ending the stream; report the
            # status the server ended it with, not the local write failure.
            code = await self._call.code()
            if code is grpc.StatusCode.OK:
                raise
            raise grpc.aio.AioRpcError(
                code,
                await self._call.initial_metadata(),
                await self._call.trailing_metadata(),
                details=await self._call.details(),
            ) from None

    async def _drain(self) -> None:
        # read() raises the stream's error status, if it ended with one.
        while await self._call.read() is not grpc.aio.EOF:
            pass

    async def _read(self) -> pb.ChatResponse:
        response = await self._call.read()
        if response is grpc.aio.EOF:  # (read() raised instead if the status was an error)
            raise ConnectionError("the server closed the stream")
        assert isinstance(response, pb.ChatResponse)
        return response


class _Run(Protocol):
    """Run a coroutine on the client's loop and wait for its result."""

    def __call__(self, coroutine: Coroutine[Any, Any, T], /) -> T: ...


class SyncChatClient:
    """Blocking view of `ChatClient`: its calls run on an event loop in a thread of this
    client, so both have one implementation (failover, metadata, paging)."""

    def __init__(
        self, target: str, token: str | None = None, *, tls: TLSConfig | None = None
    ) -> None:
        """A client of the gateway at `target`, plaintext unless `tls` is given."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sinkserve-client", daemon=True
        )
        self._thread.start()

        async def make() -> ChatClient:  # the channel belongs to the loop it is made on
            return ChatClient(target, token, tls=tls)

        self._client = self._run(make())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def conversation(
        self,
        session_id: str | None = None,
        *,
        system_prompt: str = "",
        defaults: pb.SamplingParams | None = None,
        timeout: float | None = None,
    ) -> SyncConversation:
        """A Chat stream on a new session, or resuming `session_id`; open when returned."""

        async def start() -> Conversation:
            conversation = self._client.conversation(
                session_id, system_prompt=system_prompt, defaults=defaults, timeout=timeout
            )
            await conversation.open()
            return conversation

        return SyncConversation(self._run, self._run(start()))

    def create_session(self, system_prompt: str = "") -> pb.Session:
        return self._run(self._client.create_session(system_prompt))

    def get_session(self, session_id: str) -> pb.Session:
        return self._run(self._client.get_session(session_id))

    def delete_session(self, session_id: str) -> None:
        self._run(self._client.delete_session(session_id))

    def list_sessions(self) -> list[pb.Session]:
        return self._run(self._client.list_sessions())


class SyncConversation:
    """Blocking view of one `Conversation` (see it for failover). `cancel()` may be
    called from another thread while `send()` iterates."""

    def __init__(self, run: _Run, conversation: Conversation) -> None:
        self._run = run  # runs a coroutine on the client's loop and waits for its result
        self._conversation = conversation

    @property
    def session_id(self) -> str:
        return self._conversation.session_id

    @property
    def sinks(self) -> int:
        return self._conversation.sinks

    @property
    def window(self) -> int:
        return self._conversation.window

    @property
    def resumed(self) -> bool:
        return self._conversation.resumed

    @property
    def cache_position(self) -> int:
        return self._conversation.cache_position

    @property
    def last_turn(self) -> pb.TurnEnd | None:
        return self._conversation.last_turn

    @property
    def retries(self) -> int:
        return self._conversation.retries

    def __enter__(self) -> SyncConversation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._conversation.drop()

    def send(
        self, text: str, *, raw: bool = False, params: pb.SamplingParams | None = None
    ) -> Iterator[pb.TokenDelta]:
        """Run one turn, yielding its deltas; its TurnEnd is then in `last_turn`."""
        deltas = self._conversation.send(text, raw=raw, params=params)

        async def next_delta() -> pb.TokenDelta | None:
            try:
                return await anext(deltas)
            except StopAsyncIteration:
                return None

        try:
            while (delta := self._run(next_delta())) is not None:
                yield delta
        finally:
            self._run(deltas.aclose())

    def turn(
        self, text: str, *, raw: bool = False, params: pb.SamplingParams | None = None
    ) -> tuple[str, pb.TurnEnd]:
        """Run one turn to its end: (whole text, TurnEnd)."""
        return self._run(self._conversation.turn(text, raw=raw, params=params))

    def cancel(self) -> None:
        """Ask the server to cancel the running turn (it still ends with a TurnEnd)."""
        self._run(self._conversation.cancel())

    def end(self) -> None:
        """End the session (after a running turn) and wait for the stream to close."""
        self._run(self._conversation.end())

    def close(self) -> None:
        """Close the stream; the session stays and can be resumed."""
        self._run(self._conversation.close())
