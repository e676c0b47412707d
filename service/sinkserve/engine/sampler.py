"""Token sampling over a batch of logits rows, each with its own settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sinkserve.engine.types import SamplingParams

_GOLDEN = 0x9E3779B97F4A7C15  # an odd step: distinct seeds for 2**64 turns


def turn_seed(seed: int, turn: int) -> int:
    """The random stream of a session's `turn`-th turn (0 = its first) under `seed`.

    Each turn draws its own stream: with one stream for every turn, a later turn whose
    logits resemble an earlier one's makes the same draws and repeats that reply word for
    word. Replaying the same conversation with the same seed still gives the same replies.
    """
    return (seed + turn * _GOLDEN) % 2**64


@dataclass
class SampleRow:
    """What the sampler needs for one row of logits."""

    turn_id: int
    params: SamplingParams
    rng: torch.Generator | None  # seeded per turn when params.seed is set
    history: Sequence[int] = ()  # token ids the repetition penalty applies to


def apply_repetition_penalty(logits: torch.Tensor, history: Sequence[int], p: float) -> None:
    """CTRL-style penalty in place: seen tokens' positive logits are divided by p, negative
    ones multiplied."""
    ids = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    seen = logits[ids]
    logits[ids] = torch.where(seen > 0, seen / p, seen * p)


# Inference mode: the runners make `logits` inside it (inference tensors), and the
# repetition penalty updates them in place, which torch refuses outside it.
@torch.inference_mode()
def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int]:
    """Pick one token per row of float32 logits [n, vocab] (updated in place by the
    repetition penalty). Greedy rows share one argmax; only stochastic rows pay for
    softmax and filtering."""
    for i, row in enumerate(rows):
        if row.params.repetition_penalty != 1.0 and row.history:
            apply_repetition_penalty(logits[i], row.history, row.params.repetition_penalty)
    out = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.params.temperature > 0:
            out[i] = _sample_one(logits[i], row.params, row.rng)
    return out


def _sample_one(logits: torch.Tensor, p: SamplingParams, rng: torch.Generator | None) -> int:
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.numel():
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=rng).item())
