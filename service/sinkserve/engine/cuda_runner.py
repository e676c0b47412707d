"""The CUDA runner: decode steps replayed from CUDA graphs, prefill chunks run eagerly.

A step's single-token items (the decode group) run through `decode_forward`, captured
once per batch-size bucket (1, 2, 4, ... up to max_sessions) as a CUDA graph over static
input buffers (token, position, slot per row). A batch is padded to its bucket with rows
that point at a scratch KV slot no session owns, so padding never touches a session's
cache. Each step costs one host-to-device copy of the inputs, one graph replay and one
read of the sampled ids (greedy rows take the argmax computed inside the graph; other
rows go through the regular sampler on the graph's logits). Multi-token items (prefill
chunks) take the eager PyTorch path of `Llama.forward`.

Stepping ahead: after a greedy decode-only step the runner launches the next step before
the host has read this one's ids, feeding them on the device (ids become tokens,
positions + 1), so the GPU does not idle while the host returns the ids, runs the
scheduler and calls `step` again. If that call asks for exactly that step (same slots in
the same order, the positions after, the ids just returned as tokens, greedy), its ids
are already on their way; otherwise, and before anything else touches the cache (`save`,
`load`, `clear`, `logits`), the step ahead is undone: the one cache entry per row it
wrote, copied before it ran, is put back.

Decode attention reads the cache in place by slot index (`sink_attention`); the
residual/norm and SiLU steps are fused Triton kernels (`fused_ops`), as is the GEMV that
batch-1 steps run their layer projections through. On Hopper and later these kernels use
programmatic dependent launch: each starts while its predecessor finishes. With graphs off
(a CPU device under TRITON_INTERPRET=1, for tests) the same body runs eagerly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sinkserve.config import EngineConfig
from sinkserve.engine.kernels.fused_ops import add_rms_norm, gemv, silu_mul
from sinkserve.engine.kernels.sink_attention import AttnConfig, attention_config, decode_attention
from sinkserve.engine.kv_cache import CacheEntries, HostSlot, KVCache
from sinkserve.engine.model import Llama
from sinkserve.engine.quant import Weight
from sinkserve.engine.quant import linear as dense_linear
from sinkserve.engine.rope import cos_sin
from sinkserve.engine.runner import TorchRunner
from sinkserve.engine.sampler import SampleRow, sample
from sinkserve.engine.scheduler import StepItem


@dataclass(frozen=True)
class DecodeTuning:
    """What one batch bucket's decode step launches: attention shape, GEMV or cuBLAS, and
    whether its Triton kernels use programmatic dependent launch."""

    attn: AttnConfig
    gemv: bool
    pdl: bool


def decode_tuning(
    rows: int, kv_heads: int, group: int, window: int, sm_count: int, gemv: bool, pdl: bool
) -> DecodeTuning:
    """`gemv`: batch-1 steps run the layer projections through the Triton GEMV (SiLU fused
    into the down projection) instead of cuBLAS, closer to copy bandwidth on an H200
    (bench/results/gpu-nvidia-h200.json). `pdl`: each Triton kernel may launch while its
    predecessor runs and read its weights (attention: its first K/V tile) before waiting
    for it (see `fused_ops`), which hides the gap between a step's ~200 kernels."""
    attn = attention_config(rows, kv_heads, group, window, sm_count)
    return DecodeTuning(attn, gemv=gemv and rows == 1, pdl=pdl)


