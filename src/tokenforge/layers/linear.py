"""Linear layers computed in float32 from weights prepared once at load time for the CPU.

Two copies serve two regimes. Matmuls of many rows (prefill, batched decode) are compute-bound: they use
a float32 copy reordered into oneDNN's blocked layout (as vLLM's CPU backend and torch's inductor do),
which on this project's AVX2 machines runs 1.2-3x faster than torch's default path at 8 to 1024 rows, the
LM head included; CPUs without bf16/f16 matrix units gain nothing from narrow weights there. Matmuls of
a few rows (small-batch decode) are bandwidth-bound: they stream the checkpoint-precision weight
through the skinny kernel, which reads bf16 directly (half the bytes of float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenforge import kernels

# The batch size oneDNN tunes the packed layout for; measured best overall between 1 and 1024 rows.
_PACK_FOR_ROWS = 64
# Up to this many rows the skinny kernel beats the packed GEMM (measured on the SmolLM2-135M shapes).
_SKINNY_MAX_ROWS = 8


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_FOR_ROWS)
    except (RuntimeError, AttributeError):  # a torch build without the op: plain matmuls still work
        return None


class Linear(torch.nn.Module):
    """y = x @ W^T (+ b) with x, y in float32. `weight_dtype` records the checkpoint's precision."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight_dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.float()
        plain = weight if weight.dtype == torch.bfloat16 else weight.float()
        self.plain = plain.contiguous()
        self.packed = _pack(weight.float())
        self.skinny = kernels.skinny_matmul_supported(self.plain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and x.shape[0] <= _SKINNY_MAX_ROWS:
            y = kernels.skinny_matmul(x, self.plain)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.plain.float(), self.bias)
