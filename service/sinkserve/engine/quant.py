"""Weight-only int4 linear layers for the CPU (`EngineConfig.quant = "int4"`).

Each output row is cut into groups of `group` input columns, stored as 4-bit codes q with
a per-group scale and zero point: w = (q - 8) * scale + zero (asymmetric min/max). A GGUF
Q4_1 block (32 weights, w = d * q + m) has exactly this form, so Q4_1 checkpoints lose
(almost) nothing beyond the bfloat16 rounding of the scales. The matmul is
`aten._weight_int4pack_mm_for_cpu`, which reads 4 bits a weight instead of 16 or 32: at
small batch sizes, where a decode step is bound by reading weights, that is what pays.

From some row count on, a step is bound by arithmetic instead, and that kernel computes
slower than a dense matmul, so each int4 weight also keeps a dense copy for those steps,
prepacked in oneDNN's blocked layout (`PackedWeight`; F.linear repacks the whole weight on
every call). Which copy, from how many rows (`DenseCopy`), depends on the CPU. 30 layers of
SmolLM2 with distinct weights (as in a step: they do not stay in cache), 2 cores,
`python bench/cpu_linear.py`:
- with AMX, bfloat16 from 8 rows (`AMX_DENSE`): int4 / packed bfloat16 / packed float32
  1 row 3.8 / 12.3 / 23.6 ms; 8 rows 12.0 / 12.6 / 27.2; 12 rows 16.8 / 12.9; 32 rows
  41.0 / 13.9 / 46.1. The copy holds the values the codes stand for rounded to bfloat16
  (an error below the one quantization made): 2 bytes a weight (SmolLM2-135M: +212 MB).
- without, float32 from 24 rows (`PLAIN_DENSE`; a VM with AVX-512 BF16 and no AMX,
  int4 / plain float32 / packed float32: 16 rows 25.8 / 39.1 / 31.6; 32 rows 52.9 / 48.8
  / 43.8; 64 rows 101.5 / 75.6 / 70.7). There bfloat16 is no faster than float32 (on the
  AMX machine with oneDNN held to AVX-512 BF16, `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`:
  8 rows int4 12.3 / bfloat16 21.1 ms, 32 rows 43.1 / 44.8), and float32 keeps the exact
  values of the codes: 4 bytes a weight (+424 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP = 32
INNER_K_TILES = 2
PACK_ROWS_HINT = 32  # oneDNN picks the packed layout for this many rows; any count runs


@dataclass(frozen=True)
class PackedWeight:
    """An [out_features, in_features] weight prepacked for oneDNN's matmul (CPU), in the
    dtype it computes in (float32 or bfloat16)."""

    packed: torch.Tensor  # opaque mkldnn tensor from mkldnn._reorder_linear_weight


def pack(w: torch.Tensor, dtype: torch.dtype) -> PackedWeight:
    """`w` as `dtype` in oneDNN's blocked layout (see the module doc)."""
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), PACK_ROWS_HINT))


@dataclass(frozen=True)
class DenseCopy:
    """The dense copy an int4 weight keeps: its dtype, and the row count from which
    `linear` multiplies by it instead of running the int4 kernel."""

    dtype: torch.dtype
    rows: int


AMX_DENSE = DenseCopy(torch.bfloat16, 8)  # measured, see the module doc
PLAIN_DENSE = DenseCopy(torch.float32, 24)


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 on AMX tiles (oneDNN uses them where it can)."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


@dataclass(frozen=True)
class Int4Weight:
    """A packed [out_features, in_features] weight."""

    packed: torch.Tensor  # uint8, opaque layout of _convert_weight_to_int4pack_for_cpu
    scales_zeros: torch.Tensor  # [in / group, out, 2]: scale, zero (activation dtype)
    group: int
    dense: PackedWeight  # the weight the codes stand for, for steps of dense_rows+ rows
    dense_rows: int


@dataclass(frozen=True)
class Int8Weight:
    """A [out_features, in_features] weight as int8 rows with one scale per row."""

    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # [N] (activation dtype)


Weight = torch.Tensor | Int4Weight | Int8Weight | PackedWeight


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    """Symmetric per-row int8 (for the output head, whose rows GGUF keeps at 6-8 bits)."""
    scale = (w.float().abs().amax(-1) / 127).clamp(min=1e-12).to(dtype).float()
    codes = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(codes=codes.contiguous(), scales=scale.to(dtype))


def can_quantize(w: torch.Tensor, group: int = GROUP) -> bool:
    return w.dim() == 2 and w.shape[1] % group == 0 and w.shape[0] % 8 == 0


def quantize_int4(
    w: torch.Tensor, dtype: torch.dtype, dense: DenseCopy, group: int = GROUP
) -> Int4Weight:
    """Quantize a float [N, K] weight, groups of `group` along K; scales kept in `dtype`
    (the activation dtype the matmul will see); keep the `dense` copy beside the codes.

    A group that already lies on a 4-bit grid (a dequantized Q4_1 block: its values are
    lo + d * integer) keeps that grid, found as the smallest gap between its values, so
    its codes come back exactly; other groups get the min/max grid."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    span = (hi - lo).clamp(min=1e-12)
    gaps = wg.sort(-1).values.diff(dim=-1)
    gaps = gaps.masked_fill(gaps <= span[..., None] * 1e-3, float("inf")).amin(-1)
    steps = (span / gaps).round()
    scale = torch.where((steps <= 15) & ((span / gaps - steps).abs() < 1e-3), gaps, span / 15)
    scale = scale.to(dtype).float()  # the grid the kernel will use
    q = ((wg - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
    zero = lo + 8 * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.to(torch.int32).reshape(n, k).contiguous(), INNER_K_TILES
    )
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
    # What the kernel computes with: (q - 8) * scale + zero, both rounded to `dtype`.
    zero_k = zero.to(dtype).float()
    values = ((q - 8) * scale[..., None] + zero_k[..., None]).reshape(n, k)
    return Int4Weight(
        packed=packed,
        scales_zeros=sz,
        group=group,
        dense=pack(values, dense.dtype),
        dense_rows=dense.rows,
    )


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w.T (+ bias) for any `Weight`. A dense, int8 or packed weight takes x in
    any float dtype (cast where it differs from the one the weight computes in; the int4
    kernel needs the activation dtype). The result is in the dtype the weight computes
    in, except for packed weights, which answer in x's dtype (so both paths of an int4
    weight agree)."""
    if isinstance(w, Int4Weight) and x.shape[0] >= w.dense_rows:
        w = w.dense
    if isinstance(w, torch.Tensor):
        return F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, bias)
    y: torch.Tensor  # torch.ops calls are untyped
    if isinstance(w, PackedWeight):
        dt = w.packed.dtype
        y = torch.ops.mkldnn._linear_pointwise(x.to(dt), w.packed, None, "none", [], "")
        y = y.to(x.dtype)
    elif isinstance(w, Int8Weight):
        y = torch.ops.aten._weight_int8pack_mm(x.to(w.scales.dtype), w.codes, w.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scales_zeros)
    return y if bias is None else y + bias
