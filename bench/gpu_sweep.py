"""One-call tuning sweep of the batch-1 decode kernels on the GPU (one JSON object).

    python3 bench/gpu_sweep.py [--out DIR] [--old PATH_TO_OLD_sink_attention.py]

Side by side in one process: copy bandwidth; every projection of the 7B/8B shapes through
cuBLAS (as stored, and pre-transposed) and the Triton GEMV over a grid of tiles; the decode
attention kernel over splits / tile / warps / stages for 7B batch 1, 8B batch 1 and 8B
batch 64 (each output checked against the previous kernel's, when given); then whole
decode steps (CUDA graph replay) under several tunings. Every timing is a CUDA graph of
many calls cycling over enough distinct weights or caches to leave the L2 cold.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import LLAMA2_7B, LLAMA3_8B, decode_rate, fill_full_caches, kv_bytes, weights_bytes
from service.config import EngineConfig
from service.engine import cuda_runner
from service.engine.fused_ops import gemv
from service.engine.model import Llama
from service.engine.rope import cos_sin, inv_frequencies
from service.engine.sink_attention import AttnConfig, decode_attention

DEV = torch.device("cuda")
BF = torch.bfloat16


def graph_time_us(calls: list, reps: int = 10) -> float:
    """Median over reps of one replay of a graph holding `calls` in order, per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del g
    return statistics.median(times)


