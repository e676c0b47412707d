"""Preallocated KV slots: per session, S sink keys plus a ring of W window keys.

Layout of one slot's cache index c (0 <= c < S + W): c < S holds the sink at absolute
position c; c >= S holds the window token at absolute position p where
c == S + (p - S) % W. A ring needs no copying on eviction: attention ignores key order and
only the mask matters. `kpos[slot, c]` is the absolute position stored at c (-1: empty).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from service.engine.scheduler import StepItem


@dataclass
class DecodePlan:
    """Single-token items, rows [0, num_rows)."""

    num_rows: int
    slots: torch.Tensor  # [B]
    slot_range: tuple[int, int] | None  # set when slots are consecutive: gather is a view
    length: int  # cache entries [0, length) hold every key of the group's sessions
    bias: torch.Tensor  # [B, 1, 1, length + 1] float32 0 / -inf: cache keys, then its own
    write_index: torch.Tensor  # [B]
    flat_index: torch.Tensor  # [B * kv_heads]: rows of k[layer].view(-1, head_dim) written


@dataclass
class ChunkPlan:
    """A prefill chunk of one session, rows [row_start, row_end)."""

    row_start: int
    row_end: int
    slot: int
    mask: torch.Tensor  # [L, C + L]: cache keys, then the chunk's keys
    new_sink_cols: torch.Tensor | None  # [L] chunk keys that are sinks (first chunk only)
    write_rows: torch.Tensor  # chunk rows that stay in the cache
    write_index: torch.Tensor  # their cache indexes


@dataclass
class StepPlan:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] absolute
    cache_positions: torch.Tensor  # [T] min(position, S + W): the query's place in the cache
    decode: DecodePlan | None
    chunks: list[ChunkPlan]
    logit_rows: torch.Tensor  # rows whose logits are returned, in item order


class KVCache:
    """K/V tensors [layers][slots, kv_heads, S + W, head_dim] plus positions [slots, S + W]."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        sinks: int,
        window: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.sinks, self.window = sinks, window
        self.device = device
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        shape = (num_layers, num_slots, num_kv_heads, sinks + window, head_dim)
        # One tensor for all layers (a step's writes to every layer are one gather/scatter
        # away, see `entries`), used a layer at a time through the views `k[layer]`.
        self.k_all = torch.zeros(shape, dtype=dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = list(self.k_all.unbind(0)), list(self.v_all.unbind(0))
        self.kpos = torch.full((num_slots, sinks + window), -1, dtype=torch.long, device=device)

    @property
    def bytes_per_slot(self) -> int:
        one = self.k[0][0]
        return 2 * len(self.k) * one.numel() * one.element_size() + self.kpos[0].numel() * 8

    def cache_index(self, pos: torch.Tensor) -> torch.Tensor:
        s, w = self.sinks, self.window
        return torch.where(pos < s, pos, s + (pos - s).remainder(w))

    def visible(self, key_pos: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """Whether a stored key at key_pos (-1 = empty) is attended by a query at query_pos:
        a sink, or one of the W tokens before the query (broadcasting)."""
        return (
            (key_pos >= 0)
            & (key_pos < query_pos)
            & ((key_pos < self.sinks) | (key_pos >= query_pos - self.window))
        )

    def plan(self, items: Sequence[StepItem]) -> StepPlan:
        """Lay out a step: single-token items first (one batched decode group), then chunks.
        Masks are built once here and shared by all layers. Each slot appears at most once."""
        dev = self.device
        singles = [it for it in items if len(it.tokens) == 1]
        chunks = [it for it in items if len(it.tokens) > 1]
        ordered = singles + chunks
        tokens = [t for it in ordered for t in it.tokens]
        positions = torch.tensor(
            [it.start + i for it in ordered for i in range(len(it.tokens))], dtype=torch.long
        ).to(dev)
        limit = self.sinks + self.window
        decode = None
        if singles:
            slots_list = [it.slot for it in singles]
            slots = torch.tensor(slots_list, dtype=torch.long).to(dev)
            b = len(singles)
            q = positions[:b, None]
            # A session at position p holds keys at cache entries [0, min(p, S + W)).
            length = max(1, min(limit, max(it.start for it in singles)))
            own = torch.ones(b, 1, dtype=torch.bool, device=dev)
            mask = torch.cat([self.visible(self.kpos[slots, :length], q), own], dim=1)
            bias = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
            bias.masked_fill_(~mask, float("-inf"))
            first = slots_list[0]
            consecutive = slots_list == list(range(first, first + b))
            write_index = self.cache_index(positions[:b])
            heads = torch.arange(self.num_kv_heads, device=dev)
            flat = (slots[:, None] * self.num_kv_heads + heads) * limit + write_index[:, None]
            decode = DecodePlan(
                num_rows=b,
                slots=slots,
                slot_range=(first, first + b) if consecutive else None,
                length=length,
                bias=bias[:, None, None, :],
                write_index=write_index,
                flat_index=flat.flatten(),
            )
        chunk_plans = []
        row = len(singles)
        for it in chunks:
            n = len(it.tokens)
            pos = positions[row : row + n]
            q = pos[:, None]
            cache_mask = self.visible(self.kpos[it.slot][None, :], q)
            new_mask = (pos[None, :] <= q) & (
                (pos[None, :] < self.sinks) | (pos[None, :] >= q - self.window)
            )
            end = it.start + n
            has_sinks = it.start < self.sinks and end > limit
            keep = (pos < self.sinks) | (pos >= end - self.window)
            rows = keep.nonzero().flatten()
            chunk_plans.append(
                ChunkPlan(
                    row_start=row,
                    row_end=row + n,
                    slot=it.slot,
                    mask=torch.cat([cache_mask, new_mask], dim=1),
                    new_sink_cols=(pos < self.sinks) if has_sinks else None,
                    write_rows=rows,
                    write_index=self.cache_index(pos[rows]),
                )
            )
            row += n
        rows_of, row = {}, 0
        for it in ordered:
            n = len(it.tokens)
            rows_of[id(it)] = list(range(row if it.all_logits else row + n - 1, row + n))
            row += n
        # In the caller's item order.
        logit_rows = [r for it in items if it.want_logits for r in rows_of[id(it)]]
        return StepPlan(
            tokens=torch.tensor(tokens, dtype=torch.long).to(dev),
            positions=positions,
            cache_positions=positions.clamp(max=limit),
            decode=decode,
            chunks=chunk_plans,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long).to(dev),
        )

    def gather(self, layer: int, plan: DecodePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, kv_heads, length, hd] of the decode group's slots (a view when the
        slots are consecutive)."""
        n = plan.length
        if plan.slot_range is not None:
            a, b = plan.slot_range
            return self.k[layer][a:b, :, :n], self.v[layer][a:b, :, :n]
        return self.k[layer][plan.slots, :, :n], self.v[layer][plan.slots, :, :n]

    def write(self, layer: int, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the step's rotated keys and values (after the layer's attention read)."""
        k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)  # the cache's dtype
        if plan.decode is not None:
            d, hd = plan.decode, self.head_dim
            self.k[layer].view(-1, hd).index_copy_(0, d.flat_index, k[: d.num_rows].reshape(-1, hd))
            self.v[layer].view(-1, hd).index_copy_(0, d.flat_index, v[: d.num_rows].reshape(-1, hd))
        for c in plan.chunks:
            rows = c.write_rows + c.row_start
            self.k[layer][c.slot][:, c.write_index] = k[rows].transpose(0, 1)
            self.v[layer][c.slot][:, c.write_index] = v[rows].transpose(0, 1)

    def commit_positions(self, plan: StepPlan) -> None:
        """Record the step's positions once every layer has written."""
        if plan.decode is not None:
            d = plan.decode
            self.kpos[d.slots, d.write_index] = plan.positions[: d.num_rows]
        for c in plan.chunks:
            self.kpos[c.slot, c.write_index] = plan.positions[c.write_rows + c.row_start]

    def entries(self, slots: torch.Tensor, index: torch.Tensor) -> CacheEntries:
        """A copy of cache entry index[i] of slot slots[i] in every layer, and its position."""
        return CacheEntries(
            slots=slots.clone(),
            index=index.clone(),
            k=self.k_all[:, slots, :, index],
            v=self.v_all[:, slots, :, index],
            kpos=self.kpos[slots, index],
        )

    def restore(self, saved: CacheEntries) -> None:
        """Put back entries copied by `entries`."""
        self.k_all[:, saved.slots, :, saved.index] = saved.k
        self.v_all[:, saved.slots, :, saved.index] = saved.v
        self.kpos[saved.slots, saved.index] = saved.kpos

    def clear(self, slot: int) -> None:
        self.kpos[slot] = -1

    def save(self, slot: int) -> HostSlot:
        """An exact host copy of one slot."""
        return HostSlot(
            k=self.k_all[:, slot].to("cpu", copy=True),
            v=self.v_all[:, slot].to("cpu", copy=True),
            kpos=self.kpos[slot].to("cpu", copy=True),
        )

    def load(self, slot: int, saved: HostSlot) -> None:
        self.k_all[:, slot].copy_(saved.k)
        self.v_all[:, slot].copy_(saved.v)
        self.kpos[slot].copy_(saved.kpos)


@dataclass
class HostSlot:
    """A slot's exact contents in host memory (a swapped-out session)."""

    k: torch.Tensor  # [layers, kv_heads, C, hd]
    v: torch.Tensor
    kpos: torch.Tensor  # [C]


@dataclass
class CacheEntries:
    """Some slots' cache entries at one index each, all layers (`KVCache.entries`)."""

    slots: torch.Tensor  # [B]
    index: torch.Tensor  # [B]
    k: torch.Tensor  # [B, layers, kv_heads, hd]
    v: torch.Tensor
    kpos: torch.Tensor  # [B]
