"""Validated settings of one gateway process."""

from __future__ import annotations

from dataclasses import dataclass

from service.config import ConfigError


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of the gateway. Every field is checked in `__post_init__` (ConfigError).
    Session limits, TTLs and sampling defaults are the model's (config.pbtxt)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    model: str = "sinkserve"
    metrics_port: int = 9464  # Prometheus /metrics; -1 = off, 0 = pick a free port
    auth_disabled: bool = False  # only for local use; must be asked for explicitly
    tokens_file: str = ""  # lines "caller:token"
    tokens_env: str = "SINKSERVE_TOKENS"  # env var holding "caller:token,caller:token"
    max_streams_per_caller: int = 64  # concurrent Chat streams
    max_message_bytes: int = 1 << 20  # gRPC receive/send limit
    max_turn_chars: int = 65536
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    # How often the model is pinged; with probe_timeout_s it bounds how long a dead model
    # goes unnoticed (health NOT_SERVING, running turns failed with UNAVAILABLE).
    health_interval_s: float = 0.25
    probe_timeout_s: float = 1.5
    shutdown_grace_s: float = 30.0  # turns in flight get this long to finish on SIGTERM
    # On SIGTERM, health says NOT_SERVING this long before open streams are ended: a
    # proxy checking /ready (or gRPC health) has moved new streams elsewhere by then.
    drain_delay_s: float = 1.5
    sinks: int = 0  # reported to clients when the model config does not say
    window: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {why}")

        need(bool(self.host), "host", "must be non-empty")
        need(0 <= self.port <= 65535, "port", "must be in 0..65535")
        need(":" in self.triton_url, "triton_url", "must be host:port")
        need(bool(self.model), "model", "must be non-empty")
        need(-1 <= self.metrics_port <= 65535, "metrics_port", "must be in -1..65535")
        need(self.max_streams_per_caller >= 1, "max_streams_per_caller", "must be >= 1")
        need(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        need(self.max_turn_chars >= 1, "max_turn_chars", "must be >= 1")
        need(self.keepalive_time_s > 0, "keepalive_time_s", "must be > 0")
        need(self.keepalive_timeout_s > 0, "keepalive_timeout_s", "must be > 0")
        need(self.health_interval_s > 0, "health_interval_s", "must be > 0")
        need(self.probe_timeout_s > 0, "probe_timeout_s", "must be > 0")
        need(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must be >= 0")
        need(self.drain_delay_s >= 0, "drain_delay_s", "must be >= 0")
        need(self.sinks >= 0, "sinks", "must be >= 0")
        need(self.window >= 0, "window", "must be >= 0")