def decode_forward(
    model: Llama,
    kv: KVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    tuning: DecodeTuning,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per row: write each row's K/V and position into its slot and
    return logits [B, vocab] in the model's dtype. Static shapes, no host synchronisation.
    `counters`: the attention kernel's int32 zeros, at least B * kv_heads (see
    `decode_attention`)."""
    cfg = model.cfg
    b, nh, hd = tokens.shape[0], cfg.num_heads, cfg.head_dim
    pdl = tuning.pdl

    def linear(a: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if tuning.gemv and bias is None and isinstance(w, torch.Tensor):
            return gemv(a, w, pdl=pdl)
        return dense_linear(a, w, bias)

    limit = kv.sinks + kv.window
    rope = (
        *cos_sin(positions, model.inv_freq, torch.float32),
        *cos_sin(positions.clamp(max=limit), model.inv_freq, torch.float32),
    )
    x = F.embedding(tokens, model.embed)  # the residual stream, updated in place
    delta = None
    for li, layer in enumerate(model.layers):
        h = add_rms_norm(x, delta, layer.attn_norm, cfg.rms_eps, pdl=pdl)
        qkv = linear(h, layer.wqkv, layer.bqkv)
        attn = torch.empty(b, nh, hd, dtype=x.dtype, device=x.device)
        decode_attention(
            qkv,
            rope,
            kv.k[li],
            kv.v[li],
            kv.kpos,
            slots,
            positions,
            attn,
            sinks=kv.sinks,
            window=kv.window,
            config=tuning.attn,
            sm_scale=1.0,  # Llama folds hd^-0.5 into the q rows of wqkv
            counters=counters,
            pdl=pdl,
        )
        delta = linear(attn.view(b, nh * hd), layer.wo)
        h = add_rms_norm(x, delta, layer.ffn_norm, cfg.rms_eps, pdl=pdl)
        gate_up = linear(h, layer.w_gate_up)
        if tuning.gemv and isinstance(layer.w_down, torch.Tensor):
            delta = gemv(gate_up, layer.w_down, silu=True, pdl=pdl)
        else:
            delta = dense_linear(silu_mul(gate_up, pdl=pdl), layer.w_down)
    h = add_rms_norm(x, delta, model.norm, cfg.rms_eps, pdl=pdl)
    # Positions are committed once every layer has read the old ones.
    kv.kpos[slots, kv.cache_index(positions)] = positions
    return dense_linear(h.to(model.lm_head.dtype), model.lm_head)


@dataclass
class _Bucket:
    size: int
    run: Callable[[], None]
    logits: torch.Tensor  # [size, vocab] float32, rewritten by each run
    ids: torch.Tensor  # [size] greedy argmax of `logits`


@dataclass
class _IdsOut:
    """A step's greedy ids on their way to host memory."""

    host: torch.Tensor  # pinned on CUDA
    done: torch.cuda.Event | None  # recorded after the copy (None off CUDA: copied already)

    def read(self, n: int) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host[:n].tolist()


@dataclass
class _Ahead:
    """A decode step launched before the engine asked for it (see the module doc)."""

    bucket: _Bucket
    slots: list[int]
    positions: list[int]
    tokens: list[int]  # the ids of the step before (set once the host has read them)
    out: _IdsOut
    overwritten: CacheEntries  # what its cache writes replace, copied before it ran


