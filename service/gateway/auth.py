"""Bearer-token authentication: a token names a caller; every session belongs to one.

Tokens come from a file (lines `caller:token`, `#` comments) and/or an environment
variable (`caller:token,caller:token`). Auth is off only when explicitly disabled; then
every request is the caller "anonymous".
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from service.config import ConfigError

ANONYMOUS = "anonymous"
# Method prefixes that need no token: probes and schema discovery.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def parse_tokens(text: str, *, source: str, separator: str = "\n") -> dict[str, str]:
    """`caller:token` entries to {token: caller}; ConfigError naming `source` on bad input."""
    tokens: dict[str, str] = {}
    for n, raw in enumerate(text.split(separator), 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        caller, sep, token = entry.partition(":")
        caller, token = caller.strip(), token.strip()
        if not sep or not caller or not token:
            raise ConfigError(f"{source} entry {n}: expected 'caller:token'")
        if token in tokens:
            raise ConfigError(f"{source} entry {n}: token of {caller!r} is not unique")
        tokens[token] = caller
    return tokens


class Authenticator:
    """Maps the `authorization: Bearer <token>` metadata of a call to a caller name."""

    def __init__(self, tokens: Mapping[str, str] | None) -> None:
        """`tokens` maps token -> caller; None disables auth (everyone is ANONYMOUS)."""
        self._tokens = dict(tokens) if tokens is not None else None

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    @classmethod
    def from_sources(
        cls, *, disabled: bool, tokens_file: str, tokens_env: str, environ: Mapping[str, str]
    ) -> Authenticator:
        if disabled:
            return cls(None)
        tokens: dict[str, str] = {}
        if tokens_file:
            tokens |= parse_tokens(Path(tokens_file).read_text(), source=tokens_file)
        if tokens_env and environ.get(tokens_env):
            tokens |= parse_tokens(environ[tokens_env], source=f"${tokens_env}", separator=",")
        if not tokens:
            raise ConfigError(
                f"no API tokens: set --tokens-file or ${tokens_env} "
                "(or pass --no-auth for local use only)"
            )
        return cls(tokens)

    @classmethod
    def from_environ(cls, *, disabled: bool, tokens_file: str, tokens_env: str) -> Authenticator:
        return cls.from_sources(
            disabled=disabled, tokens_file=tokens_file, tokens_env=tokens_env, environ=os.environ
        )

    def caller(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """The caller named by the call's token, ANONYMOUS when auth is off, else None."""
        if self._tokens is None:
            return ANONYMOUS
        header = next((str(v) for k, v in metadata or () if k == "authorization"), "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        # Compare against every token so timing does not tell how much of one matched.
        for known, caller in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                found = caller
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid token (UNAUTHENTICATED) before they reach a servicer."""

    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(PUBLIC_METHOD_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        if self._auth.caller(metadata) is not None:
            return handler
        return _denying(handler, "missing or invalid bearer token (metadata 'authorization')")


def _denying(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
