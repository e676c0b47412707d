"""The StreamingLLM reference method on a Hugging Face transformers Llama (benchmark only).

As in mit-han-lab/streaming-llm: batch 1, keys kept *before* RoPE, after each token the
cache is cut to the S first plus the W last entries (a `torch.cat` of the two slices per
layer), and every step re-rotates the whole cache at positions 0..n-1 within the cache,
the query at n-1; eager attention (matmul, float32 softmax, matmul). Where this leaves
the reference code it is in the reference's favour: no attention-mask add, cos/sin rows
sliced from one table rather than gathered by position ids.

`step` runs the model's own forward (`hf(input_ids)`) with every attention module's
`forward` replaced, which is how the reference code hooks in; `lean_step` calls the same
modules from a plain loop, without transformers' per-layer machinery (a faster variant
of the same method, reported beside it). `PlainDecode` is no StreamingLLM at all: the
model's own forward over a DynamicCache kept at a fixed length, no re-rotation (the
issue's orientation figure, to tell a slow host from a slow method).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, repeat_kv, rotate_half


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of one tensor [1, heads, n, hd] at the table's n rows (the reference's
    single-tensor rotation; transformers' `apply_rotary_pos_emb` would rotate two)."""
    rotated: torch.Tensor = x * cos + rotate_half(x) * sin
    return rotated


class HFStreamingReference:
    """One session over `hf` (a `LlamaForCausalLM`) with pre-RoPE K/V caches."""

    def __init__(self, hf: LlamaForCausalLM, sinks: int, window: int) -> None:
        self.hf, self.sinks, self.window = hf, sinks, window
        cfg = hf.config
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.hidden_size // self.nh
        dev = hf.lm_head.weight.device
        # The cos/sin table of the reference code (rotary_emb's cached table), float32 math.
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        inv = 1.0 / (theta ** (torch.arange(0, self.hd, 2, device=dev).float() / self.hd))
        angles = torch.outer(torch.arange(sinks + window + 1, device=dev).float(), inv)
        emb = torch.cat([angles, angles], dim=-1)
        dtype = hf.lm_head.weight.dtype
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.keys: list[torch.Tensor] = []  # per layer [1, nKV, n, hd], pre-RoPE
        self.values: list[torch.Tensor] = []

    def set_cache(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = list(keys), list(values)

    def patch(self) -> None:
        """Replace each layer's attention forward with the pos-shift one (idempotent)."""
        for i, layer in enumerate(self.hf.model.layers):
            attn = layer.self_attn

            def forward(
                hidden_states: torch.Tensor,
                *args: object,
                _i: int = i,
                _attn: LlamaAttention = attn,
                **kwargs: object,
            ) -> tuple[torch.Tensor, None]:
                return self._attention(_i, _attn, hidden_states), None

            attn.forward = forward

    def _attention(self, i: int, attn: LlamaAttention, h: torch.Tensor) -> torch.Tensor:
        q = attn.q_proj(h).view(1, 1, self.nh, self.hd).transpose(1, 2)
        k = attn.k_proj(h).view(1, 1, self.nkv, self.hd).transpose(1, 2)
        v = attn.v_proj(h).view(1, 1, self.nkv, self.hd).transpose(1, 2)
        keys = torch.cat([self.keys[i], k], dim=2) if len(self.keys) > i else k
        values = torch.cat([self.values[i], v], dim=2) if len(self.values) > i else v
        n = keys.shape[2]
        cos, sin = self.cos[:n], self.sin[:n]
        q_rot = rotate(q, cos[n - 1 :], sin[n - 1 :])
        k_rot = rotate(keys, cos, sin)  # the whole cache, again
        k_rot = repeat_kv(k_rot, self.nh // self.nkv)
        vals = repeat_kv(values, self.nh // self.nkv)
        scores = q_rot @ k_rot.transpose(2, 3) / self.hd**0.5
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ vals).transpose(1, 2).reshape(1, 1, self.nh * self.hd)
        self._store(i, keys, values)
        projected: torch.Tensor = attn.o_proj(out)
        return projected

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token through the model's own forward; return float32 logits [vocab]."""
        self.patch()
        dev = self.hf.lm_head.weight.device
        out = self.hf(input_ids=torch.tensor([[token]], device=dev), use_cache=False)
        logits: torch.Tensor = out.logits[0, -1]
        return logits.float()

    @torch.inference_mode()
    def lean_step(self, token: int) -> torch.Tensor:
        """The same step from a plain loop over the modules; float32 logits [vocab]."""
        model = self.hf.model
        dev = self.hf.lm_head.weight.device
        x = model.embed_tokens(torch.tensor([[token]], device=dev))
        for i, layer in enumerate(model.layers):
            x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits: torch.Tensor = self.hf.lm_head(model.norm(x))
        return logits[0, -1].float()

    def _store(self, i: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Evict to S sinks + W recent, as StartRecentKVCache does after each step."""
        s, w = self.sinks, self.window
        if keys.shape[2] > s + w:
            keys = torch.cat([keys[:, :, :s], keys[:, :, -w:]], dim=2)
            values = torch.cat([values[:, :, :s], values[:, :, -w:]], dim=2)
        if len(self.keys) <= i:
            self.keys.append(keys)
            self.values.append(values)
        else:
            self.keys[i], self.values[i] = keys, values


class PlainDecode:
    """Plain decode through `hf`'s own forward and attention implementation, a DynamicCache
    holding `keys`/`values` and cut back to their length after every step; greedy from
    `token`, one token id read back a step (as the reference loop)."""

    def __init__(
        self, hf: LlamaForCausalLM, keys: list[torch.Tensor], values: list[torch.Tensor], token: int
    ) -> None:
        self.hf, self.n, self.token = hf, keys[0].shape[2], token
        self.cache = DynamicCache(config=hf.config)
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.cache.update(k.clone(), v.clone(), i)

    @torch.inference_mode()
    def step(self) -> None:
        """One greedy step, with the model's attention implementation as set."""
        ids = torch.tensor([[self.token]], device=self.hf.lm_head.weight.device)
        out = self.hf(input_ids=ids, past_key_values=self.cache, use_cache=True)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, -self.n :], layer.values[:, :, -self.n :]
        self.token = int(out.logits[0, -1].argmax())