class CudaGraphRunner(TorchRunner):
    """`TorchRunner` whose decode steps replay CUDA graphs (one per batch-size bucket)."""

    def __init__(
        self,
        config: EngineConfig,
        model: Llama,
        *,
        graphs: bool | None = None,
        sm_count: int | None = None,
        gemv: bool = True,
        pdl: bool | None = None,
        ahead: bool | None = None,
    ) -> None:
        # No CPU fused step: off CUDA this runner only serves tests of its own kernels.
        super().__init__(config, model, extra_slots=1, fused=False)
        dev = model.device
        self.scratch_slot = config.max_sessions
        self.graphs = dev.type == "cuda" if graphs is None else graphs
        # Step ahead (module doc): by default on CUDA, where the GPU would otherwise idle.
        self.ahead = dev.type == "cuda" if ahead is None else ahead
        self._ahead: _Ahead | None = None
        # The engine saves and clears idle sessions' slots from other threads while its
        # loop steps: undoing the step ahead must not interleave with a step.
        self._ahead_lock = threading.RLock()
        self.gemv = gemv  # see `decode_tuning`
        cuda = dev.type == "cuda"
        if sm_count is None:  # off CUDA (interpreter tests): as if 8 SMs, to split the window
            sm_count = torch.cuda.get_device_properties(dev).multi_processor_count if cuda else 8
        self.sm_count = sm_count
        if pdl is None:  # programmatic dependent launch needs Hopper (sm_90) or later
            pdl = cuda and torch.cuda.get_device_capability(dev)[0] >= 9
        self.pdl = pdl
        size, self.bucket_sizes = 1, []
        while size < config.max_sessions:
            self.bucket_sizes.append(size)
            size *= 2
        self.bucket_sizes.append(size)
        # rows: token, position, slot (static: graphs read these addresses)
        self.inputs = torch.zeros(3, size, dtype=torch.long, device=dev)
        self.staging = torch.zeros(3, size, dtype=torch.long, pin_memory=dev.type == "cuda")
        # Greedy ids on their way to the host: two steps can be in flight.
        self.host_ids = [
            torch.zeros(size, dtype=torch.long, pin_memory=dev.type == "cuda") for _ in range(2)
        ]
        self._flip = 0  # which of them the next copy goes to
        # The attention kernel's split tickets, zero between launches. Every bucket's graph
        # reads and writes them (never two at once); the runner owns them because a graph
        # keeps only their address: freed, that memory went to other tensors.
        self.counters = torch.zeros(size * model.cfg.num_kv_heads, dtype=torch.int32, device=dev)
        self._buckets: dict[int, _Bucket] = {}
        self._pool: Any = None  # the graphs share one memory pool

    def capture_all(self) -> None:
        """Capture every bucket now instead of on first use."""
        for size in self.bucket_sizes:
            self._bucket(size)

    @torch.inference_mode()
    def step(self, items: Sequence[StepItem], rows: Sequence[SampleRow]) -> list[int]:
        with self._ahead_lock:
            return self._step(items, rows)

    def _step(self, items: Sequence[StepItem], rows: Sequence[SampleRow]) -> list[int]:
        singles = [it for it in items if len(it.tokens) == 1]
        chunks = [it for it in items if len(it.tokens) > 1]
        simple = (
            len(singles) == len(items)
            and all(it.want_logits for it in items)
            and self.logits_hook is None
            and all(r.params.temperature == 0 and r.params.repetition_penalty == 1 for r in rows)
        )
        ahead = self._ahead
        if ahead is not None and simple and self._asked_for(ahead, items):
            self._ahead = None
            return self._greedy_ids(ahead.bucket, items, ahead.out)
        self.settle()
        bucket = self._decode(singles) if singles else None
        if simple and bucket is not None:
            return self._greedy_ids(bucket, items, self._ids_out(bucket))
        logits = self._gather_logits(items, singles, bucket, chunks)
        if self.logits_hook is not None:
            self.logits_hook(rows, logits)
        return sample(logits, rows)

    def settle(self) -> None:
        """Undo the step launched ahead, if any: done before anything else runs on or
        reads the cache."""
        with self._ahead_lock:
            if self._ahead is not None:
                self.kv.restore(self._ahead.overwritten)
                self._ahead = None

    def logits(self, items: Sequence[StepItem]) -> torch.Tensor:
        self.settle()
        return super().logits(items)

    def save(self, slot: int) -> HostSlot:
        self.settle()
        return super().save(slot)

    def load(self, slot: int, saved: HostSlot) -> None:
        self.settle()
        super().load(slot, saved)

    def clear(self, slot: int) -> None:
        self.settle()
        super().clear(slot)

    @staticmethod
    def _asked_for(ahead: _Ahead, items: Sequence[StepItem]) -> bool:
        return (
            [it.slot for it in items] == ahead.slots
            and [it.start for it in items] == ahead.positions
            and [it.tokens[0] for it in items] == ahead.tokens
        )

    def _greedy_ids(self, bucket: _Bucket, items: Sequence[StepItem], out: _IdsOut) -> list[int]:
        """The ids of the step last run on `bucket` (coming through `out`); where the runner
        steps ahead, the next step is launched first, from those ids still on the device."""
        nxt = self._launch_ahead(bucket, items) if self.ahead else None
        ids = out.read(len(items))
        if nxt is not None:
            nxt.tokens = ids
            self._ahead = nxt
        return ids

    def _ids_out(self, bucket: _Bucket) -> _IdsOut:
        """Copy the bucket's ids to host memory (the next copy goes to the other buffer:
        the step ahead's ids travel while these are read)."""
        host = self.host_ids[self._flip]
        self._flip ^= 1
        host[: bucket.size].copy_(bucket.ids, non_blocking=True)
        done = None
        if host.is_pinned():
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record()
        return _IdsOut(host, done)

    def _launch_ahead(self, bucket: _Bucket, items: Sequence[StepItem]) -> _Ahead:
        """Replay `bucket` once more on its own inputs advanced on the device: the ids it
        just computed as tokens, positions + 1 (slots and padding rows unchanged)."""
        n = len(items)
        tokens, positions, slots = self.inputs[0, :n], self.inputs[1, :n], self.inputs[2, :n]
        tokens.copy_(bucket.ids[:n])
        positions += 1
        overwritten = self.kv.entries(slots, self.kv.cache_index(positions))
        bucket.run()
        return _Ahead(
            bucket,
            slots=[it.slot for it in items],
            positions=[it.start + 1 for it in items],
            tokens=[],
            out=self._ids_out(bucket),
            overwritten=overwritten,
        )

    def _gather_logits(
        self,
        items: Sequence[StepItem],
        singles: list[StepItem],
        bucket: _Bucket | None,
        chunks: list[StepItem],
    ) -> torch.Tensor:
        """Logits rows of the items that want them, in the caller's item order."""
        chunk_logits = self.model.forward(self.kv, self.kv.plan(chunks)) if chunks else None
        single_row = {id(it): i for i, it in enumerate(singles)}
        parts, next_chunk_row = [], 0
        for it in items:
            if not it.want_logits:
                continue
            if id(it) in single_row and bucket is not None:
                i = single_row[id(it)]
                parts.append(bucket.logits[i : i + 1])
            elif chunk_logits is not None:
                n = len(it.tokens) if it.all_logits else 1
                parts.append(chunk_logits[next_chunk_row : next_chunk_row + n])
                next_chunk_row += n
        if not parts:
            return torch.empty(0, self.model.cfg.vocab_size, device=self.model.device)
        return torch.cat(parts)

    def _decode(self, items: list[StepItem]) -> _Bucket:
        """Run the decode group: stage inputs, pad to the bucket, replay."""
        n = len(items)
        bucket = self._bucket(next(s for s in self.bucket_sizes if s >= n))
        staged = self.staging.numpy()
        staged[0, :n] = [it.tokens[0] for it in items]
        staged[1, :n] = [it.start for it in items]
        staged[2, :n] = [it.slot for it in items]
        staged[:, n : bucket.size] = [[0], [0], [self.scratch_slot]]
        # The previous step read its ids back, so the last copy out of `staging` is done.
        self.inputs.copy_(self.staging, non_blocking=True)
        bucket.run()
        return bucket

    def _bucket(self, size: int) -> _Bucket:
        if size not in self._buckets:
            self._buckets[size] = self._build(size)
        return self._buckets[size]

    def _build(self, size: int) -> _Bucket:
        cfg = self.model.cfg
        group = cfg.num_heads // cfg.num_kv_heads
        tuning = decode_tuning(
            size, cfg.num_kv_heads, group, self.kv.window, self.sm_count, self.gemv, self.pdl
        )
        tokens, positions, slots = (
            self.inputs[0, :size],
            self.inputs[1, :size],
            self.inputs[2, :size],
        )
        # A graph holds the addresses of what it reads and writes outside its pool, not the
        # tensors: the runner (inputs, counters) or the bucket (logits, ids) must own them.
        logits = torch.empty(size, cfg.vocab_size, device=self.model.device)
        ids = torch.empty(size, dtype=torch.long, device=self.model.device)

        def body() -> None:
            out = decode_forward(
                self.model, self.kv, tokens, positions, slots, tuning, self.counters
            )
            logits.copy_(out)  # upcast to float32
            torch.argmax(logits, dim=-1, out=ids)

        if not self.graphs:
            return _Bucket(size, body, logits, ids)
        # Warm up (compiles the Triton kernels) on padding rows: only the scratch slot is
        # written. Then capture.
        self.inputs[2] = self.scratch_slot
        self.inputs[:2] = 0
        side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            body()
        self._pool = graph.pool()
        return _Bucket(size, graph.replay, logits, ids)
