"""The gateway process: gRPC server (TLS or loopback plaintext), health, reflection,
metrics, background upkeep (backend health, token reloads), shutdown."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sinkserve.gateway._proto.sinkserve.v1 import chat_pb2, chat_pb2_grpc
from sinkserve.gateway.auth import Authenticator, AuthInterceptor
from sinkserve.gateway.backend import TritonBackend
from sinkserve.gateway.config import GatewayConfig
from sinkserve.gateway.decoding import DecodeInterceptor
from sinkserve.gateway.metrics import GatewayMetrics
from sinkserve.gateway.openai_http import OpenAIServer
from sinkserve.gateway.servicer import ChatServicer
from sinkserve.gateway.timeouts import within

_STEP_S = 5.0  # the most any step of stop() may take (beyond the drain grace)
SERVICE_NAME = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


class Gateway:
    """One gateway: `await start()`, then `await stop()` (or `run_until_signal()`)."""

    def __init__(self, config: GatewayConfig, auth: Authenticator) -> None:
        self.config = config
        self.auth = auth
        self.metrics = GatewayMetrics()
        self.backend = TritonBackend(
            config.triton_url, config.model, probe_timeout_s=config.probe_timeout_s
        )
        self.servicer = ChatServicer(config, self.backend, auth, self.metrics)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0  # the OpenAI-compatible HTTP API's; 0 while it is off
        self.http: OpenAIServer | None = None
        if config.http_port >= 0:
            self.http = OpenAIServer(config, self.backend, auth, self.metrics, self.servicer.quotas)
        self.serving = False  # what health says: the model answers and no drain began
        self._log = structlog.get_logger("sinkserve.gateway")
        self._server = grpc.aio.server(
            interceptors=[AuthInterceptor(auth), DecodeInterceptor(SERVICE_NAME)],
            options=_server_options(config),
        )
        self._metrics_server: ThreadingHTTPServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        chat_pb2_grpc.add_ChatServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self.config.tls:
                creds = _server_credentials(self.config)
                self.port = self._server.add_secure_port(address, creds)
            else:  # loopback, or insecure_plaintext behind a TLS proxy (GatewayConfig checks)
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": the port is taken
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        await self._set_serving(False)
        await self._server.start()
        try:
            await self._listen_beside()
        except OSError:  # a taken port: stop what listens already, then say which
            await self._server.stop(0)
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            raise
        self._tasks = [
            asyncio.create_task(self._watch_backend()),
            asyncio.create_task(self._watch_tokens()),
        ]
        self._log.info(
            "gateway listening",
            address=f"{self.config.host}:{self.port}",
            tls=self.config.tls,
            client_certificates=bool(self.config.tls_client_ca_file),
            triton=self.config.triton_url,
            metrics_port=self.metrics_port,
            http_port=self.http_port,
        )

    async def _listen_beside(self) -> None:
        """Start the metrics and HTTP API listeners (OSError when a port is taken)."""
        if self.config.metrics_port >= 0:
            self._metrics_server, self.metrics_port = self.metrics.serve(
                self.config.host, self.config.metrics_port, lambda: self.serving
            )
        if self.http is not None:
            self.http_port = await self.http.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking work, let running turns finish (up to the grace), then stop."""
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        self._log.info("gateway draining", turns_running=self.servicer.turns_running, grace_s=grace)
        self.serving = False
        await self.health.enter_graceful_shutdown()
        # Proxies and load balancers see NOT_SERVING first, and stop sending new streams
        # here, before the streams open now are ended (their clients then resume elsewhere).
        await asyncio.sleep(self.config.drain_delay_s)
        self.servicer.drain()
        # Each step is bounded: grpc.aio's Server.stop can wait forever on a handler whose
        # call was cancelled, and a gateway asked to stop must stop. Both APIs drain at once.
        steps = [self._bounded("grpc server", self._server.stop(grace), grace + _STEP_S)]
        if self.http is not None:
            steps.append(self._bounded("http api", self.http.stop(grace), grace + _STEP_S))
        await asyncio.gather(*steps)
        for task in self._tasks:
            task.cancel()
        await self._bounded("upkeep", asyncio.gather(*self._tasks, return_exceptions=True))
        if (http := self._metrics_server) is not None:
            await self._bounded("http server", asyncio.to_thread(http.shutdown))
            http.server_close()
        await self._bounded("backend channel", self.backend.close())
        self._log.info("gateway stopped")

    async def _bounded(self, step: str, work: Awaitable[object], limit_s: float = _STEP_S) -> None:
        try:
            await within(work, limit_s)
        except asyncio.TimeoutError:
            self._log.warning("gateway stop step overran; going on", step=step, limit_s=limit_s)

    async def run_until_signal(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully; SIGHUP reloads the tokens."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)
        await stop.wait()
        await self.stop()

    def reload_tokens(self) -> None:
        """Read the API tokens again (SIGHUP, a changed tokens file). Calls that start
        afterwards use the new tokens; streams already open go on; a bad file keeps the
        old tokens (see Authenticator.reload)."""
        self.metrics.token_reloads.labels(result=self.auth.reload()).inc()

    async def _set_serving(self, ok: bool) -> None:
        self.serving = ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_backend(self) -> None:
        """Health follows the model: NOT_SERVING while Triton is down or the model does not
        answer a ping (its process died, or it is not loaded); then running turns fail
        with UNAVAILABLE at once instead of waiting for responses that never come."""
        was: bool | None = None
        while True:
            why = await self.backend.ready()
            ready = why is None
            if ready and was is not True:
                shape = await self.backend.cache_shape()
                if shape is not None:
                    self.servicer.cache_shape = shape
            if ready != was:
                self._log.info("backend readiness changed", ready=ready, reason=why)
                await self._set_serving(ready)
                self.metrics.backend_ready.set(int(ready))
                was = ready
            if why is not None:
                self.servicer.backend_lost(why)
                if self.http is not None:
                    self.http.backend_lost(why)
            await asyncio.sleep(self.config.health_interval_s)

    async def _watch_tokens(self) -> None:
        """Reload the tokens when their file changes (a rotated Kubernetes Secret reaches
        the mounted file within about a minute), checked every health_interval_s."""
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            if self.auth.file_changed():
                self.reload_tokens()


def _server_credentials(config: GatewayConfig) -> grpc.ServerCredentials:
    """The gateway's certificate and key; with a client CA, clients must present a
    certificate it signed (the handshake fails otherwise, before any call)."""
    ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _server_options(config: GatewayConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping this often without data (below it they get GOAWAY).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
