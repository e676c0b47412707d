"""A Llama-architecture decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over sink+ring KV slots.

The forward pass runs one engine step: a flat batch of T tokens from many sessions (decode
tokens and prefill chunks), described by a `StepPlan` from `kv_cache.plan_step`.

Positions (StreamingLLM, Xiao et al. 2024): a token attends to its session's S sink keys,
the W previous tokens and itself, with RoPE positions counted *within that cache*. Because
a RoPE score depends only on the distance between the query's and the key's rotations,
keys are stored rotated once, at their absolute position, and never re-rotated:
- window keys vs. the query at its absolute position t: distance t - a, the same as the
  distance within the cache;
- sink keys (absolute = cache position i < S) vs. the query rotated at its cache position
  min(t, S + W): distance min(t, S + W) - i, as the paper prescribes.
So each query is rotated twice (`q_abs`, `q_sink`) instead of re-rotating S + W keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sinkserve.config import QUANTS
from sinkserve.engine.kv_cache import ChunkGroup, DecodePlan, KVCache, StepPlan
from sinkserve.engine.quant import (
    AMX_DENSE,
    PLAIN_DENSE,
    Weight,
    can_quantize,
    cpu_has_amx,
    linear,
    pack,
    quantize_int4,
    quantize_int8,
)
from sinkserve.engine.rope import inv_frequencies, rope_tables
from sinkserve.engine.weights import ModelConfig

HEAD_INT8_ROWS = 8  # see Llama.lm_head


@dataclass
class Layer:
    attn_norm: torch.Tensor
    wqkv: Weight  # [(nH + 2 nKV) * hd, H]: q (pre-scaled by hd^-0.5), k, v in one matmul
    bqkv: torch.Tensor | None
    wo: Weight
    ffn_norm: torch.Tensor
    w_gate_up: Weight  # [2 I, H]: gate and up fused
    w_down: Weight


class Llama:
    """Weights (fused for few kernel launches) plus the step forward pass.

    The attention scale hd^-0.5 is folded into the q rows of `wqkv` (and its bias), so no
    layer multiplies scores by it. `quant="int4"` stores the layers' projection weights as
    group-wise int4 (see `quant.py`); the embedding and the output head stay dense.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        tensors: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        quant: str = "none",
    ) -> None:
        if quant not in QUANTS:
            raise ValueError(f"quant={quant!r}: must be one of {', '.join(QUANTS)}")
        self.cfg = cfg
        self.dtype = dtype
        self.device = device
        self.quant = quant
        # The KV cache's dtype. On CPU always float32: decode attention runs in float32
        # (CPU bfloat16 batched matmuls of these small shapes are slow), and upcasting a
        # bfloat16 cache on every read cost 40% of a 32-session step; it doubles a
        # bfloat16 model's slot size (SmolLM2 4+1020: 24 -> 47 MB).
        self.kv_dtype = torch.float32 if device.type == "cpu" else dtype
        scale = cfg.head_dim**-0.5

        def get(name: str, mul: float = 1.0) -> torch.Tensor:
            t = tensors[name].to(device=device, dtype=torch.float32)
            return (t * mul if mul != 1.0 else t).to(dtype)

        # With AMX, bfloat16 weights multiply fastest prepacked for oneDNN (quant.py).
        on_cpu = device.type == "cpu"
        amx = on_cpu and cpu_has_amx()
        dense = AMX_DENSE if amx else PLAIN_DENSE

        def weight(w: torch.Tensor) -> Weight:
            if quant == "int4" and can_quantize(w):
                return quantize_int4(w, dtype, dense)
            if amx and dtype == torch.bfloat16:
                return pack(w, dtype)
            return w

        self.embed = get("embed")
        # The residual stream and the norms stay float32 whatever the weights' dtype.
        self.norm = tensors["norm"].to(device=device, dtype=torch.float32)
        # The output head. `lm_head` in the model's dtype (what the CUDA runner reads);
        # `head` is what `forward` uses: on CPU float32 prepacked for oneDNN, so that steps
        # of many rows get float32 logits (a packed bfloat16 head is faster with AMX, 2.9
        # against 8.4 ms at 32 rows, but answers in bfloat16). With int4 also a per-row
        # int8 copy for steps of fewer than HEAD_INT8_ROWS logit rows, where reading a
        # quarter of the bytes pays (SmolLM2, 2 cores, the head not in cache, int8 / packed
        # float32: 1 row 2.5 / 4.4 ms, 6 rows 5.1 / 5.3, 8 rows 5.9 / 5.7, 32 rows 19.3 /
        # 10.0). GGUF files keep the head at 6-8 bits: int4 there costs several percent of
        # perplexity, int8 almost nothing.
        self.lm_head = self.embed if cfg.tie_embeddings else get("lm_head")
        self.head: Weight = pack(self.lm_head, torch.float32) if on_cpu else self.lm_head
        self.lm_head_int8 = quantize_int8(self.lm_head, dtype) if quant == "int4" else None
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            bias = (
                torch.cat([get(p + "bq", scale), get(p + "bk"), get(p + "bv")])
                if cfg.qkv_bias
                else None
            )
            self.layers.append(
                Layer(
                    attn_norm=tensors[p + "attn_norm"].to(device, torch.float32),
                    wqkv=weight(torch.cat([get(p + "wq", scale), get(p + "wk"), get(p + "wv")])),
                    bqkv=bias,
                    wo=weight(get(p + "wo")),
                    ffn_norm=tensors[p + "ffn_norm"].to(device, torch.float32),
                    w_gate_up=weight(torch.cat([get(p + "w_gate"), get(p + "w_up")])),
                    w_down=weight(get(p + "w_down")),
                )
            )
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)

    def forward(self, kv: KVCache, plan: StepPlan) -> torch.Tensor:
        """Run one step, write its keys/values into `kv`, return float32 logits for
        `plan.logit_rows` ([n, vocab])."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # [2, T, 1, hd]: row 0 rotates to the absolute position, row 1 to the cache position.
        cos, sin = rope_tables(plan.positions, plan.cache_positions, self.inv_freq, self.dtype)
        dt, width = self.dtype, (cfg.hidden_size,)
        x = F.embedding(plan.tokens, self.embed).float()
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, width, layer.attn_norm, cfg.rms_eps).to(dt)
            qkv = linear(h, layer.wqkv, layer.bqkv)
            # q and k heads rotated together, to both angle sets, in three ops.
            qk = qkv[:, : (nh + nkv) * hd].unflatten(1, (nh + nkv, hd))  # type: ignore[no-untyped-call]
            swapped = qk.unflatten(2, (2, hd // 2)).flip(2).flatten(2)
            rot = torch.addcmul(qk * cos, swapped, sin)  # [2, T, nH + nKV, hd]
            q_abs, k, q_sink = rot[0, :, :nh], rot[0, :, nh:], rot[1, :, :nh]
            v = qkv[:, (nh + nkv) * hd :].unflatten(1, (nkv, hd))  # type: ignore[no-untyped-call]
            if plan.decode is not None and not plan.chunks:
                attn = _decode_attention(kv, li, plan.decode, q_abs, q_sink, k, v)
            else:
                attn = torch.empty_like(q_abs)
                if plan.decode is not None:
                    rows = slice(0, plan.decode.num_rows)
                    attn[rows] = _decode_attention(
                        kv, li, plan.decode, q_abs[rows], q_sink[rows], k[rows], v[rows]
                    )
                for group in plan.chunks:
                    r = group.rows
                    out = _chunk_attention(kv, li, group, q_abs[r], q_sink[r], k[r], v[r])
                    attn.index_copy_(0, r, out)
            kv.write(li, plan, k, v)
            x = x + linear(attn.reshape(-1, nh * hd), layer.wo)
            h = F.rms_norm(x, width, layer.ffn_norm, cfg.rms_eps).to(dt)
            gate, up = linear(h, layer.w_gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, layer.w_down)
        kv.commit_positions(plan)
        return self.logits(x[plan.logit_rows])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, vocab] of last-layer residual rows x [n, hidden]."""
        out = F.rms_norm(x, (self.cfg.hidden_size,), self.norm, self.cfg.rms_eps)
        head = self.head  # float32 logits whichever head: linear casts out as it needs
        if self.lm_head_int8 is not None and out.shape[0] < HEAD_INT8_ROWS:
            head = self.lm_head_int8
        return linear(out, head).float()


