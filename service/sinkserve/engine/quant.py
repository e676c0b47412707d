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

In bfloat16 models on a CPU with AVX-512 BF16, int4 and int8 weights also keep their
codes in the layout of `cpu_matvec.cpp` (`rowpack`, the same bytes a weight as ATen's),
whose kernels take steps of fewer than 8 rows and stream the codes at close to the
memory's rate; elsewhere, or where the extension cannot be built, ATen's kernels run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sinkserve.engine import cpu_ext

GROUP = 32
MATVEC_ROWS = 8  # cpu_matvec.h kMatvecRows: steps of fewer rows take those kernels
MATVEC_BLOCK = 16  # output rows a block of their layouts holds
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
    rowpack: torch.Tensor | None  # the codes for cpu_matvec (pack_rows_int4), or None


@dataclass(frozen=True)
class Int8Weight:
    """A [out_features, in_features] weight as int8 rows with one scale per row."""

    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # [N] (activation dtype)
    rowpack: torch.Tensor | None  # the codes for cpu_matvec (pack_rows_int8), or None


Weight = torch.Tensor | Int4Weight | Int8Weight | PackedWeight


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    """Symmetric per-row int8 (for the output head, whose rows GGUF keeps at 6-8 bits)."""
    scale = (w.float().abs().amax(-1) / 127).clamp(min=1e-12).to(dtype).float()
    codes = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(
        codes=codes.contiguous(),
        scales=scale.to(dtype),
        rowpack=pack_rows_int8(codes) if takes_matvec(w, dtype, 16) else None,
    )


def takes_matvec(w: torch.Tensor, dtype: torch.dtype, k_multiple: int) -> bool:
    """Whether steps of few rows multiply by `w` [N, K] with cpu_matvec's kernels: bfloat16
    activations on a CPU that has them, N a multiple of their block, K of `k_multiple`."""
    n, k = w.shape
    return (
        w.device.type == "cpu"
        and dtype == torch.bfloat16
        and n % MATVEC_BLOCK == 0
        and k % k_multiple == 0
        and cpu_ext.matvec_supported()
    )


def pack_rows_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15) with bfloat16 scale and zero [N, K / 32] in cpu_matvec.cpp's
    int4 layout: uint8 [N / 16, K / 32, 320]."""
    n, k = q.shape
    nb, g = n // MATVEC_BLOCK, k // GROUP
    # [block, row, group, nibble (low: pairs 0-7, high: 8-15), pair, member]
    qg = q.to(torch.uint8).reshape(nb, MATVEC_BLOCK, g, 2, 8, 2)
    codes = (qg[:, :, :, 0] | (qg[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)  # [b, g, c, r, e]

    def per_block(t: torch.Tensor) -> torch.Tensor:  # [N, G] bfloat16 -> [b, g, 32] bytes
        t = t.to(torch.bfloat16).reshape(nb, MATVEC_BLOCK, g).permute(0, 2, 1).contiguous()
        return t.view(torch.uint8)

    return torch.cat([codes.reshape(nb, g, 256), per_block(scale), per_block(zero)], -1)


def pack_rows_int8(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in cpu_matvec.cpp's int8 layout: uint8 [N / 16, K / 16, 256]."""
    n, k = codes.shape
    u = (codes.to(torch.int16) + 128).to(torch.uint8)
    u = u.reshape(n // MATVEC_BLOCK, MATVEC_BLOCK, k // 16, 8, 2).permute(0, 2, 3, 1, 4)
    return u.reshape(n // MATVEC_BLOCK, k // 16, 256).contiguous()


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
    fast = group == GROUP and takes_matvec(w, dtype, GROUP)
    return Int4Weight(
        packed=packed,
        scales_zeros=sz,
        group=group,
        dense=pack(values, dense.dtype),
        dense_rows=dense.rows,
        rowpack=pack_rows_int4(q.reshape(n, k), scale, zero) if fast else None,
    )


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w.T (+ bias) for any `Weight`. A dense, int8 or packed weight takes x in
    any float dtype (cast where it differs from the one the weight computes in; the int4
    kernel needs the activation dtype). The result is in the dtype the weight computes
    in, except for packed weights, which answer in x's dtype (so both paths of an int4
    weight agree). Steps of fewer than MATVEC_ROWS bfloat16 rows take cpu_matvec's
    kernels where the weight has their layout."""
    if isinstance(w, Int4Weight) and x.shape[0] >= w.dense_rows:
        w = w.dense
    if isinstance(w, torch.Tensor):
        return F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w, bias)
    y: torch.Tensor  # torch.ops calls are untyped
    if isinstance(w, PackedWeight):
        dt = w.packed.dtype
        y = torch.ops.mkldnn._linear_pointwise(x.to(dt), w.packed, None, "none", [], "")
        y = y.to(x.dtype)
    elif w.rowpack is not None and 0 < x.shape[0] < MATVEC_ROWS and takes_dtype(x, w):
        y = matvec(x.to(torch.bfloat16), w)
    elif isinstance(w, Int8Weight):
        y = torch.ops.aten._weight_int8pack_mm(x.to(w.scales.dtype), w.codes, w.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.packed, w.group, w.scales_zeros)
    return y if bias is None else y + bias


def takes_dtype(x: torch.Tensor, w: Int4Weight | Int8Weight) -> bool:
    """Whether x may go to cpu_matvec's kernels: bfloat16 for int4 (as ATen's kernel, which
    needs the activation dtype); any float for int8, cast to bfloat16 (as ATen's path)."""
    return isinstance(w, Int8Weight) or x.dtype == torch.bfloat16


def matvec(x: torch.Tensor, w: Int4Weight | Int8Weight) -> torch.Tensor:
    """x (bfloat16, 1 to MATVEC_ROWS - 1 rows) @ w.T through cpu_matvec's kernels (the
    weight must have their layout: `rowpack`)."""
    ext = cpu_ext.extension()
    y: torch.Tensor
    if isinstance(w, Int4Weight):
        y = ext.int4_matvec(x.contiguous(), w.rowpack)
    else:
        y = ext.int8_matvec(x.contiguous(), w.rowpack, w.scales)
    return y
