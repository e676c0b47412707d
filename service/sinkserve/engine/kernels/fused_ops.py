"""Small fused Triton kernels for the decode step: one launch where eager PyTorch takes
several (a decode step is hundreds of launches; each small one costs a few microseconds
of an otherwise memory-bound step).

Programmatic dependent launch (`pdl=True`, Hopper and later): a kernel may start while
its predecessor in the stream still runs. Before `gdc_wait` it reads only what no kernel
of the step writes (weights, and the KV caches and positions of earlier steps); every
read of a predecessor's output and every write comes after it, and `gdc_wait` returns
only once the predecessor has completed (which, transitively, every earlier kernel has).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def pdl_options(pdl: bool) -> dict[str, bool]:
    """Launch keywords for a kernel taking part in programmatic dependent launch (none
    otherwise: the Triton interpreter knows no such option)."""
    return {"launch_pdl": True} if pdl else {}


# The @triton.jit kernels below stay unannotated: Triton reads a parameter's annotation as its
# kernel type (tl.constexpr), and triton ships no types (hence their `type: ignore`s).
@triton.jit  # type: ignore[untyped-decorator]
def pdl_enter(PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    """Let the next kernel launch, then wait for the previous one (see module doc)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@triton.jit  # type: ignore[untyped-decorator]
def _add_rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr, delta_ptr, w_ptr, out_ptr, n_cols, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_enter(PDL)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        x += tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + offs, x, mask=mask)
        x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    tl.store(out_ptr + offs, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """`x += delta` in place (the residual stream), then return RMSNorm(x) * weight.
    x, delta: contiguous [rows, hidden]."""
    rows, n = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(rows,)](
        x,
        x if delta is None else delta,
        weight,
        out,
        n,
        eps,
        HAS_DELTA=delta is not None,
        BLOCK=block,
        PDL=pdl,
        num_warps=max(1, min(16, block // 256)),
        **pdl_options(pdl),
    )
    return out


@triton.jit  # type: ignore[untyped-decorator]
def _silu_mul_kernel(gu_ptr, out_ptr, inter, BLOCK: tl.constexpr, PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    pdl_enter(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * inter + cols, act.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [rows, 2 I] laid out as (gate, up) -> [rows, I]."""
    rows, two_i = gate_up.shape
    inter = two_i // 2
    out = gate_up.new_empty(rows, inter)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, out, inter, BLOCK=block, PDL=pdl, **pdl_options(pdl)
    )
    return out


@triton.jit  # type: ignore[untyped-decorator]
def _gemv_input(x_ptr, kk, kmask, k_in, SILU: tl.constexpr):  # type: ignore[no-untyped-def]
    """Input columns kk as float32; with SILU, x is (gate, up) of width 2 k_in and the
    input is SiLU(gate) * up, rounded to x's dtype as `silu_mul` would."""
    if SILU:
        gate = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + k_in + kk, mask=kmask, other=0.0).to(tl.float32)
        xk = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        xk = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
    return xk


@triton.jit  # type: ignore[untyped-decorator]
def _gemv_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    y_ptr,
    n_out,
    k_in,
    w_row_stride,
    SILU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_out
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_row_stride
    # The first weight tile is read before waiting on the kernel that produces x.
    kmask = cols < k_in
    w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    pdl_enter(PDL)
    acc = w.to(tl.float32) * _gemv_input(x_ptr, cols, kmask, k_in, SILU)[None, :]
    for k0 in range(BLOCK_K, k_in, BLOCK_K):
        kk = k0 + cols
        kmask = kk < k_in
        w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * _gemv_input(x_ptr, kk, kmask, k_in, SILU)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty), mask=rmask)


def gemv_config(n_out: int, k_in: int, silu: bool) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) by weight shape: the fastest of a grid on
    an H200 for the 7B and 8B projections."""
    if silu:
        return 8, 1024, 4, 3
    if n_out * k_in <= 4096 * 4096:
        return 16, 1024, 8, 1
    if n_out <= 8192:
        return 8, 512, 4, 1
    return 16, 256, 4, 3


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    silu: bool = False,
    block_n: int | None = None,
    block_k: int = 512,
    num_warps: int = 4,
    num_stages: int = 1,
    pdl: bool = False,
) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] for one row (a batch-1 decode step), each program
    streaming BLOCK_N weight rows; with `silu`, x is [1, 2 K] laid out as (gate, up) and
    the input is SiLU(gate) * up, rounded to x's dtype as `silu_mul` would."""
    n_out, k_in = weight.shape
    assert x.shape == (1, 2 * k_in if silu else k_in) and x.is_contiguous()
    if block_n is None:  # the tuned tile for this shape
        block_n, block_k, num_warps, num_stages = gemv_config(n_out, k_in, silu)
    block_k = min(block_k, max(16, triton.next_power_of_2(k_in)))
    y = x.new_empty(1, n_out)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, y, n_out, k_in, weight.stride(0),
        SILU=silu, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, **pdl_options(pdl),
    )  # fmt: skip
    return y
