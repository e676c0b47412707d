"""Prometheus metrics of the gateway, in a registry of their own (served on the metrics port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.backend_ready = Gauge(
            "sinkserve_gateway_backend_ready", "1 while Triton and the model are ready", registry=r
        )

    def serve(self, host: str, port: int) -> tuple[object, int]:
        """Start the /metrics HTTP server; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
