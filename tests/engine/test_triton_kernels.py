"""The CUDA path's Triton kernels equal naive PyTorch references (Triton's interpreter on
CPU tensors, float32: the comparison is exact up to float32 rounding)."""

from __future__ import annotations

import math

import pytest
import torch

from sinkserve.engine.kernels.fused_ops import add_rms_norm, gemv, silu_mul
from sinkserve.engine.kernels.sink_attention import AttnConfig, decode_attention
from sinkserve.engine.rope import cos_sin, inv_frequencies

TOL = 1e-4


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of x [T, heads, hd] by per-row cos/sin [T, hd / 2]."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def naive_decode(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kpos: torch.Tensor,
    nh: int,
    sinks: int,
    window: int,
    inv_freq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row and head: softmax over visible cache keys (sinks scored with the query at
    its cache position, window keys at its absolute position) plus the row's own key."""
    nkv, hd = k_cache.shape[1], k_cache.shape[3]
    g = nh // nkv
    out = torch.empty(len(slots), nh, hd)
    q, k, v = torch.split(qkv, [nh * hd, nkv * hd, nkv * hd], dim=-1)
    cp, sp = cos_sin(positions, inv_freq, torch.float32)
    cc, sc = cos_sin(positions.clamp(max=sinks + window), inv_freq, torch.float32)
    q_abs = rotate(q.view(-1, nh, hd), cp, sp)
    q_sink = rotate(q.view(-1, nh, hd), cc, sc)
    k_new = rotate(k.view(-1, nkv, hd), cp, sp)
    v_new = v.view(-1, nkv, hd)
    for b, (slot, t) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        for head in range(nh):
            kvh = head // g
            scores: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            for c, p in enumerate(kpos[slot].tolist()):
                if 0 <= p < t and (p < sinks or p >= t - window):
                    qv = q_sink[b, head] if c < sinks else q_abs[b, head]
                    scores.append(qv @ k_cache[slot, kvh, c])
                    values.append(v_cache[slot, kvh, c])
            scores.append(q_abs[b, head] @ k_new[b, kvh])
            values.append(v_new[b, kvh])
            probs = torch.softmax(torch.stack(scores) / math.sqrt(hd), dim=0)
            out[b, head] = probs @ torch.stack(values)
    return out, k_new, v_new


@pytest.mark.parametrize(
    ("splits", "nkv", "dot"), [(1, 2, True), (3, 2, True), (3, 4, True), (3, 4, False)]
)
def test_decode_attention_matches_a_naive_softmax_over_visible_keys(
    splits: int, nkv: int, dot: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    nh, hd, sinks, window, num_slots = 4, 32, 3, 40, 5
    c = sinks + window
    inv_freq = inv_frequencies(hd, 10000.0, None)
    k_cache = torch.randn(num_slots, nkv, c, hd, generator=g)
    v_cache = torch.randn(num_slots, nkv, c, hd, generator=g)
    kpos = torch.full((num_slots, c), -1, dtype=torch.long)
    # Rows at different fill levels: young (t < S), filling, full, far past the window.
    positions = torch.tensor([2, 17, 43, 1000, 123457])
    slots = torch.tensor([4, 0, 2, 1, 3])
    for slot, t in zip(slots.tolist(), positions.tolist(), strict=True):
        for p in range(t):
            if p < sinks or p >= t - window:
                kpos[slot, p if p < sinks else sinks + (p - sinks) % window] = p
    qkv = torch.randn(len(slots), (nh + 2 * nkv) * hd, generator=g)
    rope = (
        *cos_sin(positions, inv_freq, torch.float32),
        *cos_sin(positions.clamp(max=c), inv_freq, torch.float32),
    )
    want, k_new, v_new = naive_decode(
        qkv, positions, slots, k_cache, v_cache, kpos, nh, sinks, window, inv_freq
    )
    k_before, v_before = k_cache.clone(), v_cache.clone()
    counters = torch.zeros(len(slots) * nkv, dtype=torch.int32)
    config = AttnConfig(splits, block_n=16, dot=dot)
    for launch in range(2):  # a second launch (a graph replay) reuses the same counters
        k_cache.copy_(k_before)
        v_cache.copy_(v_before)
        out = torch.full((len(slots), nh, hd), float("nan"))
        decode_attention(
            qkv, rope, k_cache, v_cache, kpos, slots, positions, out,
            sinks=sinks, window=window, config=config, sm_scale=hd**-0.5, counters=counters,
        )  # fmt: skip
        assert (out - want).abs().max().item() < TOL, f"launch {launch}"
        assert not counters.any(), "the last split leaves the counters zeroed"
    index = torch.where(positions < sinks, positions, sinks + (positions - sinks) % window)
    assert torch.allclose(k_cache[slots, :, index], k_new, atol=TOL)
    assert torch.equal(v_cache[slots, :, index], v_new)
    k_before[slots, :, index] = k_cache[slots, :, index]
    assert torch.equal(k_cache, k_before), "only the rows' own ring indexes are written"


def test_add_rms_norm_updates_the_residual_and_normalizes_it() -> None:
    g = torch.Generator().manual_seed(1)
    x, delta, w = torch.randn(3, 48, generator=g), torch.randn(3, 48, generator=g), torch.rand(48)
    want_x = x + delta
    want = want_x * torch.rsqrt(want_x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    got = add_rms_norm(x, delta, w, 1e-5)
    assert torch.allclose(x, want_x) and torch.allclose(got, want, atol=TOL)
    assert torch.allclose(add_rms_norm(x.clone(), None, w, 1e-5), want, atol=TOL)


def test_silu_mul_gates_the_up_projection() -> None:
    gu = torch.randn(2, 2 * 1500, generator=torch.Generator().manual_seed(2))
    gate, up = gu.chunk(2, dim=-1)
    assert torch.allclose(silu_mul(gu), torch.nn.functional.silu(gate) * up, atol=TOL)


@pytest.mark.parametrize("silu", [False, True])
def test_gemv_equals_a_matrix_product_with_ragged_edges(silu: bool) -> None:
    g = torch.Generator().manual_seed(3)
    n, k = 37, 300  # neither a multiple of the blocks
    w = torch.randn(n, k, generator=g)
    x = torch.randn(1, 2 * k if silu else k, generator=g)
    a = silu_mul(x) if silu else x
    got = gemv(x, w, silu=silu, block_n=16, block_k=128)
    assert torch.allclose(got, a @ w.T, atol=TOL, rtol=TOL)
