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

from sinkserve.engine.scheduler import StepItem


@dataclass
class DecodePlan:
    """Single-token items, rows [0, num_rows)."""

    num_rows: int
    slots: torch.Tensor  # [B]
    slot_range: tuple[int, int] | None  # set when slots are consecutive: gather is a view
    length: int  # cache entries [0, length) hold every key of the group's sessions
    bias: torch.Tensor  # [B, 1, 1, length + 1] float32 0 / -inf: cache keys, then its own


@dataclass
class ChunkGroup:
    """Prefill chunks of one length L, of B sessions, attended as one batch: a step's
    chunks cost a few operations per layer, not a few per chunk per layer."""

    rows: torch.Tensor  # [B * L] the chunks' rows of the step, chunk after chunk
    slots: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, 1, 1, L, C + L]: cache keys, then the chunk's keys
    # [B, 1, 1, 1, L] chunk keys that are sinks, set when some chunk holds its session's
    # first tokens and reaches past the cache (its later queries see them as sinks).
    new_sink_cols: torch.Tensor | None


@dataclass
class StepPlan:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] absolute
    cache_positions: torch.Tensor  # [T] min(position, S + W): the query's place in the cache
    decode: DecodePlan | None
    chunks: list[ChunkGroup]
    logit_rows: torch.Tensor  # rows whose logits are returned, in item order
    # The keys that stay in the cache: rows of the step, their slots and cache indexes,
    # and the rows of k[layer].view(-1, head_dim) they go to ([R * kv_heads]). No two
    # target the same entry (each slot is in a step once; a chunk keeps distinct ones).
    write_rows: torch.Tensor  # [R]
    write_slots: torch.Tensor  # [R]
    write_index: torch.Tensor  # [R]
    write_flat: torch.Tensor  # [R * kv_heads]


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
        """Lay out a step: single-token items first (one batched decode group), then chunks
        (grouped by length). Masks are built once here and shared by all layers. Each slot
        appears at most once."""
        dev = self.device
        singles = [it for it in items if len(it.tokens) == 1]
        chunks = [it for it in items if len(it.tokens) > 1]
        ordered = singles + chunks
        tokens = [t for it in ordered for t in it.tokens]
        positions = torch.tensor(
            [it.start + i for it in ordered for i in range(len(it.tokens))], dtype=torch.long
        ).to(dev)
        decode = self._decode_plan(singles, positions) if singles else None
        writes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, slots) of kept keys
        if decode is not None:
            writes.append((torch.arange(len(singles), device=dev), decode.slots))
        by_length: dict[int, list[tuple[int, StepItem]]] = {}
        row = len(singles)
        for it in chunks:
            by_length.setdefault(len(it.tokens), []).append((row, it))
            row += len(it.tokens)
        groups = []
        for members in by_length.values():
            group, kept = self._chunk_group(members, positions)
            groups.append(group)
            writes += kept
        rows_of, row = {}, 0
        for it in ordered:
            n = len(it.tokens)
            rows_of[id(it)] = list(range(row if it.all_logits else row + n - 1, row + n))
            row += n
        # In the caller's item order.
        logit_rows = [r for it in items if it.want_logits for r in rows_of[id(it)]]
        write_rows = torch.cat([rows for rows, _ in writes])
        write_slots = torch.cat([slots for _, slots in writes])
        write_index = self.cache_index(positions[write_rows])
        heads = torch.arange(self.num_kv_heads, device=dev)
        limit = self.sinks + self.window
        flat = (write_slots[:, None] * self.num_kv_heads + heads) * limit + write_index[:, None]
        return StepPlan(
            tokens=torch.tensor(tokens, dtype=torch.long).to(dev),
            positions=positions,
            cache_positions=positions.clamp(max=limit),
            decode=decode,
            chunks=groups,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long).to(dev),
            write_rows=write_rows,
            write_slots=write_slots,
            write_index=write_index,
            write_flat=flat.flatten(),
        )

    def _decode_plan(self, singles: list[StepItem], positions: torch.Tensor) -> DecodePlan:
        dev = self.device
        slots_list = [it.slot for it in singles]
        slots = torch.tensor(slots_list, dtype=torch.long).to(dev)
        b = len(singles)
        q = positions[:b, None]
        # A session at position p holds keys at cache entries [0, min(p, S + W)).
        length = max(1, min(self.sinks + self.window, max(it.start for it in singles)))
        own = torch.ones(b, 1, dtype=torch.bool, device=dev)
        mask = torch.cat([self.visible(self.kpos[slots, :length], q), own], dim=1)
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
        bias.masked_fill_(~mask, float("-inf"))
        first = slots_list[0]
        consecutive = slots_list == list(range(first, first + b))
        return DecodePlan(
            num_rows=b,
            slots=slots,
            slot_range=(first, first + b) if consecutive else None,
            length=length,
            bias=bias[:, None, None, :],
        )

    def _chunk_group(
        self, members: list[tuple[int, StepItem]], positions: torch.Tensor
    ) -> tuple[ChunkGroup, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The group of equal-length chunks (first row, item), and the (rows, slots) of
        the keys each keeps."""
        limit = self.sinks + self.window
        masks, sink_cols, kept, all_rows = [], [], [], []
        any_sinks = False
        for row, it in members:
            n = len(it.tokens)
            rows = torch.arange(row, row + n, device=self.device)
            pos = positions[row : row + n]
            q = pos[:, None]
            cache_mask = self.visible(self.kpos[it.slot][None, :], q)
            new_mask = (pos[None, :] <= q) & (
                (pos[None, :] < self.sinks) | (pos[None, :] >= q - self.window)
            )
            masks.append(torch.cat([cache_mask, new_mask], dim=1))
            end = it.start + n
            has_sinks = it.start < self.sinks and end > limit
            any_sinks |= has_sinks
            none = torch.zeros(n, dtype=torch.bool, device=self.device)
            sink_cols.append(pos < self.sinks if has_sinks else none)
            keep = (pos < self.sinks) | (pos >= end - self.window)
            kept_rows = rows[keep]
            kept.append((kept_rows, torch.full_like(kept_rows, it.slot)))
            all_rows.append(rows)
        new_sinks = torch.stack(sink_cols)[:, None, None, None, :] if any_sinks else None
        group = ChunkGroup(
            rows=torch.cat(all_rows),
            slots=torch.tensor([it.slot for _, it in members], device=self.device),
            mask=torch.stack(masks)[:, None, None],
            new_sink_cols=new_sinks,
        )
        return group, kept

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
        hd = self.head_dim
        for src, cache in ((k, self.k[layer]), (v, self.v[layer])):
            rows = src[plan.write_rows].to(cache.dtype).reshape(-1, hd)  # the cache's dtype
            cache.view(-1, hd).index_copy_(0, plan.write_flat, rows)

    def commit_positions(self, plan: StepPlan) -> None:
        """Record the step's positions once every layer has written."""
        self.kpos[plan.write_slots, plan.write_index] = plan.positions[plan.write_rows]

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
