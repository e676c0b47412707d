"""Requests whose bytes are not the method's message reach the handler as `Undecodable`.

gRPC itself answers such a unary call UNKNOWN and leaves a stream waiting; the client's
mistake should be INVALID_ARGUMENT, so every handler gets a deserializer that cannot
raise, and the servicer refuses what it returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Undecodable:
    """Stands for a request that failed to parse."""

    def __init__(self, error: str) -> None:
        self.error = error

    @property
    def message(self) -> str:
        return f"the request is not a valid message of this method: {self.error}"


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc) or "undecodable bytes")

    return tolerant


class DecodeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Gives the handlers of one service (those that check for Undecodable) a
    deserializer that returns Undecodable instead of raising."""

    def __init__(self, service: str) -> None:
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (
            handler is None
            or handler.request_deserializer is None
            or not handler_call_details.method.startswith(self._prefix)
        ):
            return handler
        # Method handlers are named tuples (grpc._utilities.RpcMethodHandler).
        replaced: grpc.RpcMethodHandler = handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer)
        )
        return replaced
