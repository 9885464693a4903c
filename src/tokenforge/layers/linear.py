"""Linear layers whose weights may be stored in a lower precision than the activations are computed in.

CPUs without bf16/f16 matrix units (AVX2) run torch's bf16 GEMM at a fraction of the f32 rate, so a
low-precision weight is widened to float32 in a reusable scratch buffer before a large matmul; a one-row
matmul is bandwidth-bound, so there the narrow weight is used directly and reads half the bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows from which widening the weight once beats the narrow GEMM (measured on AVX2: bf16 GEMM ~15 GFLOP/s
# flat, f32 GEMM 40-80 GFLOP/s from 8 rows, widening ~18 GB/s).
_WIDEN_FROM_ROWS = 4


class Linear(torch.nn.Module):
    """y = x @ W^T (+ b). W is [out, in] in the storage dtype; x and y are in the compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 scratch: dict | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype
        self.narrow = weight.dtype != compute_dtype
        self._scratch = scratch if scratch is not None else {}

    def _widened(self) -> torch.Tensor:
        buf = self._scratch.get(self.weight.shape)
        if buf is None:
            buf = self._scratch[self.weight.shape] = torch.empty(self.weight.shape, dtype=self.compute_dtype)
        return buf.copy_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.narrow:
            return F.linear(x, self.weight, self.bias)
        if x.shape[0] >= _WIDEN_FROM_ROWS:
            return F.linear(x, self._widened(), self.bias)
        y = F.linear(x.to(self.weight.dtype), self.weight).to(self.compute_dtype)
        return y if self.bias is None else y + self.bias
