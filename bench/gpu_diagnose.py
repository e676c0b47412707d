"""Which part of the CUDA runner breaks bench/gpu.py's device correctness? (one JSON object)

    python3 bench/gpu_diagnose.py [--old PATH_TO_another_sink_attention.py]

Runs bench/gpu.py's `engine_vs_oracle` on the GPU under a matrix of switches: CUDA graphs
on/off, the Triton GEMV on/off, and (with --old) another version's attention kernel in
place of this one. A case whose rel_err_median is far above the others' names the part
that breaks (for example, graphs that keep the address of a tensor nothing else owns).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

# The checkout (for `bench.*`) and service/ (for `sinkserve`): GPU hosts run these
# scripts from a copy of the repository, without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu import engine_vs_oracle
from sinkserve.engine import cuda_runner
from sinkserve.engine.kernels.sink_attention import AttnConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    # Swapped in the module's namespace, where the runner and `engine_vs_oracle` look them up.
    patched = vars(cuda_runner)
    original_runner, original_attn = patched["CudaGraphRunner"], patched["decode_attention"]
    old = None
    if args.old:
        spec = importlib.util.spec_from_file_location("old_sink_attention", args.old)
        assert spec and spec.loader
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)

    def old_attention(
        *a: object,
        config: AttnConfig,
        sm_scale: float,
        counters: torch.Tensor | None = None,
        **kw: object,
    ) -> None:
        assert old is not None
        if "sm_scale" in inspect.signature(old.decode_attention).parameters:
            kw["sm_scale"] = sm_scale  # else the old kernel scales by hd^-0.5 itself
        old.decode_attention(*a, splits=config.splits, block_n=64, **kw)

    out: dict[str, dict[str, Any]] = {}
    for graphs in (True, False):
        for gemv in (True, False):
            for attn in ("new", "old") if old else ("new",):
                patched["decode_attention"] = old_attention if attn == "old" else original_attn
                patched["CudaGraphRunner"] = partial(original_runner, graphs=graphs, gemv=gemv)
                key = f"graphs_{graphs}_gemv_{gemv}_attn_{attn}"
                try:
                    r = engine_vs_oracle(dev)
                    out[key] = {
                        s: {
                            k: r[s]["cuda_graph_runner"][k]
                            for k in ("rel_err_median", "argmax_agreement")
                        }
                        for s in r
                        if isinstance(r[s], dict)
                    }
                except Exception as exc:
                    out[key] = {"error": f"{type(exc).__name__}: {exc}"}
                print(key, json.dumps(out[key]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
