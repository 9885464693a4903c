"""Rotary position embeddings (rotate-half convention) with the default, linear and Llama-3 frequency rules."""

from __future__ import annotations

import math

import torch

from tokenforge.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    # float32 throughout, exactly as the reference computes it, so positions far out agree bit for bit.
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.freq_factors:
        inv = inv / torch.tensor(rope.freq_factors, dtype=torch.float32)
    if rope.kind == "linear":
        return inv / rope.factor
    if rope.kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        mid = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    return inv


class Rotary:
    """Holds cos/sin tables [max_positions, head_dim // 2]; applied to [tokens, heads, head_dim]."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int):
        inv = inverse_frequencies(rope, head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        self.cos = angles.cos()
        self.sin = angles.sin()

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, 1, head_dim // 2] at the given positions."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def rotate_(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Rotate x [tokens, heads, head_dim] (a view may do) in place."""
        cos, sin = self.tables(positions)
        x.copy_(apply_rotary(x, cos, sin))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
