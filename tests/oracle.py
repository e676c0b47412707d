"""The plain StreamingLLM method, written to be obviously correct rather than fast.

One session, one token at a time, no batching. Keys are kept *before* RoPE; after each
token the cache is cut to the S first tokens plus the W previous ones, and every key is
re-rotated at its index within the cache, the query at the last index (Xiao et al. 2024,
and the reference code's approach). The engine must match it.
"""

from __future__ import annotations

import math

import torch

from sinkserve.engine.rope import inv_frequencies
from sinkserve.engine.weights import ModelConfig


def _rope(x: torch.Tensor, position: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of one vector x [hd] at an integer position, angles in float64."""
    half = x.shape[-1] // 2
    angle = position * inv_freq
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean() + eps) * w


class PlainStreamingLLM:
    """A single session of plain StreamingLLM over a float32 weights dict."""

    def __init__(
        self, cfg: ModelConfig, tensors: dict[str, torch.Tensor], sinks: int, window: int
    ) -> None:
        self.cfg, self.w = cfg, {k: t.float() for k, t in tensors.items()}
        self.sinks, self.window = sinks, window
        self.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]

    def step(self, token: int) -> torch.Tensor:
        """Feed one token; return the float32 logits [vocab] that follow it."""
        cfg, w = self.cfg, self.w
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        x = w["embed"][token].clone()
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            h = _rms(x, w[p + "attn_norm"], cfg.rms_eps)
            q, k, v = w[p + "wq"] @ h, w[p + "wk"] @ h, w[p + "wv"] @ h
            if cfg.qkv_bias:
                q, k, v = q + w[p + "bq"], k + w[p + "bk"], v + w[p + "bv"]
            self.keys[i].append(k.view(nkv, hd))
            self.values[i].append(v.view(nkv, hd))
            if len(self.keys[i]) > self.sinks + self.window + 1:  # evict the oldest non-sink
                del self.keys[i][self.sinks]
                del self.values[i][self.sinks]
            n = len(self.keys[i])
            out: list[torch.Tensor] = []
            for head in range(nh):
                kvh = head // (nh // nkv)
                qh = _rope(q.view(nh, hd)[head], n - 1, self.inv_freq)
                scores = torch.stack(
                    [
                        _rope(self.keys[i][j][kvh], j, self.inv_freq) @ qh / math.sqrt(hd)
                        for j in range(n)
                    ]
                )
                probs = torch.softmax(scores, dim=0)
                weighted = (probs[j] * self.values[i][j][kvh] for j in range(n))
                out.append(sum(weighted, torch.zeros_like(qh)))  # a tensor start: a tensor sum
            x = x + w[p + "wo"] @ torch.cat(out)
            h = _rms(x, w[p + "ffn_norm"], cfg.rms_eps)
            gate, up = w[p + "w_gate"] @ h, w[p + "w_up"] @ h
            x = x + w[p + "w_down"] @ (torch.nn.functional.silu(gate) * up)
        lm_head = w["embed"] if cfg.tie_embeddings else w["lm_head"]
        return lm_head @ _rms(x, w["norm"], cfg.rms_eps)
