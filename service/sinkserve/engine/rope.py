"""Rotary position embedding in the rotate-half (Hugging Face) layout.

Angles are computed in float64 from absolute positions: a session's positions grow without
bound (millions of tokens), and float32 `position * inv_freq` loses the fractional part of
the angle long before that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "linear" divides every frequency by `factor`; "llama3"
    scales only the low frequencies, blending between `low_freq_factor` and
    `high_freq_factor` wavelengths of the original context."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """float64 [head_dim // 2] inverse frequencies."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    if scaling.kind == "llama3":
        wavelen = 2 * math.pi / inv
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv / scaling.factor + smooth * inv
        out = torch.where(wavelen > low_wavelen, inv / scaling.factor, blended)
        return torch.where(wavelen < high_wavelen, inv, out)
    raise ValueError(f"unknown rope scaling kind {scaling.kind!r}")


def cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim // 2] for integer positions [T], computed in float64."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_tables(
    positions: torch.Tensor,
    cache_positions: torch.Tensor,
    inv_freq: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [2, T, 1, head_dim] for the absolute (row 0) and the cache (row 1)
    positions [T], angles in float64, such that rotating x [T, heads, head_dim] in the
    rotate-half layout to both is `x * cos + swap_halves(x) * sin` ([2, T, heads, hd])."""
    pos = torch.stack([positions, cache_positions]).to(torch.float64)
    angles = pos[..., None] * inv_freq  # [2, T, hd / 2]
    cos, sin = angles.cos(), angles.sin()
    return (
        torch.cat([cos, cos], dim=-1)[:, :, None, :].to(dtype),
        torch.cat([-sin, sin], dim=-1)[:, :, None, :].to(dtype),
    )
