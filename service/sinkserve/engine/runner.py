"""The part of the engine that owns tensors, behind a small interface.

The scheduler decides *what* runs in a step (plain ids and token lists); a runner does it.
`TorchRunner` runs the PyTorch model on CPU or CUDA. A TensorRT-LLM executor runner would
implement the same protocol (its `KvCacheConfig` carries `sink_token_length` and
`max_attention_window`; releases >= 1.1 dropped sink support).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from sinkserve.config import DTYPES, EngineConfig
from sinkserve.engine.cpu_decode import FusedDecode
from sinkserve.engine.kv_cache import HostSlot, KVCache
from sinkserve.engine.model import Llama
from sinkserve.engine.sampler import SampleRow, sample
from sinkserve.engine.scheduler import StepItem


class Runner(Protocol):
    bytes_per_slot: int

    def step(self, items: Sequence[StepItem], rows: Sequence[SampleRow]) -> list[int]:
        """Feed `items`; sample one token for each item that wants logits, in order."""
        ...

    def new_rng(self, seed: int | None) -> torch.Generator | None: ...

    def save(self, slot: int) -> HostSlot: ...

    def load(self, slot: int, saved: HostSlot) -> None: ...

    def clear(self, slot: int) -> None: ...


LogitsHook = Callable[[Sequence[SampleRow], torch.Tensor], None]


class TorchRunner:
    """Llama forward + sampling over a preallocated `KVCache`.

    `extra_slots` adds KV slots past `config.max_sessions` that the scheduler never hands
    out (the CUDA runner points the padding rows of a graph's batch at one). `fused`: take
    the CPU fused decode step where it applies (`cpu_decode`; the CUDA runner does not)."""

    def __init__(
        self, config: EngineConfig, model: Llama, *, extra_slots: int = 0, fused: bool = True
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.kv = KVCache(
            num_layers=cfg.num_layers,
            num_slots=config.max_sessions + extra_slots,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            sinks=config.sinks,
            window=config.window,
            dtype=model.kv_dtype,
            device=model.device,
        )
        self.bytes_per_slot = self.kv.bytes_per_slot
        # Decode-only steps in one C++ call where it applies (CPU; see cpu_decode).
        self.fused = FusedDecode.build(model, self.kv) if fused else None
        self.logits_hook: LogitsHook | None = None  # diagnostics and tests: sees raw logits

    @torch.inference_mode()
    def logits(self, items: Sequence[StepItem]) -> torch.Tensor:
        """Feed `items`; float32 logits [n, vocab] for the items that want them."""
        if self.fused is not None and self.fused.takes(items):
            return self.fused.logits(items)
        return self.model.forward(self.kv, self.kv.plan(items))

    def step(self, items: Sequence[StepItem], rows: Sequence[SampleRow]) -> list[int]:
        logits = self.logits(items)
        if self.logits_hook is not None:
            self.logits_hook(rows, logits)
        return sample(logits, rows)

    def new_rng(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        rng = torch.Generator(device=self.model.device)
        rng.manual_seed(seed)
        return rng

    def save(self, slot: int) -> HostSlot:
        return self.kv.save(slot)

    def load(self, slot: int, saved: HostSlot) -> None:
        self.kv.load(slot, saved)

    def clear(self, slot: int) -> None:
        self.kv.clear(slot)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of one of the config's `DTYPES` names."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} must be one of {', '.join(DTYPES)}")
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype
