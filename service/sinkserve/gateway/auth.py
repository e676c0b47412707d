"""Bearer-token authentication: a token names a caller; every session belongs to one.

Tokens come from a file (lines `caller:token`, `#` comments) and/or an environment
variable (`caller:token,caller:token`). Auth is off only when explicitly disabled; then
every request is the caller "anonymous". `Authenticator.reload()` reads the sources again
(the gateway calls it on SIGHUP and when the file changes): the new tokens apply to calls
that start after it.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import grpc
import structlog

from sinkserve.config import ConfigError

ANONYMOUS = "anonymous"
# What a reload did: "failed" keeps the tokens that were in force.
ReloadResult = Literal["changed", "unchanged", "failed"]
# (inode, mtime in ns, size) of the tokens file; None while it cannot be stat'ed.
_Stamp = tuple[int, int, int] | None
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


class TokenSources:
    """Where the tokens come from: a file of `caller:token` lines and/or an environment
    variable of `caller:token,caller:token` entries (a token in both: the variable's)."""

    def __init__(self, tokens_file: str, tokens_env: str, environ: Mapping[str, str]) -> None:
        self.tokens_file = tokens_file
        self.tokens_env = tokens_env
        self._environ = environ
        self._stamp: _Stamp = None  # the file as it was when last read

    def read(self) -> dict[str, str]:
        """{token: caller} from every source; ConfigError (or OSError) when a source is
        malformed or unreadable, or the sources hold no token at all."""
        # Stamped before reading: a change made during the read shows up as a change to
        # the next `changed()`, so it is never missed (at worst read twice).
        self._stamp = self._file_stamp()
        tokens: dict[str, str] = {}
        if self.tokens_file:
            tokens |= parse_tokens(Path(self.tokens_file).read_text(), source=self.tokens_file)
        if self.tokens_env and self._environ.get(self.tokens_env):
            text = self._environ[self.tokens_env]
            tokens |= parse_tokens(text, source=f"${self.tokens_env}", separator=",")
        if not tokens:
            raise ConfigError(
                f"no API tokens: set --tokens-file or ${self.tokens_env} "
                "(or pass --no-auth for local use only)"
            )
        return tokens

    def changed(self) -> bool:
        """Whether the tokens file is not the one last read (its inode, mtime or size
        differ). A new inode is how a Kubernetes Secret volume swaps its files in."""
        return bool(self.tokens_file) and self._file_stamp() != self._stamp

    def _file_stamp(self) -> _Stamp:
        if not self.tokens_file:
            return None
        try:
            st = os.stat(self.tokens_file)  # follows links, as the read does
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


class Authenticator:
    """Maps the `authorization: Bearer <token>` metadata of a call to a caller name.

    `generation` counts the reloads that changed the tokens (0: as first read)."""

    def __init__(
        self, tokens: Mapping[str, str] | None, sources: TokenSources | None = None
    ) -> None:
        """`tokens` maps token -> caller; None disables auth (everyone is ANONYMOUS).
        `sources`, where `tokens` were read from, are what `reload()` reads again."""
        self._tokens = dict(tokens) if tokens is not None else None
        self._sources = sources
        self.generation = 0
        self._log = structlog.get_logger("sinkserve.gateway")

    @property
    def enabled(self) -> bool:
        return self._tokens is not None

    @classmethod
    def from_sources(
        cls, *, disabled: bool, tokens_file: str, tokens_env: str, environ: Mapping[str, str]
    ) -> Authenticator:
        """Auth over the tokens of the file and the variable; ConfigError (or OSError)
        when they are malformed or hold none, unless auth is `disabled`."""
        if disabled:
            return cls(None)
        sources = TokenSources(tokens_file, tokens_env, environ)
        return cls(sources.read(), sources)

    @classmethod
    def from_environ(cls, *, disabled: bool, tokens_file: str, tokens_env: str) -> Authenticator:
        return cls.from_sources(
            disabled=disabled, tokens_file=tokens_file, tokens_env=tokens_env, environ=os.environ
        )

    def file_changed(self) -> bool:
        """Whether the tokens file changed since it was last read (cheap: one stat)."""
        return self.enabled and self._sources is not None and self._sources.changed()

    def reload(self) -> ReloadResult:
        """Read the token sources again. Calls that start afterwards are checked against
        the new tokens (a removed token is refused; streams already open go on). A source
        that is malformed, unreadable or empty keeps the previous tokens, logged as an
        error: a half-written file must not lock every caller out."""
        if self._tokens is None or self._sources is None:
            return "unchanged"  # auth is off, or the tokens were given, not read
        try:
            tokens = self._sources.read()
        except (ConfigError, OSError) as err:
            self._log.error(
                "tokens reload failed; the previous tokens stay",
                error=str(err),
                generation=self.generation,
            )
            return "failed"
        if tokens == self._tokens:
            return "unchanged"
        self._tokens = tokens
        self.generation += 1
        self._log.info(
            "tokens reloaded", generation=self.generation, callers=len(set(tokens.values()))
        )
        return "changed"

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


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
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
