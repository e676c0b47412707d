"""The one validated configuration that flows from the CLI or Triton down to the runner.

`EngineConfig.from_mapping` is the strict parser used by `config.pbtxt` parameters and CLI
flags (`add_engine_flags`, `engine_config`): an unknown key or a bad value raises
`ConfigError` naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RUNNERS = ("torch",)
DTYPES = ("float32", "bfloat16", "float16")
QUANTS = ("none", "int4")
SAMPLINGS = ("model", "greedy")


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names it."""


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine instance.

    The per-session cache holds `sinks` attention-sink tokens (the session's first tokens)
    plus a ring of the `window` most recent tokens: a new token attends to the sinks, the
    window and itself, with RoPE positions counted within that cache.
    """

    model: str = ""  # GGUF file or Hugging Face checkpoint dir; "" = the default model
    runner: str = "torch"
    device: str = "cpu"
    dtype: str = "float32"
    # Weight-only quantization of the linear layers: "int4" (CPU, bfloat16; group-wise
    # 4-bit, lossless for GGUF Q4_1 up to scale rounding) reads 4x fewer weight bytes
    # than bfloat16 per decode step.
    quant: str = "none"
    sinks: int = 4
    window: int = 1020
    max_sessions: int = 16  # KV slots on the device
    max_host_sessions: int = 1024  # idle sessions swapped to host memory
    step_token_budget: int = 256  # tokens per engine step (decode + chunked prefill)
    max_new_tokens: int = 4096  # upper bound a request may ask for
    # Tokens a turn (with its chat template) or a system prompt may have; 0 = the window.
    # Longer ones are refused: their own start would be evicted during their prefill.
    max_prompt_tokens: int = 0
    slot_wait_s: float = 30.0  # how long a new turn waits for a busy slot
    session_ttl_s: float = 3600.0  # idle sessions expire after this
    max_sessions_per_owner: int = 64  # open sessions of one caller, in memory or stored
    # How long a running turn's claim on its session holds without renewal (renewed every
    # third of it): what another replica waits before taking over from a dead one.
    lease_s: float = 6.0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    # Where a turn's unset sampling fields come from: "model" = the checkpoint's recommended
    # sampling over a chat default (temperature 0.8, top-k 40, top-p 0.95, repetition
    # penalty 1.1);
    # "greedy" = temperature 0 and no penalty (reproducible replies: tests, comparisons).
    sampling: str = "model"

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{key}={getattr(self, key)!r}: {why}")

        need(self.runner in RUNNERS, "runner", f"must be one of {', '.join(RUNNERS)}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        need(
            self.device == "cpu" or self.device.startswith("cuda"),
            "device",
            "must be 'cpu' or 'cuda[:N]'",
        )
        need(
            not (self.device == "cpu" and self.dtype == "float16"),
            "dtype",
            "float16 is for CUDA; use float32 or bfloat16 on CPU",
        )
        need(self.quant in QUANTS, "quant", f"must be one of {', '.join(QUANTS)}")
        need(
            self.quant == "none" or (self.device == "cpu" and self.dtype == "bfloat16"),
            "quant",
            "int4 needs device=cpu and dtype=bfloat16",
        )
        need(0 <= self.sinks <= 64, "sinks", "must be in 0..64")
        need(self.window >= 1, "window", "must be >= 1")
        need(self.max_sessions >= 1, "max_sessions", "must be >= 1")
        need(self.max_host_sessions >= 0, "max_host_sessions", "must be >= 0")
        need(self.step_token_budget >= 1, "step_token_budget", "must be >= 1")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0 (0 = the window)")
        need(self.slot_wait_s >= 0, "slot_wait_s", "must be >= 0")
        need(self.session_ttl_s > 0, "session_ttl_s", "must be > 0")
        need(self.max_sessions_per_owner >= 1, "max_sessions_per_owner", "must be >= 1")
        need(self.lease_s > 0, "lease_s", "must be > 0")
        need(self.threads >= 0, "threads", "must be >= 0")
        need(self.sampling in SAMPLINGS, "sampling", f"must be one of {', '.join(SAMPLINGS)}")

    @property
    def prompt_limit(self) -> int:
        """The most tokens one turn or system prompt may have."""
        return self.max_prompt_tokens or self.window

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EngineConfig:
        """Build from string-ish values (config.pbtxt parameters, env, CLI), strictly."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in fields:
                raise ConfigError(f"unknown setting {key!r}; known: {', '.join(sorted(fields))}")
            kind = type(getattr(cls, key))
            try:
                kwargs[key] = raw if isinstance(raw, kind) else kind(str(raw).strip())
            except ValueError:
                raise ConfigError(f"{key}={raw!r}: expected {kind.__name__}") from None
        return cls(**kwargs)


ENGINE_FLAGS = ("model", "device", "dtype", "quant", "sinks", "window", "threads")


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The command-line flags of `ENGINE_FLAGS`, defaults from `EngineConfig`."""
    d = EngineConfig()
    p.add_argument("--model", default=d.model, help="GGUF file or HF dir (default: SmolLM2)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--dtype", default=d.dtype)
    p.add_argument("--quant", default=d.quant, help="weight quantization: none | int4")
    p.add_argument("--sinks", type=int, default=d.sinks)
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--threads", type=int, default=d.threads)


def engine_config(args: argparse.Namespace, **overrides: object) -> EngineConfig:
    """The config of parsed `add_engine_flags` flags plus `overrides`, validated."""
    values = {k: getattr(args, k) for k in ENGINE_FLAGS} | overrides
    return EngineConfig.from_mapping(values)