def _softmax(scores: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(dtype)


def _decode_attention(
    kv: KVCache,
    layer: int,
    plan: DecodePlan,
    q_abs: torch.Tensor,
    q_sink: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> torch.Tensor:
    """One query per session: keys = the session's cache (sinks + ring) + its own key.
    Only the first `plan.length` cache entries are read: no session of the group has
    more keys than that (short sessions do not pay for the whole window)."""
    b, nh, hd = q_abs.shape
    nkv = k_new.shape[1]
    g = nh // nkv
    kc, vc = kv.gather(layer, plan)  # [B, nKV, L, hd]; a group's g query heads share one
    # float32 math (the CPU cache is float32 already, see `Llama.kv_dtype`).
    kc, vc = kc.float(), vc.float()
    qa = q_abs.float().view(b, nkv, g, hd)  # the g heads are rows of one matmul per (B, nKV)
    scores = qa @ kc.transpose(-1, -2)  # [B, nKV, g, L]
    if kv.sinks:
        qs = q_sink.float().view(b, nkv, g, hd)
        scores[..., : kv.sinks] = qs @ kc[..., : kv.sinks, :].transpose(-1, -2)
    self_score = (qa * k_new[:, :, None, :]).sum(-1, keepdim=True)
    scores = torch.cat([scores, self_score], dim=-1) + plan.bias
    p = torch.softmax(scores, dim=-1)
    out = torch.addcmul(p[..., :-1] @ vc, p[..., -1:], v_new[:, :, None, :])
    return out.reshape(b, nh, hd).to(q_abs.dtype)


def _chunk_attention(
    kv: KVCache,
    layer: int,
    group: ChunkGroup,
    q_abs: torch.Tensor,
    q_sink: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
) -> torch.Tensor:
    """B prefill chunks of L tokens, one session each: keys = the session's cache + its
    chunk. Rows chunk after chunk, [B * L, heads, hd] in and out."""
    b = group.slots.shape[0]
    n, nh, hd = q_abs.shape
    length, nkv = n // b, k_new.shape[1]
    g = nh // nkv
    kc, vc = kv.k[layer][group.slots], kv.v[layer][group.slots]  # [B, nKV, C, hd]
    dt = kc.dtype  # the math runs in the cache's dtype

    def chunked(t: torch.Tensor, heads: int) -> torch.Tensor:  # -> [B, heads, L, hd]
        return t.to(dt).view(b, length, heads, hd).transpose(1, 2)

    keys = torch.cat([kc, chunked(k_new, nkv)], dim=2)[:, :, None]  # [B, nKV, 1, C + L, hd]
    vals = torch.cat([vc, chunked(v_new, nkv)], dim=2)[:, :, None]
    qa = chunked(q_abs, nh).unflatten(1, (nkv, g))  # type: ignore[no-untyped-call]  # [B, nKV, g, L, hd]
    qs = chunked(q_sink, nh).unflatten(1, (nkv, g))  # type: ignore[no-untyped-call]
    scores = qa @ keys.transpose(-1, -2)  # [B, nKV, g, L, C + L]
    if kv.sinks:
        scores[..., : kv.sinks] = qs @ kc[:, :, None, : kv.sinks].transpose(-1, -2)
    if group.new_sink_cols is not None:
        # A chunk holds its session's first tokens (its sinks): queries past the window
        # must see them at their cache distance too.
        c = kc.shape[2]
        sink_scores = qs @ keys[..., c:, :].transpose(-1, -2)
        scores[..., c:] = torch.where(group.new_sink_cols, sink_scores, scores[..., c:])
    p = _softmax(scores, group.mask, dt)
    out = p @ vals  # [B, nKV, g, L, hd]
    return out.flatten(1, 2).transpose(1, 2).reshape(n, nh, hd).to(q_abs.dtype)
