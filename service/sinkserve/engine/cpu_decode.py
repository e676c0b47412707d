"""Decode steps in one C++ call (CPU).

A decode step of one session spends far longer in the ~250 ATen calls a layer between
the matmuls (norms, RoPE, attention on rows of a few hundred values, each call costing
microseconds of dispatch) than in arithmetic. `cpu_decode.cpp` runs a whole step of
single-token rows: the matmuls through the same kernels as `quant.linear` (int4 weights
through cpu_matvec's kernels below 8 rows where they have its layout and ATen's above, or
from `Int4Weight.dense_rows` rows their dense copies prepacked for oneDNN; prepacked
bfloat16; plain float32 or bfloat16), everything between them as plain loops, attention
split over the rows and KV heads on torch's intra-op threads. The embedding, the final
norm and the output head stay in `Llama` (one call each). Numerics agree with the eager
path to float32 rounding for float32 models and to bfloat16 rounding for bfloat16 ones
(`tests/engine/test_cpu_decode.py`, and the float32 oracle tests, whose decode steps
take this path).

The C++ is `cpu_ext`'s extension; where it cannot be built the engine keeps the eager
path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from sinkserve.engine import cpu_ext
from sinkserve.engine.kv_cache import KVCache
from sinkserve.engine.model import Layer, Llama
from sinkserve.engine.quant import Int4Weight, PackedWeight, Weight
from sinkserve.engine.rope import rope_tables
from sinkserve.engine.scheduler import StepItem


def projections(layer: Layer) -> tuple[Weight, ...]:
    return layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down


class FusedDecode:
    """The C++ decode step bound to one model's weights and one KV cache."""

    def __init__(self, model: Llama, kv: KVCache) -> None:
        cfg = model.cfg
        self.model = model
        weights = [w for layer in model.layers for w in projections(layer)]
        first = weights[0]
        int4 = [w for w in weights if isinstance(w, Int4Weight)]
        rowpacks = [w.rowpack for w in int4 if w.rowpack is not None]
        self.impl = cpu_ext.extension().FusedDecode(
            [n for layer in model.layers for n in (layer.attn_norm, layer.ffn_norm)],
            [layer.bqkv for layer in model.layers if layer.bqkv is not None],
            [w.packed if isinstance(w, Int4Weight | PackedWeight) else w for w in weights],
            [w.scales_zeros for w in int4],
            [w.dense.packed for w in int4],
            rowpacks if len(rowpacks) == len(weights) else [],
            [c for k, v in zip(kv.k, kv.v, strict=True) for c in (k, v)],
            kv.kpos,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            kv.sinks,
            kv.window,
            first.group if isinstance(first, Int4Weight) else 0,
            first.dense_rows if isinstance(first, Int4Weight) else 0,
            cfg.rms_eps,
        )
        self.bfloat16 = model.dtype == torch.bfloat16
        self.limit = kv.sinks + kv.window

    @staticmethod
    def build(model: Llama, kv: KVCache) -> FusedDecode | None:
        """The fused step where it applies (CPU, a float32 cache, every projection of one
        kind: int4, prepacked or plain in the model's dtype) and the extension builds; None
        otherwise (the caller keeps the eager path)."""
        weights = [w for layer in model.layers for w in projections(layer)]
        kinds = {type(w) for w in weights}
        applies = (
            model.device.type == "cpu"
            and kv.k[0].dtype == torch.float32
            and model.dtype in (torch.float32, torch.bfloat16)
            and len(kinds) == 1
            and kinds <= {Int4Weight, PackedWeight, torch.Tensor}
            and all(not isinstance(w, torch.Tensor) or w.dtype == model.dtype for w in weights)
        )
        if not applies or not cpu_ext.available():
            return None
        return FusedDecode(model, kv)

    def takes(self, items: Sequence[StepItem]) -> bool:
        """Whether this step is single-token rows only (distinct slots, as in any step)."""
        return len(items) > 0 and all(len(it.tokens) == 1 for it in items)

    @torch.inference_mode()
    def logits(self, items: Sequence[StepItem]) -> torch.Tensor:
        """Feed one token per item; float32 logits [n, vocab] for the items that want
        them, in item order (as `Llama.forward` answers)."""
        m = self.model
        tokens = torch.tensor([it.tokens[0] for it in items])
        positions = torch.tensor([it.start for it in items])
        slots = torch.tensor([it.slot for it in items])
        cos, sin = rope_tables(
            positions, positions.clamp(max=self.limit), m.inv_freq, torch.float32
        )
        x = F.embedding(tokens, m.embed).float()
        x = self.impl.step(x, slots, positions, cos.squeeze(2), sin.squeeze(2), self.bfloat16)
        wanted = [i for i, it in enumerate(items) if it.want_logits or it.all_logits]
        if len(wanted) < len(items):
            x = x[wanted]
        return m.logits(x)
