"""One error type for everything the gateway reports, and the mapping from Triton's errors."""

from __future__ import annotations

import re

import grpc

# Triton's own messages for a model that is not loaded (or being reloaded), or whose
# Python-backend process died ("Stub process '...' is not healthy.").
_MODEL_MISSING_HINTS = (
    "unknown model",
    "is not ready",
    "is not found",
    "no version is available",
    "is not healthy",
)

# How the model states when a refused request may succeed ("... (retry after 12.5 s)").
_RETRY_HINT = re.compile(r"\(retry after ([0-9]+(?:\.[0-9]+)?) s\)$")


class GatewayError(Exception):
    """Ends the call with `code` and `message` (the servicer turns it into a gRPC status)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s  # sent as `retry-after-ms` trailing metadata

    def __repr__(self) -> str:
        return f"GatewayError({self.code.name}, {self.message!r})"


def from_triton_message(message: str) -> GatewayError:
    """Map an in-band Triton error ("NOT_FOUND: unknown session 'x'") to a GatewayError.

    The model prefixes its messages with a gRPC status name; Triton's own errors carry none
    and mostly mean the model is not loaded, which a client sees as UNAVAILABLE.
    """
    head, sep, rest = message.partition(":")
    code = grpc.StatusCode.__members__.get(head.strip()) if sep else None
    if code is not None and code is not grpc.StatusCode.OK:
        text = rest.strip() or message
        hint = _RETRY_HINT.search(text)
        return GatewayError(code, text, retry_after_s=float(hint[1]) if hint else None)
    if any(hint in message for hint in _MODEL_MISSING_HINTS):
        return GatewayError(grpc.StatusCode.UNAVAILABLE, f"model unavailable: {message}")
    return GatewayError(grpc.StatusCode.INTERNAL, f"backend error: {message}")


def from_rpc_error(err: grpc.RpcError) -> GatewayError:
    """Map a failed call to Triton itself (not an in-band error) to a GatewayError."""
    code = err.code() if isinstance(err, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
    details = err.details() if isinstance(err, grpc.aio.AioRpcError) else str(err)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(code, "deadline exceeded while waiting for the model")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        return GatewayError(grpc.StatusCode.UNAVAILABLE, f"Triton unreachable: {details}")
    return from_triton_message(f"{code.name}: {details}")
