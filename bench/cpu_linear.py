"""The CPU matmul choices of `service/sinkserve/engine/quant.py`, timed side by side in one run.

For each row count: the 30 layers' projections of SmolLM2-135M's shape (distinct random
weights, so they do not stay in cache, as in a real step) through the int4 kernel and
through weights prepacked for oneDNN in bfloat16 and in float32; then the output head
(49152 x 576, cache flushed before each call) as int8, packed bfloat16 and packed float32.
Prints JSON (milliseconds, medians of --repeats). Picks quant.AMX_DENSE / PLAIN_DENSE and
HEAD_INT8_ROWS; `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` shows an AMX machine without AMX.

Run: PYTHONPATH=. .venv/bin/python bench/cpu_linear.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch

from sinkserve.engine.quant import (
    DenseCopy,
    Weight,
    linear,
    pack,
    quantize_int4,
    quantize_int8,
)

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate+up, down
HEAD = (49152, 576)
INT4_ONLY = DenseCopy(torch.float32, sys.maxsize)  # linear() never switches to the copy


def median_ms(fn: Callable[[], object], repeats: int, before: Callable[[], object]) -> float:
    fn()
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,2,4,8,12,16,32,64")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    dense = [[torch.randn(o, i, generator=g) * 0.02 for o, i in SHAPES] for _ in range(LAYERS)]
    layers: dict[str, list[list[Weight]]] = {
        "int4": [[quantize_int4(w, torch.bfloat16, INT4_ONLY) for w in ws] for ws in dense],
        "packed_bf16": [[pack(w, torch.bfloat16) for w in ws] for ws in dense],
        "packed_f32": [[pack(w, torch.float32) for w in ws] for ws in dense],
    }
    head_w = torch.randn(*HEAD, generator=g) * 0.02
    heads: dict[str, Weight] = {
        "int8": quantize_int8(head_w, torch.bfloat16),
        "packed_bf16": pack(head_w, torch.bfloat16),
        "packed_f32": pack(head_w, torch.float32),
    }
    junk = torch.zeros(16 * 2**20)  # 64 MB: more than the last-level cache
    result: dict[str, dict[str, dict[str, float]]] = {"layers_ms": {}, "head_ms": {}}
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = {i: torch.randn(rows, i, generator=g).bfloat16() for _, i in SHAPES}

        def run(ws: list[list[Weight]], xs: dict[int, torch.Tensor] = xs) -> None:
            for layer in ws:
                for w, (_, i) in zip(layer, SHAPES, strict=True):
                    linear(xs[i], w)

        result["layers_ms"][str(rows)] = {
            name: median_ms(partial(run, ws), args.repeats, lambda: None)
            for name, ws in layers.items()
        }
        x = torch.randn(rows, HEAD[1], generator=g)
        result["head_ms"][str(rows)] = {
            name: median_ms(partial(linear, x, w), args.repeats, lambda: junk.add_(1))
            for name, w in heads.items()
        }
        print(rows, result["layers_ms"][str(rows)], result["head_ms"][str(rows)], flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
