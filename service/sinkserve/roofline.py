"""The machine's own memory roofline for CPU decode, measured in the run that quotes it.

A decode step of a few sessions reads every weight once, so its floor is the bytes of
weights it reads over the rate this machine streams memory. VMs of one kind differ by 3x
in that rate (17 to 55 GB/s on 2 threads), so a tokens/s figure means little without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sinkserve.engine.model import Llama
from sinkserve.engine.quant import Int4Weight, Int8Weight, PackedWeight, Weight

GIB = 1 << 30


def memory_bandwidth_gb_s(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """The best rate (1e9 bytes/s) at which `threads` threads sum a float32 tensor of `gib`
    GiB: far larger than any cache, so it streams from memory.

    Measured in a child process: in the process of an engine, allocating and freeing the
    GiB left its later decode steps about 3x slower (one session, 2-core VM; the cause was
    not found, a fixed malloc mmap or trim threshold did not change it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
    )
    args = [str(threads), str(gib), str(repeats)]
    code = "import sys; from sinkserve.roofline import sum_rate; print(sum_rate(*sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


def sum_rate(threads: str, gib: str, repeats: str) -> float:
    """memory_bandwidth_gb_s's measurement, in the process that calls it."""
    torch.set_num_threads(int(threads))
    data = torch.ones(int(float(gib) * GIB) // 4)
    best = float("inf")
    for _ in range(int(repeats)):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best / 1e9


def weight_bytes(w: Weight) -> int:
    """Bytes a step of one row reads of `w`, through the kernel that step takes."""
    if isinstance(w, Int4Weight):
        if w.rowpack is not None:
            return w.rowpack.nbytes
        return w.packed.nbytes + w.scales_zeros.nbytes
    if isinstance(w, Int8Weight):
        return (w.rowpack if w.rowpack is not None else w.codes).nbytes + w.scales.nbytes
    if isinstance(w, PackedWeight):
        return w.packed.numel() * w.packed.element_size()
    return w.nbytes


def step_bytes(model: Llama) -> int:
    """Weights one single-row decode step reads: every projection and the head (its int8
    copy where it has one: a step of one row takes it)."""
    layers = sum(
        weight_bytes(w)
        for layer in model.layers
        for w in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)
    )
    head = model.lm_head_int8 if model.lm_head_int8 is not None else model.head
    return layers + weight_bytes(head)


def roofline(model: Llama, threads: int) -> dict[str, float]:
    """This machine's bandwidth, the bytes a step reads, and the rate of one session those
    allow (tokens/s if reading weights were all a step did)."""
    bandwidth = memory_bandwidth_gb_s(threads)
    nbytes = step_bytes(model)
    return {
        "bandwidth_gb_s": round(bandwidth, 2),
        "step_weight_mb": round(nbytes / 1e6, 2),
        "roofline_tok_s": round(bandwidth * 1e9 / nbytes, 1),
    }
