"""The gated MLP activation: silu(gate) * up over the fused gate/up projection's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenforge import kernels


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2M] (gate first, then up) -> [T, M]."""
    if kernels.fused_supported(gate_up):
        return kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
