"""Attention launch shapes in context (GPU; one JSON object).

    python3 bench/gpu_attention_sweep.py [--out DIR]

Llama-2-7B shape, batch 1, full 4+2044 cache: a CUDA graph of 32 layers, each a qkv GEMV,
the sink + ring attention and the output GEMV, all with programmatic dependent launch as
the runner issues them. Microseconds a layer for each launch shape, and for the GEMVs
alone: the difference is what the attention costs inside a step, overlap included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from triton.testing import do_bench_cudagraph

# The checkout (for `bench.*`) and service/ (for `sinkserve`): GPU hosts run these
# scripts from a copy of the repository, without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import save_result
from sinkserve.engine.kernels.fused_ops import gemv
from sinkserve.engine.kernels.sink_attention import AttnConfig, decode_attention
from sinkserve.engine.rope import cos_sin, inv_frequencies

SHAPES = [  # (splits, block_n, num_warps, num_stages)
    (17, 128, 4, 1), (17, 128, 8, 1), (16, 128, 4, 1), (24, 128, 4, 1), (32, 64, 4, 1),
    (32, 64, 2, 1), (9, 256, 8, 1), (9, 256, 4, 1), (33, 64, 4, 2), (17, 128, 4, 2),
    (12, 256, 8, 1), (64, 32, 2, 1), (64, 32, 4, 1),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    nh = nkv = 32
    hd, s, w, layers, t0, h = 128, 4, 2044, 32, 100_000, 4096
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=dev, dtype=bf) * 0.02

    # Distinct tensors per layer, as in a step: nothing stays in L2 from layer to layer.
    kc = [torch.randn(2, nkv, s + w, hd, generator=g, device=dev, dtype=bf) for _ in range(layers)]
    vc = [torch.randn_like(k) for k in kc]
    wqkv = [rnd(3 * h, h) for _ in range(layers)]
    wo = [rnd(h, h) for _ in range(layers)]
    kpos = torch.full((2, s + w), -1, dtype=torch.long, device=dev)
    pos = torch.cat([torch.arange(s), torch.arange(t0 - w, t0)]).to(dev)
    kpos[0, torch.where(pos < s, pos, s + (pos - s) % w)] = pos
    x = rnd(1, h)
    positions = torch.tensor([t0], device=dev)
    slots = torch.tensor([0], device=dev)
    inv = inv_frequencies(hd, 10000.0, None).to(dev)
    rope = (
        *cos_sin(positions, inv, torch.float32),
        *cos_sin(positions.clamp(max=s + w), inv, torch.float32),
    )
    o = torch.empty(1, nh, hd, device=dev, dtype=bf)
    counters = torch.zeros(nkv, dtype=torch.int32, device=dev)

    def layer_us(config: AttnConfig | None) -> float:
        def run() -> None:
            positions.fill_(t0)  # the kernel stores at t0's ring index; reads stay the same
            for li in range(layers):
                qkv = gemv(x, wqkv[li], pdl=True)
                if config is not None:
                    decode_attention(
                        qkv, rope, kc[li], vc[li], kpos, slots, positions, o, sinks=s,
                        window=w, config=config, sm_scale=hd**-0.5, counters=counters, pdl=True,
                    )  # fmt: skip
                gemv(o.view(1, -1), wo[li], pdl=True)

        return float(do_bench_cudagraph(run, rep=300)) * 1e3 / layers

    per_layer = {
        f"s{sp}_b{bn}_w{nw}_st{st}": layer_us(AttnConfig(sp, bn, nw, st, dot=False))
        for sp, bn, nw, st in SHAPES
    }
    per_layer["gemv_only"] = layer_us(None)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(dev), "us_per_layer": per_layer}
    save_result(args.out, "gpu-attention-sweep", out["device"], out)


if __name__ == "__main__":
    main()
