"""Validated settings of one gateway process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sinkserve.config import ConfigError

# The hosts on which the gateway may listen in plaintext without asking for it: no other
# machine can reach them.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class GatewayConfig:
    """Settings of the gateway. Every field is checked in `__post_init__` (ConfigError).
    Session limits, TTLs and sampling defaults are the model's (config.pbtxt)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = pick a free port
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    model: str = "sinkserve"
    metrics_port: int = 9464  # Prometheus /metrics; -1 = off, 0 = pick a free port
    # The OpenAI-compatible HTTP API (/v1/...; docs/openai.md) on `host`, with the same
    # tokens, TLS and limits as gRPC; -1 = off, 0 = pick a free port.
    http_port: int = -1
    auth_disabled: bool = False  # only for local use; must be asked for explicitly
    tokens_file: str = ""  # lines "caller:token"
    tokens_env: str = "SINKSERVE_TOKENS"  # env var holding "caller:token,caller:token"
    # TLS: the gateway's PEM certificate chain and key (both or neither). With a client CA
    # (a PEM bundle) every client must also present a certificate that CA signed (mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Plaintext on a non-loopback host. Only where a TLS-terminating proxy or service mesh
    # sits in front and the network (e.g. a NetworkPolicy) lets only it reach this port:
    # tokens and conversations cross that hop in the clear.
    insecure_plaintext: bool = False
    max_streams_per_caller: int = 64  # concurrent Chat streams
    max_message_bytes: int = 1 << 20  # gRPC receive/send limit
    max_turn_chars: int = 65536  # also the limit of a system prompt
    # Turns written to a stream while one runs wait in order, at most this many.
    max_queued_turns: int = 8
    max_turns_per_caller: int = 32  # turns running at once, over all of a caller's streams
    tokens_per_minute_per_caller: int = 0  # prompt + generated tokens; 0 = no limit
    # A turn whose client reads nothing for this long is cancelled (RESOURCE_EXHAUSTED);
    # until then at most turn_buffer responses wait in the gateway.
    stall_timeout_s: float = 60.0
    turn_buffer: int = 64
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
        need(
            bool(self.tls_cert_file) == bool(self.tls_key_file),
            "tls_key_file" if self.tls_cert_file else "tls_cert_file",
            "TLS needs both tls_cert_file and tls_key_file",
        )
        for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            need(not getattr(self, key) or Path(getattr(self, key)).is_file(), key, "no such file")
        need(
            self.tls or not self.tls_client_ca_file,
            "tls_client_ca_file",
            "client certificates need TLS (tls_cert_file and tls_key_file)",
        )
        need(
            not (self.tls and self.insecure_plaintext),
            "insecure_plaintext",
            "contradicts tls_cert_file (TLS is on)",
        )
        need(
            self.tls or self.insecure_plaintext or self.host in LOOPBACK_HOSTS,
            "host",
            "beyond loopback the gateway needs TLS (tls_cert_file and tls_key_file), or "
            "insecure_plaintext where a TLS-terminating proxy or mesh sits in front",
        )
        need(0 <= self.port <= 65535, "port", "must be in 0..65535")
        need(":" in self.triton_url, "triton_url", "must be host:port")
        need(bool(self.model), "model", "must be non-empty")
        need(-1 <= self.metrics_port <= 65535, "metrics_port", "must be in -1..65535")
        need(-1 <= self.http_port <= 65535, "http_port", "must be in -1..65535")
        need(self.max_streams_per_caller >= 1, "max_streams_per_caller", "must be >= 1")
        need(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        need(self.max_turn_chars >= 1, "max_turn_chars", "must be >= 1")
        need(self.max_queued_turns >= 0, "max_queued_turns", "must be >= 0")
        need(self.max_turns_per_caller >= 1, "max_turns_per_caller", "must be >= 1")
        need(
            self.tokens_per_minute_per_caller >= 0,
            "tokens_per_minute_per_caller",
            "must be >= 0 (0 = no limit)",
        )
        need(self.stall_timeout_s > 0, "stall_timeout_s", "must be > 0")
        need(self.turn_buffer >= 1, "turn_buffer", "must be >= 1")
        need(self.keepalive_time_s > 0, "keepalive_time_s", "must be > 0")
        need(self.keepalive_timeout_s > 0, "keepalive_timeout_s", "must be > 0")
        need(self.health_interval_s > 0, "health_interval_s", "must be > 0")
        need(self.probe_timeout_s > 0, "probe_timeout_s", "must be > 0")
        need(self.shutdown_grace_s >= 0, "shutdown_grace_s", "must be >= 0")
        need(self.drain_delay_s >= 0, "drain_delay_s", "must be >= 0")
        need(self.sinks >= 0, "sinks", "must be >= 0")
        need(self.window >= 0, "window", "must be >= 0")

    @property
    def tls(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return bool(self.tls_cert_file)
