"""The bench's memory roofline: the bytes a one-row decode step reads, and the probe."""

from __future__ import annotations

import math

import torch

from sinkserve.engine.model import Llama
from sinkserve.roofline import memory_bandwidth_gb_s, step_bytes
from tests.engine.helpers import tiny_model


def model(dtype: torch.dtype, quant: str) -> Llama:
    cfg, tensors = tiny_model(256, hidden=64, head_dim=16, qkv_bias=False)
    return Llama(cfg, tensors, dtype, torch.device("cpu"), quant=quant)


def projection_weights(m: Llama) -> int:
    return sum(
        w.shape[0] * w.shape[1] if isinstance(w, torch.Tensor) else 0
        for layer in m.layers
        for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
    )


def test_a_step_reads_two_bytes_a_weight_in_bfloat16_and_five_eighths_with_int4() -> None:
    dense = model(torch.bfloat16, "none")
    n = projection_weights(dense)
    head = dense.lm_head.numel()
    # The plain CPU head is float32 (prepacked): 4 bytes a weight.
    assert step_bytes(dense) == 2 * n + 4 * head
    int4 = model(torch.bfloat16, "int4")
    # 4-bit codes plus a bfloat16 scale and zero per 32 weights: 0.625 bytes a weight in
    # either layout; the head's int8 codes are a byte each plus a bfloat16 scale per row.
    assert step_bytes(int4) == 0.625 * n + head + 2 * int4.lm_head.shape[0]


def test_the_probe_reads_memory_at_a_finite_positive_rate() -> None:
    rate = memory_bandwidth_gb_s(threads=1, gib=0.125, repeats=2)
    assert math.isfinite(rate) and 0.1 < rate < 10_000
