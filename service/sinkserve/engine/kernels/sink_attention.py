"""Decode attention over sink + ring KV slots, read in place by slot index (Triton).

One query token per row of a ragged decode batch; each row names its KV slot and absolute
position. The cache is never gathered: programs index `k_cache[slot, kv_head]` directly.

Flash-decoding in one launch, grid (rows, kv_heads, splits):
- each program scores the g query heads of a KV group against one stretch of the ring
  window with `q_abs` (RoPE at the absolute position), keeping a running max / sum /
  weighted value sum. Split 0 also takes the S sink columns, scored with `q_sink` (RoPE at
  the cache position min(t, S + W)), and the token's own key. Masks come from `kpos` (the
  absolute position held at each cache index, -1 = empty): a key is visible when
  0 <= kpos < t and it is a sink or kpos >= t - W. A tile's K and V loads are issued
  together, before any arithmetic on them.
- each program writes its partial softmax, then takes a ticket from a per-(row, head)
  counter; the last split to arrive merges every partial (one vector load over all
  splits), writes the output, stores the token's rotated key and its value at its ring
  index, and resets the counter for the next launch. The store must follow every read of
  the slot: the index it overwrites holds the key at t - W, which this very query still
  attends to, and every other split took its ticket only after its reads.

Scores and values go through `tl.dot` on tiles of 16 query rows (g real ones); with one
query head per KV head (g = 1) `AttnConfig.dot = False` takes plain multiply-and-sum.

With programmatic dependent launch (`pdl`, see `fused_ops`) each split reads its first
tile of keys (and their positions) before waiting on the projection that produces its
queries.

Queries and the new key arrive unrotated in the fused qkv projection; RoPE is applied in
the kernel from per-row float32 cos/sin tables (angles computed in float64 upstream).
The rotate-half layout is handled by working on the two halves of the head dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sinkserve.engine.kernels.fused_ops import pdl_enter, pdl_options

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttnConfig:
    """Launch shape of `decode_attention` (window splits, keys per tile, warps, stages)."""

    splits: int
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = True  # tensor-core tiles also when g = 1 (else multiply-and-sum)


# The @triton.jit kernels below stay unannotated: Triton reads a parameter's annotation as its
# kernel type (tl.constexpr), and triton ships no types (hence their `type: ignore`s).
@triton.jit
def _rope_halves(x1, x2, cos, sin):  # type: ignore[no-untyped-def]
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit  # type: ignore[untyped-decorator]
def _scores(q1, q2, k1, k2, USE_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    """[GP, HALF] queries against [N, HALF] keys (two halves each) -> [GP, N] float32.
    Without dot, GP is 1: multiply-and-sum over the head dimension."""
    if USE_DOT:
        s = tl.dot(q1.to(k1.dtype), tl.trans(k1)) + tl.dot(q2.to(k2.dtype), tl.trans(k2))
    else:
        q1v = tl.sum(q1, 0)  # [HALF]: drops the single query row
        q2v = tl.sum(q2, 0)
        k1f = k1.to(tl.float32)
        k2f = k2.to(tl.float32)
        s = (tl.sum(k1f * q1v[None, :], 1) + tl.sum(k2f * q2v[None, :], 1))[None, :]
    return s


@triton.jit  # type: ignore[untyped-decorator]
def _weighted(p, v, USE_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    """[GP, N] weights times [N, HALF] values -> [GP, HALF] float32 (GP is 1 without dot)."""
    if USE_DOT:
        o = tl.dot(p.to(v.dtype), v)
    else:
        pv = tl.sum(p, 0)  # [N]
        o = tl.sum(pv[:, None] * v.to(tl.float32), 0)[None, :]
    return o


@triton.jit  # type: ignore[untyped-decorator]
def _halves(ptr, offs, cmask, HALF: tl.constexpr):  # type: ignore[no-untyped-def]
    """Both halves of the head dimension of a tile of keys (or values)."""
    x1 = tl.load(ptr + offs, mask=cmask[:, None], other=0.0)
    x2 = tl.load(ptr + offs + HALF, mask=cmask[:, None], other=0.0)
    return x1, x2


@triton.jit  # type: ignore[untyped-decorator]
def _window_keys(k_ptr, kpos_base, kv_base, n0, end, pos, W: tl.constexpr,  # type: ignore[no-untyped-def]
                 HALF: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Window columns [n0, n0 + BLOCK_N) below `end`: their offsets, mask, visibility
    and key halves (the values are loaded from the same offsets)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    cmask = cols < end
    kp = tl.load(kpos_base + cols, mask=cmask, other=-1)
    vis = (kp >= 0) & (kp < pos) & (kp >= pos - W)
    offs = kv_base + cols[:, None] * (2 * HALF) + tl.arange(0, HALF)[None, :]
    k1, k2 = _halves(k_ptr, offs, cmask, HALF)
    return offs, cmask, vis, k1, k2


@triton.jit  # type: ignore[untyped-decorator]
def _fold_tile(q1, q2, k1, k2, v1, v2, vis, m_i, l_i, acc1, acc2, USE_DOT: tl.constexpr):  # type: ignore[no-untyped-def]
    """One tile of keys folded into the online softmax state (m_i, l_i, acc1, acc2); the
    query halves are already rotated and scaled for these keys."""
    s = _scores(q1, q2, k1, k2, USE_DOT)
    s = tl.where(vis[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc1 = acc1 * alpha[:, None] + _weighted(p, v1, USE_DOT)
    acc2 = acc2 * alpha[:, None] + _weighted(p, v2, USE_DOT)
    return m_new, l_i, acc1, acc2


@triton.jit  # type: ignore[untyped-decorator]
def _decode_kernel(  # type: ignore[no-untyped-def]
    qkv_ptr,
    qkv_row_stride,
    cos_p_ptr,
    sin_p_ptr,
    cos_c_ptr,
    sin_c_ptr,
    k_ptr,
    v_ptr,
    cache_slot_stride,
    cache_head_stride,
    kpos_ptr,
    slots_ptr,
    pos_ptr,
    acc_ptr,
    ml_ptr,
    count_ptr,
    out_ptr,
    qk_scale,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    HALF: tl.constexpr,
    S: tl.constexpr,
    SP: tl.constexpr,
    W: tl.constexpr,
    NSPLIT: tl.constexpr,
    NSP: tl.constexpr,
    SPLIT_LEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    hd: tl.constexpr = 2 * HALF
    c_len: tl.constexpr = S + W
    slot = tl.load(slots_ptr + row)
    pos = tl.load(pos_ptr + row)
    kv_base = slot.to(tl.int64) * cache_slot_stride + h * cache_head_stride
    kpos_base = kpos_ptr + slot.to(tl.int64) * c_len

    # Window columns of this split: [start, end), capped at the row's position (a cache
    # younger than S + W tokens fills indexes [0, t) in order). The first tile's keys are
    # read before waiting on the qkv projection: no kernel of this step writes the cache
    # before this one (see fused_ops on programmatic dependent launch). Own names
    # (woffs, wmask): Triton rejects rebinding them to the sink tile's shapes below.
    start = S + sp * SPLIT_LEN
    end = tl.minimum(tl.minimum(start + SPLIT_LEN, c_len), pos)
    woffs, wmask, vis, k1, k2 = _window_keys(
        k_ptr, kpos_base, kv_base, start, end, pos, W, HALF, BLOCK_N
    )
    pdl_enter(PDL)
    # Values after the wait: holding them too across it cost more (fewer resident
    # programs) than their overlap won (bench/gpu_attention_sweep.py, H200).
    v1, v2 = _halves(v_ptr, woffs, wmask, HALF)

    r = tl.arange(0, GP)
    d = tl.arange(0, HALF)
    rmask = r < G
    q_base = qkv_ptr + row * qkv_row_stride + (h * G + r)[:, None] * hd + d[None, :]
    q1 = tl.load(q_base, mask=rmask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_base + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
    cos_p = tl.load(cos_p_ptr + row * HALF + d)[None, :]
    sin_p = tl.load(sin_p_ptr + row * HALF + d)[None, :]
    qa1, qa2 = _rope_halves(q1, q2, cos_p, sin_p)
    qa1 = qa1 * qk_scale  # scale and log2(e) folded in: softmax runs on exp2
    qa2 = qa2 * qk_scale

    m_i = tl.full([GP], -1.0e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc1 = tl.zeros([GP, HALF], tl.float32)
    acc2 = tl.zeros([GP, HALF], tl.float32)
    m_i, l_i, acc1, acc2 = _fold_tile(
        qa1, qa2, k1, k2, v1, v2, vis, m_i, l_i, acc1, acc2, USE_DOT
    )  # fmt: skip
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        woffs, wmask, vis, k1, k2 = _window_keys(
            k_ptr, kpos_base, kv_base, n0, end, pos, W, HALF, BLOCK_N
        )
        v1, v2 = _halves(v_ptr, woffs, wmask, HALF)
        m_i, l_i, acc1, acc2 = _fold_tile(
            qa1, qa2, k1, k2, v1, v2, vis, m_i, l_i, acc1, acc2, USE_DOT
        )  # fmt: skip

    if sp == 0:
        if S > 0:
            cos_c = tl.load(cos_c_ptr + row * HALF + d)[None, :]
            sin_c = tl.load(sin_c_ptr + row * HALF + d)[None, :]
            qs1, qs2 = _rope_halves(q1, q2, cos_c, sin_c)
            cols = tl.arange(0, SP)
            cmask = cols < S
            kp = tl.load(kpos_base + cols, mask=cmask, other=-1)
            svis = (kp >= 0) & (kp < pos)
            offs = kv_base + cols[:, None] * hd + d[None, :]
            # Own names: Triton rejects rebinding the window tile's names to sink shapes.
            sk1, sk2 = _halves(k_ptr, offs, cmask, HALF)
            sv1, sv2 = _halves(v_ptr, offs, cmask, HALF)
            m_i, l_i, acc1, acc2 = _fold_tile(
                qs1 * qk_scale, qs2 * qk_scale, sk1, sk2, sv1, sv2, svis,
                m_i, l_i, acc1, acc2, USE_DOT,
            )  # fmt: skip
        # The token's own key and value (always visible).
        kn_base = qkv_ptr + row * qkv_row_stride + (NUM_HEADS + h) * hd + d
        kn1, kn2 = _rope_halves(
            tl.load(kn_base).to(tl.float32), tl.load(kn_base + HALF).to(tl.float32), cos_p, sin_p
        )
        s_own = tl.sum(qa1 * kn1, 1) + tl.sum(qa2 * kn2, 1)
        m_new = tl.maximum(m_i, s_own)
        alpha = tl.exp2(m_i - m_new)
        p_own = tl.exp2(s_own - m_new)
        l_i = l_i * alpha + p_own
        vn_base = kn_base + NUM_KV_HEADS * hd
        vn1 = tl.load(vn_base).to(tl.float32)[None, :]
        vn2 = tl.load(vn_base + HALF).to(tl.float32)[None, :]
        acc1 = acc1 * alpha[:, None] + p_own[:, None] * vn1
        acc2 = acc2 * alpha[:, None] + p_own[:, None] * vn2
        m_i = m_new

    # Partials keep only the G real query rows: [part, G, hd] and [part, 2, G].
    group = row * NUM_KV_HEADS + h
    part = group * NSPLIT + sp
    acc_offs = acc_ptr + part * G * hd + r[:, None] * hd + d[None, :]
    tl.store(acc_offs, acc1, mask=rmask[:, None])
    tl.store(acc_offs + HALF, acc2, mask=rmask[:, None])
    tl.store(ml_ptr + part * 2 * G + r, m_i, mask=rmask)
    tl.store(ml_ptr + part * 2 * G + G + r, l_i, mask=rmask)

    # Ticket: every thread's partial stores come before it (barrier, then a release).
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr + group, 1, sem="acq_rel")
    if ticket == NSPLIT - 1:
        tl.debug_barrier()  # the acquire above comes before every thread's loads
        # The last split merges all partials: [NSP, GP] maxima and sums, [NSP, GP, HALF],
        # loaded at L2 (.cg), where the other programs' stores are visible.
        s_all = tl.arange(0, NSP)
        ml_offs = (group * NSPLIT + s_all)[:, None] * 2 * G + r[None, :]
        pmask = (s_all < NSPLIT)[:, None] & rmask[None, :]
        m_s = tl.load(ml_ptr + ml_offs, mask=pmask, other=-1.0e30, cache_modifier=".cg")
        l_s = tl.load(ml_ptr + ml_offs + G, mask=pmask, other=0.0, cache_modifier=".cg")
        a_offs = (
            acc_ptr
            + (group * NSPLIT + s_all)[:, None, None] * G * hd
            + r[None, :, None] * hd
            + d[None, None, :]
        )
        a1 = tl.load(a_offs, mask=pmask[:, :, None], other=0.0, cache_modifier=".cg")
        a2 = tl.load(a_offs + HALF, mask=pmask[:, :, None], other=0.0, cache_modifier=".cg")
        m = tl.max(m_s, 0)
        b = tl.exp2(m_s - m[None, :])
        l_sum = tl.sum(l_s * b, 0)
        l_sum = tl.where(rmask, l_sum, 1.0)  # padding rows: avoid 0 / 0
        o1 = tl.sum(a1 * b[:, :, None], 0) / l_sum[:, None]
        o2 = tl.sum(a2 * b[:, :, None], 0) / l_sum[:, None]
        out_offs = out_ptr + (row * NUM_HEADS + h * G + r)[:, None] * hd + d[None, :]
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_offs, o1.to(out_ty), mask=rmask[:, None])
        tl.store(out_offs + HALF, o2.to(out_ty), mask=rmask[:, None])

        # Every split's reads of this slot and head are done (each took its ticket after
        # them): store the new key (rotated) and value.
        index = tl.where(pos < S, pos, S + (pos - S) % W)
        kn_base = qkv_ptr + row * qkv_row_stride + (NUM_HEADS + h) * hd + d
        kn1, kn2 = _rope_halves(
            tl.load(kn_base).to(tl.float32),
            tl.load(kn_base + HALF).to(tl.float32),
            tl.load(cos_p_ptr + row * HALF + d),
            tl.load(sin_p_ptr + row * HALF + d),
        )
        dst = kv_base + index * hd + d
        cache_ty = k_ptr.dtype.element_ty
        tl.store(k_ptr + dst, kn1.to(cache_ty))
        tl.store(k_ptr + dst + HALF, kn2.to(cache_ty))
        vn_base = kn_base + NUM_KV_HEADS * hd
        tl.store(v_ptr + dst, tl.load(vn_base))
        tl.store(v_ptr + dst + HALF, tl.load(vn_base + HALF))
        tl.store(count_ptr + group, 0)  # ready for the next launch


def attention_config(
    rows: int, kv_heads: int, group: int, window: int, sm_count: int
) -> AttnConfig:
    """Launch shape for a batch of `rows` (the fastest of a grid measured on an H200; the
    sweep's figures are in bench/results/gpu-attention-sweep-nvidia-h200.json).

    Small batches split the window so that rows * kv_heads * splits covers the SMs about
    four times over; large ones still take at least two splits (8B shape, 64 rows: two
    beat one and four). One row with one query head per KV head (7B shape): 128-key tiles
    of multiply-and-sum on four warps (bench/gpu_attention_sweep.py: 15.5 us a layer on
    top of the projections, two warps 41.6; tensor-core tiles took 22.7 alone before PDL)."""
    want = -(-4 * sm_count // (rows * kv_heads))
    splits = max(2, min(want, -(-window // 64)))
    if group == 1 and rows == 1:
        return AttnConfig(splits=splits, block_n=128, num_warps=4, num_stages=1, dot=False)
    return AttnConfig(splits=splits)


def decode_attention(
    qkv: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kpos: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    out: torch.Tensor,
    *,
    sinks: int,
    window: int,
    config: AttnConfig,
    sm_scale: float,
    counters: torch.Tensor | None = None,
    pdl: bool = False,
) -> None:
    """Attention of one decode token per row, then store its K/V at its ring index.

    qkv [B, (nH + 2 nKV) * hd] (unrotated projections); rope = (cos_p, sin_p, cos_c, sin_c)
    float32 [B, hd / 2] at the absolute and the cache position; k_cache/v_cache
    [slots, nKV, S + W, hd]; kpos [slots, S + W] int64; slots, positions [B] int64;
    out [B, nH, hd] is written. Scores are q.k * sm_scale (1.0 where the model already
    folded hd^-0.5 into its q projection). `counters`: int32 zeros, at least B * nKV, left
    zeroed (allocated here when not given). They carry state from launch to launch: a
    CUDA graph that captured this call holds their address, not the tensor, so its owner
    must keep them alive (CudaGraphRunner.counters). `kpos` is not updated here (the
    caller commits positions once every layer has run). `pdl`: launch as a programmatic
    dependent of the previous kernel (Hopper and later; see `fused_ops`).
    """
    b, nh, hd = out.shape
    nkv = k_cache.shape[1]
    g = nh // nkv
    use_dot = g > 1 or config.dot
    gp = max(16, triton.next_power_of_2(g)) if use_dot else triton.next_power_of_2(g)
    half = hd // 2
    block_n = config.block_n
    split_len = triton.cdiv(triton.cdiv(window, config.splits), block_n) * block_n
    splits = triton.cdiv(window, split_len)
    dev = qkv.device
    acc = torch.empty(b * nkv * splits * g * hd, dtype=torch.float32, device=dev)
    ml = torch.empty(b * nkv * splits * 2 * g, dtype=torch.float32, device=dev)
    if counters is None:
        counters = torch.zeros(b * nkv, dtype=torch.int32, device=dev)
    cos_p, sin_p, cos_c, sin_c = rope
    _decode_kernel[(b, nkv, splits)](
        qkv,
        qkv.stride(0),
        cos_p,
        sin_p,
        cos_c,
        sin_c,
        k_cache,
        v_cache,
        k_cache.stride(0),
        k_cache.stride(1),
        kpos,
        slots,
        positions,
        acc,
        ml,
        counters,
        out,
        sm_scale * LOG2E,
        NUM_HEADS=nh,
        NUM_KV_HEADS=nkv,
        G=g,
        GP=gp,
        HALF=half,
        S=sinks,
        SP=max(16, triton.next_power_of_2(sinks)),
        W=window,
        NSPLIT=splits,
        NSP=max(2, triton.next_power_of_2(splits)),  # no size-1 axis in the merge
        SPLIT_LEN=split_len,
        BLOCK_N=block_n,
        USE_DOT=use_dot,
        PDL=pdl,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **pdl_options(pdl),
    )