def copy_bw() -> float:
    src = torch.randint(0, 255, (1 << 32,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = graph_time_us([lambda: dst.copy_(src)] * 4)
    return 2 * src.numel() / (us / 1e6) / 1e9


GEMV_CONFIGS = [
    (bn, bk, w, st)
    for bn in (4, 8, 16, 32)
    for bk in (256, 512, 1024)
    for w in (4, 8)
    for st in (1, 3)
    if bn * bk // (32 * w) <= 64
]


def gemv_shape(name: str, n: int, k: int, silu: bool, g: torch.Generator) -> dict:
    nbytes = n * k * 2
    copies = max(2, -(-400_000_000 // nbytes))
    ws = [torch.randn(n, k, generator=g, device=DEV, dtype=BF) * 0.02 for _ in range(copies)]
    x = torch.randn(1, 2 * k if silu else k, generator=g, device=DEV, dtype=BF)
    a = cuda_runner.silu_mul(x) if silu else x
    ref = (a.float() @ ws[0].float().T).to(BF)
    calls_per = 32
    res: dict = {"bytes": nbytes}

    def timed(fn):
        calls = [partial(fn, ws[i % copies]) for i in range(calls_per)]
        us = graph_time_us(calls)
        return {"us": us, "GBps": nbytes / (us / 1e6) / 1e9}

    if silu:
        res["cublas_silu_mul_then_linear"] = timed(lambda w: F.linear(cuda_runner.silu_mul(x), w))
        res["cublas_linear_only"] = timed(lambda w: F.linear(a, w))
    else:
        res["cublas_linear"] = timed(lambda w: F.linear(x, w))
        wts = [w.t().contiguous() for w in ws[:2]]
        res["cublas_matmul_transposed"] = {
            **graph_time_and_bw([lambda wt=wts[i % 2]: x @ wt for i in range(calls_per)], nbytes)
        }
        del wts
    best = None
    for bn, bk, nw, st in GEMV_CONFIGS:
        key = f"triton_n{bn}_k{bk}_w{nw}_s{st}"
        try:
            y = gemv(x, ws[0], silu=silu, block_n=bn, block_k=bk, num_warps=nw, num_stages=st)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            r = timed(
                lambda w, bn=bn, bk=bk, nw=nw, st=st: gemv(
                    x, w, silu=silu, block_n=bn, block_k=bk, num_warps=nw, num_stages=st
                )
            )
            r["rel_err"] = err
        except Exception as exc:
            r = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        res[key] = r
        if "us" in r and (best is None or r["us"] < res[best]["us"]):
            best = key
    res["best_triton"] = best
    print(
        name,
        {
            k: round(v["us"], 2)
            for k, v in res.items()
            if isinstance(v, dict) and "us" in v and not k.startswith("triton")
        },
        best,
        res[best]["us"] if best else None,
        flush=True,
    )
    return res


def sweep_gemv() -> dict:
    h, out = 4096, {}
    shapes = {
        "wqkv": (3 * h, h, False),
        "wqkv_8b": (h + 2 * 1024, h, False),
        "wo": (h, h, False),
        "w_gate_up": (2 * 11008, h, False),
        "w_down_silu": (h, 11008, True),
        "w_gate_up_8b": (2 * 14336, h, False),
        "w_down_silu_8b": (h, 14336, True),
        "lm_head": (32000, h, False),
    }
    g = torch.Generator(device=DEV).manual_seed(0)
    for name, (n, k, silu) in shapes.items():
        out[name] = gemv_shape(name, n, k, silu, g)
        torch.cuda.empty_cache()
    return out


def graph_time_and_bw(calls, nbytes) -> dict:
    us = graph_time_us(calls)
    return {"us": us, "GBps": nbytes / (us / 1e6) / 1e9}


def attn_case(name, rows, nh, nkv, configs, old, layers_bytes=600_000_000) -> dict:
    hd, s, w, t0 = 128, 4, 2044, 100_000
    per_layer = rows * nkv * (s + w) * hd * 2 * 2
    layers = max(2, -(-layers_bytes // per_layer))
    g = torch.Generator(device=DEV).manual_seed(1)
    ks = [
        torch.randn(rows + 1, nkv, s + w, hd, generator=g, device=DEV, dtype=BF)
        for _ in range(layers)
    ]
    vs = [torch.randn_like(k) for k in ks]
    kpos = torch.full((rows + 1, s + w), -1, dtype=torch.long, device=DEV)
    positions = torch.tensor([t0 + 37 * i for i in range(rows)], device=DEV)
    for i in range(rows):
        p = torch.cat([torch.arange(s), torch.arange(t0 + 37 * i - w, t0 + 37 * i)]).to(DEV)
        kpos[i, torch.where(p < s, p, s + (p - s) % w)] = p
    slots = torch.arange(rows, device=DEV)
    qkv = torch.randn(rows, (nh + 2 * nkv) * hd, generator=g, device=DEV, dtype=BF)
    inv = inv_frequencies(hd, 10000.0, None).to(DEV)
    rope = (
        *cos_sin(positions, inv, torch.float32),
        *cos_sin(positions.clamp(max=s + w), inv, torch.float32),
    )
    out = torch.empty(rows, nh, hd, device=DEV, dtype=BF)
    counters = torch.zeros(rows * nkv, dtype=torch.int32, device=DEV)
    res: dict = {
        "rows": rows,
        "heads": nh,
        "kv_heads": nkv,
        "kv_bytes_per_layer": per_layer,
        "layers_cycled": layers,
    }

    def new_call(cfg, i):
        return lambda: decode_attention(
            qkv, rope, ks[i], vs[i], kpos, slots, positions, out,
            sinks=s, window=w, config=cfg, counters=counters,
        )  # fmt: skip

    def old_call(splits, bn, i):
        return lambda: old.decode_attention(
            qkv, rope, ks[i], vs[i], kpos, slots, positions, out,
            sinks=s, window=w, splits=splits, block_n=bn,
        )  # fmt: skip

    ref = None
    if old is not None:
        for i in range(layers):  # bring every layer to its steady state (own key stored)
            old_call(8, 64, i)()
        old_call(8, 64, 0)()
        ref = out.float().clone()
        for splits, bn in ((4, 128), (8, 64)):
            us = graph_time_us([old_call(splits, bn, i % layers) for i in range(32)])
            res[f"old_splits{splits}_block{bn}"] = {"us": us, "GBps": per_layer / (us / 1e6) / 1e9}
    best = None
    for cfg in configs:
        key = f"new_splits{cfg.splits}_block{cfg.block_n}_w{cfg.num_warps}_s{cfg.num_stages}"
        key += "" if cfg.dot else "_fma"
        try:
            out.fill_(float("nan"))
            new_call(cfg, 0)()
            torch.cuda.synchronize()
            r: dict = {}
            if ref is not None:
                r["rel_err_vs_old"] = ((out.float() - ref).norm() / ref.norm()).item()
            r["counters_zero"] = bool((counters == 0).all())
            us = graph_time_us([new_call(cfg, i % layers) for i in range(32)])
            r |= {"us": us, "GBps": per_layer / (us / 1e6) / 1e9}
            out.fill_(float("nan"))
            new_call(cfg, 0)()
            if ref is not None:
                r["rel_err_after_graph"] = ((out.float() - ref).norm() / ref.norm()).item()
        except Exception as exc:
            r = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        res[key] = r
        if "us" in r and (best is None or r["us"] < res[best]["us"]):
            best = key
    res["best"] = best
    print(
        name,
        {k: round(v["us"], 2) for k, v in res.items() if isinstance(v, dict) and "us" in v},
        flush=True,
    )
    return res


def sweep_attention(old) -> dict:
    """7B shape, batch 1 (g = 1): tensor-core tiles against multiply-and-sum."""
    A = AttnConfig
    c7 = [A(sp, bn, 4, st) for sp in (8, 16, 32) for bn in (32, 64) for st in (2, 3)]
    c7 += [A(sp, bn, w, 1, dot=False) for sp in (16, 32) for bn in (32, 64, 128) for w in (2, 4)]
    return {"llama2_7b_batch1": attn_case("7b_b1", 1, 32, 32, c7, old)}


def host_overhead(runner, steps: int) -> dict:
    """Serial replays (host clock, synchronised each time): graph launch + sync latency
    without the runner's Python, and with the ids read back as `step` does."""
    bucket = runner._buckets[1]
    out = {}
    for label, fn in (
        ("serial_replay_sync_ms", lambda: (bucket.run(), torch.cuda.synchronize())),
        ("serial_replay_tolist_ms", lambda: (bucket.run(), bucket.ids[:1].tolist())),
    ):
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[label] = statistics.median(times) * 1e3
    return out


def random_model(shape) -> Llama:
    g = torch.Generator(device=DEV).manual_seed(2)
    cfg = shape.model_config()
    tensors = {
        name: torch.ones(shp, dtype=BF, device=DEV) if len(shp) == 1
        else torch.randn(shp, generator=g, device=DEV, dtype=BF) * 0.02
        for name, shp in cfg.expected_shapes().items()
    }  # fmt: skip
    return Llama(cfg, tensors, BF, DEV)


def end_to_end(bw: float, tunings: dict, steps: int = 100) -> dict:
    """Whole decode steps (runner.step and bare graph replay) under several tunings."""
    out: dict = {}
    original = cuda_runner.decode_tuning
    for shape, batches in ((LLAMA2_7B, (1,)), (LLAMA3_8B, (1, 64))):
        model = random_model(shape)
        res: dict = {}
        for label, make in tunings.items():
            for rows in batches:
                if rows > 1 and label != "default":
                    continue
                cuda_runner.decode_tuning = make
                cfg = EngineConfig(
                    device="cuda", dtype="bfloat16", sinks=4, window=2044, max_sessions=rows
                )
                runner = cuda_runner.CudaGraphRunner(cfg, model)
                t0s = [100_000 + 37 * i for i in range(rows)]
                fill_full_caches(runner, t0s, seed=3)
                r = decode_rate(runner, t0s, steps, DEV)
                nbytes = weights_bytes(model) + kv_bytes(runner, rows)
                r["tuning"] = repr(
                    make(rows, shape.kv_heads, shape.heads // shape.kv_heads, 2044, runner.sm_count)
                )
                r["roofline_pct"] = 100 * nbytes / (bw * 1e9) / (r["step_ms"] / 1e3)
                r["roofline_pct_graph_replay"] = (
                    100 * nbytes / (bw * 1e9) / (r["graph_replay_ms"] / 1e3)
                )
                if label == "default" and rows == 1:
                    r |= host_overhead(runner, steps)
                res[f"{label}_batch{rows}"] = r
                print(
                    shape.name,
                    label,
                    rows,
                    round(r["tok_s"], 1),
                    round(r["roofline_pct"], 1),
                    r["tuning"],
                    flush=True,
                )
                del runner
                torch.cuda.empty_cache()
        if "default_batch64" in res:
            res["aggregate_over_batch_1"] = (
                res["default_batch64"]["tok_s"] / res["default_batch1"]["tok_s"]
            )
        out[shape.name] = res
        del model
        torch.cuda.empty_cache()
    cuda_runner.decode_tuning = original
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--old", default=None, help="path of the previous sink_attention.py")
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_sink_attention", args.old)
        assert spec and spec.loader
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    result: dict = {"device": torch.cuda.get_device_name(DEV), "torch": torch.__version__}
    import triton

    result["triton"] = triton.__version__
    bw = copy_bw()
    result["copy_bandwidth_GBps"] = bw
    print("copy GB/s", bw, flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].lower()).strip("-")
    path = Path(args.out) / f"gpu-sweep-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()

    def tune(attn=None, gemv_on=True):
        def make(rows, kv_heads, group, window, sm_count):
            base = original(rows, kv_heads, group, window, sm_count)
            return cuda_runner.DecodeTuning(
                attn if attn and rows == 1 else base.attn, gemv_on and rows == 1
            )

        return make

    original = cuda_runner.decode_tuning
    tunings = {"default": original}

    def best_attention_end_to_end() -> dict:
        cases = result.get("attention", {}).get("llama2_7b_batch1", {})
        ranked = sorted((v["us"], k) for k, v in cases.items() if k.startswith("new") and "us" in v)
        for _, key in ranked[:2]:  # the two fastest kernels, in whole steps
            parts = key.split("_")
            tunings[key] = tune(
                AttnConfig(
                    int(parts[1][6:]), int(parts[2][5:]), int(parts[3][1:]), int(parts[4][1:]),
                    dot=not key.endswith("_fma"),
                )
            )  # fmt: skip
        tunings["attn_fma_splits16_block64_w2"] = tune(AttnConfig(16, 64, 2, 1, dot=False))
        return end_to_end(bw, tunings)

    for key, run in (
        ("gemv", sweep_gemv),
        ("attention", lambda: sweep_attention(old)),
        ("end_to_end", best_attention_end_to_end),
    ):
        if key in skip:
            continue
        try:
            result[key] = run()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            result[key] = {"error": f"{type(exc).__name__}: {exc}"}
        result[f"{key}_s"] = round(time.perf_counter() - t, 1)
        path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
