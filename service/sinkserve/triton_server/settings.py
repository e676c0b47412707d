"""`config.pbtxt` parameters: the adapter's own few keys, the rest strictly for the engine."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkserve.config import ConfigError, EngineConfig
from sinkserve.triton_server.launcher import HANDOFF_ENV, REPLICA_ENV, STORE_ENV


@dataclass(frozen=True)
class ModelSettings:
    """How the Triton model runs its engine; `engine` comes from the remaining parameters."""

    engine: EngineConfig
    handoff_dir: Path
    # Where session records live: sqlite:///path (one machine) or redis://host:port/db.
    session_store: str
    # This replica's name in the records (replicas sharing a store must differ; a
    # restarted replica keeps its name). "" = the host name.
    replica: str = ""
    handoff_timeout_s: float = 600.0  # how long a new instance waits for the old to drain
    metrics_interval_s: float = 1.0
    # Streamed responses per second shared by all turns (StreamPacer); 0 = every token.
    # Unset: by device (default_responses_per_s).
    stream_responses_per_s: float = 200.0


def default_responses_per_s(device: str) -> float:
    """The stream budget where config.pbtxt sets none. On CPU each response's cost lands
    on the engine's cores: 200. On a GPU host the engine's step loop shares only the stub's
    GIL with the responses. On an H200, 1000 kept the gateway at 0.97-1.11 of
    engine-direct at 1, 16 and 64 sessions (one run of four gave 0.74 at 64). 4000 fell
    to 0.43 at 64, and 200 made deltas too coarse to stream
    (bench/results/NOTES-served-stack-nvidia-h200.md)."""
    return 1000.0 if device.startswith("cuda") else 200.0


def kv_fingerprint(config: EngineConfig) -> str:
    """Identifies what makes a KV snapshot reusable: the weights file, dtype, cache shape."""
    from sinkserve.engine.weights import default_model_path

    model = Path(config.model) if config.model else default_model_path()
    stat = model.stat() if model.exists() else None
    weights = f"{model.resolve()}:{stat.st_size}:{stat.st_mtime_ns}" if stat else str(model)
    return f"{weights}|{config.runner}|{config.dtype}|{config.quant}|{config.sinks}|{config.window}"


def parse_parameters(parameters: Mapping[str, Any], model_name: str) -> ModelSettings:
    """Parse Triton's `parameters` ({key: {"string_value": v}}); raise ConfigError naming
    the key of an unknown setting, a bad value, or an unfilled `${...}` placeholder."""
    values: dict[str, str] = {}
    for key, entry in parameters.items():
        value = entry.get("string_value", "") if isinstance(entry, Mapping) else str(entry)
        if "${" in value:
            raise ConfigError(f"{key}={value!r}: unfilled template placeholder")
        values[key] = value
    handoff = values.pop("handoff_dir", "") or os.environ.get(HANDOFF_ENV, "")
    # Default: scoped to this tritonserver process (the stub's parent).
    base = (
        Path(handoff)
        if handoff
        else Path(tempfile.gettempdir()) / f"sinkserve-handoff-{os.getppid()}"
    )
    replica = values.pop("replica", "") or os.environ.get(REPLICA_ENV, "")
    store = values.pop("session_store", "") or os.environ.get(STORE_ENV, "")
    store = store or f"sqlite://{default_state_dir() / f'sessions-{model_name}.sqlite3'}"
    if not store.startswith(("sqlite:///", "redis://", "rediss://")):
        raise ConfigError(f"session_store={store!r}: use sqlite:///absolute/path or redis://...")
    extra = {}
    for key, zero_ok in (
        ("handoff_timeout_s", False),
        ("metrics_interval_s", False),
        ("stream_responses_per_s", True),
    ):
        if key in values:
            raw = values.pop(key)
            try:
                extra[key] = float(raw)
            except ValueError:
                raise ConfigError(f"{key}={raw!r}: expected float") from None
            if not (extra[key] > 0 or (zero_ok and extra[key] == 0)):
                raise ConfigError(f"{key}={raw!r}: must be {'>= 0' if zero_ok else '> 0'}")
    engine = EngineConfig.from_mapping(values)
    extra.setdefault("stream_responses_per_s", default_responses_per_s(engine.device))
    return ModelSettings(
        engine=engine,
        handoff_dir=base / model_name,
        session_store=store,
        replica=replica,
        **extra,
    )


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/sinkserve, else ~/.local/state/sinkserve: kept across restarts."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sinkserve"
