"""Prometheus metrics of the gateway, in a registry of their own, served with a readiness
endpoint on the metrics port."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.open_streams = Gauge(
            "sinkserve_gateway_open_streams", "Chat streams open now", registry=r
        )
        self.turns = Counter(
            "sinkserve_gateway_turns", "Turns finished, by finish reason", ["reason"], registry=r
        )
        self.tokens = Counter(
            "sinkserve_gateway_generated_tokens", "Tokens streamed to clients", registry=r
        )
        self.ttft = Histogram(
            "sinkserve_gateway_time_to_first_token_seconds",
            "From a turn's arrival to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "sinkserve_gateway_inter_token_seconds",
            "Between consecutive token deltas of a turn",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "sinkserve_gateway_errors",
            "Calls ended with an error, by gRPC code",
            ["code"],
            registry=r,
        )
        self.http_requests = Counter(
            "sinkserve_gateway_http_requests",
            "Requests to the OpenAI-compatible HTTP API, by route and HTTP status",
            ["route", "status"],
            registry=r,
        )
        self.backend_ready = Gauge(
            "sinkserve_gateway_backend_ready", "1 while Triton and the model are ready", registry=r
        )
        self.token_reloads = Counter(
            "sinkserve_gateway_token_reloads",
            "Re-reads of the API tokens (SIGHUP, a changed tokens file), by result: changed, "
            "unchanged, failed (the previous tokens stay)",
            ["result"],
            registry=r,
        )

    def serve(
        self, host: str, port: int, ready: Callable[[], bool]
    ) -> tuple[ThreadingHTTPServer, int]:
        """Start the HTTP server of /metrics and /ready (200 while `ready()`, else 503: a
        readiness check for proxies and probes that speak HTTP, not gRPC health); returns
        (server, bound port)."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/ready":
                    ok = ready()
                    status, body = (200, b"SERVING\n") if ok else (503, b"NOT_SERVING\n")
                    kind = "text/plain"
                else:
                    status, body, kind = 200, generate_latest(registry), CONTENT_TYPE_LATEST
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # a checker that left early
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # probes every fraction of a second: no line each

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:  # the port is taken: say which, not a traceback
            raise OSError(f"cannot listen for metrics on {host}:{port}: {err.strerror}") from None
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="gateway-http", daemon=True).start()
        return server, server.server_port
