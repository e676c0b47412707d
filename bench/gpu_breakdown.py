"""Where a Llama-2-7B-shape batch-1 decode step goes (GPU; one JSON object).

    python3 bench/gpu_breakdown.py [--out DIR]

Times each kernel of one layer alone inside a CUDA graph (triton.testing.do_bench_cudagraph,
without programmatic dependent launch): the four projections (achieved bandwidth over their
weight bytes), the attention kernel at a full 4+2044 cache with the runner's launch shape
and several others, the fused norm and SiLU kernels; then the per-step sum (runner's
shapes) against the roofline.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

# The checkout (for `bench.*`) and service/ (for `sinkserve`): GPU hosts run these
# scripts from a copy of the repository, without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import copy_bandwidth, save_result
from sinkserve.engine.kernels.fused_ops import add_rms_norm, gemv, silu_mul
from sinkserve.engine.kernels.sink_attention import AttnConfig, attention_config, decode_attention
from sinkserve.engine.rope import cos_sin, inv_frequencies


def bench_ms(fn: Callable[[], object]) -> float:
    return float(do_bench_cudagraph(fn, rep=200))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    h, ffn, vocab, nh, nkv, hd, layers, s, w = 4096, 11008, 32000, 32, 32, 128, 32, 4, 2044
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=dev, dtype=bf) * 0.02

    copy_bw = copy_bandwidth(dev, 1 << 32)  # as bench/gpu.py measures it
    x = rnd(1, h)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev),
        "copy_bandwidth_GBps": copy_bw / 1e9,
    }
    projections = {}
    for name, (n_out, n_in) in {
        "wqkv": (3 * h, h),
        "wo": (h, h),
        "w_gate_up": (2 * ffn, h),
        "w_down": (h, ffn),
        "lm_head": (vocab, h),
    }.items():
        wt, a = rnd(n_out, n_in), rnd(1, n_in)
        ms = bench_ms(partial(F.linear, a, wt))
        ms_t = bench_ms(partial(gemv, a, wt))
        projections[name] = {
            "us": min(ms, ms_t) * 1e3,
            "cublas_GBps": wt.numel() * 2 / (ms / 1e3) / 1e9,
            "triton_gemv_GBps": wt.numel() * 2 / (ms_t / 1e3) / 1e9,
        }
    out["projections"] = projections

    kc = torch.randn(2, nkv, s + w, hd, generator=g, device=dev, dtype=bf)
    vc = torch.randn_like(kc)
    t0 = 100_000
    kpos = torch.full((2, s + w), -1, dtype=torch.long, device=dev)
    pos = torch.cat([torch.arange(s), torch.arange(t0 - w, t0)]).to(dev)
    kpos[0, torch.where(pos < s, pos, s + (pos - s) % w)] = pos
    qkv = rnd(1, (nh + 2 * nkv) * hd)
    positions = torch.tensor([t0], device=dev)
    slots = torch.tensor([0], device=dev)
    inv = inv_frequencies(hd, 10000.0, None).to(dev)
    rope = (
        *cos_sin(positions, inv, torch.float32),
        *cos_sin(positions.clamp(max=s + w), inv, torch.float32),
    )
    o = torch.empty(1, nh, hd, device=dev, dtype=bf)
    kv_bytes = 2 * kc[0].numel() * 2
    attn = {}
    counters = torch.zeros(nkv, dtype=torch.int32, device=dev)
    sm_count = torch.cuda.get_device_properties(dev).multi_processor_count
    configs = {"runner": attention_config(1, nkv, nh // nkv, w, sm_count)}
    for splits in (4, 8, 16, 32):
        for block_n in (32, 64, 128):
            configs[f"splits{splits}_block{block_n}"] = AttnConfig(splits, block_n)
    for name, config in configs.items():

        def run(config: AttnConfig = config) -> None:
            positions.fill_(t0)  # the kernel stores at t0's ring index; reads stay the same
            decode_attention(
                qkv, rope, kc, vc, kpos, slots, positions, o, sinks=s, window=w,
                config=config, sm_scale=hd**-0.5, counters=counters,
            )  # fmt: skip

        ms = bench_ms(run)
        attn[name] = {"us": ms * 1e3, "GBps": kv_bytes / (ms / 1e3) / 1e9}
    out["attention_one_layer"] = attn
    norm_w = torch.ones(h, device=dev, dtype=bf)
    out["add_rms_norm_us"] = bench_ms(lambda: add_rms_norm(x, x, norm_w, 1e-5)) * 1e3
    gu = rnd(1, 2 * ffn)
    out["silu_mul_us"] = bench_ms(lambda: silu_mul(gu)) * 1e3
    per_layer = (
        sum(projections[k]["us"] for k in ("wqkv", "wo", "w_gate_up", "w_down"))
        + attn["runner"]["us"]
        + 2 * out["add_rms_norm_us"]
        + out["silu_mul_us"]
    )
    weights = (3 * h * h + h * h + 3 * ffn * h) * 2 * layers + vocab * h * 2
    roof_ms = (weights + layers * (kv_bytes + (s + w) * 8)) / copy_bw * 1e3
    out["sum_of_kernels_ms"] = (layers * per_layer + projections["lm_head"]["us"]) / 1e3
    out["roofline_ms"] = roof_ms
    save_result(args.out, "gpu-breakdown", out["device"], out)


if __name__ == "__main__":
    main()
